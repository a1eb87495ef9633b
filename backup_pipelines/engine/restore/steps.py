"""The steps of an in-place restore, each a function of its own, and the helper that runs them.

:class:`RestoreRun` carries what every step needs (the target, its live database, the
maintenance connection, the log) and what the steps found so far (the safety backup, the name of
the restoring copy, the replaced database). :meth:`RestoreRun.step` runs one named step: it logs
its start and end, records its duration for the report, and turns an error into a
:class:`RestoreStepError` naming the step and the safety backup.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from backup_pipelines.engine.artifacts import BackupArtifact
from backup_pipelines.engine.backup.globals import apply_database_properties, read_globals_sql
from backup_pipelines.engine.backup.logical import run_backup
from backup_pipelines.engine.config import ProjectConfig, Target
from backup_pipelines.engine.confirm import require_confirmation
from backup_pipelines.engine.conninfo import ConnectionInfo
from backup_pipelines.engine.databases import require_database
from backup_pipelines.engine.errors import BackupPipelinesError, IntegrityError, RestoreFailedError
from backup_pipelines.engine.postgres import PgTools, connect, table_row_counts
from backup_pipelines.engine.processes import one_line
from backup_pipelines.engine.progress import ProgressReporter
from backup_pipelines.engine.restore.cleanup import (
    drop_expired_previous_copies,
    drop_interrupted_restores,
    remove_abandoned_work_dirs,
    work_dir_for,
)
from backup_pipelines.engine.restore.database import (
    RESTORING_MARKER,
    copy_database_properties,
    create_database,
    database_exists,
    disable_subscriptions,
    drop_database,
    free_name,
    mark_database,
    replication_slots_of,
    server_tools,
    subscriptions_of,
    swap_databases,
    utc_stamp,
)
from backup_pipelines.engine.restore.errors import RestoreRefusedError, RestoreStepError
from backup_pipelines.engine.restore.locate import (
    check_backup_matches_target,
    local_copy,
    locate_backup,
)
from backup_pipelines.engine.restore.roles import RolesReport, create_missing_roles
from backup_pipelines.engine.restore.runner import compare_counts, describe_mismatches, restore_into
from backup_pipelines.engine.verify import verify_artifact

T = TypeVar("T")

ROLES_HINT = (
    "no role was created (all or nothing); creating roles needs CREATEROLE (SUPERUSER for "
    "superuser roles): restore as a superuser of this server"
)
SWAP_HINT = (
    "the restoring role needs to own the database (or be superuser) and be allowed to "
    "terminate its sessions (pg_signal_backend)"
)


@dataclass
class RestoreRun:
    """One in-place restore of a target: its context, and what its steps found so far."""

    config: ProjectConfig
    target: Target
    live: ConnectionInfo  # the target's own database
    admin: ConnectionInfo  # the maintenance database the restore connects to
    log: Any
    progress: ProgressReporter
    started: float = field(default_factory=time.monotonic)
    step_seconds: dict[str, float] = field(default_factory=dict)
    safety_backup: str | None = None
    restoring: str | None = None  # the new database the backup is restored into
    previous: str | None = None  # what the live database was renamed to by the swap
    terminated_sessions: int = 0
    roles: RolesReport | None = None  # what the roles step created (None: not run)

    @property
    def database(self) -> str:
        return self.live.dbname

    @property
    def server(self) -> str:
        return self.admin.describe().rsplit("/", 1)[0]

    @property
    def work_dir(self) -> Path:
        return work_dir_for(self.target)

    def failure(
        self, step: str, exc: BaseException, extra_hint: str | None = None
    ) -> RestoreStepError:
        """The error for a failed ``step``: the cause, and that the live database is unchanged."""
        cause = exc.message if isinstance(exc, BackupPipelinesError) else self.live.redact(str(exc))
        safety = self.safety_backup
        where = f"safety backup: {safety}" if safety else "no safety backup was needed or taken"
        hint_parts = [f"database '{self.database}' was not changed; {where}"]
        cause_hint = exc.hint if isinstance(exc, BackupPipelinesError) else None
        if extra_hint or cause_hint:
            hint_parts.append(extra_hint or cause_hint or "")
        return RestoreStepError(
            step,
            f"restore of target '{self.target.name}' failed at step '{step}': {cause}",
            hint="; ".join(hint_parts),
            safety_backup=safety,
        )

    def step(
        self,
        name: str,
        action: Callable[..., T],
        *args: Any,
        timed: bool = True,
        wrap: bool = True,
        hint: str | None = None,
    ) -> T:
        """Run the step ``name`` (``action(*args)``): log its start and end, record how long it
        took in the report (unless ``timed`` is off), and turn a failure into a
        RestoreStepError naming the step (unless ``wrap`` is off: refusals pass unchanged)."""
        self.log.info(f"Restore step '{name}' started")
        clock = time.monotonic()
        try:
            result = action(*args)
        except RestoreStepError:
            raise
        except (BackupPipelinesError, psycopg.Error) as exc:
            if not wrap:
                raise
            raise self.failure(name, exc, hint) from None
        seconds = time.monotonic() - clock
        if timed:
            self.step_seconds[name] = seconds
        self.log.info(f"Restore step '{name}' done in {seconds:.1f}s")
        return result


def start(
    config: ProjectConfig,
    target_name: str,
    *,
    log: Any,
    progress: ProgressReporter,
    database: str | None = None,
) -> RestoreRun:
    """The restore of ``target_name`` (``database`` of a server target); refused when its
    database is the maintenance database."""
    target = require_database(config.target(target_name), database, "restore")
    live = ConnectionInfo.parse(
        target.dsn(), source=f"target '{target.name}' ({target.settings.dsn_env})"
    )
    admin = live.with_dbname(target.settings.restore.maintenance_database)
    if live.dbname == admin.dbname:
        raise RestoreRefusedError(
            f"target '{target.name}' restores into database '{live.dbname}', which is also the "
            "maintenance database the restore connects to (a database cannot be renamed while "
            "connected to it)",
            hint="set restore.maintenance_database for the target to another database, e.g. template1",
        )
    return RestoreRun(config, target, live, admin, log, progress)


def locate(run: RestoreRun, backup: str, allow_other_database: bool) -> BackupArtifact:
    """Open the backup the operator named and check it is one of this target's database."""
    artifact = locate_backup(run.config, run.target, backup)
    if not allow_other_database:
        check_backup_matches_target(artifact, run.target, run.database)
    return artifact


