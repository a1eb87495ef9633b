"""Point-in-time recovery in Dagster: base backups, WAL archive health, PITR drills and restores."""
