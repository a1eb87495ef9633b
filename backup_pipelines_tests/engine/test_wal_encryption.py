"""Archived WAL follows the target's OpenPGP ``encryption`` settings, like its backups: real gpg,
a local folder and moto's S3 server. Compressed then encrypted, so ``gpg --decrypt | zstd -dc``
gives the segment back without this software; ``wal-fetch`` decrypts with the current or a
previous key; a configured but unusable key stops ``wal-push`` before anything is stored."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster, free_port
from backup_pipelines.engine.backup.base import run_base_backup
from backup_pipelines.engine.config import EncryptionSettings, PitrSettings
from backup_pipelines.engine.drills.pitr import pitr_drill
from backup_pipelines.engine.errors import EncryptionKeyError
from backup_pipelines.engine.pitr.health import archive_health
from backup_pipelines.engine.pitr.recover import pitr_restore
from backup_pipelines.engine.pitr.window import parse_target_time, recovery_window
from backup_pipelines.engine.storage import BackupStorage, S3Storage, default_s3_client
from backup_pipelines.engine.wal import (
    WalArchive,
    WalStore,
    local_wal_storage,
    object_stem,
    wal_archive_for,
    wal_fetch,
    wal_push,
)
from backup_pipelines.engine.wal.records import record_from_bytes
from backup_pipelines_tests.fault_matrix.clear_errors import assert_clear_error
from backup_pipelines_tests.pitr_support import PASSWORD, chown_to_server_user, start_pitr_cluster

SEGMENT = "000000010000000000000007"
OTHER = "000000010000000000000008"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PASS_A = "wal passphrase A " + secrets.token_hex(4)
PASS_B = "wal passphrase B " + secrets.token_hex(4)


def _segment(folder: Path, name: str, seed: int, size: int = 2 << 20) -> Path:
    folder.mkdir(exist_ok=True)
    head = bytes([seed]) * 4096 + os.urandom(64 << 10)
    path = folder / name
    path.write_bytes(head + b"\0" * (size - len(head)))
    return path


def _passphrase_file(folder: Path, name: str, passphrase: str) -> Path:
    path = folder / name
    path.write_text(passphrase + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackupStorage]:
    if request.param == "local":
        root = tmp_path / "archive"
        root.mkdir(mode=0o700)
        yield local_wal_storage(root)
    else:
        request.getfixturevalue("aws_env")
        bucket = f"walenc-{secrets.token_hex(4)}"
        default_s3_client().create_bucket(Bucket=bucket)
        yield S3Storage(bucket, "wal/main", server_side_encryption="AES256")


def _archive(
    tmp_path: Path, storage: BackupStorage, encryption: dict[str, Any], codec: str = "zstd"
) -> WalArchive:
    settings = PitrSettings(archive_dir=tmp_path / "unused", wal_compression=codec)  # type: ignore[arg-type]
    return WalArchive(
        "main", settings, [WalStore(storage)], EncryptionSettings.model_validate(encryption)
    )


def _stored_copy(storage: BackupStorage, name: str, folder: Path) -> Path:
    """The archived object as a plain file, as an operator would download or copy it."""
    path = folder / name.rsplit("/", 1)[-1]
    path.write_bytes(b"".join(storage.iter_chunks(name)))
    return path


def _shell_decrypt(stored: Path, passfile: Path | None, secret: Path | None, unpack: str) -> bytes:
    """What an operator without this software runs: gpg --decrypt FILE | zstd -dc."""
    with tempfile.TemporaryDirectory(prefix="bp-op-") as home:
        os.chmod(home, 0o700)
        env = {**os.environ, "GNUPGHOME": home}
        try:
            if secret is not None:
                subprocess.run(
                    ["gpg", "--batch", "--import", str(secret)],
                    env=env,
                    check=True,
                    capture_output=True,
                )
            passphrase = (
                f"--pinentry-mode loopback --passphrase-file {passfile}" if passfile else ""
            )
            result = subprocess.run(
                f"gpg --batch --quiet {passphrase} --decrypt {stored} | {unpack}",
                shell=True,
                env=env,
                capture_output=True,
                check=True,
                executable="/bin/bash",
            )
            return result.stdout
        finally:
            subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False)


@pytest.mark.parametrize("codec,unpack", [("zstd", "zstd -dc"), ("gzip", "gunzip -c")])
def test_passphrase_encrypted_segment_opens_with_plain_gpg_and_wal_fetch(
    storage: BackupStorage, tmp_path: Path, gpg_tmp: Path, codec: str, unpack: str
) -> None:
    passfile = _passphrase_file(tmp_path, "wal.pass", PASS_A)
    archive = _archive(
        tmp_path, storage, {"mode": "passphrase", "passphrase_file": str(passfile)}, codec
    )
    source = _segment(tmp_path / "pg_wal", SEGMENT, 1)
    outcome = wal_push(archive, source)
    assert outcome.stored == [storage.url()]

    names = {i.name for i in storage.list()}
    stored_name = object_stem(SEGMENT) + (".zst" if codec == "zstd" else ".gz")
    assert names == {stored_name, object_stem(SEGMENT) + ".meta"}
    stored = _stored_copy(storage, stored_name, tmp_path)
    raw = stored.read_bytes()
    assert not raw.startswith(ZSTD_MAGIC) and not raw.startswith(b"\x1f\x8b")  # not just packed
    assert source.read_bytes()[:4096] not in raw
    # Compress, then encrypt: the documented shell pipeline gives the segment back.
    assert _shell_decrypt(stored, passfile, None, unpack) == source.read_bytes()

    record_bytes = b"".join(storage.iter_chunks(object_stem(SEGMENT) + ".meta"))
    record = record_from_bytes(record_bytes, "meta")
    assert record.encryption is not None
    assert record.encryption["mode"] == "passphrase"
    assert record.encryption["key_id"].startswith("passphrase:")
    assert PASS_A.encode() not in record_bytes
    if isinstance(storage, S3Storage):
        head = storage.client.head_object(Bucket=storage.bucket, Key=f"wal/main/{stored_name}")
        assert head["Metadata"]["encryption-key-id"] == record.encryption["key_id"]

    destination = tmp_path / "restore" / "RECOVERYXLOG"
    destination.parent.mkdir()
    wal_fetch(archive, SEGMENT, destination)
    assert destination.read_bytes() == source.read_bytes()


def test_public_key_encrypted_segment_needs_only_the_public_key_to_archive(
    storage: BackupStorage, tmp_path: Path, gpg_tmp: Path, gpg_keys: dict[str, Path]
) -> None:
    pushing = _archive(
        tmp_path, storage, {"mode": "public_key", "public_key_files": [str(gpg_keys["one_pub"])]}
    )
    source = _segment(tmp_path / "pg_wal", SEGMENT, 2)
    wal_push(pushing, source)
    stored_name = object_stem(SEGMENT) + ".zst"
    stored = _stored_copy(storage, stored_name, tmp_path)
    assert _shell_decrypt(stored, None, gpg_keys["one_sec"], "zstd -dc") == source.read_bytes()
    record = json.loads(b"".join(storage.iter_chunks(object_stem(SEGMENT) + ".meta")))
    assert record["encryption"]["mode"] == "public_key"
    assert record["encryption"]["recipients"] == [record["encryption"]["fingerprint"]]

    # The archiving host holds no secret key: it cannot read its own archive back.
    destination = tmp_path / "RECOVERYXLOG"
    with pytest.raises(EncryptionKeyError, match="none of the configured secret keys"):
        wal_fetch(pushing, SEGMENT, destination)
    assert not destination.exists()
    restoring = _archive(
        tmp_path,
        storage,
        {
            "mode": "public_key",
            "public_key_files": [str(gpg_keys["one_pub"])],
            "secret_key_files": [str(gpg_keys["one_sec"])],
        },
    )
    wal_fetch(restoring, SEGMENT, destination)
    assert destination.read_bytes() == source.read_bytes()


def test_rotation_old_segments_stay_fetchable_with_the_previous_passphrase(
    storage: BackupStorage, tmp_path: Path, gpg_tmp: Path
) -> None:
    old = _passphrase_file(tmp_path, "old.pass", PASS_A)
    new = _passphrase_file(tmp_path, "new.pass", PASS_B)
    before = _segment(tmp_path / "pg_wal", SEGMENT, 3)
    wal_push(
        _archive(tmp_path, storage, {"mode": "passphrase", "passphrase_file": str(old)}), before
    )

    rotated = _archive(
        tmp_path,
        storage,
        {
            "mode": "passphrase",
            "passphrase_file": str(new),
            "previous_passphrases": [{"file": str(old)}],
        },
    )
    after = _segment(tmp_path / "pg_wal", OTHER, 4)
    wal_push(rotated, after)
    keys = {
        name: record_from_bytes(
            b"".join(storage.iter_chunks(object_stem(name) + ".meta")), name
        ).encryption["key_id"]  # type: ignore[index]
        for name in (SEGMENT, OTHER)
    }
    assert keys[SEGMENT] != keys[OTHER]
    # A retry of the pre-rotation segment after the rotation is "identical": 0, nothing rewritten.
    assert wal_push(rotated, before).already_archived == [storage.url()]

    for name, source in ((SEGMENT, before), (OTHER, after)):
        destination = tmp_path / f"fetched-{name}"
        wal_fetch(rotated, name, destination)
        assert destination.read_bytes() == source.read_bytes()

    # Without the previous passphrase the old segment is refused, naming the key it needs.
    forgot = _archive(tmp_path, storage, {"mode": "passphrase", "passphrase_file": str(new)})
    with pytest.raises(EncryptionKeyError) as caught:
        wal_fetch(forgot, SEGMENT, tmp_path / "never")
    assert keys[SEGMENT] in caught.value.message
    assert "previous_passphrases" in (caught.value.hint or "")
    assert not (tmp_path / "never").exists()


def test_a_missing_key_refuses_to_archive_and_stores_nothing(
    storage: BackupStorage, tmp_path: Path, gpg_tmp: Path, gpg_keys: dict[str, Path]
) -> None:
    source = _segment(tmp_path / "pg_wal", SEGMENT, 5)
    for encryption, phrase in (
        ({"mode": "passphrase", "passphrase_env": "BP_WAL_PASS_UNSET"}, "BP_WAL_PASS_UNSET"),
        ({"mode": "passphrase", "passphrase_file": str(tmp_path / "gone.pass")}, "gone.pass"),
        ({"mode": "public_key", "public_key_files": [str(tmp_path / "gone.asc")]}, "gone.asc"),
        ({"mode": "public_key", "public_key_files": [str(gpg_keys["sign_only_pub"])]}, "encrypt"),
    ):
        with pytest.raises(EncryptionKeyError, match=phrase):
            wal_push(_archive(tmp_path, storage, encryption), source)
        assert storage.list() == []
    if isinstance(storage, type(local_wal_storage(tmp_path))):
        assert list((tmp_path / "archive").rglob("*")) == []  # not even a folder or a .partial


def test_a_damaged_encrypted_copy_falls_back_to_the_other_place(
    tmp_path: Path, gpg_tmp: Path
) -> None:
    passfile = _passphrase_file(tmp_path, "wal.pass", PASS_A)
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir(mode=0o700)
    second.mkdir(mode=0o700)
    stores = [WalStore(local_wal_storage(first)), WalStore(local_wal_storage(second))]
    settings = PitrSettings(archive_dir=first)
    encryption = EncryptionSettings(mode="passphrase", passphrase_file=passfile)
    archive = WalArchive("main", settings, stores, encryption)
    source = _segment(tmp_path / "pg_wal", SEGMENT, 6)
    wal_push(archive, source)
    damaged = first / (object_stem(SEGMENT) + ".zst")
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    destination = tmp_path / "RECOVERYXLOG"
    outcome = wal_fetch(archive, SEGMENT, destination)
    assert outcome.source == str(second)
    assert destination.read_bytes() == source.read_bytes()


@pytest.fixture
def encrypted_project(tmp_path: Path, make_project) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    archive = tmp_path / "archive"
    archive.mkdir(mode=0o700)
    passfile = _passphrase_file(tmp_path, "wal.pass", PASS_A)
    make_project(
        {
            "main": {
                "dsn_env": "UNUSED_DSN",
                "encryption": {"mode": "passphrase", "passphrase_file": str(passfile)},
                "pitr": {"archive_dir": str(archive)},
            }
        }
    )
    return archive, passfile


def test_push_fetch_exit_contract_with_encryption_on(
    encrypted_project: tuple[Path, Path], tmp_path: Path, gpg_tmp: Path, cli
) -> None:  # type: ignore[no-untyped-def]
    archive, passfile = encrypted_project
    source = _segment(tmp_path / "pg_wal", SEGMENT, 7)
    original = source.read_bytes()
    assert cli("wal-push", str(source)).returncode == 0
    stored = archive / (object_stem(SEGMENT) + ".zst")
    first_bytes = stored.read_bytes()
    # identical -> 0, nothing rewritten
    assert cli("wal-push", str(source)).returncode == 0
    assert stored.read_bytes() == first_bytes
    # different content under the same name -> 1, nothing overwritten
    source.write_bytes(original[:-1] + b"\1")
    different = cli("wal-push", str(source))
    assert different.returncode == 1 and "DIFFERENT" in different.stderr
    assert stored.read_bytes() == first_bytes
    # missing -> 1
    missing = cli("wal-fetch", OTHER, str(tmp_path / "x"))
    assert missing.returncode == 1 and "not in the WAL archive" in missing.stderr
    # fetched -> the original bytes
    destination = tmp_path / "RECOVERYXLOG"
    assert cli("wal-fetch", SEGMENT, str(destination)).returncode == 0
    assert destination.read_bytes() == original
    # damaged -> 2, nothing written in its place
    damaged = bytearray(first_bytes)
    damaged[len(damaged) // 2] ^= 0xFF
    stored.write_bytes(bytes(damaged))
    refused = cli("wal-fetch", SEGMENT, str(tmp_path / "damaged"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "every archived copy is damaged" in refused.stderr.splitlines()[-1]
    assert not (tmp_path / "damaged").exists()
    stored.write_bytes(first_bytes)
    # wrong passphrase -> 2, one clear line naming the key the segment needs
    passfile.write_text(PASS_B + "\n")
    wrong = cli("wal-fetch", SEGMENT, str(tmp_path / "wrong"))
    line = assert_clear_error(wrong, 2, "wal-fetch REFUSED", "no configured passphrase matches")
    assert "passphrase:" in line and PASS_B not in wrong.stderr + wrong.stdout
    assert not (tmp_path / "wrong").exists()


def test_wal_push_refuses_in_one_line_and_archives_nothing_without_its_key(
    encrypted_project: tuple[Path, Path], tmp_path: Path, gpg_tmp: Path, cli
) -> None:  # type: ignore[no-untyped-def]
    archive, passfile = encrypted_project
    passfile.unlink()
    source = _segment(tmp_path / "pg_wal", SEGMENT, 8)
    result = cli("wal-push", str(source))
    assert_clear_error(result, 1, "wal-push FAILED", str(passfile))
    assert list(archive.rglob("*")) == []


@pytest.mark.postgres
def test_pitr_through_encrypted_wal_restores_exactly_the_rows_before_the_target(
    monkeypatch: pytest.MonkeyPatch, gpg_tmp: Path
) -> None:
    """The server archives through wal-push with a passphrase it alone can read; pitr-restore,
    wal-status and the drill then recover through wal-fetch decrypting every segment."""
    keys = Path(tempfile.mkdtemp(prefix="bp-walkey-"))
    keys.chmod(0o755)
    passfile = _passphrase_file(keys, "wal.pass", PASS_A)
    chown_to_server_user(passfile)
    setup = start_pitr_cluster(
        monkeypatch,
        target={"encryption": {"mode": "passphrase", "passphrase_file": str(passfile)}},
    )
    restored: LocalCluster | None = None
    try:
        setup.sql("CREATE TABLE orders (id int PRIMARY KEY, note text)")
        run_base_backup(setup.target)
        setup.sql("INSERT INTO orders SELECT g, 'before' FROM generate_series(1, 500) g")
        time.sleep(0.2)
        target_time = parse_target_time(setup.sql("SELECT clock_timestamp()"))
        time.sleep(0.2)
        setup.sql("INSERT INTO orders SELECT g, 'after' FROM generate_series(501, 800) g")
        setup.sql("DELETE FROM orders WHERE id <= 100")
        segment = setup.switch_and_wait()

        assert setup.archive_dir is not None
        record = json.loads((setup.archive_dir / (object_stem(segment) + ".meta")).read_text())
        assert record["encryption"]["mode"] == "passphrase"
        stored = setup.archive_dir / record["stored_name"]
        assert not stored.read_bytes().startswith(ZSTD_MAGIC)
        health = archive_health(setup.target)
        assert health.healthy, health.summary()
        assert recovery_window(setup.target, wal_archive_for(setup.target)).latest is not None

        port = free_port()
        data_dir = setup.workdir / "restored" / "data"
        result = pitr_restore(
            setup.config, setup.target, target_time, data_dir, port=port, start=True
        )
        restored = LocalCluster(root=data_dir.parent, port=port, password=PASSWORD)
        assert result.promoted
        assert restored.psql("SELECT count(*), min(id), max(id) FROM orders") == "500|1|500"
        assert restored.psql("SELECT count(*) FROM orders WHERE note = 'after'") == "0"
        assert "wal-fetch: restored" in (data_dir / "pitr_restore.log").read_text()
        restored.pg_ctl("-m", "immediate", "stop")
        restored = None

        drill = pitr_drill(setup.config, setup.target)
        assert drill.passed, drill.message
    finally:
        if restored is not None:
            restored.pg_ctl("-m", "immediate", "stop")
        setup.close()
        shutil.rmtree(keys, ignore_errors=True)
