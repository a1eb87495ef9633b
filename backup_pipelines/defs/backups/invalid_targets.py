"""A placeholder ``<target>/logical_backup`` for each target whose settings are invalid.

Such a target gets none of its real assets, checks or schedules (the other targets keep all of
theirs). The placeholder keeps it in the asset list, in its own group, with the problems in
its description and metadata; materializing it fails with the same message, and
``stale_backup_sensor`` alerts the notifiers once per problem.
"""

import re
from datetime import timedelta

import dagster as dg

from backup_pipelines.lib.names import LOGICAL_BACKUP, target_key
from backup_pipelines.lib.project import invalid_target_message, project_config
from backup_pipelines.lib.tags import asset_attributes

# A target nobody backs up turns "too old" in the UI after a day, like a healthy one would.
PLACEHOLDER_FRESHNESS_WINDOW = timedelta(hours=24)


def placeholder_prefix(name: str, taken: set[str]) -> str:
    """An asset key prefix and group name for ``name``, even when the name itself is invalid."""
    prefix = re.sub(r"[^A-Za-z0-9_]", "_", name) or "target"
    if prefix != name:
        prefix = f"invalid_{prefix}"
    while prefix in taken:
        prefix += "_"
    return prefix


def build_invalid_target(name: str, problems: str, prefix: str) -> dg.AssetsDefinition:
    source = project_config().source_path
    message = invalid_target_message(name, problems, source)
    listing = "\n".join(f"- {line}" for line in problems.splitlines())

    @dg.asset(
        key=target_key(prefix, LOGICAL_BACKUP),
        **asset_attributes(prefix, "postgres", configuration="invalid"),
        description=(
            f"**CONFIGURATION ERROR: target `{name}` is not backed up.** Its settings in "
            f"`{source}` are invalid, so none of its backups, checks, drills or schedules "
            f"exist:\n\n{listing}\n\nFix the targets file (`backup-pipelines check-config` "
            "lists every problem) and reload the code location. The other targets are not "
            "affected."
        ),
        metadata={
            "configuration_error": dg.MetadataValue.md(listing),
            "targets_file": dg.MetadataValue.path(str(source)),
        },
        freshness_policy=dg.FreshnessPolicy.time_window(fail_window=PLACEHOLDER_FRESHNESS_WINDOW),
    )
    def logical_backup() -> None:
        raise dg.Failure(description=message, allow_retries=False)

    return logical_backup


def invalid_target_assets() -> list[dg.AssetsDefinition]:
    config = project_config()
    taken = set(config.targets)
    assets = []
    for name, problems in config.broken_targets.items():
        prefix = placeholder_prefix(name, taken)
        taken.add(prefix)
        assets.append(build_invalid_target(name, problems, prefix))
    return assets


@dg.definitions
def invalid_targets() -> dg.Definitions:
    return dg.Definitions(assets=invalid_target_assets())
