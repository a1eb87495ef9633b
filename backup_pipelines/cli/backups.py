"""Commands for logical backups: backup, verify, list, check-config."""

from __future__ import annotations

import argparse
import json

from backup_pipelines.cli.output import load_project, log, say
from backup_pipelines.engine.config import load_config
from backup_pipelines.engine.errors import EXIT_REFUSED, IntegrityError
from backup_pipelines.engine.listing import human_age, human_size, list_backups
from backup_pipelines.engine.pipeline import run_backup
from backup_pipelines.engine.preflight import project_problems
from backup_pipelines.engine.restore import restore_test
from backup_pipelines.engine.storage import open_backup
from backup_pipelines.engine.verify import verify_artifact


def cmd_backup(args: argparse.Namespace) -> int:
    config = load_project(args.config)
    target = config.target(args.target)
    artifact = run_backup(target, log=log, purpose="manual")
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
    passed = True
    for outcome in verify_artifact(artifact):
        say(f"  {outcome.name}: {'ok' if outcome.passed else 'FAILED'} - {outcome.message}")
        artifact.record_check(outcome.name, outcome.passed, outcome.message)
        passed = passed and outcome.passed
    if passed and args.test:
        result = restore_test(target, artifact, log=log)
        say(f"  {result.summary()}")
        artifact.record_check("restore_test", result.passed, result.summary())
        passed = result.passed
    if not passed:
        say("backup FAILED verification: do not rely on it")
        return 1
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
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
    if not all(o.passed for o in outcomes):
        failed = next(o for o in outcomes if not o.passed)
        raise IntegrityError(
            f"verification failed: {failed.message}",
            hint=failed.hint
            or "do not restore from this file; use an older backup or the offsite copy",
        )
    say("OK")
    return 0


def describe_encryption(encryption: dict) -> str:
    mode = encryption.get("mode", "none")
    key = encryption.get("key_id") or encryption.get("fingerprint")
    return f"{mode} (key {key})" if key else mode


def cmd_list(args: argparse.Namespace) -> int:
    config = load_project(args.config)
    target = config.target(args.target)
    listing = list_backups(target)
    if args.json:
        say(
            json.dumps(
                [
                    {
                        "path": str(a.path),
                        "started_at": a.meta.started_at.isoformat(),
                        "size_bytes": a.meta.size_bytes,
                        "status": a.status,
                        "sha256": a.meta.sha256,
                        "encryption": a.meta.encryption,
                    }
                    for a in listing.artifacts
                ],
                indent=2,
            )
        )
        return 0
    if not listing.artifacts:
        say(f"no backups for target '{target.name}' in {target.backup_dir}")
    else:
        say(f"{'BACKUP':<48} {'TAKEN (UTC)':<20} {'AGE':>8} {'SIZE':>10}  {'STATUS':<10} KEY")
        for a in listing.artifacts:
            say(
                f"{a.path.name:<48} {a.meta.started_at.strftime('%Y-%m-%d %H:%M:%S'):<20} "
                f"{human_age(a.meta.started_at):>8} {human_size(a.meta.size_bytes):>10}  {a.status:<10} "
                f"{describe_encryption(a.meta.encryption)}"
            )
    if listing.partial_leftovers:
        say(
            f"({listing.partial_leftovers} .partial leftover(s) of interrupted backups; not backups)"
        )
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    # Not load_project: broken targets are listed below with everything else, not as warnings.
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
