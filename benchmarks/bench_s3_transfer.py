"""Offsite copy speed against boto3's own transfer manager, on the same file in the same run.

    .venv/bin/python benchmarks/bench_s3_transfer.py [--size-mib 256] [--repeat 5]

Starts moto's S3 server on a free port (as the tests do), writes one incompressible file and
times, interleaved in every repetition:
  ours-put     S3Storage.put_file (one read of the file, SHA-256 per part and of the whole file,
               parts in flight at once, S3 confirms every part's checksum)
  boto3-put    client.upload_file (boto3's TransferManager, its defaults: 10 threads, 8 MiB parts,
               no end-to-end SHA-256)
  ours-get     S3Storage.get_file (parallel ranged GETs to a temporary file, SHA-256 checked
               against the recorded one, fsync, rename)
  boto3-get    client.download_file (TransferManager defaults)
Prints medians and our throughput as a ratio of boto3's (1.00x = as fast; the goal is >= 0.9x).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backup_pipelines.devtools.s3_server import start_s3_server  # noqa: E402
from backup_pipelines.engine.storage import S3Storage, default_s3_client  # noqa: E402
from backup_pipelines.engine.storage.s3_multipart import DEFAULT_CONCURRENCY  # noqa: E402

VENV_BIN = Path(sys.executable).parent
MiB = 1 << 20


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    args = parser.parse_args()

    proc, url = start_s3_server()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL_S3=url,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
            work = Path(tmp)
            source = work / "backup.bin"
            with source.open("wb") as handle:
                for _ in range(args.size_mib):
                    handle.write(os.urandom(MiB))
            sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
            import boto3

            theirs = boto3.client("s3")
            theirs.create_bucket(Bucket="bench")
            ours = S3Storage(
                "bench", "ours", client=default_s3_client(), concurrency=args.concurrency
            )
            times: dict[str, list[float]] = {
                k: [] for k in ("ours-put", "boto3-put", "ours-get", "boto3-get")
            }
            for rep in range(args.repeat):
                # Alternate who goes first, so neither always gets the warmer server.
                order = ("ours", "boto3") if rep % 2 == 0 else ("boto3", "ours")
                for who in order:
                    if who == "ours":
                        times["ours-put"].append(
                            timed(lambda: ours.put_file(source, "b.bin", expected_sha256=sha256))
                        )
                    else:
                        times["boto3-put"].append(
                            timed(lambda: theirs.upload_file(str(source), "bench", "theirs/b.bin"))
                        )
                for who in order:
                    dest = work / f"{who}-{rep}.bin"
                    if who == "ours":
                        times["ours-get"].append(
                            timed(
                                functools.partial(
                                    ours.get_file, "b.bin", dest, expected_sha256=sha256
                                )
                            )
                        )
                    else:
                        times["boto3-get"].append(
                            timed(
                                functools.partial(
                                    theirs.download_file, "bench", "theirs/b.bin", str(dest)
                                )
                            )
                        )
                    if hashlib.sha256(dest.read_bytes()).hexdigest() != sha256:
                        raise SystemExit(f"{who} downloaded different bytes")
                    dest.unlink()
                print(
                    f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                    flush=True,
                )
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    med = {k: statistics.median(v) for k, v in times.items()}
    size = args.size_mib * MiB
    print(
        f"\n{args.size_mib} MiB incompressible, moto S3 server, medians of {args.repeat} runs, "
        f"our concurrency {args.concurrency}:"
    )
    for name, seconds in med.items():
        print(f"  {name:<10} {seconds:6.2f} s  {size / seconds / MiB:7.1f} MiB/s")
    print(f"  upload:   ours at {med['boto3-put'] / med['ours-put']:.2f}x boto3's throughput")
    print(f"  download: ours at {med['boto3-get'] / med['ours-get']:.2f}x boto3's throughput")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
