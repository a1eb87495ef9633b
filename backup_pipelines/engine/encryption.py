"""OpenPGP encryption of backups with the real ``gpg``, streamed, with key rotation.

Backups are standard OpenPGP files: ``gpg --decrypt FILE.gpg`` restores them without this
software. Two modes per target:

- ``passphrase``: symmetric AES-256. The passphrase comes from an environment variable or a 0600
  file and reaches gpg through a pipe (``--passphrase-fd``), never argv. ``.meta`` records a
  *fingerprint* of the passphrase (scrypt with a fixed salt, so it identifies the passphrase
  without revealing it), which is how the right passphrase is found after a rotation.
- ``public_key``: encrypted to the configured public keys; the backup host holds no secret.
  ``.meta`` records the recipients' fingerprints; restores need a matching secret key.

Every gpg call runs with a temporary ``GNUPGHOME`` (0700) that is removed afterwards, and its
agent is stopped. When encryption is configured but its key or passphrase cannot be loaded,
:func:`encryption_stage_factory` raises :class:`EncryptionError` before anything is written:
a backup never silently falls back to plaintext.

Key rotation: point ``passphrase_env`` / ``public_key_files`` at the new key; new backups use
it. List old passphrases under ``previous_passphrases`` and old secret keys under
``secret_key_files``; decryption picks the one whose fingerprint ``.meta`` names.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backup_pipelines.engine.compression import CHUNK_SIZE
from backup_pipelines.engine.config import EncryptionSettings, PassphraseSource
from backup_pipelines.engine.errors import EncryptionError, EncryptionKeyError, IntegrityError
from backup_pipelines.engine.processes import StderrCollector, one_line

CIPHER = "AES256"
# The maximum iteration count, explicit: else gpg starts an agent to calibrate one (slow per WAL).
S2K_OPTIONS = ("--s2k-digest-algo", "SHA512", "--s2k-count", "65011712")
_FINGERPRINT_SALT = b"backup_pipelines passphrase fingerprint v1"


def gpg_binary() -> str:
    path = shutil.which("gpg")
    if path is None:
        raise EncryptionKeyError(
            "gpg is not installed, but this target's backups are encrypted",
            hint="install GnuPG 2 (Debian: apt-get install gnupg)",
        )
    return path


def load_passphrase(source: PassphraseSource) -> bytes:
    """Read a passphrase from its environment variable or 0600 file (first line, no newline)."""
    if source.env:
        value = os.environ.get(source.env, "")
        if not value.strip():
            raise EncryptionKeyError(
                f"encryption passphrase not available: environment variable {source.env} is not set",
                hint=f"export {source.env} (or use passphrase_file); refusing to write an "
                "unencrypted backup",
            )
        return value.rstrip("\r\n").encode("utf-8")
    assert source.file is not None
    path = source.file
    try:
        info = path.stat()
    except OSError as exc:
        raise EncryptionKeyError(
            f"encryption passphrase file {path} cannot be read: {exc.strerror}",
            hint="create it with the passphrase on its first line and chmod 600 it",
        ) from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise EncryptionKeyError(
            f"passphrase file {path} is readable by other users (mode {info.st_mode & 0o777:o})",
            hint=f"chmod 600 {path}",
        )
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise EncryptionKeyError(f"passphrase file {path} cannot be read: {exc.strerror}") from None
    first = text.splitlines()[0] if text.strip() else b""
    if not first:
        raise EncryptionKeyError(f"passphrase file {path} is empty")
    return first


def passphrase_fingerprint(passphrase: bytes) -> str:
    """A stable identifier of a passphrase that does not reveal it (scrypt is slow to guess)."""
    derived = hashlib.scrypt(passphrase, salt=_FINGERPRINT_SALT, n=1 << 14, r=8, p=1, dklen=16)
    return derived.hex()


def passphrase_key_id(fingerprint: str) -> str:
    return f"passphrase:{fingerprint[:16]}"


class GpgHome:
    """A throwaway GNUPGHOME; use as a context manager (removes it and stops its agent)."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="bp-gpg-"))
        self.path.chmod(0o700)
        self.gpg = gpg_binary()

    def __enter__(self) -> GpgHome:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPG_")}
        env["GNUPGHOME"] = str(self.path)
        return env

    def argv(self, *args: str) -> list[str]:
        return [self.gpg, "--batch", "--yes", "--no-tty", "--quiet", *args]

    def run(
        self, *args: str, passphrase: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        read_fd = None
        extra: list[str] = []
        if passphrase is not None:
            read_fd = passphrase_pipe(passphrase)
            extra = ["--pinentry-mode", "loopback", "--passphrase-fd", str(read_fd)]
        try:
            return subprocess.run(
                self.argv(*extra, *args),
                env=self.env(),
                capture_output=True,
                pass_fds=(read_fd,) if read_fd is not None else (),
                timeout=120,
            )
        finally:
            if read_fd is not None:
                os.close(read_fd)

    def import_keys(self, files: Iterable[Path], *, what: str) -> None:
        for path in files:
            if not path.is_file():
                raise EncryptionKeyError(
                    f"{what} {path} does not exist",
                    hint="fix the path under 'encryption:' in the targets file",
                )
            result = self.run("--import", str(path))
            if result.returncode != 0:
                raise EncryptionKeyError(
                    f"{what} {path} cannot be imported by gpg: "
                    f"{result.stderr.decode('utf-8', 'replace').strip()}",
                    hint="export it with `gpg --armor --export KEYID` (public) or "
                    "`gpg --armor --export-secret-keys KEYID` (secret)",
                )

    def key_fingerprints(self, *, secret: bool = False) -> list[tuple[str, list[str], list[str]]]:
        """(primary fingerprint, subkey fingerprints, user ids) of every key in the home."""
        result = self.run("--with-colons", "--list-secret-keys" if secret else "--list-keys")
        keys: list[tuple[str, list[str], list[str]]] = []
        expect_primary = False
        for line in result.stdout.decode("utf-8", "replace").splitlines():
            fields = line.split(":")
            if fields[0] in ("pub", "sec"):
                keys.append(("", [], []))
                expect_primary = True
            elif fields[0] in ("sub", "ssb"):
                expect_primary = False
            elif fields[0] == "fpr" and keys:
                primary, subs, uids = keys[-1]
                if expect_primary:
                    keys[-1] = (fields[9], subs, uids)
                    expect_primary = False
                else:
                    subs.append(fields[9])
            elif fields[0] == "uid" and keys:
                keys[-1][2].append(fields[9])
        return keys

    def unusable_for_encryption(self) -> list[str]:
        """Primary keys gpg will not encrypt to (expired, revoked, or no encryption subkey)."""
        result = self.run("--with-colons", "--list-keys")
        problems = []
        fingerprint_next = False
        pending: str | None = None
        for line in result.stdout.decode("utf-8", "replace").splitlines():
            fields = line.split(":")
            if fields[0] == "pub":
                validity, capabilities = fields[1], fields[11] if len(fields) > 11 else ""
                pending = None
                if validity in ("e", "r"):
                    pending = "expired" if validity == "e" else "revoked"
                elif "E" not in capabilities:
                    pending = "has no usable encryption subkey"
                fingerprint_next = True
            elif fields[0] == "fpr" and fingerprint_next:
                fingerprint_next = False
                if pending:
                    problems.append(f"{fields[9]} {pending}")
        return problems

    def close(self) -> None:
        with contextlib.suppress(Exception):
            subprocess.run(
                ["gpgconf", "--kill", "gpg-agent"],
                env=self.env(),
                capture_output=True,
                timeout=30,
            )
        shutil.rmtree(self.path, ignore_errors=True)


def passphrase_pipe(passphrase: bytes) -> int:
    """A pipe whose read end yields the passphrase: gpg reads it with --passphrase-fd."""
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, passphrase + b"\n")  # far below the pipe buffer: never blocks
    finally:
        os.close(write_fd)
    return read_fd


