"""moto's S3 server over real HTTP on 127.0.0.1, for the tests and the benchmarks."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from backup_pipelines.devtools.local_postgres import free_port

# Under load (parallel test workers on two cores) moto can take half a minute to answer.
START_TIMEOUT_SECONDS = 90


def start_s3_server(
    timeout: float = START_TIMEOUT_SECONDS,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``moto_server`` on a free port; return the process and its endpoint URL once it
    answers (the caller stops the process)."""
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {url}") from None
            time.sleep(0.1)
