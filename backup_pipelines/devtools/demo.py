"""`make demo`: a throwaway PostgreSQL with the ShiftManager sample database, backed up through
Dagster (asset + integrity checks), then proven by a restore test. `make ui` opens the Dagster UI
on the same instance; `make demo-stop` removes the demo database server.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

from backup_pipelines.devtools.local_postgres import LocalCluster, init_cluster, pg_bin_dir
from backup_pipelines.devtools.sample_data import create_sample_database
from backup_pipelines.engine.config import PROJECT_ROOT

DEMO_DIR = PROJECT_ROOT / ".demo"
STATE_FILE = DEMO_DIR / "state.json"
DAGSTER_HOME = PROJECT_ROOT / ".dagster_home"
TARGET = "development"
DATABASE = "shiftmanager_dev"


def _cluster_from_state() -> LocalCluster | None:
    if not STATE_FILE.exists():
        return None
    state = json.loads(STATE_FILE.read_text())
    return LocalCluster(
        root=Path(state["root"]),
        port=state["port"],
        password=state["password"],
        bin_dir=pg_bin_dir(),
    )


def ensure_cluster() -> LocalCluster:
    """Reuse the demo server if it is still there, else create a new one."""
    cluster = _cluster_from_state()
    if cluster is not None:
        if not (cluster.data_dir / "postmaster.pid").exists():
            cluster.start()
        return cluster
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir(mode=0o700)
    cluster = init_cluster(DEMO_DIR / "pg", password=secrets.token_urlsafe(18))
    STATE_FILE.write_text(
        json.dumps({"root": str(cluster.root), "port": cluster.port, "password": cluster.password})
    )
    STATE_FILE.chmod(0o600)
    return cluster


def demo_environment(cluster: LocalCluster) -> dict[str, str]:
    DAGSTER_HOME.mkdir(exist_ok=True)
    shutil.copy(PROJECT_ROOT / "dagster.yaml", DAGSTER_HOME / "dagster.yaml")
    return {
        "DATABASE_URL_DEVELOPMENT": cluster.dsn(DATABASE),
        "DAGSTER_HOME": str(DAGSTER_HOME),
        "BACKUP_PIPELINES_CONFIG": str(PROJECT_ROOT / "backup_targets.yaml"),
    }


def run_demo() -> int:
    print("1/4 Starting a throwaway PostgreSQL and loading the ShiftManager sample database ...")
    cluster = ensure_cluster()
    create_sample_database(cluster.dsn(), DATABASE, employees=2000, shifts=60000)
    os.environ.update(demo_environment(cluster))
    print(f"    PostgreSQL on 127.0.0.1:{cluster.port}, database {DATABASE}")

    import dagster as dg

    from backup_pipelines.definitions import defs

    print(
        f"2/4 Materializing {TARGET}/logical_backup and {TARGET}/restore_drill through Dagster "
        "(the weekly backup + restore drill job), with their checks ..."
    )
    definitions = defs()
    instance = dg.DagsterInstance.get()
    result = definitions.resolve_job_def("restore_drills").execute_in_process(
        instance=instance,
        asset_selection=[
            dg.AssetKey([TARGET, "logical_backup"]),
            dg.AssetKey([TARGET, "restore_drill"]),
        ],
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        raise_on_error=False,
    )
    materialized = {
        event.materialization.asset_key.path[-1]: event.materialization.metadata
        for event in result.get_asset_materialization_events()
    }
    if "logical_backup" not in materialized:
        print(
            f"    the backup FAILED: see run {result.run_id} in the UI (make ui)", file=sys.stderr
        )
        return 1
    backup = materialized["logical_backup"]
    path = Path(str(backup["path"].value))
    print(f"    run {result.run_id}")
    print(f"    backup {path}")
    print(
        f"    {backup['size_bytes'].value} bytes, ratio {backup['compression_ratio'].value}x, "
        f"{backup['dagster/row_count'].value} rows in {backup['table_count'].value} tables, "
        f"{backup['duration_seconds'].value}s"
    )
    checks_ok = True
    for evaluation in sorted(
        result.get_asset_check_evaluations(),
        key=lambda e: (e.asset_key.to_user_string(), e.check_name),
    ):
        status = "passed" if evaluation.passed else f"FAILED ({evaluation.severity.value})"
        checks_ok = checks_ok and evaluation.passed
        print(
            f"    check {evaluation.asset_key.to_user_string()}:{evaluation.check_name}: {status}"
        )

    print("3/4 Restore test (the drill restored the backup into a scratch database):")
    drill = materialized.get("restore_drill")
    if drill is None:
        print("    the restore drill did not complete: see the run in the UI", file=sys.stderr)
        return 1
    for key in ("tables", "rows", "indexes_checked", "rto_seconds", "rpo_seconds"):
        if key in drill:
            print(f"    {key}: {drill[key].value}")
    if "result" in drill:
        print(f"    {drill['result'].value}")

    print("4/4 Done.")
    print(f"    Backup files: {path.parent}/ (each backup with its .sha256 and .meta)")
    print(f"    Check by hand: cd {path.parent} && sha256sum -c {path.name}.sha256")
    print("    Open the Dagster UI on this instance: make ui   (then http://127.0.0.1:3000)")
    print("    Stop and remove the demo database server: make demo-stop")
    return 0 if (checks_ok and result.success) else 1


def run_ui() -> int:
    cluster = ensure_cluster()
    env = {**os.environ, **demo_environment(cluster)}
    bin_dir = Path(sys.executable).parent
    os.chdir(PROJECT_ROOT)
    os.execve(
        str(bin_dir / "dagster"),
        [
            str(bin_dir / "dagster"),
            "dev",
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            os.environ.get("DAGSTER_PORT", "3000"),
        ],
        env,
    )


def stop_demo() -> int:
    cluster = _cluster_from_state()
    if cluster is not None:
        cluster.stop("fast")
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    print("demo database server stopped and removed (backups and the Dagster history are kept)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ui", action="store_true")
    parser.add_argument("--stop", action="store_true")
    args = parser.parse_args()
    if args.stop:
        return stop_demo()
    if args.ui:
        return run_ui()
    return run_demo()


if __name__ == "__main__":
    sys.exit(main())
