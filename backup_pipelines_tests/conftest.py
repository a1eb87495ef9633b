"""Shared fixtures: real PostgreSQL clusters, a real S3 server (moto over HTTP), project configs,
the command line (in-process and as a real process), and the test tiers.

Nothing here mocks PostgreSQL or its tools: every test talks to a real server started here.
Session fixtures are per process: under pytest-xdist every worker has its own cluster, its own
S3 server and its own secrets, so workers never see each other's databases or passwords.

Tiers (markers, see pyproject.toml): a test is marked ``postgres`` / ``s3`` / ``slow`` by the
fixtures it uses (``pg``, ``s3_endpoint``, ``run_cli``), and ``daemon`` / ``browser`` / ``slow``
by hand where it starts such things itself. Every other test is marked ``fast``: ``make check``
runs them (``-m fast``), ``make test`` runs everything. Tests that reach a server only through
``request.getfixturevalue`` (say a storage contract parametrized over backends) mark those
parameters themselves (``pytest.param("s3", marks=pytest.mark.s3)``); the cases that need no
server, such as an in-memory storage backend's, are fast without any marker.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from backup_pipelines.devtools.local_postgres import LocalCluster, init_cluster
from backup_pipelines.devtools.s3_server import start_s3_server
from backup_pipelines.devtools.sample_data import create_sample_database
from backup_pipelines.engine.config import CONFIG_ENV_VAR, ProjectConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"

# A password no test would print by accident: leak tests grep for it everywhere (also in every
# process's command line). Random per process, so parallel workers never find each other's.
DB_PASSWORD = "pw-" + secrets.token_hex(8)

# Markers set from the fixtures a test uses (their closure, so indirect use counts too).
FIXTURE_MARKERS = {"pg": "postgres", "s3_endpoint": "s3", "run_cli": "slow"}
# A test with none of these is in the fast tier.
HEAVY_MARKERS = ("postgres", "s3", "daemon", "browser", "slow")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier before ``-m`` selects (tryfirst: before pytest's own hook).

    Then the daemon and browser tests (minutes each) move to the front, so that under
    pytest-xdist they start first on different workers instead of ending the run alone. Only
    those move: every other test keeps its place next to its module's fixtures.
    """
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in fixtures:
                item.add_marker(marker)
        if not any(item.get_closest_marker(marker) for marker in HEAVY_MARKERS):
            item.add_marker("fast")
    items.sort(key=lambda item: 0 if item.get_closest_marker("daemon") else 1)


# What a fast test may not start: each costs seconds (an interpreter, a server, a cluster, a
# second OS user). A test that does is told to carry the marker that says so.
SLOW_PROGRAMS = {
    "backup-pipelines": "slow",
    "chromium": "browser",
    "dagster": "slow",
    "dagster-daemon": "daemon",
    "dagster-webserver": "daemon",
    "faketime": "slow",
    "initdb": "postgres",
    "moto_server": "s3",
    "pg_createcluster": "postgres",
    "pg_ctl": "postgres",
    "pg_ctlcluster": "postgres",
    "postgres": "postgres",
    "runuser": "slow",
    "useradd": "slow",
}
# Dagster's compute-log capture starts this tiny helper (no imports) for every step it runs.
ALLOWED_SCRIPTS = ("watch_orphans.py",)


def _slow_program(argv: list[str]) -> str | None:
    """The slow program a command line starts, if any (``sh -c SCRIPT``: any program in it)."""
    if not argv:
        return None
    programs = [argv[0]]
    if Path(argv[0]).name in ("sh", "bash") and "-c" in argv and "-n" not in argv:  # -n: parse
        script = argv[argv.index("-c") + 1]
        programs += [word for word in script.split() if "/" in word]
    if any(word.endswith(ALLOWED_SCRIPTS) for word in argv):
        return None
    for program in programs:
        name = Path(program.strip("'\"")).name
        if name in SLOW_PROGRAMS or re.fullmatch(r"python[0-9.]*", name):
            return name
    return None


