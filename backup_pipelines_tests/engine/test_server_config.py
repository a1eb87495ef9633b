"""The pieces of configuration capture that need no server: cutting pg_basebackup's tar
before its end blocks, postgresql.conf parsing, rewriting a restored configuration, and the
reason a restored server gives when it cannot start."""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from backup_pipelines.engine.backup.base import BaseBackupMeta
from backup_pipelines.engine.backup.server_config import (
    CapturedFile,
    ServerConfig,
    TarEndCutter,
    config_tar,
    member_name,
    parse_setting_line,
)
from backup_pipelines.engine.errors import BackupFailedError, IntegrityError
from backup_pipelines.engine.pitr.server import failure_hint, server_failure_reason
from backup_pipelines.engine.pitr.server_config import install_server_config


def _tar(members: dict[str, bytes], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _captured(path: str, data: bytes, setting: str) -> CapturedFile:
    return CapturedFile(
        setting=setting,
        path=path,
        member=member_name(path),
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def test_cutting_the_end_blocks_keeps_every_member_whatever_the_chunking() -> None:
    # Data ending in zero blocks (an all-zero relation page) must not be mistaken for the end.
    members = {
        "PG_VERSION": b"15\n",
        "base/1/1259": b"\x01" * 700 + bytes(8192),
        "empty": b"",
        "global/pg_control": bytes(8192),
    }
    stream = _tar(members)
    captured = ServerConfig(
        "/var/lib/postgresql/15/main",
        files=[
            _captured("/etc/postgresql/15/main/postgresql.conf", b"port = 5433\n", "config_file")
        ],
        contents={member_name("/etc/postgresql/15/main/postgresql.conf"): b"port = 5433\n"},
    )
    rng = random.Random(7)
    for _ in range(20):
        cutter = TarEndCutter()
        out, index = [], 0
        while index < len(stream):
            step = rng.choice([1, 3, 511, 512, 513, 4096, 70000])
            out.append(cutter.feed(stream[index : index + step]))
            index += step
        assert cutter.ended
        joined = b"".join(out) + config_tar(captured, 0)
        with tarfile.open(fileobj=io.BytesIO(joined), mode="r|") as archive:
            read = {m.name: archive.extractfile(m).read() for m in archive}  # type: ignore[union-attr]
        assert read == {**members, **captured.contents}


def test_cutting_refuses_a_stream_it_does_not_understand() -> None:
    damaged = bytearray(_tar({"a": b"x" * 10}))
    damaged[0:1] = b"b"  # the header's checksum no longer matches
    with pytest.raises(BackupFailedError, match="does not understand"):
        TarEndCutter().feed(bytes(damaged))
    with pytest.raises(BackupFailedError, match="after the end"):
        TarEndCutter().feed(_tar({"a": b"x"}) + b"junk")


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("include_dir = 'conf.d'", ("include_dir", "conf.d")),
        ("  Include 'it''s.conf'  # note", ("include", "it's.conf")),
        ("port=5433 # main", ("port", "5433")),
        (
            "data_directory '/var/lib/postgresql/15/main'",
            ("data_directory", "/var/lib/postgresql/15/main"),
        ),
        ("# port = 1", None),
        ("   ", None),
    ],
)
def test_postgresql_conf_lines_parse(line: str, parsed: tuple[str, str] | None) -> None:
    assert parse_setting_line(line) == parsed


def _meta(files: list[CapturedFile]) -> BaseBackupMeta:
    now = datetime.now(UTC)
    return BaseBackupMeta(
        tool_version="t", target="main", database="(cluster)", server="s", server_version="15.8",
        server_version_num=150008, pg_dump_version="15", format="tar", compression="zstd",
        compression_level=3, file_name="base_x.tar.zst", size_bytes=1, dump_bytes=1, sha256="0",
        started_at=now, finished_at=now, duration_seconds=0, start_lsn="0/2000028",
        end_lsn="0/2000100", timeline=1, wal_segment_size=16777216,
        first_wal_segment="000000010000000000000002", last_wal_segment="000000010000000000000002",
        data_directory="/var/lib/postgresql/15/main", server_config=files,
    )  # fmt: skip