@dataclass(frozen=True)
class EncryptionPlan:
    """A configured, loadable encryption: what gpg needs, and what ``.meta`` records."""

    mode: str
    meta: dict[str, Any]
    passphrase: bytes | None = field(default=None, repr=False)
    public_key_files: tuple[Path, ...] = ()
    recipients: tuple[str, ...] = ()


def prepare_encryption(settings: EncryptionSettings) -> EncryptionPlan | None:
    """Load the key or passphrase now; None for ``mode: none``. Raises EncryptionError."""
    if settings.mode == "none":
        return None
    if settings.mode == "passphrase":
        source = settings.current_passphrase
        assert source is not None
        passphrase = load_passphrase(source)
        fingerprint = passphrase_fingerprint(passphrase)
        return EncryptionPlan(
            mode="passphrase",
            passphrase=passphrase,
            meta={
                "mode": "passphrase",
                "cipher": CIPHER,
                "key_id": passphrase_key_id(fingerprint),
                "fingerprint": fingerprint,
                "passphrase_source": source.describe(),
            },
        )
    with GpgHome() as home:
        home.import_keys(settings.public_key_files, what="public key file")
        keys = home.key_fingerprints()
        unusable = home.unusable_for_encryption()
    if unusable:
        raise EncryptionKeyError(
            "cannot encrypt to the configured public key(s): " + "; ".join(unusable),
            hint="configure a current key with an encryption subkey (gpg --quick-add-key FPR "
            "cv25519 encr) and export it again; refusing to write an unencrypted backup",
        )
    if not keys:
        raise EncryptionKeyError(
            "the public key files hold no key: "
            + ", ".join(str(p) for p in settings.public_key_files),
            hint="export the recipient's key with `gpg --armor --export KEYID > FILE`",
        )
    recipients = tuple(primary for primary, _subs, _uids in keys)
    return EncryptionPlan(
        mode="public_key",
        public_key_files=tuple(settings.public_key_files),
        recipients=recipients,
        meta={
            "mode": "public_key",
            "cipher": CIPHER,
            "key_id": recipients[0],
            "fingerprint": recipients[0],
            "recipients": list(recipients),
            "subkeys": sorted({s for _p, subs, _u in keys for s in subs}),
            "user_ids": [uid for _p, _s, uids in keys for uid in uids],
        },
    )


