"""Directory-format backups (pg_dump -Fd -j N) against pg_dump itself, and restore times.

    .venv/bin/python benchmarks/bench_directory.py [--scale 30] [--jobs 2] [--repeat 3]
        [--output benchmarks/results/directory-scale30.txt]

Builds a pgbench database in a throwaway cluster (the helpers of bench_backup.py) and times,
interleaved `--repeat` times (medians shown):

backups, `backup-pipelines backup --skip-verify` with `format: directory, jobs: N` against
  none   pg_dump -Fd -j N -Z0 -f dir
  gzip   pg_dump -Fd -j N -Z6 -f dir               (pg_dump's workers compress, as ours do)
  zstd   pg_dump -Fd -j N -Z0 -f dir               (the issue's reference: the folder alone)
  zstd+  pg_dump -Fd -j N -Z0 -f dir && tar -cf - -C dir . | zstd -3 -T N > file
                                                   (the shell pipeline doing all our work)
restores into an empty database, from our backups (engine `restore_into`, as restores and
drills run it: decode/extract, then psql or pg_restore):
  directory/<c>  pg_restore -j N on the extracted folder
  custom/<c>     pg_restore -j N on the (decoded) archive
  plain/<c>      psql --single-transaction
  shell          pg_restore -j N on the folder `pg_dump -Fd -j N -Z6` wrote (no decoding)
for <c> in gzip and zstd.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backup_pipelines.devtools.local_postgres import throwaway_cluster  # noqa: E402
from backup_pipelines.engine.artifacts import list_artifacts  # noqa: E402
from benchmarks.bench_backup import (  # noqa: E402
    build_pgbench,
    pgbench_env,
    publish_report,
    timed_backup,
    timed_shell,
)

COMPRESSIONS = ("none", "gzip", "zstd")
RESTORE_PAIRS = [(f, c) for c in ("gzip", "zstd") for f in ("directory", "custom", "plain")]


def _ours(args: list[str], env: dict[str, str]) -> float:
    return timed_backup(args, env)[0]


def _clear_backups(root: Path) -> None:
    for leftover in root.glob("*/*.*"):
        if leftover.is_file():
            leftover.unlink()


def _timed_restore(cluster: object, backup: Path, jobs: int, work: Path) -> float:
    from backup_pipelines.engine.artifacts import load_artifact
    from backup_pipelines.engine.conninfo import ConnectionInfo
    from backup_pipelines.engine.postgres import find_tools
    from backup_pipelines.engine.restore.runner import restore_into

    cluster.psql("DROP DATABASE IF EXISTS bench_restored")  # type: ignore[attr-defined]
    cluster.psql("CREATE DATABASE bench_restored")  # type: ignore[attr-defined]
    info = ConnectionInfo.parse(cluster.dsn("bench_restored"))  # type: ignore[attr-defined]
    started = time.perf_counter()
    restore_into(
        load_artifact(backup),
        info,
        tools=find_tools(15),
        jobs=jobs,
        work_dir=work,
        log=logging.getLogger("bench"),
    )
    return time.perf_counter() - started


def _shell_restore(cluster: object, folder: Path, jobs: int, env: dict[str, str]) -> float:
    cluster.psql("DROP DATABASE IF EXISTS bench_restored")  # type: ignore[attr-defined]
    cluster.psql("CREATE DATABASE bench_restored")  # type: ignore[attr-defined]
    pg_restore = cluster.bin_dir / "pg_restore"  # type: ignore[attr-defined]
    return timed_shell(f"{pg_restore} -j {jobs} -d bench_restored {folder}", env)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", help="also write the table to this file")
    args = parser.parse_args()
    jobs = args.jobs
    work = Path(tempfile.mkdtemp(prefix="bp-bench-dir-"))
    try:
        with throwaway_cluster(password="bench-password") as cluster:
            env = pgbench_env(cluster)
            db = build_pgbench(cluster, args.scale, env)
            size = cluster.psql(f"SELECT pg_size_pretty(pg_database_size('{db}'))")
            config = work / "targets.yaml"
            lines = [f"backup_root: {work}/backups", "targets:"]
            for compression in COMPRESSIONS:
                lines.append(
                    f"  directory_{compression}: {{dsn_env: BENCH_DB, format: directory, "
                    f"jobs: {jobs}, compression: {compression}, restore_jobs: {jobs}}}"
                )
            for dump_format, compression in RESTORE_PAIRS:
                if dump_format != "directory":
                    lines.append(
                        f"  {dump_format}_{compression}: {{dsn_env: BENCH_DB, "
                        f"format: {dump_format}, compression: {compression}}}"
                    )
            config.write_text("\n".join(lines) + "\n")
            ours_env = {
                **os.environ,
                "BACKUP_PIPELINES_CONFIG": str(config),
                "BENCH_DB": cluster.dsn(db),
            }
            pg_dump = cluster.bin_dir / "pg_dump"
            out = work / "shell"
            folder = out / "dir"
            fresh = f"rm -rf {folder} && "
            shell = {
                "none": f"{fresh}{pg_dump} -Fd -j {jobs} -Z0 -f {folder} {db}",
                "gzip": f"{fresh}{pg_dump} -Fd -j {jobs} -Z6 -f {folder} {db}",
                "zstd": f"{fresh}{pg_dump} -Fd -j {jobs} -Z0 -f {folder} {db}",
                "zstd+": f"{fresh}{pg_dump} -Fd -j {jobs} -Z0 -f {folder} {db} && "
                f"tar -cf - -C {folder} . | zstd -q -3 -T{jobs} -f -o {out}/dump.tar.zst",
            }
            out.mkdir()
            timed_shell(f"{pg_dump} {db} > /dev/null", env)  # warm the page cache
            variants: dict[str, Callable[[], float]] = {}
            for name, command in shell.items():
                variants[f"shell {name}"] = functools.partial(timed_shell, command, env)
            for compression in COMPRESSIONS:
                variants[f"ours {compression}"] = functools.partial(
                    _ours, ["backup", f"directory_{compression}", "--skip-verify"], ours_env
                )
            samples: dict[str, list[float]] = {name: [] for name in variants}
            # Our backup's own time (.meta duration: from its connection to the rename), i.e.
            # without the command's start-up, which is the same for every format.
            body: dict[str, list[float]] = {c: [] for c in COMPRESSIONS}
            for round_ in range(args.repeat):
                for name, run in variants.items():
                    samples[name].append(run())
                    if name.startswith("ours "):
                        compression = name.removeprefix("ours ")
                        (made,) = list_artifacts(work / "backups" / f"directory_{compression}")
                        body[compression].append(made.meta.duration_seconds)
                    _clear_backups(work / "backups")
                print(f"backup round {round_ + 1}/{args.repeat} done", flush=True)
            backup = {name: statistics.median(values) for name, values in samples.items()}
            _, rss, tree = timed_backup(["backup", "directory_zstd", "--skip-verify"], ours_env)
            _clear_backups(work / "backups")

            # One backup of each restore pair, restored --repeat times, interleaved.
            backups: dict[str, Path] = {}
            for dump_format, compression in RESTORE_PAIRS:
                target = f"{dump_format}_{compression}"
                _ours(["backup", target, "--skip-verify"], ours_env)
                (artifact,) = list_artifacts(work / "backups" / target)
                path = artifact.path
                backups[target] = path
            timed_shell(shell["gzip"], env)
            restores: dict[str, list[float]] = {name: [] for name in [*backups, "shell"]}
            restore_work = work / "restore-work"
            for round_ in range(args.repeat):
                for name, path in backups.items():
                    restores[name].append(_timed_restore(cluster, path, jobs, restore_work))
                restores["shell"].append(_shell_restore(cluster, folder, jobs, env))
                print(f"restore round {round_ + 1}/{args.repeat} done", flush=True)
            restore = {name: statistics.median(values) for name, values in restores.items()}

            report = [
                f"pgbench scale {args.scale} ({size}), jobs {jobs}, median of {args.repeat} "
                f"interleaved runs, {os.cpu_count()} CPUs, load average at the end "
                f"{os.getloadavg()[0]:.1f}",
                "backup wall seconds: pg_dump -Fd -j N alone, ours (directory, whole command), "
                "ratio; then ours without the command's start-up (.meta duration), ratio",
                f"{'compression':<17} {'pg_dump s':>9} {'ours s':>8}  {'ratio':>6}  "
                f"{'body s':>7}  {'ratio':>6}",
            ]
            for label, shell_name, compression in [
                *((c, c, c) for c in COMPRESSIONS),
                ("zstd (+tar|zstd)", "zstd+", "zstd"),
            ]:
                theirs, ours = backup[f"shell {shell_name}"], backup[f"ours {compression}"]
                own = statistics.median(body[compression])
                report.append(
                    f"{label:<17} {theirs:9.2f} {ours:8.2f}  {ours / theirs:5.2f}x  "
                    f"{own:7.2f}  {own / theirs:5.2f}x"
                )
            report.append(
                f"peak RSS of the backup process (directory/zstd): {rss / 1024:.0f} MiB "
                f"(process tree incl. pg_dump: {tree / 1024:.0f} MiB)"
            )
            report.append(
                "restore wall seconds into an empty database (decode/extract + load), "
                f"pg_restore -j {jobs}"
            )
            for name, seconds in restore.items():
                label = "shell pg_restore -j of a -Z6 folder" if name == "shell" else name
                report.append(f"  {label:<36} {seconds:8.2f}")
            publish_report(report, args.output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
