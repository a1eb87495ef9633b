"""The restored copy's own configuration: the files captured with the base backup (Debian keeps
them in ``/etc/postgresql/<ver>/<cluster>/``) written into the new data directory, and every
setting that would make the copy use the original cluster's files, sockets or ports rewritten.

- ``postgresql.conf`` goes to ``<data_dir>/postgresql.conf`` (where ``pg_ctl -D`` reads it);
  every other captured file to ``<data_dir>/restored_server_config/<its original path>``.
- In ``postgresql.conf`` and every file it includes: ``data_directory``, ``external_pid_file``
  and ``stats_temp_directory`` are commented out; ``hba_file``, ``ident_file`` and include
  paths point at the restored copies (relative includes resolved as the server did).
- ``postgresql.auto.conf`` (read last, so it wins) then gets the copy's socket folder, cluster
  name and, from ``engine.pitr.recover``, its port and recovery settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from backup_pipelines.engine.backup.base import BaseBackupMeta
from backup_pipelines.engine.backup.server_config import (
    INCLUDE_DIRECTIVES,
    include_target,
    is_inside,
    parse_setting_line,
)
from backup_pipelines.engine.errors import IntegrityError
from backup_pipelines.engine.fsutil import ensure_private_dir, write_atomic
from backup_pipelines.engine.wal import conf_quote

RESTORED_CONFIG_DIR = "restored_server_config"
# Settings naming a path of the original cluster that the copy must not use: commented out, so
# the copy falls back to its own data directory (the defaults).
_COMMENTED_OUT = ("data_directory", "external_pid_file", "stats_temp_directory")
_MAPPED = ("hba_file", "ident_file")
_MARK = "# (commented out by backup-pipelines pitr-restore: a path of the original cluster) "
# A Unix socket path is at most 107 bytes: the folder plus "/.s.PGSQL.65535".
_MAX_SOCKET_DIR = 90
_FALLBACK_HBA = (
    "# Written by backup-pipelines pitr-restore: the base backup did not hold pg_hba.conf.\n"
    "local all all peer\nhost all all 127.0.0.1/32 scram-sha-256\n"
)


@dataclass
class InstalledConfig:
    """What ``install_server_config`` wrote, for ``postgresql.auto.conf`` and the report."""

    settings: dict[str, str] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def install_server_config(
    data_dir: Path, meta: BaseBackupMeta, captured: dict[str, bytes], *, copy_name: str
) -> InstalledConfig:
    """Write the captured configuration into ``data_dir`` and return the settings the copy's
    ``postgresql.auto.conf`` needs so it never touches the original cluster's paths."""
    installed = InstalledConfig()
    original_data = meta.data_directory
    mirror = data_dir / RESTORED_CONFIG_DIR
    by_setting: dict[str, Path] = {}

    def mapped(original: str) -> Path:
        if original_data and is_inside(original, original_data):
            relative = posixpath.relpath(posixpath.normpath(original), original_data)
            return data_dir if relative == "." else data_dir / relative
        return mirror / original.lstrip("/")

    for entry in meta.server_config:  # all checked before anything is written
        data = captured.get(entry.member)
        if data is None or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise IntegrityError(
                f"{meta.file_name}: the captured configuration file {entry.path} is "
                f"{'missing from the archive' if data is None else 'damaged (SHA-256 mismatch)'}",
                hint="use another base backup (or its offsite copy)",
            )
    for entry in meta.server_config:
        data = captured[entry.member]
        where = (
            data_dir / "postgresql.conf" if entry.setting == "config_file" else mapped(entry.path)
        )
        ensure_private_dir(where.parent, what="restored configuration folder")
        write_atomic(where, data)
        installed.written.append(where)
        by_setting.setdefault(entry.setting, where)

    main_conf = data_dir / "postgresql.conf"
    original_main = next(
        (e.path for e in meta.server_config if e.setting == "config_file"),
        posixpath.join(original_data, "postgresql.conf") if original_data else str(main_conf),
    )
    if not main_conf.exists():
        write_atomic(
            main_conf,
            b"# Written by backup-pipelines pitr-restore: the base backup did not hold the "
            b"server's postgresql.conf; every setting has its default.\n",
        )
        installed.warnings.append(
            "the base backup holds no postgresql.conf (taken before configuration files were "
            "captured, or not readable then): the copy runs with default settings"
        )
    _rewrite(main_conf, original_main, mapped, set())
    if "hba_file" in by_setting:
        installed.settings["hba_file"] = conf_quote(str(by_setting["hba_file"]))
    elif not (data_dir / "pg_hba.conf").exists():
        write_atomic(data_dir / "pg_hba.conf", _FALLBACK_HBA.encode())
        installed.settings["hba_file"] = conf_quote(str(data_dir / "pg_hba.conf"))
        installed.warnings.append(
            "the base backup holds no pg_hba.conf: the copy admits local peer and 127.0.0.1 "
            f"password connections only ({data_dir / 'pg_hba.conf'})"
        )
    if "ident_file" in by_setting:
        installed.settings["ident_file"] = conf_quote(str(by_setting["ident_file"]))
    elif not (data_dir / "pg_ident.conf").exists():
        write_atomic(data_dir / "pg_ident.conf", b"")
        installed.settings["ident_file"] = conf_quote(str(data_dir / "pg_ident.conf"))
    installed.settings["external_pid_file"] = "''"
    installed.settings["cluster_name"] = conf_quote(copy_name)
    if len(str(data_dir)) <= _MAX_SOCKET_DIR:
        installed.settings["unix_socket_directories"] = conf_quote(str(data_dir))
    else:
        # Too long for a socket path; TCP only rather than the original's socket folder.
        installed.settings["unix_socket_directories"] = "''"
    return installed


def _rewrite(path: Path, original: str, mapped: Callable[[str], Path], seen: set[Path]) -> None:
    """Rewrite one restored configuration file in place, then every file it includes."""
    if path in seen or not path.is_file():
        return
    seen.add(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out: list[str] = []
    follow: list[tuple[Path, str]] = []
    for line in lines:
        parsed = parse_setting_line(line)
        if parsed is None:
            out.append(line)
            continue
        name, value = parsed
        if name in _COMMENTED_OUT:
            out.append(_MARK + line)
        elif name in _MAPPED and value:
            target = include_target(original, value)
            out.append(f"{name} = {conf_quote(str(mapped(target)))}  # was {line.strip()}")
        elif name in INCLUDE_DIRECTIVES and value:
            target = include_target(original, value)
            new = mapped(target)
            out.append(f"{name} = {conf_quote(str(new))}  # was {line.strip()}")
            if name == "include_dir":
                # An empty folder (Debian's default conf.d/) has no captured file to bring it
                # back, and the server refuses to start on a missing include_dir.
                ensure_private_dir(new, what="restored include_dir")
                with contextlib.suppress(OSError):
                    for child in sorted(new.iterdir()):
                        if child.name.endswith(".conf") and not child.name.startswith("."):
                            follow.append((child, posixpath.join(target, child.name)))
            else:
                follow.append((new, target))
        else:
            out.append(line)
    write_atomic(path, ("\n".join(out) + "\n").encode("utf-8"))
    for child, child_original in follow:
        _rewrite(child, child_original, mapped, seen)
