"""Fault matrix, wrong keys and damaged files.

- Wrong passphrase, missing passphrase and missing secret key (real gpg) at ``verify`` and at
  ``restore``: one clear message naming the key the backup needs, nothing touched.
- Tampered and truncated data file, ``.sha256`` and ``.meta`` at ``verify``, ``restore`` and the
  restore drill: refused, the live database untouched, no safety backup taken, no database
  left behind on the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.devtools.sample_data import create_sample_database
from backup_pipelines.engine.artifacts import BackupArtifact
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.drills.logical import run_drill
from backup_pipelines_tests.fault_matrix.support import (
    EXIT_FAILED,
    assert_clear_failure,
    assert_clear_message,
)
from backup_pipelines_tests.helpers import fingerprint
from backup_pipelines_tests.restore_helpers import backup_files, databases

PASS_GOOD = "fault matrix passphrase one"
PASS_OTHER = "fault matrix passphrase two"


@pytest.fixture(scope="module")
def live_db(pg: LocalCluster) -> Iterator[str]:
    """The database every refused restore must leave exactly as it is."""
    name = f"fm_keys_{os.getpid()}"
    create_sample_database(pg.dsn(), name, employees=100, shifts=500)
    yield name
    with contextlib.suppress(Exception):
        pg.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def key_pair() -> Iterator[tuple[Path, Path, str]]:
    """A real gpg key pair: (public key file, secret key file, fingerprint)."""
    root = Path(tempfile.mkdtemp(prefix="fm-keys-"))
    home = root / "home"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}

    def gpg(*args: str) -> bytes:
        return subprocess.run(
            ["gpg", "--batch", "--yes", "--pinentry-mode", "loopback", *args],
            env=env,
            capture_output=True,
            check=True,
        ).stdout

    gpg("--passphrase", "", "--quick-gen-key", "Fault Matrix <fm@example.test>",
        "future-default", "default", "never")  # fmt: skip
    public, secret = root / "fm.pub.asc", root / "fm.sec.asc"
    public.write_bytes(gpg("--armor", "--export", "fm@example.test"))
    secret.write_bytes(gpg("--armor", "--export-secret-keys", "fm@example.test"))
    secret.chmod(0o600)
    fpr = next(
        line.split(":")[9]
        for line in gpg("--with-colons", "--list-keys", "fm@example.test").decode().splitlines()
        if line.startswith("fpr:")
    )
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False)
    yield public, secret, fpr
    shutil.rmtree(root, ignore_errors=True)


class Refusals:
    """Runs verify, restore and drill against one backup and checks nothing was touched."""

    def __init__(self, pg: LocalCluster, live_db: str, config, cli) -> None:  # type: ignore[no-untyped-def]
        self.pg, self.live_db, self.config, self.cli = pg, live_db, config, cli
        self.backup_dir = config.target("prod").backup_dir
        self.live = fingerprint(pg, live_db)
        self.dbs = databases(pg)

    def snapshot(self) -> list[str]:
        return [p.name for p in backup_files(self.backup_dir)]

    def verify(self, backup: Path, *needles: str) -> str:
        return assert_clear_failure(self.cli("verify", str(backup)), EXIT_FAILED, *needles)

    def restore(self, backup: Path, *needles: str) -> str:
        before = self.snapshot()
        result = self.cli("restore", str(backup), "prod", "--confirm", "prod")
        record = assert_clear_failure(result, EXIT_FAILED, *needles)
        self.assert_untouched(before)
        return record

    def drill(self, backup: Path, *needles: str) -> str:
        before = self.snapshot()
        result = run_drill(self.config, "prod", backup=str(backup))
        assert not result.passed
        message = f"{result.failed_step}: {result.reason}"
        assert_clear_message(message, *needles)
        self.assert_untouched(before)
        return message

    def assert_untouched(self, files_before: list[str]) -> None:
        assert fingerprint(self.pg, self.live_db) == self.live
        assert databases(self.pg) == self.dbs  # nothing created and left behind
        assert self.snapshot() == files_before  # no safety backup: refused before that step


@pytest.fixture
def project(pg: LocalCluster, live_db: str, make_project) -> Callable[..., object]:  # type: ignore[no-untyped-def]
    def make(**settings: object):  # type: ignore[no-untyped-def]
        return make_project(
            {"prod": {"dsn_env": "DB_PROD", "restore": {"maintenance_database": "postgres"},
                      **settings}},
            env={"DB_PROD": pg.dsn(live_db)},
        )  # fmt: skip

    return make


# --- keys -------------------------------------------------------------------------------------


def test_wrong_and_missing_passphrase_at_verify_and_restore(
    pg: LocalCluster, live_db: str, project, cli, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FM_PASSPHRASE", PASS_GOOD)
    config = project(encryption={"mode": "passphrase", "passphrase_env": "FM_PASSPHRASE"})
    backup = run_backup(config.target("prod"))
    key_id = backup.meta.encryption["key_id"]
    assert key_id.startswith("passphrase:")
    checks = Refusals(pg, live_db, config, cli)

    monkeypatch.setenv("FM_PASSPHRASE", PASS_OTHER)  # rotated without previous_passphrases
    for record in (
        checks.verify(backup.path, key_id, "previous_passphrases"),
        checks.restore(
            backup.path, "step 'verify'", key_id, f"database '{live_db}' was not changed"
        ),
    ):
        assert PASS_GOOD not in record and PASS_OTHER not in record

    monkeypatch.delenv("FM_PASSPHRASE")  # the key is missing altogether
    checks.verify(backup.path, key_id, "FM_PASSPHRASE")
    checks.restore(backup.path, "step 'verify'", key_id, "FM_PASSPHRASE")

    monkeypatch.setenv("FM_PASSPHRASE", PASS_GOOD)  # the right key: the same backup is fine
    assert cli("verify", str(backup.path)).returncode == 0


def test_missing_secret_key_at_verify_and_restore(
    pg: LocalCluster, live_db: str, project, cli, key_pair
) -> None:  # type: ignore[no-untyped-def]
    public, secret, fpr = key_pair
    config = project(encryption={"mode": "public_key", "public_key_files": [str(public)]})
    backup = run_backup(config.target("prod"))
    checks = Refusals(pg, live_db, config, cli)

    checks.verify(backup.path, fpr, "secret_key_files")
    checks.restore(backup.path, "step 'verify'", fpr, "secret_key_files")

    project(
        encryption={
            "mode": "public_key",
            "public_key_files": [str(public)],
            "secret_key_files": [str(secret)],
        }
    )
    assert cli("verify", str(backup.path)).returncode == 0


# --- damaged files ----------------------------------------------------------------------------


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _tamper_sha256(path: Path) -> None:
    digest, name = path.read_text().split()
    path.write_text(f"{'0' * 64}  {name}\n")
    assert digest != "0" * 64


def _tamper_meta_sha256(path: Path) -> None:
    meta = json.loads(path.read_text())
    meta["sha256"] = "1" * 64
    path.write_text(json.dumps(meta))


def _tamper_meta_counts(path: Path) -> None:
    meta = json.loads(path.read_text())
    meta["row_counts"]["scheduling.shift"] += 1
    path.write_text(json.dumps(meta))


DAMAGE: dict[str, tuple[Callable[[BackupArtifact], Path], Callable[[Path], None], str]] = {
    # case: (which file, how, what every refusal must mention)
    "data-tampered": (lambda a: a.path, _flip_byte, "SHA-256 mismatch"),
    "data-truncated": (lambda a: a.path, _truncate, "SHA-256 mismatch"),
    "sha256-tampered": (lambda a: a.sha256_path, _tamper_sha256, "SHA-256 mismatch"),
    "sha256-truncated": (lambda a: a.sha256_path, _truncate, "does not hold a SHA-256 digest"),
    "meta-tampered": (lambda a: a.meta_path, _tamper_meta_sha256, "SHA-256 mismatch"),
    "meta-truncated": (lambda a: a.meta_path, _truncate, "is not valid JSON"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_backup_is_refused_by_verify_restore_and_drill(
    pg: LocalCluster, live_db: str, project, cli, case: str
) -> None:  # type: ignore[no-untyped-def]
    which, damage, reason = DAMAGE[case]
    config = project()
    backup = run_backup(config.target("prod"))
    checks = Refusals(pg, live_db, config, cli)
    damage(which(backup))

    checks.verify(backup.path, reason)
    checks.restore(backup.path, reason)
    checks.drill(backup.path, reason)


def test_meta_with_edited_row_counts_is_refused_by_restore_and_drill(
    pg: LocalCluster, live_db: str, project, cli
) -> None:  # type: ignore[no-untyped-def]
    """The data file and its checksum are intact, so ``verify`` (checksum and full decode)
    cannot tell; restoring it can, and both restore and drill refuse it at their count check."""
    config = project()
    backup = run_backup(config.target("prod"))
    checks = Refusals(pg, live_db, config, cli)
    _tamper_meta_counts(backup.meta_path)

    assert cli("verify", str(backup.path)).returncode == 0
    # The restore gets as far as its safety backup, which it keeps and names.
    before = checks.snapshot()
    result = cli("restore", str(backup.path), "prod", "--confirm", "prod")
    assert_clear_failure(result, EXIT_FAILED, "step 'check'", "scheduling.shift", "safety backup")
    assert fingerprint(pg, live_db) == checks.live
    assert databases(pg) == checks.dbs
    # The pre-restore safety backup: data, .sha256, .meta, globals and its .sha256.
    assert len(checks.snapshot()) == len(before) + 5
    checks.drill(backup.path, "check", "scheduling.shift")
