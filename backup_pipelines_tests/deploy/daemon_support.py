"""deploy/dagster.production.yaml on a real PostgreSQL, with the real dagster-daemon (and
webserver) as child processes: what the deploy tests start."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.devtools.webserver import stop_process_group
from backup_pipelines_tests.conftest import DB_PASSWORD, REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
WORKSPACE = DEPLOY / "workspace.yaml"

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail with the log's tail if a
    process it depends on died or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    detail = log.read_text()[-4000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{detail}")


# The one way to stop a child process group (the daemon, the webserver and their code servers).
stop = stop_process_group


@contextmanager
def background(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """``command`` in its own process group, output to ``log``; stopped when the block ends."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        stop(proc)


@dataclass(frozen=True)
class ProductionInstance:
    home: Path
    dagster_db: str

    @property
    def env(self) -> dict[str, str]:
        """The environment for dagster commands: this process's, where the settings are set."""
        return dict(os.environ)


@contextmanager
def production_instance(
    pg: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ProductionInstance]:
    """A DAGSTER_HOME with deploy/dagster.production.yaml, its storage in a fresh database of
    ``pg``; the environment is set in this process too (``dg.DagsterInstance.get()``)."""
    dagster_db = f"dagster_{os.getpid()}"
    pg.psql(f'DROP DATABASE IF EXISTS "{dagster_db}"')
    pg.psql(f'CREATE DATABASE "{dagster_db}"')
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY / "dagster.production.yaml", home / "dagster.yaml")
    settings = {
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": str(pg.port),
        "DAGSTER_PG_DB": dagster_db,
        "DAGSTER_PG_USER": "postgres",
        "DAGSTER_PG_PASSWORD": DB_PASSWORD,
        "DAGSTER_COMPUTE_LOG_DIR": str(tmp_path / "compute_logs"),
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    try:
        yield ProductionInstance(home, dagster_db)
    finally:
        pg.psql(f'DROP DATABASE IF EXISTS "{dagster_db}" WITH (FORCE)', check=False)
