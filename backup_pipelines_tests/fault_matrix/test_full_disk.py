"""Fault matrix, full disk: ``backup_root`` on a real, small filesystem (tmpfs) filled to the
point where a backup fails before pg_dump writes anything, in the middle of the dump, while
the ``.sha256`` is written and while the ``.meta`` is written.

Every time: exit 1 with one clear message naming the filesystem and its free space, nothing
left that looks like a backup (not even a ``.partial``), the previous backup intact and still
verifying, and the next backup works once there is room again.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.devtools.sample_data import create_sample_database
from backup_pipelines.engine.artifacts import list_artifacts
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.verify import verify_artifact
from backup_pipelines_tests.fault_matrix.support import (
    EXIT_FAILED,
    assert_clear_failure,
    fill,
    tmpfs,
)

PAGE = 4096  # tmpfs accounts file data in pages; folders and empty files cost nothing


def _pages(size: int) -> int:
    return math.ceil(size / PAGE) * PAGE


@pytest.fixture(scope="module")
def source_db(pg: LocalCluster) -> Iterator[str]:
    """One sample database for every fill level (only read by these tests)."""
    name = f"fm_disk_{os.getpid()}"
    create_sample_database(pg.dsn(), name, employees=300, shifts=3000)
    yield name
    with contextlib.suppress(Exception):
        pg.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize(
    ("stage", "room"),
    [
        # Room left on the filesystem, from the sizes of the previous (identical) data file and
        # globals file (written beside the dump, as .partial, and named last with its .sha256).
        # No room at all: the globals and the data file both fail; whichever notices first is
        # reported, so the message names "the ... file" of the backup either way.
        (("the globals file", "the data file"), lambda data, glob: 0),
        ("the data file", lambda data, glob: _pages(glob)),  # before pg_dump wrote anything
        ("the data file", lambda data, glob: _pages(glob) + _pages(data // 2)),  # mid-dump
        ("the .sha256 file", lambda data, glob: _pages(glob) + _pages(data)),  # the dump fits
        ("the .meta file", lambda data, glob: _pages(glob) + _pages(data) + PAGE),
        ("the globals .sha256 file", lambda data, glob: _pages(glob) + _pages(data) + 2 * PAGE),
    ],
    ids=["globals", "before-dump", "mid-dump", "sha256", "meta", "globals-sha256"],
)
def test_full_disk_leaves_nothing_that_looks_complete(
    pg: LocalCluster, source_db: str, make_project, cli, tmp_path: Path, stage, room
) -> None:  # type: ignore[no-untyped-def]
    with tmpfs(tmp_path / "backups", "8m") as root:
        config = make_project(
            # No compression: the file size is the same on every run, so the fill is exact.
            {"prod": {"dsn_env": "DB_PROD", "compression": "none"}},
            env={"DB_PROD": pg.dsn(source_db)},
            backup_root=str(root),
        )
        target = config.target("prod")
        previous = run_backup(target)
        previous_sha = hashlib.sha256(previous.path.read_bytes()).hexdigest()
        before = sorted(p.name for p in target.backup_dir.iterdir())
        assert previous.meta_path.stat().st_size <= PAGE

        assert previous.meta.globals is not None
        filler = fill(root, room(previous.meta.size_bytes, previous.meta.globals.size_bytes))
        result = cli("backup", "prod")
        message = assert_clear_failure(
            result, EXIT_FAILED, f"filesystem {root} (tmpfs)", "free of 8.0 MiB", "prune"
        )
        stages = stage if isinstance(stage, tuple) else (stage,)
        assert any(
            f"disk full while writing {one} of the backup of 'prod'" in message for one in stages
        ), message

        # Nothing new at all: no backup, no sidecar, no .partial.
        assert sorted(p.name for p in target.backup_dir.iterdir()) == before, stage
        assert [a.path for a in list_artifacts(target.backup_dir)] == [previous.path]
        assert hashlib.sha256(previous.path.read_bytes()).hexdigest() == previous_sha
        assert all(o.passed for o in verify_artifact(previous))

        filler.unlink()
        run_backup(target)
        assert len(list_artifacts(target.backup_dir)) == 2
