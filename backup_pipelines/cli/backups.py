"""Commands for logical backups: backup, verify, list, check-config."""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from backup_pipelines.cli.output import add_progress_option, load_project, log, progress_for, say
from backup_pipelines.engine.clock import is_future
from backup_pipelines.engine.errors import EXIT_REFUSED, BackupPipelinesError, IntegrityError

if TYPE_CHECKING:
    from backup_pipelines.engine.listing import BackupListing


def cmd_backup(args: argparse.Namespace) -> int:
    # Only what the dump needs is imported before pg_dump starts; verification comes after.
    from backup_pipelines.engine.backup.logical import run_backup
    from backup_pipelines.engine.listing import human_size

    config = load_project(args.config)
    target = config.target(args.target)
    progress = progress_for(args)
    artifact = run_backup(target, log=log, purpose="manual", progress=progress)
    say(f"backup: {artifact.path}")
    say(
        f"  size {human_size(artifact.meta.size_bytes)} (dump {human_size(artifact.meta.dump_bytes)}), "
        f"sha256 {artifact.meta.sha256}"
    )
    say(
        f"  {len(artifact.meta.row_counts)} tables, {artifact.meta.total_rows} rows, "
        f"{artifact.meta.duration_seconds:.1f}s"
    )
    if args.skip_verify:
        return 0
    from backup_pipelines.engine.drills.logical import restore_test
    from backup_pipelines.engine.verify import verify_artifact

    passed = True
    for outcome in verify_artifact(artifact):
        say(f"  {outcome.name}: {'ok' if outcome.passed else 'FAILED'} - {outcome.message}")
        artifact.record_check(outcome.name, outcome.passed, outcome.message)
        passed = passed and outcome.passed
    if passed and args.test:
        result = restore_test(target, artifact, log=log, progress=progress)
        say(f"  {result.summary()}")
        artifact.record_check("restore_test", result.passed, result.summary())
        passed = result.passed
    if not passed:
        say("backup FAILED verification: do not rely on it")
        return 1
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from backup_pipelines.engine.storage import open_backup
    from backup_pipelines.engine.verify import verify_artifact

    artifact = open_backup(args.backup)
    meta = artifact.meta
    say(f"{artifact.location}")
    say(
        f"  target {meta.target}, database {meta.database}, {meta.format}/{meta.compression}, "
        f"encryption {describe_encryption(meta.encryption)}, taken {meta.started_at.isoformat()}"
    )
    outcomes = verify_artifact(artifact)
    for outcome in outcomes:
        say(f"  {outcome.name}: {'ok' if outcome.passed else 'FAILED'} - {outcome.message}")
    # The result goes into .meta, so `list`, retention and `restore latest` know it too.
    not_recorded: BackupPipelinesError | None = None
    try:
        for outcome in outcomes:
            artifact = artifact.record_check(outcome.name, outcome.passed, outcome.message)
    except BackupPipelinesError as exc:
        not_recorded = exc
    failed = next((o for o in outcomes if not o.passed), None)
    if failed is not None:
        raise IntegrityError(
            f"verification failed: {failed.message}"
            + (
                f"; the result could not be recorded either: {not_recorded.message}"
                if not_recorded
                else " (recorded in the .meta)"
            ),
            hint=failed.hint
            or "do not restore from this file; use an older backup or the offsite copy",
        )
    if not_recorded is not None:
        raise not_recorded
    say("  result recorded in the .meta")
    say("OK")
    return 0


def describe_encryption(encryption: dict) -> str:
    mode = encryption.get("mode", "none")
    key = encryption.get("key_id") or encryption.get("fingerprint")
    return f"{mode} (key {key})" if key else mode


@dataclass(frozen=True)
class ListRow:
    """One line of `list`: a complete backup, or a data file whose .meta cannot be read."""

    name: str
    path: Path
    started_at: datetime | None
    size_bytes: int | None
    purpose: str
    status: str
    key: str
    note: str
    sha256: str | None = None
    encryption: dict | None = None
    dated_in_future: bool = False


