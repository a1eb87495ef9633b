"""A real ``dagster-webserver`` as a child process, for the browser test and the benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from backup_pipelines.devtools.local_postgres import free_port

VENV_BIN = Path(sys.executable).parent


def graphql(url: str, query: str, timeout: float = 30) -> dict[str, Any]:
    """POST one GraphQL query to the webserver at ``url`` and return the decoded answer."""
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop ``proc`` and everything in its process group (the webserver's code server,
    ``dagster api grpc``, outlives SIGTERM and would linger for hours otherwise)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def start_webserver(
    env: dict[str, str], log: Path, cwd: Path, timeout: float = 180
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``dagster-webserver`` on ``backup_pipelines.definitions`` and wait until it lists
    the assets; returns the process (in its own process group) and its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [
                str(VENV_BIN / "dagster-webserver"),
                *("-h", "127.0.0.1", "-p", str(port), "-m", "backup_pipelines.definitions"),
            ],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            nodes = graphql(url, "{ assetNodes { assetKey { path } } }", timeout=timeout)
            if nodes.get("data", {}).get("assetNodes"):
                return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process_group(proc)
            raise RuntimeError("dagster-webserver did not come up:\n" + log.read_text()[-4000:])
        time.sleep(0.25)
