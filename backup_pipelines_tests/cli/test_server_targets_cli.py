"""Server targets (``databases: all``) from the command line: every database backed up on its
own, ``--database`` for one, restores and drills refuse to guess which database."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.engine.artifacts import list_artifacts
from backup_pipelines_tests.conftest import DB_PASSWORD
from backup_pipelines_tests.server_support import (
    backup_role_dsn,
    create_database,
    fingerprint,
    server_cluster,
)

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def server() -> Iterator[LocalCluster]:
    with server_cluster(DB_PASSWORD) as cluster:
        for name in ("app_a", "app_b", "scratch_tmp"):
            create_database(cluster, name)
        create_database(cluster, "app/c", rows=7)  # a name a folder cannot hold as it is
        yield cluster


@pytest.fixture
def project(server: LocalCluster, make_project):
    return make_project(
        {
            "fleet": {
                "dsn_env": "DATABASE_URL_FLEET",
                "databases": "all",
                "exclude": ["scratch_*", "postgres"],
            }
        },
        env={"DATABASE_URL_FLEET": backup_role_dsn(server)},
    )


def test_backup_takes_every_database_and_restore_gives_back_the_content(
    server: LocalCluster, project, cli
) -> None:
    result = cli("backup", "fleet")
    assert result.returncode == 0, result.stderr
    assert "3 database(s) to back up" in result.stdout
    root = project.resolved_backup_root / "fleet"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == ["app%2Fc", "app_a", "app_b"]  # no scratch_*, no postgres, no templates
    for folder in folders:
        [artifact] = list_artifacts(root / folder)
        assert artifact.meta.database == {"app%2Fc": "app/c"}.get(folder, folder)
        assert artifact.status == "verified"

    # Lose data in one database, restore its newest backup: the content is the source's again.
    before = fingerprint(server, "app_b")
    server.psql("DELETE FROM item WHERE id > 10", dbname="app_b")
    assert fingerprint(server, "app_b") != before
    restored = cli("restore", "latest", "fleet", "--database", "app_b", "--confirm", "fleet")
    assert restored.returncode == 0, restored.stderr
    assert fingerprint(server, "app_b") == before


def test_database_option_backs_up_lists_verifies_and_drills_one(project, cli) -> None:
    assert cli("backup", "fleet", "--database", "app_a").returncode == 0
    root = project.resolved_backup_root / "fleet"
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["app_a"]

    listed = json.loads(cli("list", "fleet", "--database", "app_a", "--json").stdout)
    assert len(listed) == 1 and listed[0]["database"] == "app_a"
    everything = cli("list", "fleet").stdout
    assert "== database app_a" in everything and "== database app_b" in everything
    assert "no backups for target 'fleet', database 'app_b'" in everything

    verified = cli("verify", "fleet", "--database", "app_a")
    assert verified.returncode == 0, verified.stderr
    assert "OK" in verified.stdout

    drill = cli("drill", "fleet", "--database", "app_a")
    assert drill.returncode == 0, drill.stderr + drill.stdout

    pruned = cli("prune", "fleet", "--dry-run")
    assert pruned.returncode == 0, pruned.stderr
    assert "== database app_a" in pruned.stdout
    assert "retention for target 'fleet', database 'app_a'" in pruned.stdout

    # cron-backup (the path without Dagster) backs up every database too.
    cron = cli("cron-backup", "fleet")
    assert cron.returncode == 0, cron.stderr
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["app%2Fc", "app_a", "app_b"]


def test_restore_and_drill_of_a_server_target_need_database(project, cli) -> None:
    assert cli("backup", "fleet", "--database", "app_a").returncode == 0
    for args in (("restore", "latest", "fleet", "--confirm", "fleet"), ("drill", "fleet")):
        result = cli(*args)
        assert result.returncode == 2
        [line] = [x for x in result.stderr.splitlines() if "--database" in x]
        assert "target 'fleet' is a server with 3 database(s): app/c, app_a, app_b" in line


def test_database_option_on_a_single_database_target_is_refused(
    server: LocalCluster, make_project, cli
) -> None:
    make_project(
        {"single": {"dsn_env": "DATABASE_URL_SINGLE"}},
        env={"DATABASE_URL_SINGLE": backup_role_dsn(server, "app_a")},
    )
    result = cli("backup", "single", "--database", "app_b")
    assert result.returncode == 2
    assert "target 'single' is one database" in result.stderr


def test_a_database_the_role_cannot_connect_to_fails_alone(
    server: LocalCluster, project, cli
) -> None:
    create_database(server, "locked_out", owner="postgres")
    server.psql("REVOKE CONNECT ON DATABASE locked_out FROM PUBLIC")
    try:
        result = cli("backup", "fleet")
    finally:
        server.psql("DROP DATABASE locked_out")
    assert result.returncode == 1
    assert "1 of 4 database(s) FAILED: locked_out" in result.stdout
    [error] = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert "cannot connect to backup_role@127.0.0.1" in error and "/locked_out: " in error
    assert "CONNECT privilege" in error
    assert "GRANT CONNECT" in result.stderr
    root = project.resolved_backup_root / "fleet"
    for name in ("app_a", "app_b", "app%2Fc"):
        assert len(list_artifacts(root / name)) == 1
    # Nothing that looks like a backup of the database it could not read.
    assert not list_artifacts(root / "locked_out")
    assert not [p for p in (root / "locked_out").glob("*") if not p.name.startswith(".")]


def test_freshness_and_metrics_watch_every_database_of_a_server_target(
    server: LocalCluster, project, make_project, cli, tmp_path
) -> None:
    """From cron (no Dagster), a server target was always "STALE - no backup at all" and had no
    metrics: its backups are in one folder per database."""
    assert cli("backup", "fleet").returncode == 0
    fresh = cli("check-freshness", "fleet")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    for database in ("app_a", "app_b", "app/c"):
        assert f"fleet/{database}: ok - newest backup is" in fresh.stdout
    assert "scratch_tmp" not in fresh.stdout and "fleet/postgres" not in fresh.stdout

    textfile = tmp_path / "metrics.prom"
    assert cli("metrics", "--textfile", str(textfile)).returncode == 0
    lines = textfile.read_text().splitlines()
    sizes = [
        a.meta.size_bytes
        for folder in (project.resolved_backup_root / "fleet").iterdir()
        for a in list_artifacts(folder)
    ]
    assert 'backup_pipelines_backup_success{target="fleet"} 1.0' in lines
    assert f'backup_pipelines_backup_size_bytes{{target="fleet"}} {float(sum(sizes))}' in lines
    assert any(
        line.startswith("backup_pipelines_backup_last_success_timestamp_seconds") for line in lines
    )

    # A database new on the server has no backup yet: the target is stale, and its freshness
    # unknown to the metrics (no series rather than a wrong one).
    create_database(server, "app_new")
    try:
        stale = cli("check-freshness", "fleet")
        assert stale.returncode == 1
        assert "fleet/app_new: STALE - no backup at all" in stale.stdout
        assert "fleet/app_a: ok" in stale.stdout
        assert cli("metrics", "--textfile", str(textfile)).returncode == 0
        text = textfile.read_text()
        assert 'backup_pipelines_backup_last_success_timestamp_seconds{target="fleet"}' not in text
        assert 'backup_pipelines_backup_success{target="fleet"} 1.0' in text
    finally:
        server.psql('DROP DATABASE "app_new" WITH (FORCE)')

    # With the server down, the databases that have backups are still watched.
    make_project(
        {"fleet": {"dsn_env": "DATABASE_URL_FLEET", "databases": "all", "exclude": ["scratch_*"]}},
        env={"DATABASE_URL_FLEET": "postgresql://nobody@127.0.0.1:1/postgres"},
    )
    down = cli("check-freshness", "fleet")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "fleet/app_a: ok" in down.stdout and "fleet/app/c: ok" in down.stdout
