"""Which PostgreSQL programs serve which server: the server's own major version first; for
client tools that may be newer, the lowest newer one; programs that must match exactly
(postgres, pg_ctl, pg_waldump, pg_verifybackup, ...) only the server's own, else a clear error
naming the Debian package to install."""

from __future__ import annotations

from pathlib import Path

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.errors import ToolError
from backup_pipelines.engine.pitr.server import server_bin_dir
from backup_pipelines.engine.postgres import (
    EXACT_VERSION_TOOLS,
    find_tools,
    installed_bin_dirs,
)

CLIENT = ("pg_dump", "pg_restore", "psql", "pg_basebackup", "pg_verifybackup")
SERVER = ("postgres", "pg_ctl", "pg_controldata", "pg_waldump", "initdb")


def _tree(root: Path) -> list[tuple[int, Path]]:
    """13 and 17 fully installed, 15 with only its client package, 16 as a PGDG RPM."""
    layout = {
        "usr/lib/postgresql/13/bin": CLIENT + SERVER,
        "usr/lib/postgresql/15/bin": CLIENT,
        "usr/lib/postgresql/17/bin": CLIENT + SERVER,
        "usr/pgsql-16/bin": CLIENT + SERVER,
        "usr/lib/postgresql/notaversion/bin": CLIENT,
    }
    for folder, tools in layout.items():
        (root / folder).mkdir(parents=True)
        for tool in tools:
            (root / folder / tool).write_text("#!/bin/sh\n")
    return installed_bin_dirs((f"{root}/usr/lib/postgresql/*/bin", f"{root}/usr/pgsql-*/bin"))


def test_the_servers_own_version_is_preferred_and_exact_tools_never_substituted(
    tmp_path: Path,
) -> None:
    installed = _tree(tmp_path)
    assert [version for version, _ in installed] == [13, 15, 16, 17]
    debian = tmp_path / "usr/lib/postgresql"

    # The server's own version, even with a newer one installed (pg_dump 17 output would not
    # restore on 15: SET transaction_timeout).
    tools = find_tools(15, installed=installed)
    assert tools.path("pg_dump") == str(debian / "15/bin/pg_dump")
    assert tools.path("pg_basebackup") == str(debian / "15/bin/pg_basebackup")
    assert tools.path("pg_verifybackup") == str(debian / "15/bin/pg_verifybackup")
    # ... and its server programs are missing: refused, naming the package, never 17's.
    with pytest.raises(ToolError) as caught:
        tools.path("pg_ctl")
    assert "pg_ctl of PostgreSQL 15 is not installed" in caught.value.message
    assert "apt-get install postgresql-15" in (caught.value.hint or "")

    # No own version: the lowest newer one for client tools, nothing for exact ones.
    tools = find_tools(14, installed=installed)
    assert tools.path("pg_dump") == str(debian / "15/bin/pg_dump")
    for tool in ("pg_waldump", "postgres", "initdb", "pg_verifybackup"):
        assert tool in EXACT_VERSION_TOOLS
        with pytest.raises(ToolError, match=f"{tool} of PostgreSQL 14 is not installed") as caught:
            tools.path(tool)
        package = "postgresql-client-14" if tool == "pg_verifybackup" else "postgresql-14"
        assert f"apt-get install {package}" in (caught.value.hint or "")

    assert find_tools(16, installed=installed).path("pg_waldump") == str(
        tmp_path / "usr/pgsql-16/bin/pg_waldump"
    )
    assert find_tools(17, installed=installed).path("pg_ctl") == str(debian / "17/bin/pg_ctl")
    assert find_tools(13, installed=installed).path("pg_dump") == str(debian / "13/bin/pg_dump")
    # A server newer than everything installed.
    with pytest.raises(ToolError) as caught:
        find_tools(18, installed=installed)
    assert "older than the server (PostgreSQL 18)" in caught.value.message
    assert "postgresql-client-18" in (caught.value.hint or "")
    # No server version (reading a dump file): the newest.
    assert find_tools(None, installed=installed).path("pg_restore") == str(
        debian / "17/bin/pg_restore"
    )


def test_a_real_server_gets_the_programs_of_its_own_version(pg: LocalCluster) -> None:
    major = int(pg.psql("SHOW server_version_num")) // 10000
    tools = find_tools(major)
    for tool in ("pg_dump", "pg_basebackup", "pg_ctl", "pg_waldump", "pg_verifybackup"):
        assert Path(tools.path(tool)).parent == server_bin_dir(major, None)
    assert tools.major_version("pg_dump") == major
    assert tools.major_version("pg_ctl") == major
    missing = next(
        v for v in range(major - 1, 9, -1) if not Path(f"/usr/lib/postgresql/{v}").exists()
    )
    with pytest.raises(ToolError) as caught:
        server_bin_dir(missing, None)
    assert f"postgresql-{missing}" in (caught.value.hint or "")
