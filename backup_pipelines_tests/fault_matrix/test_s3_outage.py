"""Fault matrix, S3 down mid-upload: a real ``backup-pipelines offsite-sync`` streams a real
backup to moto's S3 server in multipart parts, and the server is killed (SIGKILL) while the
upload is in flight.

The local backup is kept and still verifies, the command fails with one clear message naming
what is still to upload, and the next run (S3 back) completes the copy, which then passes
``offsite_copy_matches``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import boto3
import pytest
from botocore.config import Config

from backup_pipelines.devtools.local_postgres import LocalCluster, free_port
from backup_pipelines.engine.artifacts import list_artifacts
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.offsite import check_offsite_copy, offsite_storage
from backup_pipelines.engine.verify import verify_artifact
from backup_pipelines_tests.conftest import VENV_BIN
from backup_pipelines_tests.fault_matrix.support import EXIT_FAILED, assert_clear_failure

BUCKET = "fault-matrix-outage"
MiB = 1 << 20


class Moto:
    """A moto S3 server of this test's own, which it may kill and start again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)
        self.client().create_bucket(Bucket=BUCKET)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def client(self):  # type: ignore[no-untyped-def]
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )


@pytest.fixture
def moto(aws_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Moto]:
    server = Moto()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.url)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def payload_db(pg: LocalCluster) -> Iterator[str]:
    """About 20 MiB of dump: three 8 MiB parts, so the upload is multipart and takes a while."""
    name = f"fm_s3_{os.getpid()}"
    pg.psql(f'DROP DATABASE IF EXISTS "{name}"')
    pg.psql(f'CREATE DATABASE "{name}"')
    pg.psql(
        "CREATE TABLE payload AS SELECT g AS id, repeat(md5(g::text), 32) AS data "
        "FROM generate_series(1, 20000) g",
        name,
    )
    yield name
    pg.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_s3_killed_mid_multipart_upload_keeps_local_and_next_run_completes(
    pg: LocalCluster, payload_db: str, moto: Moto, make_project, cli
) -> None:  # type: ignore[no-untyped-def]
    config = make_project(
        {
            "prod": {
                "dsn_env": "DB_PROD",
                "compression": "none",
                "offsite": {"bucket": BUCKET, "prefix": "pg"},
            }
        },
        env={"DB_PROD": pg.dsn(payload_db)},
    )
    target = config.target("prod")
    backup = run_backup(target)
    assert backup.meta.size_bytes > 2 * 8 * MiB

    watcher = moto.client()
    proc = subprocess.Popen(
        [str(VENV_BIN / "backup-pipelines"), "offsite-sync", "prod"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while True:  # until the first part has arrived
        uploads = watcher.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
        if uploads:
            parts = watcher.list_parts(
                Bucket=BUCKET, Key=uploads[0]["Key"], UploadId=uploads[0]["UploadId"]
            ).get("Parts", [])
            if parts:
                break
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the multipart upload never started"
        time.sleep(0.02)
    moto.kill()  # S3 goes away in the middle of the upload
    stdout, stderr = proc.communicate(timeout=180)
    failed = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_clear_failure(
        failed,
        EXIT_FAILED,
        "S3 unreachable",
        "local backups are kept",
        backup.path.name,
        "the next run uploads what is missing",
    )
    assert "testing-secret" not in stdout + stderr

    # The local backup is untouched and complete.
    assert [a.path for a in list_artifacts(target.backup_dir)] == [backup.path]
    assert all(o.passed for o in verify_artifact(backup))

    # S3 is back (an empty server: nothing of the interrupted upload survived); the next run
    # completes the copy, which matches.
    moto.start()
    again = cli("offsite-sync", "prod")
    assert again.returncode == 0, again.stderr
    assert f"{backup.path.name}: uploaded" in again.stdout
    storage = offsite_storage(target)
    outcome = check_offsite_copy(backup, storage)
    assert outcome.passed, outcome.message
    assert moto.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
