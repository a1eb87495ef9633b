"""Shared fixtures: real PostgreSQL clusters, a real S3 server (moto over HTTP), project configs.

Nothing here mocks PostgreSQL or its tools: every test talks to a real server started here.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from backup_pipelines.devtools.local_postgres import LocalCluster, free_port, init_cluster
from backup_pipelines.devtools.sample_data import create_sample_database
from backup_pipelines.engine.config import CONFIG_ENV_VAR, ProjectConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"

# A password no test would print by accident: leak tests grep for it everywhere.
DB_PASSWORD = "pw-" + secrets.token_hex(8)


@pytest.fixture(scope="session")
def pg() -> Iterator[LocalCluster]:
    """A real PostgreSQL cluster with password authentication over TCP."""
    root = Path(tempfile.mkdtemp(prefix="bp-test-pg-"))
    cluster = init_cluster(root, password=DB_PASSWORD)
    try:
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


_db_counter = itertools.count(1)


@pytest.fixture
def sample_db(pg: LocalCluster) -> Iterator[str]:
    """A fresh ShiftManager sample database (dropped afterwards); yields its name."""
    name = f"shiftmanager_{os.getpid()}_{next(_db_counter)}"
    create_sample_database(pg.dsn(), name, employees=300, shifts=3000)
    yield name
    with contextlib.suppress(Exception):
        pg.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


ProjectFactory = Callable[..., ProjectConfig]


@pytest.fixture
def make_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ProjectFactory:
    """Write a targets file and point BACKUP_PIPELINES_CONFIG at it.

    ``make_project({"prod": {"dsn_env": "DB_PROD", ...}}, env={"DB_PROD": url}, **top_level)``
    """

    def factory(
        targets: dict[str, dict[str, Any]], env: dict[str, str] | None = None, **top: Any
    ) -> ProjectConfig:
        document = {"backup_root": str(tmp_path / "backups"), **top, "targets": targets}
        path = tmp_path / "backup_targets.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        monkeypatch.setenv(CONFIG_ENV_VAR, str(path))
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        from backup_pipelines.lib.project import project_config

        project_config.cache_clear()
        return load_config(path)

    yield factory  # type: ignore[misc]
    from backup_pipelines.lib.project import project_config

    project_config.cache_clear()


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the installed ``backup-pipelines`` command as a user would, in a child process."""

    def run(
        *args: str,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "backup-pipelines"), *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )

    return run


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server over real HTTP on 127.0.0.1; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def aws_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Credentials and endpoint for the local S3 server, as a user would export them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    return s3_endpoint


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests save files worth looking at after a run (screenshots, logs)."""
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    return ARTIFACTS_DIR
