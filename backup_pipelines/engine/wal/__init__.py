"""The WAL archive (being split into modules; see the next commits)."""

from backup_pipelines.engine.wal.archive import *  # noqa: F403
from backup_pipelines.engine.wal.archive import DEFAULT_SEGMENT_SIZE  # noqa: F401
