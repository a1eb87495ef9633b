"""The run queue of every instance configuration: Dagster's QueuedRunCoordinator that also tags
each run with the target it works on.

The per-target limit in ``dagster.yaml`` (``tag_concurrency_limits`` on
``backup_pipelines/target``) only holds back runs that carry the tag. Schedules and sensors set
it on their run requests; runs launched by hand do not: a ``restore_database``,
``rollback_migrations`` or ``pitr_restore`` run from the Launchpad names its target only in its
run config (``ops.<op>.config.target``), and an asset's "Materialize" button only selects assets
(``<target>/<asset>``). This coordinator adds ``backup_pipelines/target`` (and
``backup_pipelines/db_host`` when the targets file can be read here) when a run is submitted,
before it enters the queue, so the daemon's dequeue sees them: a restore of production waits
for the running backup of production instead of failing on the engine's lock, while a restore of
staging starts at once. A run that touches several targets (a whole multi-target job) gets no
target tag; the engine's per-target locks still refuse overlapping work on one database.

Dagster's documented way to change submitted runs ("run attribution" guide). In dagster.yaml::

    run_coordinator:
      module: backup_pipelines.lib.run_coordinator
      class: TargetTaggingRunCoordinator

Every process that loads the instance (webserver, daemon, run workers) imports this module.
"""

import logging
from collections.abc import Iterator, Mapping

import dagster as dg

from backup_pipelines.lib.tags import TAG_DB_HOST, TAG_TARGET

log = logging.getLogger(__name__)


def config_targets(run_config: Mapping[str, object]) -> set[str]:
    """The ``target`` in the config of every op of the run (``ops.<op>.config.target``)."""

    def walk(ops: object) -> Iterator[str]:
        if not isinstance(ops, Mapping):
            return
        for op in ops.values():
            if not isinstance(op, Mapping):
                continue
            config = op.get("config")
            if isinstance(config, Mapping) and isinstance(config.get("target"), str):
                yield config["target"]
            yield from walk(op.get("ops"))  # ops inside a graph

    return set(walk(run_config.get("ops")))


def asset_targets(instance: dg.DagsterInstance, run: dg.DagsterRun) -> set[str]:
    """Targets of the assets the run materializes or checks (asset keys are ``<target>/<name>``)."""
    keys: set[dg.AssetKey] = set(run.asset_selection or ())
    keys |= {check.asset_key for check in run.asset_check_selection or ()}
    if not keys:
        # A whole job was launched: the assets it plans to materialize were logged at creation.
        planned = instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED
        ).records
        for record in planned:
            event = record.event_log_entry.dagster_event
            if event is not None and event.asset_key is not None:
                keys.add(event.asset_key)
    return {key.path[0] for key in keys if len(key.path) > 1}


def _db_host(target: str) -> str | None:
    """The target's database server, when the targets file can be read in this process."""
    from backup_pipelines.engine.config import load_config
    from backup_pipelines.lib.tags import db_host

    try:
        config = load_config(isolate_targets=True)
    except Exception:  # the webserver may not see the targets file: the target tag is enough
        return None
    return db_host(target, config) if target in config.targets else None


def target_tags(instance: dg.DagsterInstance, run: dg.DagsterRun) -> dict[str, str]:
    """The tags ``run`` lacks to fall under the per-target limits (empty when it has them, or
    when it works on no single target)."""
    targets = config_targets(run.run_config) | asset_targets(instance, run)
    if len(targets) != 1:
        return {}
    (target,) = targets
    tags = {TAG_TARGET: target}
    if TAG_DB_HOST not in run.tags:
        host = _db_host(target)
        if host is not None:
            tags[TAG_DB_HOST] = host
    return {key: value for key, value in tags.items() if run.tags.get(key) != value}


class TargetTaggingRunCoordinator(dg.QueuedRunCoordinator):
    """QueuedRunCoordinator (same configuration) that tags each submitted run with its target."""

    def submit_run(self, context: dg.SubmitRunContext) -> dg.DagsterRun:
        run = context.dagster_run
        if run.status == dg.DagsterRunStatus.NOT_STARTED:
            instance = self._instance  # as in Dagster's run-attribution example
            try:
                tags = target_tags(instance, run)
            except Exception:
                # Never keep a run (a restore during an outage) from being queued over a tag.
                log.exception("could not work out the target of run %s", run.run_id)
                tags = {}
            if tags:
                instance.add_run_tags(run.run_id, tags)
                run = instance.get_run_by_id(run.run_id) or run
                context = dg.SubmitRunContext(dagster_run=run, workspace=context.workspace)
        return super().submit_run(context)
