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
    from backup_pipelines.engine.artifacts import load_artifact
    from backup_pipelines.engine.config import load_config
    from backup_pipelines.engine.restore import restore_test

    print(
        f"2/4 Materializing {TARGET}/logical_backup through Dagster, with its integrity checks ..."
    )
    definitions = defs()
    instance = dg.DagsterInstance.get()
    job = definitions.resolve_job_def("logical_backups")
    result = job.execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey([TARGET, "logical_backup"])],
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        raise_on_error=False,
    )
    if not result.success:
        print("    the backup run FAILED; see the run in the UI (make ui)", file=sys.stderr)
        return 1
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    path = Path(str(metadata["path"].value))
    print(f"    run {result.run_id}: {path}")
    print(
        f"    {metadata['size_bytes'].value} bytes, ratio {metadata['compression_ratio'].value}x, "
        f"{metadata['dagster/row_count'].value} rows in {metadata['table_count'].value} tables, "
        f"{metadata['duration_seconds'].value}s"
    )
    checks_ok = True
    for evaluation in result.get_asset_check_evaluations():
        status = "passed" if evaluation.passed else f"FAILED ({evaluation.severity.value})"
        checks_ok = checks_ok and evaluation.passed
        print(f"    check {evaluation.check_name}: {status}")

    print(
        "3/4 Restore test: restoring the backup into a scratch database and comparing row counts ..."
    )
    target = load_config().target(TARGET)
    outcome = restore_test(target, load_artifact(path), log=_PrintLog())
    print(f"    {outcome.summary()}")

    print("4/4 Done.")
    print(f"    Backup files: {path.parent}/ (each backup with its .sha256 and .meta)")
    print(f"    Check by hand: cd {path.parent} && sha256sum -c {path.name}.sha256")
    print("    Open the Dagster UI on this instance: make ui   (then http://127.0.0.1:3000)")
    print("    Stop and remove the demo database server: make demo-stop")
    return 0 if (checks_ok and outcome.passed) else 1


class _PrintLog:
    def info(self, message: str) -> None:
        print(f"    {message}")

    warning = info


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