def confirm(
    run: RestoreRun,
    artifact: BackupArtifact,
    given: str | None,
    prompt: Callable[[str], str] | None,
) -> None:
    """The operator types the target's name (or passed it); then the plan goes to the log."""
    meta = artifact.meta
    require_confirmation(
        run.target.name,
        given,
        action=(
            f"replace database '{run.database}' on {run.server} with "
            f"{Path(artifact.location).name} (taken {meta.started_at.isoformat()})"
        ),
        prompt=prompt,
    )
    run.log.info(
        f"Restoring {artifact.location} (database {meta.database}, taken "
        f"{meta.started_at.isoformat()}, {meta.format}/{meta.compression}, encryption "
        f"{meta.encryption.get('mode', 'none')}) into target '{run.target.name}' "
        f"({run.live.describe()})"
    )


def download(
    run: RestoreRun, artifact: BackupArtifact, stack: contextlib.ExitStack
) -> BackupArtifact:
    """An offsite copy is downloaded once (streamed to the work folder, removed when the restore
    ends), then verified and restored from the local file."""
    return stack.enter_context(
        local_copy(artifact, run.work_dir, log=run.log, progress=run.progress)
    )


def verify(run: RestoreRun, local: BackupArtifact) -> None:
    """Checksum, decryption and decompression of the whole backup, before anything is touched."""
    run.log.info(f"Verifying {local.path.name} (checksum, decryption, decompression)")
    clock = time.monotonic()
    for outcome in verify_artifact(local):
        if not outcome.passed:
            raise run.failure(
                "verify",
                IntegrityError(outcome.message),
                outcome.hint
                or "use another backup (`backup-pipelines list` shows them) or the offsite copy",
            )
    run.log.info(f"Verified {local.path.name} in {time.monotonic() - clock:.1f}s")