def _list_rows(listing: BackupListing) -> list[ListRow]:
    from backup_pipelines.engine.listing import future_note, problem_of

    rows = []
    for a in listing.artifacts:
        future = is_future(a.meta.started_at, listing.now)
        rows.append(
            ListRow(
                name=a.path.name,
                path=a.path,
                started_at=a.meta.started_at,
                size_bytes=a.meta.size_bytes,
                purpose=a.meta.purpose,
                status=a.status,
                key=describe_encryption(a.meta.encryption),
                note=problem_of(a) or (future_note(a, listing.now) if future else ""),
                sha256=a.meta.sha256,
                encryption=a.meta.encryption,
                dated_in_future=future,
            )
        )
    for u in listing.unreadable:
        size: int | None = None
        with contextlib.suppress(OSError):
            size = u.path.stat().st_size
        rows.append(
            ListRow(
                u.path.name, u.path, None, size, "?", "damaged", "?", u.reason + UNREADABLE_NOTE
            )
        )
    epoch = datetime.min.replace(tzinfo=UTC)
    return sorted(rows, key=lambda r: (r.started_at or epoch, r.name), reverse=True)


UNREADABLE_NOTE = " (not trusted, never deleted by retention)"


def cmd_list(args: argparse.Namespace) -> int:
    from backup_pipelines.engine.listing import human_age, human_size, list_backups

    config = load_project(args.config)
    target = config.target(args.target)
    listing = list_backups(target)
    rows = _list_rows(listing)
    if args.json:
        say(
            json.dumps(
                [
                    {
                        "name": r.name,
                        "path": str(r.path),
                        "started_at": r.started_at.isoformat() if r.started_at else None,
                        "size_bytes": r.size_bytes,
                        "purpose": r.purpose,
                        "status": r.status,
                        "problem": r.note if r.status in ("failed", "damaged") else None,
                        "dated_in_future": r.dated_in_future,
                        "sha256": r.sha256,
                        "encryption": r.encryption,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return 0
    if not rows:
        say(f"no backups for target '{target.name}' in {target.backup_dir}")
    else:
        say(
            f"{'BACKUP':<48} {'TAKEN (UTC)':<20} {'AGE':>8} {'SIZE':>10}  {'PURPOSE':<12} "
            f"{'STATUS':<10} {'KEY':<12} NOTE"
        )
        for r in rows:
            taken = r.started_at.strftime("%Y-%m-%d %H:%M:%S") if r.started_at else "?"
            age = human_age(r.started_at, listing.now) if r.started_at else "?"
            size = human_size(r.size_bytes) if r.size_bytes is not None else "?"
            say(
                f"{r.name:<48} {taken:<20} {age:>8} {size:>10}  {r.purpose:<12} "
                f"{r.status:<10} {r.key:<12} {r.note}".rstrip()
            )
    if listing.partial_leftovers:
        say(
            f"({listing.partial_leftovers} .partial leftover(s) of interrupted backups; not backups)"
        )
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    # Not load_project: broken targets are listed below with everything else, not as warnings.
    from backup_pipelines.engine.config import load_config
    from backup_pipelines.engine.preflight import project_problems

    config = load_config(args.config, isolate_targets=True)
    problems = project_problems(config)
    count = len(config.targets) + len(config.broken_targets)
    say(f"{config.source_path}: {count} target(s), backups in {config.resolved_backup_root}")
    for problem in problems:
        say(f"  {problem}")
    return EXIT_REFUSED if problems else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backup", help="back up a target now")
    p.add_argument("target")
    p.add_argument(
        "--test", action="store_true", help="restore into a scratch database and compare row counts"
    )
    p.add_argument(
        "--skip-verify",
        action="store_true",
        help="skip re-reading the new backup (checksum + full decode); Dagster runs these as checks",
    )
    add_progress_option(p)
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("verify", help="check a backup's checksum and readability")
    p.add_argument("backup", help="path of the backup file, or its s3://bucket/key offsite copy")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("list", help="list a target's backups, newest first")
    p.add_argument("target")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "check-config", help="validate the targets file and its environment variables"
    )
    p.set_defaults(func=cmd_check_config)
