"""Commands for schema migrations: rollback (the guide's ``migrations/rollback.sh N ENV``)."""

from __future__ import annotations

import argparse

from backup_pipelines.cli.output import load_project, log, say


def _steps(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"steps must be a whole number, not {value!r}") from None


def cmd_rollback(args: argparse.Namespace) -> int:
    from backup_pipelines.engine.migrations.plan import plan_rollback
    from backup_pipelines.engine.migrations.rollback import execute_rollback

    config = load_project(args.config)
    target = config.target(args.target)
    plan = plan_rollback(target, args.steps)
    say(plan.describe())
    if args.dry_run:
        say("dry run: nothing was changed")
        return 0
    result = execute_rollback(target, plan, confirm=args.confirm, log=log)
    say(result.summary())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rollback",
        help="roll back the last N schema migrations (drizzle) after a safety backup",
        description=(
            "Undo the last STEPS applied migrations of TARGET with their NNNN_<tag>.down.sql "
            "files: check the plan, ask for confirmation, take a safety backup, run every down "
            "migration and delete its row from the tracking table in ONE transaction, verify."
        ),
    )
    p.add_argument("steps", type=_steps, help="how many applied migrations to roll back")
    p.add_argument("target", help="target name from the targets file")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and stop (changes nothing)"
    )
    p.add_argument(
        "--confirm",
        metavar="TARGET",
        help="confirm without a prompt by repeating the target name (for scripts)",
    )
    p.set_defaults(func=cmd_rollback)
