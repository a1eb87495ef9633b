"""Start-up: the command line loads only what a command needs (no S3 client, never Dagster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster

# Runs the command in a fresh interpreter, then reports which top-level packages it loaded.
_PROBE = """
import json, sys
from backup_pipelines.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exc:
    status = exc.code
loaded = sorted({name.split(".")[0] for name in sys.modules})
print("\\nPROBE " + json.dumps({"status": status, "loaded": loaded}))
"""

HEAVY_FOR_HELP = {"boto3", "botocore", "dagster", "pydantic", "yaml", "psycopg", "zstandard"}
NEVER_WITHOUT_S3 = {"boto3", "botocore", "dagster"}


def _probe(*args: str, env: dict[str, str] | None = None) -> tuple[int, set[str]]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    line = result.stdout.rsplit("\nPROBE ", 1)[-1]
    report = json.loads(line)
    return int(report["status"] or 0), set(report["loaded"])


@pytest.mark.slow
def test_help_loads_no_heavy_library() -> None:
    status, loaded = _probe("--help")
    assert status == 0
    assert not loaded & HEAVY_FOR_HELP, sorted(loaded & HEAVY_FOR_HELP)


@pytest.mark.slow
def test_a_backup_without_s3_loads_neither_boto3_nor_dagster(
    pg: LocalCluster, sample_db: str, make_project
) -> None:
    config = make_project({"prod": {"dsn_env": "DB_PROD"}}, env={"DB_PROD": pg.dsn(sample_db)})
    status, loaded = _probe(
        "--config", str(config.source_path), "backup", "prod", env={"DB_PROD": pg.dsn(sample_db)}
    )
    assert status == 0
    assert "psycopg" in loaded  # the probe saw a real backup
    assert not loaded & NEVER_WITHOUT_S3, sorted(loaded & NEVER_WITHOUT_S3)
