"""Encrypted backups with the real gpg and a real PostgreSQL: round trips, rotation, refusals."""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import secrets
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.errors import EncryptionError
from backup_pipelines.engine.reader import dump_chunks
from backup_pipelines.engine.verify import verify_artifact
from backup_pipelines_tests.gpg_support import KEY_PASS
from backup_pipelines_tests.gpg_support import gpg as _gpg
from backup_pipelines_tests.helpers import restore_and_compare

log = logging.getLogger("test")

# Random per process: the leak test scans every process's command line for PASS_A, and an
# operator's `gpg --passphrase PASS_A` in another test worker must not count as our leak.
PASS_A = "correct horse battery staple A " + secrets.token_hex(4)
PASS_B = "another passphrase entirely B " + secrets.token_hex(4)


def _plain_gpg_decrypt(
    path: Path, *, passphrase: str | None = None, secret: Path | None = None
) -> bytes:
    """What an operator without our software does: gpg --decrypt in a fresh keyring."""
    with tempfile.TemporaryDirectory(prefix="bp-op-") as home:
        os.chmod(home, 0o700)
        try:
            if secret is not None:
                _gpg(Path(home), "--import", str(secret))
            args = ["--passphrase", passphrase] if passphrase is not None else []
            return _gpg(Path(home), *args, "--decrypt", str(path)).stdout
        finally:
            subprocess.run(
                ["gpgconf", "--kill", "gpg-agent"], env={**os.environ, "GNUPGHOME": home}
            )


def _our_gpg_agents(folder: Path) -> list[str]:
    agents = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "gpg-agent" in argv and str(folder) in argv:
                agents.append(argv)
    return agents


def _gpg_homes(folder: Path) -> list[str]:
    return [p for p in os.listdir(folder) if p.startswith("bp-gpg-")]


def test_passphrase_round_trip_restore_and_plain_gpg(
    pg: LocalCluster, sample_db: str, make_project, tmp_path: Path, gpg_tmp: Path
) -> None:
    config = make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "encryption": {"mode": "passphrase", "passphrase_env": "BP_PASS"},
            }
        },
        env={"DB_PROD": pg.dsn(sample_db), "BP_PASS": PASS_A},
    )
    seen_argv: list[str] = []
    stop = threading.Event()

    def watch_processes() -> None:
        # The passphrase must never appear on a command line (visible to every user in ps).
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    with contextlib.suppress(OSError):
                        seen_argv.append(
                            Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                        )
            time.sleep(0.01)

    watcher = threading.Thread(target=watch_processes, daemon=True)
    watcher.start()
    try:
        artifact = run_backup(config.target("prod"), log=log)
    finally:
        stop.set()
        watcher.join()
    assert any("gpg" in argv for argv in seen_argv)
    assert not any(PASS_A in argv for argv in seen_argv)

    assert artifact.path.name.endswith(".sql.gz.gpg")
    enc = artifact.meta.encryption
    assert enc["mode"] == "passphrase" and enc["cipher"] == "AES256"
    assert enc["key_id"].startswith("passphrase:") and len(enc["fingerprint"]) == 32
    assert PASS_A not in artifact.meta_path.read_text()
    assert all(o.passed for o in verify_artifact(artifact)), verify_artifact(artifact)

    restore_and_compare(pg, sample_db, artifact, tmp_path / "work")
    by_hand = gzip.decompress(_plain_gpg_decrypt(artifact.path, passphrase=PASS_A))
    assert by_hand == b"".join(dump_chunks(artifact))
    assert b"PostgreSQL database dump complete" in by_hand
    assert _gpg_homes(gpg_tmp) == []  # temporary GNUPGHOMEs removed
    assert _our_gpg_agents(gpg_tmp) == []  # and their agents stopped


def test_public_key_round_trip_custom_format(
    pg: LocalCluster, sample_db: str, make_project, tmp_path: Path, gpg_keys
) -> None:
    encryption = {
        "mode": "public_key",
        "public_key_files": [str(gpg_keys["one_pub"])],
        "secret_key_files": [str(gpg_keys["one_sec"])],
    }
    config = make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "format": "custom",
                "compression": "none",
                "encryption": encryption,
            }
        },
        env={"DB_PROD": pg.dsn(sample_db)},
    )
    artifact = run_backup(config.target("prod"), log=log)
    assert artifact.path.name.endswith(".dump.gpg")
    enc = artifact.meta.encryption
    assert enc["mode"] == "public_key" and len(enc["key_id"]) == 40
    assert enc["user_ids"] == ["Backup one <one@example.test>"]
    assert all(o.passed for o in verify_artifact(artifact))
    # pg_restore -j needs a seekable file: the restore path decrypts into a temporary one.
    restore_and_compare(pg, sample_db, artifact, tmp_path / "work")
    archive = _plain_gpg_decrypt(artifact.path, secret=gpg_keys["one_sec"])
    assert archive.startswith(b"PGDMP")


