"""The targets file: one YAML document declaring where backups go and which databases to back up.

Adding a database is a YAML edit. Structure and values are validated when the file is loaded;
environment variables (connection URLs, secrets) are resolved only when a target is used, so a
missing variable for one target never stops the others from loading or running.

The rest of the code imports from this package, never from its modules:

- ``models``: a target's settings (``TargetSettings``), the ``Target`` the engine works with and
  the whole file (``ProjectConfig``).
- ``settings``: the per-area blocks of a target (restore, migrations, pitr, encryption, offsite,
  retention); ``monitoring``: notifiers, alerts and metrics (top-level keys).
- ``cron``: cadences and cron-string validation; ``fields``: shared field types (durations,
  environment variable names, absolute paths).
- ``load``: reading the file (YAML, duplicate keys, broken targets set aside, messages).
"""

from backup_pipelines.engine.config.cron import (
    BUILTIN_CADENCES,
    SCHEDULE_KINDS,
    cron_problem,
    looks_like_cron,
)
from backup_pipelines.engine.config.fields import (
    DEFAULT_COMPRESSION_LEVEL,
    Compression,
    DumpFormat,
    parse_duration,
)
from backup_pipelines.engine.config.load import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_NAME,
    PROJECT_ROOT,
    default_config_path,
    format_validation_error,
    load_config,
    read_targets_file,
)
from backup_pipelines.engine.config.models import (
    DEFAULT_LOCK_WAIT_TIMEOUT,
    TARGET_NAME_PATTERN,
    ProjectConfig,
    Target,
    TargetSettings,
    target_name_problem,
)
from backup_pipelines.engine.config.monitoring import (
    AlertSettings,
    EmailNotifierSettings,
    MetricsSettings,
    NotifierSettings,
    SlackNotifierSettings,
    WebhookNotifierSettings,
)
from backup_pipelines.engine.config.settings import (
    DrillSettings,
    EncryptionSettings,
    LifecycleSettings,
    MigrationSettings,
    OffsiteSettings,
    PassphraseSource,
    PitrSettings,
    RestoreSettings,
    RetentionSettings,
)

__all__ = [
    "BUILTIN_CADENCES",
    "CONFIG_ENV_VAR",
    "DEFAULT_COMPRESSION_LEVEL",
    "DEFAULT_CONFIG_NAME",
    "DEFAULT_LOCK_WAIT_TIMEOUT",
    "PROJECT_ROOT",
    "SCHEDULE_KINDS",
    "TARGET_NAME_PATTERN",
    "AlertSettings",
    "Compression",
    "DrillSettings",
    "DumpFormat",
    "EmailNotifierSettings",
    "EncryptionSettings",
    "LifecycleSettings",
    "MetricsSettings",
    "MigrationSettings",
    "NotifierSettings",
    "OffsiteSettings",
    "PassphraseSource",
    "PitrSettings",
    "ProjectConfig",
    "RestoreSettings",
    "RetentionSettings",
    "SlackNotifierSettings",
    "Target",
    "TargetSettings",
    "WebhookNotifierSettings",
    "cron_problem",
    "default_config_path",
    "format_validation_error",
    "load_config",
    "looks_like_cron",
    "parse_duration",
    "read_targets_file",
    "target_name_problem",
]