def test_a_restored_debian_configuration_points_only_at_the_copy(tmp_path: Path) -> None:
    etc = "/etc/postgresql/15/main"
    conf = (
        "data_directory = '/var/lib/postgresql/15/main'\n"
        f"hba_file = '{etc}/pg_hba.conf'\nident_file = '{etc}/pg_ident.conf'\n"
        "external_pid_file = '/var/run/postgresql/15-main.pid'\n"
        "port = 5432\ninclude_dir = 'conf.d'\ninclude_if_exists = '/var/lib/postgresql/15/main/extra.conf'\n"
        "include_dir = '/etc/postgresql/15/main/empty.d'\n"
    ).encode()
    dropin = b"work_mem = '8MB'\ninclude = 'more.conf'\n"
    more = b"stats_temp_directory = '/var/run/postgresql/15-main.pg_stat_tmp'\n"
    contents = {
        f"{etc}/postgresql.conf": (conf, "config_file"),
        f"{etc}/pg_hba.conf": (b"local all all peer\n", "hba_file"),
        f"{etc}/pg_ident.conf": (b"", "ident_file"),
        f"{etc}/conf.d/a.conf": (dropin, "include"),
        f"{etc}/conf.d/more.conf": (more, "include"),
    }
    files = [_captured(path, data, setting) for path, (data, setting) in contents.items()]
    captured = {member_name(path): data for path, (data, _) in contents.items()}
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    installed = install_server_config(data_dir, _meta(files), captured, copy_name="main pitr copy")
    mirror = data_dir / "restored_server_config" / etc.lstrip("/")
    written = (data_dir / "postgresql.conf").read_text()
    active = [line for line in written.splitlines() if not line.startswith("#")]
    assert not [
        line
        for line in active
        if line.split("#")[0].count("/var/") or line.split("#")[0].count("'/etc")
    ]
    assert f"include_dir = '{mirror}/conf.d'" in written
    assert f"include_if_exists = '{data_dir}/extra.conf'" in written
    assert f"hba_file = '{mirror}/pg_hba.conf'" in written
    assert (mirror / "pg_hba.conf").read_bytes() == b"local all all peer\n"
    # Files reached through include_dir and include are rewritten too.
    assert f"include = '{mirror}/conf.d/more.conf'" in (mirror / "conf.d" / "a.conf").read_text()
    assert (mirror / "conf.d" / "more.conf").read_text().startswith("# (commented out")
    assert installed.settings["hba_file"] == f"'{mirror}/pg_hba.conf'"
    assert installed.settings["unix_socket_directories"] == f"'{data_dir}'"
    assert installed.settings["external_pid_file"] == "''"
    assert installed.warnings == []
    # An include_dir that was empty exists again (the server refuses a missing one).
    assert (mirror / "empty.d").is_dir()

    # A damaged capture is refused, never half-installed silently.
    captured[member_name(f"{etc}/pg_hba.conf")] = b"host all all 0.0.0.0/0 trust\n"
    with pytest.raises(IntegrityError, match="pg_hba.conf is damaged"):
        install_server_config(tmp_path / "other", _meta(files), captured, copy_name="x")
    assert not (tmp_path / "other").exists()


def test_a_backup_without_configuration_still_gives_a_startable_directory(tmp_path: Path) -> None:
    meta = _meta([])
    installed = install_server_config(tmp_path, meta, {}, copy_name="x")
    assert (tmp_path / "postgresql.conf").exists() and (tmp_path / "pg_hba.conf").exists()
    assert len(installed.warnings) == 2


def test_a_server_that_cannot_find_its_configuration_says_so() -> None:
    lines = [
        'postgres: could not access the server configuration file "/x/data/postgresql.conf": '
        "No such file or directory"
    ]
    reason = server_failure_reason(lines, "pg_ctl: could not start server\nExamine the log output.")
    assert reason is not None and "could not access the server configuration file" in reason
    hint = failure_hint(reason)
    assert hint is not None and "configuration" in hint and "WAL" not in hint
