"""Backup speed and memory against the plain shell pipeline, on the same data in the same run.

    .venv/bin/python benchmarks/bench_backup.py [--scale 30] [--small-scale 10] [--repeat 3]
        [--output benchmarks/results/backup-scale30.txt]

Builds pgbench databases in a throwaway cluster and times, for the large scale, every
format/compression pair of `backup-pipelines backup --skip-verify` against the shell pipeline
doing the same work:
  floor          pg_dump > /dev/null
  plain/none     pg_dump > file                        ours: format plain, compression none
  plain/gzip     pg_dump | gzip > file                 ours: plain, gzip 6 (gzip's default)
  plain/zstd     pg_dump | zstd -3 > file              ours: plain, zstd 3 (zstd's default)
  custom/none    pg_dump -Fc -Z0 > file                ours: custom, none
  custom/gzip    pg_dump -Fc -Z6 > file                ours: custom, gzip 6 (pg_dump compresses)
  custom/zstd    pg_dump -Fc -Z0 | zstd -3 > file      ours: custom, zstd 3
  plain/gzip+v   the shell's plain/gzip                ours with its verification (checksum + decode)
and the peak memory of the backup process at both scales (it must not grow with the data).
All variants run interleaved, `--repeat` times; the table shows medians.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backup_pipelines.devtools.local_postgres import throwaway_cluster  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_shell(command: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True, env=env)
    return time.perf_counter() - started


def timed_backup(args: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """Wall time, peak RSS of the Python backup process (sampled), peak RSS of its process tree (wait4)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(VENV_BIN / "backup-pipelines"), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    peak = [0]

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.returncode is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"backup failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return elapsed, peak[0], usage.ru_maxrss


PAIRS = [
    ("plain", "none"),
    ("plain", "gzip"),
    ("plain", "zstd"),
    ("custom", "none"),
    ("custom", "gzip"),
    ("custom", "zstd"),
]


def pgbench_env(cluster: Any) -> dict[str, str]:
    """The environment for the shell tools (psql, pg_dump, pgbench) against ``cluster``."""
    return {
        **os.environ,
        "PGPASSWORD": "bench-password",
        "PGHOST": "127.0.0.1",
        "PGPORT": str(cluster.port),
        "PGUSER": "postgres",
    }


def build_pgbench(cluster: Any, scale: int, env: dict[str, str]) -> str:
    """Create ``bench_<scale>`` filled by ``pgbench -i``; returns its name."""
    name = f"bench_{scale}"
    cluster.psql(f"CREATE DATABASE {name}")
    print(f"building pgbench scale {scale} ...", flush=True)
    subprocess.run(
        [str(cluster.bin_dir / "pgbench"), "-i", "-q", "-s", str(scale), name],
        check=True,
        env=env,
        capture_output=True,
    )
    return name


