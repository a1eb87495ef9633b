"""Definitions load and sensor ticks with many targets, on Dagster's PostgreSQL storage.

    .venv/bin/python benchmarks/bench_many_targets.py [--targets 1000] [--with-backups 300]

Generates a targets file with ``--targets`` targets (every ``--s3-every``-th one with offsite
copies to a bucket on moto's S3 server), writes 3 local backups (data file, ``.sha256``,
``.meta``) for ``--with-backups`` of them and records 3 materializations and check results
for each of those in a Dagster instance whose storage is PostgreSQL (deploy/dagster.production.yaml
on a throwaway cluster, as in production). Then times:

  load        a fresh interpreter importing ``backup_pipelines.definitions`` and resolving the
              repository (what the code server does at start and on every reload); asset count
  sensors     one tick of each monitoring sensor (``dg.build_sensor_context`` on that instance):
              stale_backup_sensor, failed_check_alert_sensor (first tick and a later one),
              backup_metrics_sensor, and the offsite/retention sensor(s): every sensor whose
              name contains ``offsite_and_retention``, summed (one per target before this
              change, one for all targets after it)

  ui          dagster-webserver on the same instance: seconds until it serves the asset list
              (its code server loads the definitions), the GraphQL asset list the catalog page
              asks for, and headless Chromium opening the asset catalog and one target's
              backup asset until their content shows (`--no-ui` skips this)

Goals: load <= 10 s, each sensor tick <= 20 s (Dagster's sensor timeout is 60 s), the UI's
asset list usable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import dagster as dg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backup_pipelines.devtools.local_postgres import throwaway_cluster  # noqa: E402
from backup_pipelines.devtools.s3_server import start_s3_server  # noqa: E402

CPU: dict[str, float] = {}  # CPU seconds of this process per sensor (the database's not included)

LOAD_SCRIPT = """
import json, time
started = time.perf_counter()
cpu = time.process_time()
from backup_pipelines.definitions import defs
imported = time.perf_counter()
repository = defs().get_repository_def()
assets = len(repository.asset_graph.get_all_asset_keys())
checks = len(repository.asset_graph.asset_check_keys)
sensors = len(repository.sensor_defs)
done = time.perf_counter()
print(json.dumps({"import": imported - started, "resolve": done - imported,
                  "total": done - started, "cpu": time.process_time() - cpu, "assets": assets, "checks": checks,
                  "sensors": sensors}))
"""


def write_project(work: Path, targets: int, s3_every: int) -> Path:
    document = {
        "backup_root": str(work / "backups"),
        "metrics": {"textfile": str(work / "textfile" / "backup_pipelines.prom")},
        "targets": {
            f"db{i:04d}": {
                "dsn_env": "BENCH_DSN",
                "max_age": "1d",
                **({"offsite": {"bucket": "bench"}} if s3_every and i % s3_every == 0 else {}),
            }
            for i in range(targets)
        },
    }
    path = work / "backup_targets.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def write_backups(names: list[str]) -> None:
    from backup_pipelines.engine.config import load_config
    from backup_pipelines_tests.engine.storage_helpers import fake_backup

    config = load_config()
    now = datetime.now(UTC)
    for name in names:
        for age in (3, 2, 1):
            fake_backup(
                config.target(name).backup_dir,
                name,
                started_at=now - timedelta(hours=age),
                target=name,
            )


def record_history(instance: dg.DagsterInstance, names: list[str]) -> None:
    import dagster as dg

    from backup_pipelines.lib.names import LOGICAL_BACKUP, target_key

    for name in names:
        key = target_key(name, LOGICAL_BACKUP)
        for _ in range(3):
            instance.report_runless_asset_event(
                dg.AssetMaterialization(
                    asset_key=key, metadata={"size_bytes": 1234, "duration_seconds": 1.5}
                )
            )
            instance.report_runless_asset_event(
                dg.AssetCheckEvaluation(
                    asset_key=key,
                    check_name="checksum_matches",
                    passed=True,
                    severity=dg.AssetCheckSeverity.ERROR,
                )
            )


CATALOG_QUERY = """
{ assetsOrError { ... on AssetConnection { nodes { key { path }
  definition { groupName description kinds owners { ... on TeamAssetOwner { team } }
               assetChecksOrError { ... on AssetChecks { checks { name } } } } } } } }
