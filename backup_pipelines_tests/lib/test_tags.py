"""Names the Dagster layer derives from the targets file."""

from __future__ import annotations

from backup_pipelines.lib.tags import unique_op_names


def test_op_names_per_pool_are_distinct_identifiers() -> None:
    # Pools differ in characters an op name cannot hold: the names must still differ.
    pools = ["pg_host_db.1:5432", "pg_host_db_1:5432", "pg_host_db-1:5432", "solo"]
    names = unique_op_names("restore_drills", pools)
    assert set(names) == set(pools)
    assert len(set(names.values())) == 4
    assert all(name.isidentifier() for name in names.values())
    assert names["solo"] == "restore_drills_solo"
    assert names["pg_host_db.1:5432"].startswith("restore_drills_db_1_5432")