def publish_report(report: list[str], output: str | None) -> None:
    """Print the result table, and write it to ``output`` (``--output``) when given."""
    text = "\n".join(report)
    print("\n" + text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")


def _ours(args: list[str], env: dict[str, str]) -> float:
    return timed_backup(args, env)[0]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, default=30)
    parser.add_argument("--small-scale", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", help="also write the table to this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bp-bench-"))
    try:
        with throwaway_cluster(password="bench-password") as cluster:
            env = pgbench_env(cluster)
            for scale in (args.small_scale, args.scale):
                build_pgbench(cluster, scale, env)
            size = cluster.psql(f"SELECT pg_size_pretty(pg_database_size('bench_{args.scale}'))")
            config = work / "targets.yaml"
            lines = [f"backup_root: {work}/backups", "targets:"]
            for dump_format, compression in PAIRS:
                lines.append(
                    f"  {dump_format}_{compression}: {{dsn_env: BENCH_BIG, "
                    f"format: {dump_format}, compression: {compression}}}"
                )
            lines.append("  small: {dsn_env: BENCH_SMALL}")
            config.write_text("\n".join(lines) + "\n")
            ours_env = {
                **os.environ,
                "BACKUP_PIPELINES_CONFIG": str(config),
                "BENCH_BIG": cluster.dsn(f"bench_{args.scale}"),
                "BENCH_SMALL": cluster.dsn(f"bench_{args.small_scale}"),
            }
            pg_dump = cluster.bin_dir / "pg_dump"
            db = f"bench_{args.scale}"
            out = work / "shell"
            out.mkdir()
            shell = {
                "plain/none": f"{pg_dump} {db} > {out}/dump.sql",
                "plain/gzip": f"{pg_dump} {db} | gzip > {out}/dump.sql.gz",
                "plain/zstd": f"{pg_dump} {db} | zstd -q -3 -f -o {out}/dump.sql.zst",
                "custom/none": f"{pg_dump} -Fc -Z0 {db} > {out}/dump.dump",
                "custom/gzip": f"{pg_dump} -Fc -Z6 {db} > {out}/dump.dump",
                "custom/zstd": f"{pg_dump} -Fc -Z0 {db} | zstd -q -3 -f -o {out}/dump.dump.zst",
            }
            # Warm the page cache so the first measurement is not penalised.
            timed_shell(f"{pg_dump} {db} > /dev/null", env)
            variants: dict[str, Callable[[], float]] = {
                "floor": lambda: timed_shell(f"{pg_dump} {db} > /dev/null", env)
            }
            for dump_format, compression in PAIRS:
                pair = f"{dump_format}/{compression}"
                variants[f"shell {pair}"] = functools.partial(timed_shell, shell[pair], env)
                variants[f"ours {pair}"] = functools.partial(
                    _ours, ["backup", f"{dump_format}_{compression}", "--skip-verify"], ours_env
                )
            variants["ours plain/gzip+v"] = functools.partial(
                _ours, ["backup", "plain_gzip"], ours_env
            )
            # Interleaved repetitions, median of each: a noisy moment hits every variant alike.
            samples: dict[str, list[float]] = {name: [] for name in variants}
            cpu: dict[str, list[float]] = {name: [] for name in variants}
            # The backup itself, from its .meta: the snapshot to the fsynced file, without the
            # command's start-up (interpreter, imports, targets file) and exit.
            body: dict[str, list[float]] = {name: [] for name in variants}
            for round_ in range(args.repeat):
                for name, run in variants.items():
                    before = _children_cpu()
                    samples[name].append(run())
                    cpu[name].append(_children_cpu() - before)
                    for meta in (work / "backups").glob("*/*.meta"):
                        body[name].append(json.loads(meta.read_text())["duration_seconds"])
                    for leftover in (work / "backups").glob("*/*.*"):
                        leftover.unlink()
                print(f"round {round_ + 1}/{args.repeat} done", flush=True)
            results = {name: statistics.median(values) for name, values in samples.items()}
            cpu_used = {name: statistics.median(values) for name, values in cpu.items()}
            _, rss_big, tree_big = timed_backup(["backup", "plain_zstd", "--skip-verify"], ours_env)
            _, rss_small, tree_small = timed_backup(["backup", "small", "--skip-verify"], ours_env)

            report = [
                f"pgbench scale {args.scale} ({size}), median of {args.repeat} interleaved runs, "
                f"same data, {os.cpu_count()} CPUs, load average at the end "
                f"{os.getloadavg()[0]:.1f}",
                "wall seconds (shell, ours, ratio), then CPU seconds of the client processes "
                "(pg_dump, compressor, our process; the server's are the same for both)",
                "and the backup alone (ours without start-up and exit: .meta duration_seconds)",
                f"{'pair':<15} {'shell s':>8} {'ours s':>8}  {'ratio':>6}  "
                f"{'shell cpu':>9} {'ours cpu':>9}  {'ratio':>6}  {'body s':>7} {'ratio':>6}",
                f"{'floor':<15} {results['floor']:8.2f} {'':>8}  {'':>6}  {cpu_used['floor']:9.2f}",
            ]
            for dump_format, compression in [*PAIRS, ("plain", "gzip+v")]:
                pair = f"{dump_format}/{compression}"
                ours = results[f"ours {pair}"]
                theirs = results[f"shell {pair.removesuffix('+v')}"]
                ours_cpu = cpu_used[f"ours {pair}"]
                theirs_cpu = cpu_used[f"shell {pair.removesuffix('+v')}"]
                alone = statistics.median(body[f"ours {pair}"])
                report.append(
                    f"{pair:<15} {theirs:8.2f} {ours:8.2f}  {ours / theirs:5.2f}x  "
                    f"{theirs_cpu:9.2f} {ours_cpu:9.2f}  {ours_cpu / theirs_cpu:5.2f}x  "
                    f"{alone:7.2f} {alone / theirs:5.2f}x"
                )
            report.append(
                f"peak RSS of the backup process: scale {args.small_scale}: "
                f"{rss_small / 1024:.0f} MiB, scale {args.scale}: {rss_big / 1024:.0f} MiB "
                f"(process tree incl. pg_dump: {tree_small / 1024:.0f} / {tree_big / 1024:.0f} MiB)"
            )
            publish_report(report, args.output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