def test_rotation_new_backups_use_new_key_old_ones_stay_restorable(
    pg: LocalCluster, sample_db: str, make_project, tmp_path: Path, gpg_keys
) -> None:
    env = {"DB_PROD": pg.dsn(sample_db), "PASS_A": PASS_A, "PASS_B": PASS_B}
    config = make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "encryption": {"mode": "passphrase", "passphrase_env": "PASS_A"},
            }
        },
        env=env,
    )
    old = run_backup(config.target("prod"), log=log)
    config = make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "encryption": {
                    "mode": "passphrase",
                    "passphrase_env": "PASS_B",
                    "previous_passphrases": [{"env": "PASS_A"}],
                },
            }
        },
        env=env,
    )
    new = run_backup(config.target("prod"), log=log)
    assert old.meta.encryption["key_id"] != new.meta.encryption["key_id"]
    _plain_gpg_decrypt(new.path, passphrase=PASS_B)
    with pytest.raises(subprocess.CalledProcessError):
        _plain_gpg_decrypt(new.path, passphrase=PASS_A)
    for artifact in (old, new):
        assert all(o.passed for o in verify_artifact(artifact))
    restore_and_compare(pg, sample_db, old, tmp_path / "work")

    # Public keys rotate the same way: key one, then key two; both secret keys restore.
    # Switching from a passphrase to public keys keeps the passphrases for older backups.
    pk = {
        "mode": "public_key",
        "secret_key_files": [str(gpg_keys["one_sec"]), str(gpg_keys["two_sec"])],
        "previous_passphrases": [{"env": "PASS_A"}, {"env": "PASS_B"}],
    }
    config = make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "encryption": {**pk, "public_key_files": [str(gpg_keys["one_pub"])]},
            }
        },
        env=env,
    )
    first = run_backup(config.target("prod"), log=log)
    config = make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "encryption": {**pk, "public_key_files": [str(gpg_keys["two_pub"])]},
            }
        },
        env=env,
    )
    second = run_backup(config.target("prod"), log=log)
    assert first.meta.encryption["key_id"] != second.meta.encryption["key_id"]
    for artifact in (first, second, old, new):
        assert all(o.passed for o in verify_artifact(artifact)), artifact.path
    _plain_gpg_decrypt(second.path, secret=gpg_keys["two_sec"])
    with pytest.raises(subprocess.CalledProcessError):
        _plain_gpg_decrypt(second.path, secret=gpg_keys["one_sec"])

    # Drop the old secret key: the old backup now fails with a message naming its key.
    make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "encryption": {
                    "mode": "public_key",
                    "public_key_files": [str(gpg_keys["two_pub"])],
                    "secret_key_files": [str(gpg_keys["two_sec"])],
                },
            }
        },
        env=env,
    )
    with pytest.raises(EncryptionError, match=first.meta.encryption["key_id"]):
        b"".join(dump_chunks(first))


def test_wrong_passphrase_names_the_key(pg: LocalCluster, sample_db: str, make_project) -> None:
    env = {"DB_PROD": pg.dsn(sample_db), "BP_PASS": PASS_A}
    config = make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "encryption": {"mode": "passphrase", "passphrase_env": "BP_PASS"},
            }
        },
        env=env,
    )
    artifact = run_backup(config.target("prod"), log=log)
    make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "encryption": {"mode": "passphrase", "passphrase_env": "BP_PASS"},
            }
        },
        env={**env, "BP_PASS": "not the right one"},
    )
    with pytest.raises(EncryptionError) as caught:
        b"".join(dump_chunks(artifact))
    message = str(caught.value)
    assert artifact.meta.encryption["key_id"] in message
    assert "not the right one" not in message and PASS_A not in message
    outcomes = verify_artifact(artifact)
    assert not outcomes[-1].passed and artifact.meta.encryption["key_id"] in outcomes[-1].message


@pytest.mark.parametrize(
    "encryption",
    [
        {"mode": "passphrase", "passphrase_env": "BP_UNSET_PASSPHRASE"},
        {"mode": "passphrase", "passphrase_file": "/nonexistent/backup.pass"},
        {"mode": "public_key", "public_key_files": ["/nonexistent/key.asc"]},
    ],
)
def test_configured_but_missing_key_refuses_to_write(
    pg: LocalCluster, sample_db: str, make_project, encryption: dict, monkeypatch
) -> None:
    monkeypatch.delenv("BP_UNSET_PASSPHRASE", raising=False)
    config = make_project(
        {"prod": {"dsn_env": "DB_PROD", "encryption": encryption}},
        env={"DB_PROD": pg.dsn(sample_db)},
    )
    target = config.target("prod")
    with pytest.raises(EncryptionError, match="does not exist|not set|cannot be read"):
        run_backup(target, log=log)
    assert not target.backup_dir.exists() or not any(target.backup_dir.iterdir())


def test_passphrase_file_must_be_private(
    pg: LocalCluster, sample_db: str, make_project, tmp_path: Path
) -> None:
    secret = tmp_path / "pass"
    secret.write_text(PASS_A + "\n")
    secret.chmod(0o644)
    config = make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "encryption": {"mode": "passphrase", "passphrase_file": str(secret)},
            }
        },
        env={"DB_PROD": pg.dsn(sample_db)},
    )
    with pytest.raises(EncryptionError, match="chmod 600"):
        run_backup(config.target("prod"), log=log)
    secret.chmod(0o600)
    artifact = run_backup(config.target("prod"), log=log)
    assert artifact.meta.encryption["passphrase_source"] == f"file {secret}"
    assert b"-- PostgreSQL database dump complete" in gzip.decompress(
        _plain_gpg_decrypt(artifact.path, passphrase=PASS_A)
    )


