"""Real gpg for tests: key pairs made with gpg itself, and a private temp folder for the
engine's GNUPGHOMEs. The fixtures are shared through ``engine/conftest.py``."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

KEY_PASS = "secret key protection passphrase"


def gpg(home: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["gpg", "--batch", "--yes", "--pinentry-mode", "loopback", *args],
        env={**os.environ, "GNUPGHOME": str(home)},
        input=stdin,
        capture_output=True,
        check=True,
    )


@pytest.fixture(scope="session")
def gpg_keys() -> dict[str, Path]:
    """Two key pairs made with the real gpg; armored public and secret key files."""
    root = Path(tempfile.mkdtemp(prefix="bp-keys-"))
    home = root / "home"
    home.mkdir(mode=0o700)
    files: dict[str, Path] = {}
    for name in ("one", "two"):
        gpg(
            home,
            "--passphrase",
            "",
            "--quick-gen-key",
            f"Backup {name} <{name}@example.test>",
            "future-default",
            "default",
            "never",
        )
        files[f"{name}_pub"] = root / f"{name}.pub.asc"
        files[f"{name}_sec"] = root / f"{name}.sec.asc"
        files[f"{name}_pub"].write_bytes(
            gpg(home, "--armor", "--export", f"{name}@example.test").stdout
        )
        files[f"{name}_sec"].write_bytes(
            gpg(home, "--armor", "--export-secret-keys", f"{name}@example.test").stdout
        )
        files[f"{name}_sec"].chmod(0o600)
    # A key that can only sign: encrypting to it must be refused before any backup starts.
    gpg(
        home,
        "--passphrase",
        "",
        "--quick-gen-key",
        "Sign only <sign@example.test>",
        "ed25519",
        "sign",
        "never",
    )
    files["sign_only_pub"] = root / "sign.pub.asc"
    files["sign_only_pub"].write_bytes(gpg(home, "--armor", "--export", "sign@example.test").stdout)
    # A third key whose secret half is protected by a passphrase (given on stdin, not argv).
    three = ("--passphrase-fd", "0")
    gpg(
        home,
        *three,
        "--quick-gen-key",
        "Backup three <three@example.test>",
        "future-default",
        "default",
        "never",
        stdin=KEY_PASS.encode(),
    )
    files["three_pub"] = root / "three.pub.asc"
    files["three_sec"] = root / "three.sec.asc"
    files["three_pub"].write_bytes(gpg(home, "--armor", "--export", "three@example.test").stdout)
    files["three_sec"].write_bytes(
        gpg(
            home,
            *three,
            "--armor",
            "--export-secret-keys",
            "three@example.test",
            stdin=KEY_PASS.encode(),
        ).stdout
    )
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], env={**os.environ, "GNUPGHOME": str(home)})
    files["root"] = root
    yield files
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def gpg_tmp(monkeypatch) -> Iterator[Path]:
    """A temp folder of this test's own for the engine's GNUPGHOMEs (short: socket paths)."""
    folder = Path(tempfile.mkdtemp(prefix="bpt-"))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
