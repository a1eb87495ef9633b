"""Where backups are kept (being split into modules; see the next commits)."""

from backup_pipelines.engine.storage.s3 import *  # noqa: F403
from backup_pipelines.engine.storage.s3 import (  # noqa: F401
    MAX_PARTS,
    MIN_PART_SIZE,
    PART_SIZE_METADATA_KEY,
    S3_SCHEME,
)