class GpgEncryptStage:
    """``write`` plaintext in, encrypted bytes come out into ``sink`` (from a reader thread)."""

    def __init__(self, plan: EncryptionPlan, sink: Callable[[bytes], None]) -> None:
        self.plan = plan
        self.home = GpgHome()
        self._errors: list[BaseException] = []
        read_fd = None
        try:
            args = ["--compress-algo", "none", "--cipher-algo", CIPHER, "--output", "-"]
            if plan.mode == "passphrase":
                assert plan.passphrase is not None
                read_fd = passphrase_pipe(plan.passphrase)
                args = [
                    "--pinentry-mode",
                    "loopback",
                    "--passphrase-fd",
                    str(read_fd),
                    "--no-symkey-cache",
                    *S2K_OPTIONS,
                    *args,
                    "--symmetric",
                ]
            else:
                self.home.import_keys(plan.public_key_files, what="public key file")
                recipients = [a for r in plan.recipients for a in ("--recipient", r)]
                args = ["--trust-model", "always", *args, *recipients, "--encrypt"]
            self.proc = subprocess.Popen(
                self.home.argv(*args),
                env=self.home.env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(read_fd,) if read_fd is not None else (),
            )
        except BaseException:
            self.home.close()
            raise
        finally:
            if read_fd is not None:
                os.close(read_fd)
        assert self.proc.stderr is not None
        self.stderr = StderrCollector(self.proc.stderr)
        self._pump = threading.Thread(target=self._drain, args=(sink,), daemon=True)
        self._pump.start()

    def _drain(self, sink: Callable[[bytes], None]) -> None:
        assert self.proc.stdout is not None
        try:
            while True:
                chunk = self.proc.stdout.read(CHUNK_SIZE)
                if not chunk:
                    return
                sink(chunk)
        except BaseException as exc:  # e.g. disk full: re-raised in the writing thread
            self._errors.append(exc)
            self.proc.kill()

    def _raise_if_failed(self) -> None:
        if self._errors:
            raise self._errors[0]

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._raise_if_failed()
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
        except BrokenPipeError:
            self._pump.join()
            self._raise_if_failed()
            raise EncryptionError(
                f"gpg stopped while encrypting: {one_line(self.stderr.text())}"
            ) from None

    def finish(self) -> None:
        try:
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
            self._pump.join()
            returncode = self.proc.wait()
            self._raise_if_failed()
            if returncode != 0:
                raise EncryptionError(
                    f"gpg failed to encrypt (exit status {returncode}): {one_line(self.stderr.text())}"
                )
        finally:
            self.home.close()

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._pump.join(timeout=10)
        self.home.close()


