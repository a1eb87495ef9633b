"""Fault matrix: offsite copies configured on a host without AWS credentials.

The README promises that an S3 failure never stops local housekeeping: `prune` must still apply
retention to the local backups, say in one line what is wrong with S3 and what to do, and exit 1
(the operation partly failed). Commands that need S3 fail with the same clear line.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from backup_pipelines.engine.artifacts import list_artifacts
from backup_pipelines_tests.engine.storage_helpers import fake_backup

AWS_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


@pytest.fixture
def no_credentials(s3_endpoint: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A reachable S3 server, but nothing on this host that boto3 could sign requests with."""
    for name in AWS_CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    return s3_endpoint


def test_prune_without_credentials_still_prunes_locally_and_says_why(
    no_credentials: str, make_project, run_cli
) -> None:
    config = make_project(
        {
            "prod": {
                "dsn_env": "UNUSED_DSN",
                "offsite": {"bucket": "company-backups"},
                "retention": {"daily": 2, "weekly": 0, "monthly": 0},
            }
        }
    )
    folder = config.target("prod").backup_dir
    now = datetime.now(UTC)
    made = [fake_backup(folder, "shop", started_at=now - timedelta(days=d)) for d in range(5)]

    result = run_cli("prune", "prod")

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "NoCredentialsError" not in result.stderr
    # (botocore's own INFO lines aside) exactly one line says what went wrong.
    problems = [x for x in result.stderr.splitlines() if " ERROR " in x or " WARNING " in x]
    assert len(problems) == 1, result.stderr
    (line,) = problems
    assert "offsite copies not listed, so not pruned (local retention ran)" in line
    assert "no usable AWS credentials" in line and "AWS_ACCESS_KEY_ID" in line
    # Local housekeeping happened all the same.
    assert {a.path for a in list_artifacts(folder)} == {a.path for a in made[:2]}
    assert "3 backup(s) pruned, 2 kept" in result.stdout


def test_commands_that_need_s3_fail_with_one_clear_reason(
    no_credentials: str, make_project, cli
) -> None:
    config = make_project({"prod": {"dsn_env": "UNUSED_DSN", "offsite": {"bucket": "backups"}}})
    fake_backup(config.target("prod").backup_dir, "shop")
    for args in (
        ("offsite-sync", "prod"),
        ("verify", "s3://backups/prod/shop_20260101_020000.sql.gz"),
    ):
        result = cli(*args)
        assert result.returncode == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        assert "no usable AWS credentials" in result.stderr
        assert "What to do: export AWS_ACCESS_KEY_ID" in result.stderr