def inspect_server(run: RestoreRun) -> tuple[bool, PgTools]:
    """Whether the live database exists, and the client tools matching the server."""
    with connect(run.admin, autocommit=True) as conn:
        exists = database_exists(conn, run.database)
    return exists, server_tools(run.admin, run.target)


def take_safety_backup(run: RestoreRun, exists: bool) -> None:
    """A ``pre-restore`` backup of what is there now; the restore stops if it fails."""
    if not exists:
        run.log.warning(
            f"Database '{run.database}' does not exist on the server: nothing to protect, "
            "no safety backup; the restore will create it"
        )
        return
    run.log.info(f"Taking a pre-restore safety backup of {run.live.describe()}")
    run.safety_backup = run_backup(
        run.target, purpose="pre-restore", log=run.log, progress=run.progress
    ).location
    run.log.info(f"Safety backup written: {run.safety_backup}")


def create_roles(run: RestoreRun, local: BackupArtifact) -> None:
    """Create the roles the backup needs that this server lacks, from the backup's globals
    file; existing roles are never changed (see ``roles.py`` for what is applied and why)."""
    entry = local.meta.globals
    if entry is None:
        run.log.warning(
            f"{local.path.name} was taken before backups captured the server's globals: "
            "missing roles are not created (create them first when restoring onto a new server)"
        )
        return
    text = read_globals_sql(local)
    with connect(run.admin, autocommit=True) as conn:
        run.roles = create_missing_roles(conn, text, log=run.log)
    if run.roles.created and not entry.role_passwords:
        run.log.warning(
            f"The roles were created without passwords ({entry.role_passwords_reason}); "
            "set them with ALTER ROLE ... PASSWORD before applications log in"
        )


def restore_into_new_database(run: RestoreRun, local: BackupArtifact, tools: PgTools) -> None:
    """Restore into a new database ``<db>_restoring_<time>``; the live one is still untouched.
    What killed restores of the target left behind is cleared away first."""
    drop_interrupted_restores(run.admin, run.target, run.database, log=run.log)
    remove_abandoned_work_dirs(run.work_dir, log=run.log)
    with connect(run.admin, autocommit=True) as conn:
        run.restoring = free_name(conn, run.database, f"restoring_{utc_stamp(datetime.now(UTC))}")
    create_database(run.admin, run.restoring, local)
    mark_database(run.admin, run.restoring, RESTORING_MARKER, run.target)
    restore_into(
        local,
        run.admin.with_dbname(run.restoring),
        tools=tools,
        jobs=run.target.settings.restore_jobs,
        work_dir=run.work_dir,
        log=run.log,
        progress=run.progress,
    )


def check_row_counts(run: RestoreRun, local: BackupArtifact) -> dict[str, int]:
    """Every table's row count in the restored database against the backup's ``.meta``."""
    assert run.restoring is not None
    meta = local.meta
    with connect(run.admin.with_dbname(run.restoring)) as conn:
        restored = table_row_counts(conn, with_children=meta.row_counts_with_children)
    mismatches = compare_counts(meta.row_counts, restored)
    if mismatches:
        raise run.failure(
            "check",
            RestoreFailedError(
                "row counts of the restored database differ from the backup's .meta: "
                + describe_mismatches(mismatches)
            ),
            "the backup does not restore to what was dumped; use another backup",
        )
    run.log.info(
        f"Restored database {run.restoring}: {len(restored)} tables, "
        f"{sum(restored.values())} rows match the backup's metadata"
    )
    return restored