def encryption_stage_factory(settings: EncryptionSettings) -> Callable[..., Any] | None:
    """The ``stage_factory`` for ``run_backup``; None when the target is not encrypted.

    Loads the key or passphrase *now*, so a missing key stops the backup before it starts.
    """
    plan = prepare_encryption(settings)
    if plan is None:
        return None

    def factory(
        sink: Any,
    ) -> tuple[Callable[[bytes], None], Callable[[], None], dict[str, Any], Callable[[], None]]:
        stage = GpgEncryptStage(plan, sink.write)
        return stage.write, stage.finish, dict(plan.meta), stage.abort

    return factory


# -- decryption ----------------------------------------------------------------------------


def describe_key(encryption: dict[str, Any]) -> str:
    """Which key a backup needs, for messages and `list` / `verify`."""
    mode = encryption.get("mode", "none")
    if mode == "passphrase":
        source = encryption.get("passphrase_source")
        key = encryption.get("key_id") or "unknown passphrase"
        return f"{key} (was {source})" if source else key
    if mode == "public_key":
        uids = encryption.get("user_ids") or []
        recipients = ", ".join(encryption.get("recipients") or [encryption.get("key_id", "?")])
        return f"public key {recipients}" + (f" ({'; '.join(uids)})" if uids else "")
    return mode


def settings_for_decryption(target: str) -> list[EncryptionSettings]:
    """Encryption settings to search for a backup's key: its own target first, then the rest."""
    from backup_pipelines.engine.config import load_config
    from backup_pipelines.engine.errors import ConfigError

    try:
        config = load_config(isolate_targets=True)
    except ConfigError:
        return []
    ordered = [config.targets[target]] if target in config.targets else []
    ordered += [s for name, s in config.targets.items() if name != target]
    return [s.encryption for s in ordered]


def _find_passphrase(
    encryption: dict[str, Any], candidates: list[EncryptionSettings], name: str
) -> bytes:
    wanted = encryption.get("fingerprint")
    sources: list[PassphraseSource] = []
    for settings in candidates:
        if settings.current_passphrase is not None:
            sources.append(settings.current_passphrase)
        sources.extend(settings.previous_passphrases)
    problems: list[str] = []
    tried: list[str] = []
    for source in dict.fromkeys(sources):
        try:
            passphrase = load_passphrase(source)
        except EncryptionError as exc:
            problems.append(exc.message)
            continue
        fingerprint = passphrase_fingerprint(passphrase)
        if wanted is None or fingerprint == wanted:
            return passphrase
        tried.append(f"{source.describe()} is {passphrase_key_id(fingerprint)}")
    detail = "; ".join(tried + problems) or "no passphrase is configured"
    raise EncryptionKeyError(
        f"{name} is encrypted with {describe_key(encryption)}, and no configured passphrase "
        f"matches it ({detail})",
        hint="add the passphrase used when this backup was taken under "
        "encryption.previous_passphrases (env: VAR or file: /path), or decrypt by hand with "
        "`gpg --decrypt FILE`",
    )