@pytest.fixture(autouse=True)
def _fast_tier_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """Keep the fast tier fast: a test marked ``fast`` fails when it starts a slow program."""
    if request.node.get_closest_marker("fast") is None:
        yield
        return
    started: list[str] = []
    original = subprocess.Popen.__init__

    def watched(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        argv = [args] if isinstance(args, str | bytes | os.PathLike) else list(args)
        if kwargs.get("shell") and argv:
            argv = ["sh", "-c", *argv]
        program = _slow_program([os.fsdecode(a) for a in argv])
        if program is not None:
            started.append(program)
        original(self, args, *rest, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess.Popen, "__init__", watched)
        yield
    if started:
        markers = sorted({SLOW_PROGRAMS.get(p, "slow") for p in started})
        pytest.fail(
            f"this test is in the fast tier but starts {', '.join(sorted(set(started)))}: "
            f"mark it {' and '.join(f'@pytest.mark.{m}' for m in markers)} (make check must "
            "stay under a minute)",
            pytrace=False,
        )


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


@pytest.fixture(scope="session")
def sample_template(pg: LocalCluster) -> str:
    """The ShiftManager sample database, built once per cluster as a template to copy from.

    Copying a template is a file copy (under a second); building the sample data takes seconds.
    No one may connect to it (a session on the template would make CREATE DATABASE fail), and
    autovacuum leaves a database that allows no connections alone.
    """
    name = f"sample_template_{os.getpid()}"
    create_sample_database(pg.dsn(), name, employees=300, shifts=3000)
    pg.psql(f'ALTER DATABASE "{name}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false')
    return name


@pytest.fixture
def sample_db(pg: LocalCluster, sample_template: str) -> Iterator[str]:
    """A fresh ShiftManager sample database (dropped afterwards); yields its name.

    A copy of :func:`sample_template`: the same schema, data, roles' grants and large objects
    as a database built by ``create_sample_database`` (only large objects' OIDs differ, as
    they do between any two builds).
    """
    name = f"shiftmanager_{os.getpid()}_{next(_db_counter)}"
    pg.psql(f'CREATE DATABASE "{name}" TEMPLATE "{sample_template}"')
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


CliRunner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(capfd: pytest.CaptureFixture[str]) -> CliRunner:
    """``backup-pipelines ARGS`` run by its own ``main()`` inside the test process.

    The same argument parsing, engine calls, error handling, messages and exit status as the
    installed command, without a new interpreter per call (about 1.5 s of CPU each). Each call
    sees the environment as a child process would (``env`` added for this call only; what
    ``main()`` changes, e.g. ``$BACKUP_PIPELINES_CONFIG`` for ``--config``, is undone
    afterwards), reads ``input`` as its stdin, and its stdout and stderr (file descriptors too,
    so the output of the tools it starts) are returned as a ``CompletedProcess``. Tests whose
    point is the process itself (killing it, racing it, its command line, a terminal, the
    installed entry point) use :func:`run_cli` instead.
    """

    def run(
        *args: str, input: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        from backup_pipelines.cli import main

        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        capfd.readouterr()
        with pytest.MonkeyPatch.context() as mp:
            # Registered first, so leaving the context restores whatever main() set.
            if CONFIG_ENV_VAR in os.environ:
                mp.setenv(CONFIG_ENV_VAR, os.environ[CONFIG_ENV_VAR])
            else:
                mp.delenv(CONFIG_ENV_VAR, raising=False)
            for key, value in (env or {}).items():
                mp.setenv(key, value)
            mp.setattr(sys, "stdin", io.StringIO(input or ""))
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse: usage errors and --help
                # What the interpreter makes of it: None is 0, a message is printed and 1.
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
                    code = 1
            finally:
                for handler in root.handlers:
                    if handler not in handlers:
                        handler.close()
                root.handlers[:] = handlers
                root.setLevel(level)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(["backup-pipelines", *args], code, out, err)

    return run


@pytest.fixture
def run_cli() -> CliRunner:
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
    proc, url = start_s3_server()
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
