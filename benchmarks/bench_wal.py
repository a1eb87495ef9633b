"""WAL archiving and recovery speed against the plain shell commands, on the same real segments
in the same run.

    .venv/bin/python benchmarks/bench_wal.py [--segments 24] [--repeat 3]

A throwaway cluster writes real 16 MiB WAL segments (generate_series inserts, pg_switch_wal)
after a base backup. Then, per segment, the way PostgreSQL calls archive_command (one call after
the other, each waiting for the previous one):
  shell-push   zstd -3 + fsync (sync FILE) + rename            (the baseline)
  sync-push    backup-pipelines wal-push                     (one full process per segment)
  async-push   backup-pipelines wal-push --spool-dir         (pitr.async_archive: the worker
               pushes from archive_status ahead of the calls; timed from a cold start, worker
               not running, and again with the worker already running)
and a real recovery of the base backup through every segment (restore_command), until promoted:
  shell-fetch  zstd -dc archive/%f.zst > %p
  sync-fetch   backup-pipelines wal-fetch %f %p
  async-fetch  backup-pipelines wal-fetch --spool-dir ... %f %p   (prefetching worker)
Ratios are throughput against the shell baseline (1.00x = as fast; the goal is >= 0.50x).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backup_pipelines.devtools.local_postgres import (  # noqa: E402
    LocalCluster,
    free_port,
    pg_bin_dir,
    throwaway_cluster,
)
from backup_pipelines.engine.wal import spool as spool_protocol  # noqa: E402
from backup_pipelines_tests.pitr_support import (  # noqa: E402
    chown_to_server_user,
    server_user_command,
)

VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "backup-pipelines")


def chown_tree(path: Path) -> None:
    for item in [path, *path.rglob("*")]:
        chown_to_server_user(item)


def make_segments(work: Path, count: int) -> tuple[Path, list[Path]]:
    """A plain base backup and ``count`` real segments written after it."""
    copies = work / "segments"
    copies.mkdir()
    chown_to_server_user(copies)
    conf = {
        "wal_level": "replica",
        "archive_mode": "on",
        "archive_command": f"'cp %p {copies}/%f'",
        "max_wal_size": "'2GB'",
    }
    with throwaway_cluster(password="bench-password", extra_conf=conf) as cluster:
        base = work / "base"
        env = {**os.environ, "PGPASSWORD": "bench-password"}
        subprocess.run(
            [str(cluster.bin_dir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(cluster.port),
             "-U", "postgres", "-D", str(base), "-X", "none", "-c", "fast"],
            check=True, env=env,
        )  # fmt: skip
        cluster.psql("CREATE TABLE filler (id bigint, payload text)")
        print(f"writing {count} WAL segments ...", flush=True)
        for round_ in range(count):
            cluster.psql(
                "INSERT INTO filler SELECT g, md5(g::text) || repeat('x', 40) "
                f"FROM generate_series({round_ * 120000}, {round_ * 120000 + 119999}) g"
            )
            cluster.psql("SELECT pg_switch_wal()")
        last = cluster.psql("SELECT pg_walfile_name(pg_switch_wal())")
        deadline = time.monotonic() + 600
        while cluster.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") < last:
            if time.monotonic() > deadline:
                raise SystemExit("the cluster did not archive its WAL")
            time.sleep(0.2)
        rows = cluster.psql("SELECT count(*) FROM filler")
    (base / "expected_rows").write_text(rows)
    segments = sorted(p for p in copies.iterdir() if len(p.name) == 24)
    return base, segments


def timed(command: str, env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(["bash", "-e", "-c", command], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


class Bench:
    def __init__(self, work: Path, segments: list[Path], base: Path) -> None:
        self.work = work
        self.segments = segments
        self.base = base
        self.archive = work / "archive"
        self.spool = work / "spool"
        self.zst = work / "zst"
        self.config = work / "targets.yaml"
        self.config.write_text(
            f"backup_root: {work}/backups\ntargets:\n  bench:\n    dsn_env: UNUSED\n"
            f"    pitr:\n      archive_dir: {self.archive}\n      async_archive: true\n"
            f"      spool_dir: {self.spool}\n      async_workers: 2\n      prefetch_segments: 8\n"
        )
        self.config.chmod(0o644)
        self.env = {**os.environ, "BACKUP_PIPELINES_CONFIG": str(self.config)}
        self.pg_wal = work / "pg_wal"

    def fresh(self) -> None:
        for folder in (self.archive, self.zst, self.pg_wal, self.spool):
            if folder == self.spool:
                spool_protocol_stop(folder)
            shutil.rmtree(folder, ignore_errors=True)
        self.archive.mkdir(mode=0o700)
        self.zst.mkdir()
        (self.pg_wal / "archive_status").mkdir(parents=True)
        for segment in self.segments:
            os.link(segment, self.pg_wal / segment.name)

    def mark_ready(self) -> None:
        for segment in self.segments:
            (self.pg_wal / "archive_status" / f"{segment.name}.ready").touch()

    def loop(self, call: str) -> str:
        # As PostgreSQL's archiver: one call after the other, .ready -> .done after each success.
        names = " ".join(s.name for s in self.segments)
        return (
            f"cd {self.work}; for f in {names}; do {call}; "
            "mv pg_wal/archive_status/$f.ready pg_wal/archive_status/$f.done 2>/dev/null || true; "
            "done"
        )

    def shell_push(self) -> float:
        self.fresh()
        self.mark_ready()
        return timed(
            self.loop(
                "zstd -3 -q -f pg_wal/$f -o zst/$f.zst.tmp && sync zst/$f.zst.tmp && "
                "mv zst/$f.zst.tmp zst/$f.zst"
            )
        )

    def sync_push(self) -> float:
        self.fresh()
        self.mark_ready()
        return timed(self.loop(f"{CLI} wal-push --target bench pg_wal/$f 2>/dev/null"), self.env)

    def async_push(self, warm: bool) -> float:
        self.fresh()
        if warm:
            # The worker is already running, as on a busy server: start it with one call.
            first = self.segments[0].name
            subprocess.run(
                [CLI, "wal-push", "--target", "bench", "--spool-dir", str(self.spool),
                 str(self.pg_wal / first)],
                check=True, env=self.env, cwd=self.work, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        self.mark_ready()
        took = timed(
            self.loop(
                f"{CLI} wal-push --target bench --spool-dir {self.spool} pg_wal/$f 2>/dev/null"
            ),
            self.env,
        )
        return took

    def recover(self, restore_command: str) -> float:
        """Restore the base backup and recover through every archived segment until promoted."""
        data = self.work / "recovery" / "data"
        shutil.rmtree(data.parent, ignore_errors=True)
        data.parent.mkdir(parents=True)
        shutil.copytree(self.base, data)
        (data / "recovery.signal").touch()
        port = free_port()
        with (data / "postgresql.auto.conf").open("a") as conf:
            conf.write(
                f"restore_command = '{restore_command}'\narchive_mode = off\nport = {port}\n"
                "hot_standby = off\nrecovery_target_action = promote\n"
                f"unix_socket_directories = '{data.parent}'\nlisten_addresses = '127.0.0.1'\n"
            )
        data.chmod(0o700)
        chown_tree(data.parent)
        cluster = LocalCluster(root=data.parent, port=port, password="bench-password")
        log = data.parent / "recovery.log"
        started = time.perf_counter()
        argv = [str(pg_bin_dir() / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "900",
                "start"]  # fmt: skip
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        try:
            # pg_ctl -w may return before the end of recovery: the end is the promotion.
            deadline = time.monotonic() + 900
            while cluster.psql("SELECT pg_is_in_recovery()", check=False) != "f":
                if time.monotonic() > deadline or not (data / "postmaster.pid").exists():
                    raise SystemExit(f"recovery did not finish; see {log}")
                time.sleep(0.02)
            took = time.perf_counter() - started
            rows = cluster.psql("SELECT count(*) FROM filler")
            in_recovery = cluster.psql("SELECT pg_is_in_recovery()")
        finally:
            stop = [str(pg_bin_dir() / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
            if os.geteuid() == 0:
                stop = ["runuser", "-u", "postgres", "--", *stop]
            subprocess.run(stop, check=False, capture_output=True)
        expected = (self.base / "expected_rows").read_text()
        if rows != expected or in_recovery != "f":
            raise SystemExit(f"recovery gave {rows} rows (expected {expected}); see {log}")
        return took


def spool_protocol_stop(spool: Path) -> None:
    pid = spool_protocol.worker_pid(str(spool))
    if pid:
        os.kill(pid, 9)
        while spool_protocol.worker_pid(str(spool)) == pid:
            time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--segments", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bp-bench-wal-"))
    work.chmod(0o755)
    bench = None
    try:
        base, segments = make_segments(work, args.segments)
        bench = Bench(work, segments, base)
        n = len(segments)
        print(f"{n} real segments of 16 MiB ({sum(s.stat().st_size for s in segments) >> 20} MiB)")

        push: dict[str, Callable[[], float]] = {
            "shell-push": bench.shell_push,
            "sync-push": bench.sync_push,
            "async-push cold": lambda: bench.async_push(warm=False),
            "async-push warm": lambda: bench.async_push(warm=True),
        }
        samples: dict[str, list[float]] = {name: [] for name in push}
        for _ in range(args.repeat):
            for name, run in push.items():
                samples[name].append(run())
                print(f"  {name}: {samples[name][-1]:.2f} s", flush=True)

        # The archives recovery reads: ours (from the last push run) and the shell's .zst files.
        bench.fresh()
        bench.mark_ready()
        timed(bench.loop(f"{CLI} wal-push --target bench pg_wal/$f 2>/dev/null"), bench.env)
        timed(bench.loop("zstd -3 -q -f pg_wal/$f -o zst/$f.zst"))
        bench.spool.mkdir(mode=0o700)
        for folder in (bench.archive, bench.zst, bench.spool):
            chown_tree(folder)
        tool = server_user_command(work)
        fetch: dict[str, Callable[[], float]] = {
            "shell-fetch": lambda: bench.recover(f"zstd -q -dc {bench.zst}/%f.zst > %p"),
            "sync-fetch": lambda: bench.recover(
                f"{tool} --config {bench.config} wal-fetch --target bench %f %p"
            ),
            "async-fetch": lambda: bench.recover(
                f"{tool} --config {bench.config} wal-fetch --target bench "
                f"--spool-dir {bench.spool} %f %p"
            ),
        }
        for name in fetch:
            samples[name] = []
        for _ in range(args.repeat):
            for name, run in fetch.items():
                spool_protocol_stop(bench.spool)  # every recovery starts without a worker
                samples[name].append(run())
                print(f"  {name}: {samples[name][-1]:.2f} s", flush=True)

        results = {name: statistics.median(values) for name, values in samples.items()}
        load = os.getloadavg()[0]
        print(
            f"\n{n} real WAL segments, median of {args.repeat} interleaved runs "
            f"(load average {load:.1f} on {os.cpu_count()} cores: other work shares the machine)"
        )
        print(f"{'variant':<16} {'seconds':>8} {'s/segment':>10}  throughput vs shell")
        for name, seconds in results.items():
            baseline = "shell-push" if "push" in name else "shell-fetch"
            ratio = results[baseline] / seconds
            print(f"{name:<16} {seconds:8.2f} {seconds / n:10.3f}  {ratio:.2f}x {baseline}")
    finally:
        if bench is not None:
            spool_protocol_stop(bench.spool)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
