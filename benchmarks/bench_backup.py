"""Backup speed and memory against the plain shell pipeline, on the same data in the same run.

    .venv/bin/python benchmarks/bench_backup.py [--scale 50] [--small-scale 10]

Builds pgbench databases in a throwaway cluster and times, for the large scale:
  floor      pg_dump > /dev/null
  shell-gz   pg_dump | gzip > file            (what the guide's script does)
  ours-gz    backup-pipelines backup --skip-verify   (gzip level 6, same as gzip's default)
  shell-zst  pg_dump | zstd > file
  ours-zst   backup-pipelines backup --skip-verify   (zstd level 3, same as zstd's default)
  ours-gz+v  backup-pipelines backup            (adds the checksum + full decode verification)
and the peak memory of the backup process at both scales (it must not grow with the data).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backup_pipelines.devtools.local_postgres import throwaway_cluster  # noqa: E402

VENV_BIN = Path(sys.executable).parent


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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, default=50)
    parser.add_argument("--small-scale", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bp-bench-"))
    try:
        with throwaway_cluster(password="bench-password") as cluster:
            pgbench = cluster.bin_dir / "pgbench"
            env = {
                **os.environ,
                "PGPASSWORD": "bench-password",
                "PGHOST": "127.0.0.1",
                "PGPORT": str(cluster.port),
                "PGUSER": "postgres",
            }
            for scale in (args.small_scale, args.scale):
                cluster.psql(f"CREATE DATABASE bench_{scale}")
                print(f"building pgbench scale {scale} ...", flush=True)
                subprocess.run(
                    [str(pgbench), "-i", "-q", "-s", str(scale), f"bench_{scale}"],
                    check=True,
                    env=env,
                    capture_output=True,
                )
            size = cluster.psql(f"SELECT pg_size_pretty(pg_database_size('bench_{args.scale}'))")
            config = work / "targets.yaml"
            config.write_text(
                f"backup_root: {work}/backups\ntargets:\n"
                f"  gz_{args.scale}: {{dsn_env: BENCH_BIG}}\n"
                f"  zst_{args.scale}: {{dsn_env: BENCH_BIG, compression: zstd}}\n"
                f"  gz_{args.small_scale}: {{dsn_env: BENCH_SMALL}}\n"
            )
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
            # Warm the page cache so the first measurement is not penalised.
            timed_shell(f"{pg_dump} {db} > /dev/null", env)
            variants = {
                "floor": lambda: timed_shell(f"{pg_dump} {db} > /dev/null", env),
                "shell-gz": lambda: timed_shell(f"{pg_dump} {db} | gzip > {out}/dump.sql.gz", env),
                "ours-gz": lambda: timed_backup(
                    ["backup", f"gz_{args.scale}", "--skip-verify"], ours_env
                )[0],
                "shell-zst": lambda: timed_shell(
                    f"{pg_dump} {db} | zstd -q -f -o {out}/dump.sql.zst", env
                ),
                "ours-zst": lambda: timed_backup(
                    ["backup", f"zst_{args.scale}", "--skip-verify"], ours_env
                )[0],
                "ours-gz+v": lambda: timed_backup(["backup", f"gz_{args.scale}"], ours_env)[0],
            }
            # Interleaved repetitions, median of each: a noisy moment hits every variant alike.
            samples: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.repeat):
                for name, run in variants.items():
                    samples[name].append(run())
                    for leftover in (work / "backups").glob("*/*.*"):
                        leftover.unlink()
            results = {name: statistics.median(values) for name, values in samples.items()}
            _, rss_big, tree_big = timed_backup(
                ["backup", f"gz_{args.scale}", "--skip-verify"], ours_env
            )
            _, rss_small, tree_small = timed_backup(
                ["backup", f"gz_{args.small_scale}", "--skip-verify"], ours_env
            )

            print(
                f"\npgbench scale {args.scale} ({size}), median of {args.repeat} interleaved runs, same data"
            )
            print(f"{'variant':<11} {'seconds':>8}  ratio")
            baseline = {"ours-gz": "shell-gz", "ours-zst": "shell-zst", "ours-gz+v": "shell-gz"}
            for name, seconds in results.items():
                ratio = ""
                if name in baseline:
                    ratio = f"{seconds / results[baseline[name]]:.2f}x {baseline[name]}"
                elif name != "floor":
                    ratio = f"{seconds / results['floor']:.2f}x floor"
                print(f"{name:<11} {seconds:8.2f}  {ratio}")
            print(
                f"\npeak RSS of the backup process: scale {args.small_scale}: {rss_small / 1024:.0f} MiB, "
                f"scale {args.scale}: {rss_big / 1024:.0f} MiB "
                f"(process tree incl. pg_dump: {tree_small / 1024:.0f} / {tree_big / 1024:.0f} MiB)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
