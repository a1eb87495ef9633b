"""Encrypted backups, offsite copies and retention from the shell, as an operator runs them."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta

import pytest
from botocore.exceptions import ClientError

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.storage import default_s3_client
from backup_pipelines_tests.engine.storage_helpers import fake_backup

PASSPHRASE = "cli passphrase " + secrets.token_hex(6)


def test_encrypted_backup_offsite_verify_from_s3_list_and_prune(
    pg: LocalCluster, sample_db: str, make_project, run_cli, aws_env: str
) -> None:
    bucket = f"bp-cli-{secrets.token_hex(4)}"
    default_s3_client().create_bucket(Bucket=bucket)
    config = make_project(
        {
            "production": {
                "dsn_env": "DATABASE_URL_PRODUCTION",
                "encryption": {"mode": "passphrase", "passphrase_env": "BACKUP_PASSPHRASE"},
                "offsite": {"bucket": bucket, "prefix": "pg"},
                "retention": {"daily": 2, "weekly": 0, "monthly": 0},
            }
        },
        env={"DATABASE_URL_PRODUCTION": pg.dsn(sample_db), "BACKUP_PASSPHRASE": PASSPHRASE},
    )
    target = config.target("production")
    outputs = []

    backup = run_cli("backup", "production")
    outputs.append(backup)
    assert backup.returncode == 0, backup.stderr
    [data] = target.backup_dir.glob("*.sql.gz.gpg")
    # Two older backups (not encrypted: taken before encryption was configured).
    old = [
        fake_backup(
            target.backup_dir,
            sample_db,
            started_at=datetime.now(UTC) - timedelta(days=d),
            target="production",
        )
        for d in (3, 4)
    ]

    sync = run_cli("offsite-sync", "production")
    outputs.append(sync)
    assert sync.returncode == 0, sync.stderr
    assert sync.stdout.count(": uploaded") == 3

    url = f"s3://{bucket}/pg/production/{data.name}"
    verify = run_cli("verify", url)
    outputs.append(verify)
    assert verify.returncode == 0, verify.stderr + verify.stdout
    meta = json.loads(data.with_name(data.name + ".meta").read_text())
    key_id = meta["encryption"]["key_id"]
    assert f"encryption passphrase (key {key_id})" in verify.stdout
    assert verify.stdout.strip().endswith("OK")

    listing = run_cli("list", "production")
    outputs.append(listing)
    assert key_id in listing.stdout

    dry = run_cli("prune", "production", "--dry-run")
    outputs.append(dry)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("would prune") == 1
    assert all(a.path.exists() for a in old)

    # daily: 2 keeps the last two days that have a backup (today and 3 days ago): the 4-day
    # old one goes, locally and offsite.
    prune = run_cli("prune", "production")
    outputs.append(prune)
    assert prune.returncode == 0, prune.stderr
    assert "1 backup(s) pruned, 2 kept" in prune.stdout
    assert old[0].path.exists()
    assert not (old[1].path.exists() or old[1].meta_path.exists())
    names = {o["Key"] for o in default_s3_client().list_objects_v2(Bucket=bucket)["Contents"]}
    globals_name = meta["globals"]["file_name"]  # the real backup carries the server's globals
    assert names == {
        f"pg/production/{name}{s}"
        for name in (data.name, old[0].path.name)
        for s in ("", ".sha256", ".meta")
    } | {f"pg/production/{globals_name}{s}" for s in ("", ".sha256")}

    # Wrong passphrase: a clear error naming the key, exit 1, the passphrase never printed.
    wrong = run_cli("verify", url, env={"BACKUP_PASSPHRASE": "wrong " + PASSPHRASE})
    outputs.append(wrong)
    assert wrong.returncode == 1
    assert key_id in wrong.stdout + wrong.stderr

    for result in outputs:
        assert PASSPHRASE not in result.stdout + result.stderr


def test_s3_lifecycle_prints_and_applies(make_project, run_cli, aws_env: str) -> None:
    bucket = f"bp-cli-{secrets.token_hex(4)}"
    default_s3_client().create_bucket(Bucket=bucket)
    make_project(
        {
            "production": {
                "dsn_env": "DATABASE_URL_PRODUCTION",
                "offsite": {"bucket": bucket, "lifecycle": {"glacier_after_days": 45}},
            }
        }
    )
    printed = run_cli("s3-lifecycle", "production")
    assert printed.returncode == 0, printed.stderr
    document = json.loads(printed.stdout.split("\n# ")[0])
    archive, expire = document["Rules"]
    assert archive["Transitions"][0] == {"Days": 45, "StorageClass": "GLACIER"}
    assert expire["Expiration"] == {"Days": 365}
    with pytest.raises(
        ClientError, match="NoSuchLifecycleConfiguration"
    ):  # printing changes nothing
        default_s3_client().get_bucket_lifecycle_configuration(Bucket=bucket)

    applied = run_cli("s3-lifecycle", "production", "--apply")
    assert applied.returncode == 0, applied.stderr
    rules = default_s3_client().get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert {r["ID"] for r in rules} == {archive["ID"], expire["ID"]}


def test_check_config_reports_an_unloadable_key(make_project, cli, monkeypatch) -> None:
    monkeypatch.delenv("MISSING_PASSPHRASE", raising=False)
    make_project(
        {
            "production": {
                "dsn_env": "DATABASE_URL_PRODUCTION",
                "encryption": {"mode": "passphrase", "passphrase_env": "MISSING_PASSPHRASE"},
            }
        },
        env={"DATABASE_URL_PRODUCTION": "postgresql://u@127.0.0.1:1/db"},
    )
    result = cli("check-config")
    assert result.returncode == 2
    assert "MISSING_PASSPHRASE is not set" in result.stdout
    backup = cli("backup", "production")
    # The same problem gives the same status everywhere: a key that cannot be loaded is bad
    # configuration (2), whether check-config or a backup finds it.
    assert backup.returncode == 2
    assert "refusing to write an unencrypted backup" in backup.stderr