@pytest.mark.slow
def test_encryption_and_decryption_stream_with_flat_memory(monkeypatch, tmp_path: Path) -> None:
    import hashlib
    import tracemalloc

    from backup_pipelines.engine.compression import read_chunks
    from backup_pipelines.engine.config import EncryptionSettings
    from backup_pipelines.engine.encryption import (
        GpgEncryptStage,
        decrypt_chunks,
        prepare_encryption,
    )

    monkeypatch.setenv("BP_STREAM_PASS", PASS_A)
    settings = EncryptionSettings(mode="passphrase", passphrase_env="BP_STREAM_PASS")
    plan = prepare_encryption(settings)
    block = os.urandom(1 << 20)
    sent = hashlib.sha256()
    out = tmp_path / "stream.gpg"
    tracemalloc.start()
    try:
        with out.open("wb") as handle:
            stage = GpgEncryptStage(plan, handle.write)
            for _ in range(48):
                stage.write(block)
                sent.update(block)
            stage.finish()
        _, encrypt_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()

        def stored():
            with out.open("rb") as handle:
                yield from read_chunks(handle)

        received = hashlib.sha256()
        for chunk in decrypt_chunks(
            plan.meta, stored(), name="stream", target="x", candidates=[settings]
        ):
            received.update(chunk)
        _, decrypt_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received.hexdigest() == sent.hexdigest()
    # 48 MiB went through each way; our side never held more than a few 1 MiB chunks.
    assert encrypt_peak < 8 << 20, encrypt_peak
    assert decrypt_peak < 8 << 20, decrypt_peak


@pytest.mark.slow
def test_public_key_with_a_passphrase_protected_secret_key(
    gpg_keys, monkeypatch, tmp_path: Path
) -> None:
    from backup_pipelines.engine.config import EncryptionSettings
    from backup_pipelines.engine.encryption import (
        GpgEncryptStage,
        decrypt_chunks,
        prepare_encryption,
    )

    settings = EncryptionSettings(
        mode="public_key",
        public_key_files=[gpg_keys["three_pub"]],
        secret_key_files=[gpg_keys["three_sec"]],
        secret_key_passphrase_env="BP_KEY_PASS",
    )
    plan = prepare_encryption(settings)
    out = tmp_path / "x.gpg"
    with out.open("wb") as handle:
        stage = GpgEncryptStage(plan, handle.write)
        stage.write(b"payload " * 1000)
        stage.finish()
    monkeypatch.setenv("BP_KEY_PASS", KEY_PASS)
    plain = b"".join(
        decrypt_chunks(plan.meta, [out.read_bytes()], name="x", target="t", candidates=[settings])
    )
    assert plain == b"payload " * 1000
    monkeypatch.setenv("BP_KEY_PASS", "wrong")
    with pytest.raises(EncryptionError, match=plan.meta["key_id"]):
        b"".join(
            decrypt_chunks(
                plan.meta, [out.read_bytes()], name="x", target="t", candidates=[settings]
            )
        )


@pytest.mark.slow
def test_a_key_that_cannot_encrypt_is_refused_before_the_backup(gpg_keys) -> None:
    from backup_pipelines.engine.config import EncryptionSettings
    from backup_pipelines.engine.encryption import encryption_stage_factory

    settings = EncryptionSettings(mode="public_key", public_key_files=[gpg_keys["sign_only_pub"]])
    with pytest.raises(EncryptionError, match="no usable encryption subkey"):
        encryption_stage_factory(settings)


def test_failed_encrypted_backup_leaves_no_file_and_no_gpg_home(
    pg: LocalCluster, sample_db: str, make_project, gpg_tmp: Path
) -> None:
    """pg_dump fails (no SELECT privilege) while gpg is running: everything is cleaned up."""
    from backup_pipelines.engine.errors import BackupFailedError

    role = f"nogpg_{sample_db[-6:]}"
    pg.psql(f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN PASSWORD 'limited-pw'")
    pg.psql(f'GRANT CONNECT ON DATABASE "{sample_db}" TO {role}')
    config = make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "encryption": {"mode": "passphrase", "passphrase_env": "BP_PASS"},
            }
        },
        env={"DB_PROD": pg.dsn(sample_db, user=role, password="limited-pw"), "BP_PASS": PASS_A},
    )
    try:
        with pytest.raises(BackupFailedError, match="permission denied"):
            run_backup(config.target("prod"), log=log)
        backup_dir = config.target("prod").backup_dir
        assert [p.name for p in backup_dir.iterdir() if p.name != ".lock"] == []
        assert _gpg_homes(gpg_tmp) == [] and _our_gpg_agents(gpg_tmp) == []
    finally:
        pg.psql(f'REVOKE ALL ON DATABASE "{sample_db}" FROM {role}; DROP ROLE {role}')
