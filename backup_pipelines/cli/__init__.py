"""``backup-pipelines``: the engine from the command line, for cron, scripts and outages.

Everything an operator needs while Dagster is down works from here. Each area registers its
commands in its own module (``cli/<area>.py`` with a ``register(subparsers)`` function).
Exit status: 0 success, 1 failure of the operation, 2 bad configuration, usage or a refusal
(the mapping from errors to statuses lives in ``engine/errors.py``). Every failure is one line on
stderr saying what is wrong and what to do; a Python traceback only with ``-v``.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing itself is not imported: it costs the per-segment path
if TYPE_CHECKING:
    import argparse
    import logging
    from collections.abc import Sequence

# Nothing heavy is imported at module level: in async WAL mode (``--spool-dir``) PostgreSQL's
# per-segment wal-push / wal-fetch are answered by ``cli/wal_async.py`` alone, before any of the
# engine, pydantic or the targets file is loaded.

# Areas whose commands the CLI offers (modules ``cli/<name>.py``), in the order `--help` lists them.
COMMAND_MODULES = ["backups", "restore", "migrations", "pitr", "wal_async", "offsite", "monitoring"]

# PostgreSQL runs these once per WAL file (archive_command / restore_command): load only their
# own area, so a recovery replaying thousands of segments does not pay for every import.
FAST_COMMANDS = {"wal-push": "pitr", "wal-fetch": "pitr", "wal-worker": "wal_async"}


def _command_modules(argv: Sequence[str]) -> list[str]:
    for token in argv:
        if token in FAST_COMMANDS:
            return [FAST_COMMANDS[token]]
    return COMMAND_MODULES


def __getattr__(name: str) -> object:
    # ``backup_pipelines.cli.log`` as before, without importing logging for the fast path.
    if name == "log":
        import logging

        return logging.getLogger("backup_pipelines")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser(modules: Sequence[str] = tuple(COMMAND_MODULES)) -> argparse.ArgumentParser:
    import argparse
    import importlib

    parser = argparse.ArgumentParser(
        prog="backup-pipelines",
        description="PostgreSQL backups, verification and recovery (works without Dagster running).",
    )
    parser.add_argument(
        "--config", help="targets file (default: $BACKUP_PIPELINES_CONFIG or ./backup_targets.yaml)"
    )
    parser.add_argument("--log-file", help="also log to this file, rotated daily, 30 days kept")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(f"backup_pipelines.cli.{name}").register(sub)
    return parser


def _log_file_handler(log_file: str) -> logging.Handler:
    from logging.handlers import TimedRotatingFileHandler
    from pathlib import Path

    from backup_pipelines.engine.errors import ConfigError
    from backup_pipelines.engine.fsutil import ensure_private_dir

    path = Path(log_file).expanduser()
    if not path.name or path.is_dir():
        raise ConfigError(
            f"--log-file {log_file} is a folder",
            hint="name a file, e.g. /var/log/backup-pipelines/cron.log",
        )
    ensure_private_dir(path.parent, what="--log-file folder", warn_shared=False)
    try:
        return TimedRotatingFileHandler(path, when="midnight", backupCount=30, utc=True)
    except OSError as exc:
        raise ConfigError(
            f"--log-file {path} cannot be opened for writing: {exc.strerror or exc}",
            hint="choose a file this user can write, or fix its owner and mode",
        ) from None


def _is_terminal(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False


def configure_logging(verbose: bool, log_file: str | None) -> None:
    import logging

    from backup_pipelines.cli.output import use_live_line
    from backup_pipelines.engine.progress import LiveLine, LiveLineHandler

    # At a terminal, progress is one live line on stderr and log records are written above it.
    live = LiveLine(sys.stderr) if _is_terminal(sys.stderr) else None
    use_live_line(live)
    handlers: list[logging.Handler] = [
        LiveLineHandler(live) if live else logging.StreamHandler(sys.stderr)
    ]
    if log_file:
        handlers.append(_log_file_handler(log_file))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        handlers=handlers,
        force=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        _start_as_program()
    try:
        return _main(argv)
    except BrokenPipeError:
        from backup_pipelines.cli.output import silence_stdout

        # The reader of our output went away (`... | head`). Results go through say(), which
        # survives that and lets the command finish; this only catches a stray write (e.g.
        # --help), after which we cannot tell whether the command finished.
        silence_stdout()
        return 1
    finally:
        if argv is None:
            _skip_exit_collection()


def _start_as_program() -> None:
    # Start-up allocates hundreds of thousands of long-lived objects (imports); collecting
    # them every 700 allocations costs ~0.05 s before pg_dump can start, and finds nothing.
    import gc
    import os

    gc.set_threshold(50_000, 20, 100)
    # pydantic looks for plugins in every installed distribution's entry points (a scan of
    # the environment's metadata, ~20 ms with Dagster installed) before its first model is
    # built; the CLI uses none. A value the operator set is kept.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")


def _skip_exit_collection() -> None:
    # The interpreter's last garbage collection walks every object the imports made (pydantic
    # schemas, psycopg): 0.15-0.2 s after the work is done, a tenth of a small backup. Frozen
    # objects are skipped; files are closed and flushed by then, and the process ends anyway.
    # Only when run as a program (argv from sys.argv): a test calling main() keeps its GC.
    import gc

    gc.freeze()


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(token == "--spool-dir" or token.startswith("--spool-dir=") for token in argv):
        from backup_pipelines.cli.wal_async import run_async

        answered = run_async(argv)
        if answered is not None:
            return answered
        # Not answered through the spool (e.g. a direct fetch): the ordinary command.
    import logging
    import os
    from pathlib import Path

    from backup_pipelines.engine.errors import EXIT_FAILED, BackupPipelinesError, exit_code_for

    log = logging.getLogger("backup_pipelines")
    parser = build_parser(_command_modules(argv))
    args = parser.parse_args(argv)
    try:
        configure_logging(args.verbose, args.log_file)
    except BackupPipelinesError as exc:
        print(f"backup-pipelines: {exc.one_line()}", file=sys.stderr, flush=True)
        return exit_code_for(exc)
    if args.config:
        from backup_pipelines.engine.config import CONFIG_ENV_VAR

        # Code that finds settings on its own (e.g. decryption keys for a backup's target)
        # must read the same targets file as the command.
        os.environ[CONFIG_ENV_VAR] = str(Path(args.config).expanduser().resolve())
    try:
        return int(args.func(args))
    except BackupPipelinesError as exc:
        log.debug("details", exc_info=True)
        log.error(exc.one_line())
        return exit_code_for(exc)
    except KeyboardInterrupt:
        log.error("interrupted; nothing half-written was kept")
        return 130
    except BrokenPipeError:
        raise
    except OSError as exc:
        # A file or folder the command needed (not one the engine already explained).
        log.debug("details", exc_info=True)
        where = f" ({exc.filename})" if exc.filename else ""
        log.error(
            f"{args.command} failed: {exc.strerror or exc}{where}. What to do: check that the "
            "path exists and this user may use it; rerun with -v for details"
        )
        return EXIT_FAILED
    except Exception as exc:
        # A bug, not an operator error: still one line (the traceback is there with -v).
        log.debug("details", exc_info=True)
        detail = " ".join(str(exc).split())
        log.error(
            f"{args.command} failed with an unexpected error ({type(exc).__name__}: {detail}). "
            "What to do: rerun with -v for the traceback and report it"
        )
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
