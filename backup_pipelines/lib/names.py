"""Asset, check and resource names: the public names the assets, checks and sensors share."""

import dagster as dg

# Assets under each target (asset key ``<target>/<name>``).
LOGICAL_BACKUP = "logical_backup"
OFFSITE_COPY = "offsite_copy"
BACKUP_INVENTORY = "backup_inventory"
RESTORE_DRILL = "restore_drill"
BASE_BACKUP = "base_backup"
BASE_BACKUP_OFFSITE = "base_backup_offsite"
WAL_ARCHIVE = "wal_archive"
PITR_DRILL = "pitr_drill"

# Checks read by more than one area.
DRILL_PASSED_CHECK = "restore_drill_passed"
RTO_CHECK = "rto_within_target"
BASE_BACKUP_VERIFIED = "base_backup_verified"
WAL_ARCHIVE_HEALTHY = "wal_archive_healthy"
PITR_DRILL_PASSED = "pitr_drill_passed"

# Resource key of the dagster-aws S3Resource used for offsite copies.
OFFSITE_S3 = "offsite_s3"


def target_key(target: str, name: str) -> dg.AssetKey:
    return dg.AssetKey([target, name])