"""


def time_ui(work: Path, sample: str) -> dict[str, float]:
    """How long the UI takes with this many targets: webserver start, the asset list over
    GraphQL, and the catalog and one asset page in headless Chromium."""
    from backup_pipelines.devtools.webserver import graphql, start_webserver, stop_process_group

    results: dict[str, float] = {}
    started = time.perf_counter()
    proc, url = start_webserver(dict(os.environ), work / "webserver.log", cwd=REPO, timeout=600)
    results["ui: webserver up"] = time.perf_counter() - started
    try:
        started = time.perf_counter()
        answer = graphql(url, CATALOG_QUERY, timeout=300)
        results["ui: asset list (GraphQL)"] = time.perf_counter() - started
        nodes = answer["data"]["assetsOrError"]["nodes"]
        print(f"GraphQL asset list: {len(nodes)} assets", flush=True)
        chromium = shutil.which("chromium")
        if chromium is None:
            return results
        from playwright.sync_api import sync_playwright

        graphql(url, "mutation { setNuxSeen }")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium, args=["--no-sandbox", "--disable-gpu"], headless=True
            )
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                for label, path, text in [
                    ("ui: asset catalog page", "/assets", "db0000"),
                    ("ui: one backup asset page", f"/assets/{sample}/logical_backup", "size_bytes"),
                ]:
                    started = time.perf_counter()
                    page.goto(url + path, wait_until="domcontentloaded")
                    page.get_by_text(text).first.wait_for(timeout=300_000)
                    results[label] = time.perf_counter() - started
            finally:
                browser.close()
    finally:
        stop_process_group(proc)
    return results


def timed_tick(
    defs: dg.Definitions, instance: dg.DagsterInstance, name: str, cursor: str | None = None
) -> tuple[float, Any]:
    import dagster as dg

    from backup_pipelines.defs.resources import BackupEngineResource

    sensor = defs.resolve_sensor_def(name)
    context = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        repository_def=defs.get_repository_def(),
        resources={"backup_engine": BackupEngineResource()},
    )
    started = time.perf_counter()
    cpu = time.process_time()
    result = sensor.evaluate_tick(context)
    CPU[name] = CPU.get(name, 0.0) + time.process_time() - cpu
    return time.perf_counter() - started, result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--targets", type=int, default=1000)
    parser.add_argument("--with-backups", type=int, default=300)
    parser.add_argument("--s3-every", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--no-ui", action="store_true", help="skip the webserver and browser")
    args = parser.parse_args()

    moto, s3_url = start_s3_server()
    work = Path(tempfile.mkdtemp(prefix="bench-targets-"))
    try:
        with throwaway_cluster(password="bench") as pg:
            pg.psql("CREATE DATABASE dagster")
            home = work / "dagster_home"
            home.mkdir()
            shutil.copy(REPO / "deploy" / "dagster.production.yaml", home / "dagster.yaml")
            config_path = write_project(work, args.targets, args.s3_every)
            os.environ.update(
                DAGSTER_HOME=str(home),
                DAGSTER_PG_HOST="127.0.0.1",
                DAGSTER_PG_PORT=str(pg.port),
                DAGSTER_PG_DB="dagster",
                DAGSTER_PG_USER="postgres",
                DAGSTER_PG_PASSWORD="bench",
                DAGSTER_COMPUTE_LOG_DIR=str(work / "compute_logs"),
                BACKUP_PIPELINES_CONFIG=str(config_path),
                BENCH_DSN=pg.dsn("postgres"),
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench",
                AWS_DEFAULT_REGION="us-east-1",
                AWS_ENDPOINT_URL_S3=s3_url,
            )
            import boto3

            boto3.client("s3").create_bucket(Bucket="bench")
            names = [f"db{i:04d}" for i in range(args.with_backups)]
            started = time.perf_counter()
            write_backups(names)
            print(f"wrote {3 * len(names)} backups in {time.perf_counter() - started:.1f}s")

            load = json.loads(
                subprocess.run(
                    [sys.executable, "-c", LOAD_SCRIPT],
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=REPO,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            print(
                f"definitions load: {load['total']:.2f}s (import {load['import']:.2f}s, resolve "
                f"{load['resolve']:.2f}s; CPU {load['cpu']:.2f}s); {load['assets']} assets, {load['checks']} checks, "
                f"{load['sensors']} sensors",
                flush=True,
            )

            import dagster as dg

            from backup_pipelines.definitions import defs as load_defs

            defs = load_defs()
            results: dict[str, float] = {"load": load["total"]}
            with dg.DagsterInstance.get() as instance:
                started = time.perf_counter()
                record_history(instance, names)
                print(f"recorded history in {time.perf_counter() - started:.1f}s", flush=True)
                ticks: list[tuple[str, str | None]] = [
                    ("stale_backup_sensor", None),
                    ("failed_check_alert_sensor", None),
                    ("backup_metrics_sensor", None),
                ]
                for name, cursor in ticks:
                    seconds, result = timed_tick(defs, instance, name, cursor)
                    results[name] = seconds
                    print(f"{name}: {seconds:.2f}s (CPU {CPU[name]:.2f}s)", flush=True)
                    if name == "failed_check_alert_sensor":
                        seconds, _ = timed_tick(defs, instance, name, result.cursor)
                        results[name + " (next tick)"] = seconds
                        print(f"{name} (next tick): {seconds:.2f}s", flush=True)
                offsite = [
                    s.name
                    for s in defs.get_repository_def().sensor_defs
                    if "offsite_and_retention" in s.name
                ]
                total = 0.0
                requests = 0
                for name in offsite:
                    seconds, result = timed_tick(defs, instance, name)
                    total += seconds
                    requests += len(result.run_requests or [])
                results["offsite/retention"] = total
                print(
                    f"offsite/retention: {len(offsite)} sensor(s), {total:.2f}s of ticks in all, "
                    f"{requests} run requests",
                    flush=True,
                )
            if not args.no_ui:
                for label, seconds in time_ui(work, names[0] if names else "db0000").items():
                    results[label] = seconds
                    print(f"{label}: {seconds:.2f}s", flush=True)
            results["assets"] = load["assets"]
            results["load cpu"] = load["cpu"]
            results.update({f"{k} cpu": v for k, v in CPU.items()})
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
    finally:
        moto.terminate()
        moto.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