def swap_in(run: RestoreRun, exists: bool, local: BackupArtifact | None = None) -> None:
    """The only step that touches the live database: the restored copy takes its name (and its
    owner, privileges and settings); the live one is kept as ``<db>_pre_restore_<time>``.
    A database new on this server gets the owner, privileges and settings the backup recorded
    (none for backups taken before globals were captured)."""
    assert run.restoring is not None
    entry = local.meta.globals if local is not None else None
    replaced_active: list[str] = []
    with connect(run.admin, autocommit=True) as conn:
        if not exists:
            with conn.transaction():
                if entry is not None and entry.database is not None:
                    apply_database_properties(conn, run.restoring, entry.database)
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(run.restoring), sql.Identifier(run.database)
                    )
                )
                conn.execute(
                    sql.SQL("COMMENT ON DATABASE {} IS NULL").format(sql.Identifier(run.database))
                )
        else:
            copy_database_properties(conn, run.database, run.restoring)
            run.previous = free_name(
                conn, run.database, f"pre_restore_{utc_stamp(datetime.now(UTC))}"
            )
            run.terminated_sessions = swap_databases(
                conn, run.database, run.restoring, run.previous, run.target, log=run.log
            )
            replaced_active = subscriptions_of(conn, run.previous, enabled=True)
            slots = replication_slots_of(conn, run.previous)
            if slots:
                # A logical slot belongs to the database it was made in: after the swap its
                # subscribers would go on receiving the replaced database's changes (none).
                run.log.warning(
                    f"Logical replication slot(s) {', '.join(slots)} stay with the replaced "
                    f"database {run.previous}: their subscribers receive nothing from the "
                    "restored one. Recreate the publication's slots for it (and resynchronise "
                    "the subscribers), then drop these"
                )
    if run.previous is not None and replaced_active:
        # The replaced database is out of service: left running, its subscriptions would go on
        # consuming the publisher's slots, and the restored copy would miss those changes.
        try:
            disable_subscriptions(run.admin, run.previous, replaced_active)
            run.log.warning(
                f"Disabled the subscription(s) of the replaced database {run.previous}: "
                + ", ".join(replaced_active)
            )
        except Exception as exc:  # the restore has succeeded: say what is left to do
            run.log.warning(
                f"Could not disable the subscription(s) {', '.join(replaced_active)} of the "
                f"replaced database {run.previous} ({one_line(run.admin.redact(str(exc)))}): "
                "disable them by hand (ALTER SUBSCRIPTION ... DISABLE) before enabling the "
                "restored ones"
            )
    _note_restored_subscriptions(run)


def _note_restored_subscriptions(run: RestoreRun) -> None:
    with connect(run.admin, autocommit=True) as conn:
        restored = subscriptions_of(conn, run.database)
    if restored:
        run.log.warning(
            f"The restored database has subscription(s) {', '.join(restored)}, disabled as "
            "pg_dump restores them: enable each (ALTER SUBSCRIPTION ... ENABLE) once "
            "replication from its publisher should resume"
        )


def drop_restoring_copy(run: RestoreRun) -> None:
    """After a failure before the swap finished: the restoring copy goes, the live one stays."""
    if run.restoring is not None:
        with contextlib.suppress(Exception):
            drop_database(run.admin, run.restoring)


def drop_old_copies(run: RestoreRun) -> tuple[bool, list[str]]:
    """After the swap: drop the replaced database at once when the grace period is 0, and the
    copies earlier restores kept once past it. Never fails the restore, which has succeeded.
    Returns whether the replaced database was dropped, and the expired copies dropped."""
    previous_dropped = False
    expired: list[str] = []
    grace = run.target.settings.restore.drop_previous_after_hours
    try:
        if run.previous and grace == 0:
            drop_database(run.admin, run.previous)
            previous_dropped = True
            run.log.info(
                f"Dropped the replaced database {run.previous} (drop_previous_after_hours: 0)"
            )
        expired = drop_expired_previous_copies(run.target, log=run.log)
    except BackupPipelinesError as exc:
        run.log.warning(f"Restore succeeded, but dropping old copies failed: {exc.message}")
    except psycopg.Error as exc:
        run.log.warning(
            f"Restore succeeded, but dropping old copies failed: {run.admin.redact(str(exc))}"
        )
    return previous_dropped, expired