def decrypt_chunks(
    encryption: dict[str, Any],
    chunks: Iterable[bytes],
    *,
    name: str,
    target: str,
    candidates: list[EncryptionSettings] | None = None,
) -> Iterator[bytes]:
    """Stream ``chunks`` through ``gpg --decrypt`` with the key ``encryption`` names."""
    mode = encryption.get("mode", "none")
    if mode == "none":
        yield from chunks
        return
    if candidates is None:
        candidates = settings_for_decryption(target)
    passphrase: bytes | None = None
    home = GpgHome()
    try:
        if mode == "passphrase":
            passphrase = _find_passphrase(encryption, candidates, name)
        elif mode == "public_key":
            files = list(dict.fromkeys(p for s in candidates for p in s.secret_key_files))
            key_passphrases = [
                s.secret_key_passphrase_env for s in candidates if s.secret_key_passphrase_env
            ]
            home.import_keys(files, what="secret key file")
            held = {
                f
                for primary, subs, _u in home.key_fingerprints(secret=True)
                for f in (primary, *subs)
            }
            needed = set(encryption.get("recipients") or []) | set(encryption.get("subkeys") or [])
            if needed and not (held & needed):
                raise EncryptionKeyError(
                    f"{name} is encrypted to {describe_key(encryption)}, and none of the "
                    f"configured secret keys ({len(files)} file(s)) is that key",
                    hint="list the secret key that was current when the backup was taken under "
                    "encryption.secret_key_files (exported with `gpg --armor "
                    "--export-secret-keys KEYID`)",
                )
            if key_passphrases:
                value = os.environ.get(key_passphrases[0], "")
                passphrase = value.rstrip("\r\n").encode() if value else None
        else:
            raise EncryptionError(f"{name}: unknown encryption mode {mode!r} in .meta")
        yield from _gpg_decrypt(home, chunks, passphrase, name, encryption)
    finally:
        home.close()


def _gpg_decrypt(
    home: GpgHome,
    chunks: Iterable[bytes],
    passphrase: bytes | None,
    name: str,
    encryption: dict[str, Any],
) -> Iterator[bytes]:
    read_fd = None
    args = ["--decrypt"]
    if passphrase is not None:
        read_fd = passphrase_pipe(passphrase)
        args = [
            "--pinentry-mode",
            "loopback",
            "--passphrase-fd",
            str(read_fd),
            "--no-symkey-cache",
            *args,
        ]
    try:
        proc = subprocess.Popen(
            home.argv(*args),
            env=home.env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(read_fd,) if read_fd is not None else (),
        )
    finally:
        if read_fd is not None:
            os.close(read_fd)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stderr = StderrCollector(proc.stderr)
    feed_errors: list[BaseException] = []

    def feed() -> None:
        assert proc.stdin is not None
        try:
            for chunk in chunks:
                proc.stdin.write(chunk)
        except BrokenPipeError:
            pass  # gpg stopped: its exit status says why
        except BaseException as exc:  # e.g. S3 read failure: re-raised below
            feed_errors.append(exc)
            proc.kill()
        finally:
            with contextlib.suppress(BrokenPipeError, OSError):
                proc.stdin.close()

    feeder = threading.Thread(target=feed, name="gpg-feed", daemon=True)
    feeder.start()
    try:
        while True:
            chunk = proc.stdout.read(CHUNK_SIZE)
            if not chunk:
                break
            yield chunk
        returncode = proc.wait()
        feeder.join()
        if feed_errors:
            raise feed_errors[0]
        if returncode != 0:
            text = one_line(stderr.text())
            if "No secret key" in text or "Bad session key" in text or "decryption failed" in text:
                raise EncryptionKeyError(
                    f"{name} cannot be decrypted with the configured key: it needs "
                    f"{describe_key(encryption)} (gpg: {text})",
                    hint="configure the key or passphrase used when the backup was taken "
                    "(encryption.previous_passphrases / encryption.secret_key_files)",
                )
            raise IntegrityError(
                f"{name} failed to decrypt (gpg exit status {returncode}): {text}",
                hint="the file is damaged or truncated; use another backup or the offsite copy",
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        feeder.join(timeout=10)
        proc.stdout.close()
