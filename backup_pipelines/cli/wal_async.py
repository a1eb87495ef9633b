"""Asynchronous WAL archiving from the command line.

``wal-push ... --spool-dir DIR %p`` and ``wal-fetch ... --spool-dir DIR %f %p`` (what
``wal-setup`` prints when ``pitr.async_archive`` is on) are answered here through the spool
(``engine/wal/spool.py``), without loading the targets file or the engine: :func:`run_async`
runs before anything else in the CLI and imports only a few standard modules. ``wal-worker`` is
the background worker those calls start (``engine/wal/worker.py``).

Exit statuses are those of the synchronous commands: wal-push 0 only once the segment is stored
in every place, else 1; wal-fetch 0 restored, 1 not in the archive, 2 refused (through the direct
fetch, which every failure of the spool or the worker falls back to).
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False  # typing is not imported on the per-segment path
if TYPE_CHECKING:
    import argparse

_GLOBAL_WITH_VALUE = {"--config", "--log-file"}
_COMMAND_WITH_VALUE = {"--target", "--spool-dir"}


def _parse(argv: list[str]) -> dict[str, object] | None:
    """The options of an async wal-push / wal-fetch, or None for anything this small parser
    does not know (the full command line then handles it, synchronously)."""
    options: dict[str, object] = {"verbose": False, "positional": []}
    tokens = iter(argv)
    command = None
    for token in tokens:
        key, equals, value = token.partition("=")
        if command is None:
            if key in _GLOBAL_WITH_VALUE:
                options[key] = value if equals else next(tokens, None)
            elif token in ("-v", "--verbose"):
                options["verbose"] = True
            elif token in ("wal-push", "wal-fetch"):
                command = token
            else:
                return None
        elif key in _COMMAND_WITH_VALUE:
            options[key] = value if equals else next(tokens, None)
        elif token.startswith("-"):
            return None  # --name, --help, ...
        else:
            options["positional"].append(token)  # type: ignore[attr-defined]
    expected = 1 if command == "wal-push" else 2
    if command is None or len(options["positional"]) != expected:  # type: ignore[arg-type]
        return None
    if not options.get("--spool-dir") or None in options.values():
        return None
    options["command"] = command
    return options


def _say(level: str, message: str) -> None:
    # The format of the CLI's log lines (the server log shows both kinds side by side).
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    sys.stderr.write(f"{stamp},{int(now % 1 * 1000):03d} {level} {message}\n")
    sys.stderr.flush()


def worker_command(options: dict[str, object]) -> list[str]:
    command = [sys.executable, "-m", "backup_pipelines.cli"]
    if options.get("--config"):
        command += ["--config", os.path.abspath(str(options["--config"]))]
    if options["verbose"]:
        command.append("-v")
    command += ["wal-worker", "--spool-dir", os.path.abspath(str(options["--spool-dir"]))]
    if options.get("--target"):
        command += ["--target", str(options["--target"])]
    return command


def run_async(argv: list[str]) -> int | None:
    """Answer an async wal-push / wal-fetch; None: run the ordinary command instead."""
    options = _parse(argv)
    if options is None:
        return None
    from backup_pipelines.engine.wal import spool

    spool_dir = os.path.abspath(str(options["--spool-dir"]))
    positional: list[str] = options["positional"]  # type: ignore[assignment]
    command = worker_command(options)
    if options["command"] == "wal-push":
        path = positional[0]
        name = os.path.basename(path)
        try:
            code, message = spool.push(spool_dir, path, name, command)
        except BaseException as exc:  # noqa: BLE001 - the contract is "0 or 1", whatever happened
            code, message = 1, str(exc) or type(exc).__name__
        if code == 0:
            _say("INFO", f"wal-push: {message}")
        else:
            _say("ERROR", f"wal-push FAILED for {path}: {message}")
        return code
    name, destination = positional
    try:
        answer = spool.fetch(spool_dir, name, destination, command)
    except BaseException as exc:  # noqa: BLE001 - the direct fetch decides
        _say("WARNING", f"wal-fetch: the spool failed ({exc}); fetching {name} directly")
        answer = None
    if answer is None:
        return None
    code, message = answer
    _say("INFO", f"wal-fetch: {message}")
    return code


def cmd_wal_worker(args: argparse.Namespace) -> int:
    from pathlib import Path

    from backup_pipelines.cli.output import load_project, log
    from backup_pipelines.engine.wal import resolve_pitr_target, wal_archive_for
    from backup_pipelines.engine.wal.worker import AsyncWorker

    spool_dir = Path(args.spool_dir).expanduser().absolute()
    target = resolve_pitr_target(load_project(args.config), args.target)
    settings = target.settings.pitr
    assert settings is not None
    if not settings.async_archive or settings.spool_dir != spool_dir:
        log.warning(
            f"target '{target.name}' has async_archive={settings.async_archive} and spool_dir "
            f"{settings.spool_dir}, but PostgreSQL's command passes --spool-dir {spool_dir}: "
            "serving it anyway; update archive_command/restore_command (wal-setup prints them)"
        )
    worker = AsyncWorker(
        wal_archive_for(target),
        spool_dir,
        workers=settings.async_workers,
        prefetch=settings.prefetch_segments,
    )
    if not worker.run():
        log.info(f"another async WAL worker already serves {spool_dir}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "wal-worker",
        help="the async WAL worker (started by wal-push/wal-fetch --spool-dir; exits when idle)",
    )
    p.add_argument("--target", help="target name (default: the only target with pitr:)")
    p.add_argument("--spool-dir", required=True, help="the target's pitr.spool_dir")
    p.set_defaults(func=cmd_wal_worker)
