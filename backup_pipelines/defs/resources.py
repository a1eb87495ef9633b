"""Resources shared by every area: the engine's view of the targets file."""

import dagster as dg

from backup_pipelines.engine.config import ProjectConfig, Target, load_config


class BackupEngineResource(dg.ConfigurableResource):
    """Reads the targets file at run time, so a YAML edit applies to the next run."""

    config_path: str | None = None

    def project(self) -> ProjectConfig:
        # A target with invalid settings fails only its own runs (see project_config).
        return load_config(self.config_path, isolate_targets=True)

    def target(self, name: str) -> Target:
        return self.project().target(name)


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"backup_engine": BackupEngineResource()})
