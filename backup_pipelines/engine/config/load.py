"""Reading the targets file: find it, parse the YAML (a duplicate key is an error), set aside
targets whose own settings are invalid, and turn validation errors into lines naming the
target and the field."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from backup_pipelines.engine.config.cron import BUILTIN_CADENCES
from backup_pipelines.engine.config.models import (
    ProjectConfig,
    TargetSettings,
    deep_merge,
    target_name_problem,
    unknown_cadences,
)
from backup_pipelines.engine.errors import ConfigError

CONFIG_ENV_VAR = "BACKUP_PIPELINES_CONFIG"
DEFAULT_CONFIG_NAME = "backup_targets.yaml"
PROJECT_ROOT = Path(__file__).resolve().parents[3]


def default_config_path() -> Path:
    """``$BACKUP_PIPELINES_CONFIG``, else ``./backup_targets.yaml``, else the project's own."""
    env = os.environ.get(CONFIG_ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    local = Path.cwd() / DEFAULT_CONFIG_NAME
    if local.exists():
        return local.resolve()
    return PROJECT_ROOT / DEFAULT_CONFIG_NAME


def format_validation_error(exc: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    """Turn pydantic's error list into lines naming the target and the field."""
    lines = []
    for error in exc.errors():
        loc = [*prefix, *(str(part) for part in error["loc"])]
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see README 'Configuration')"
        if len(loc) >= 2 and loc[0] == "targets":
            field = ".".join(loc[2:]) or "(the target itself)"
            lines.append(f"target '{loc[1]}', field '{field}': {message}")
        else:
            lines.append(f"field '{'.'.join(loc) or '(top level)'}': {message}")
    return "\n".join(lines)


# A targets file is a small hand-written document; anything this big is the wrong file.
MAX_CONFIG_BYTES = 16 << 20


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    Plain YAML keeps the last of two equal keys: a second ``production:`` target would silently
    replace the first one.
    """


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> Any:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults` merges are meant to be overridden
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: PyYAML reports it itself
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line "
                f"{first.start_mark.line + 1}): a key may appear only once in a mapping; remove "
                "or rename one of them",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _yaml_error_line(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong, where."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        where = ""
        if exc.problem_mark is not None:
            where = f"line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}: "
        problem = exc.problem
        if exc.context and exc.context_mark is not None and "duplicate key" not in problem:
            problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
        return where + problem
    return " ".join(str(exc).split())


def read_targets_file(config_path: Path) -> Any:
    """The parsed YAML document, or ConfigError saying in one line why it cannot be read."""
    try:
        info = config_path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(
                f"targets file {config_path} is a folder, not a file",
                hint=f"point --config (or {CONFIG_ENV_VAR}) at the YAML file itself, e.g. "
                f"{config_path / DEFAULT_CONFIG_NAME}",
            )
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(
                f"targets file {config_path} is not a regular file",
                hint=f"point --config (or {CONFIG_ENV_VAR}) at the YAML file",
            )
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"targets file {config_path} is {info.st_size >> 20} MiB: far too big for a "
                "targets file",
                hint=f"check that --config (or {CONFIG_ENV_VAR}) names the right file",
            )
        data = config_path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"targets file not found: {config_path}",
            hint=f"create it (see backup_targets.yaml in the project) or set {CONFIG_ENV_VAR}",
        ) from None
    except PermissionError:
        raise ConfigError(
            f"targets file {config_path} cannot be read by uid {os.geteuid()}: permission denied",
            hint="let every user that runs backup-pipelines read it (cron, the Dagster daemon "
            "and PostgreSQL's archive_command may each run as another user): chmod/chown it",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"targets file {config_path} cannot be read: {exc.strerror or exc}"
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"targets file {config_path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on "
            f"line {line})",
            hint="save it as UTF-8 (e.g. `iconv -f LATIN1 -t UTF-8`)",
        ) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"targets file {config_path} is not valid YAML: {_yaml_error_line(exc)}"
        ) from None


def _set_aside_broken_targets(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Validate each target on its own: ``raw`` with only the healthy targets (validated), and
    the problems of every other one by name."""
    targets = raw.get("targets")
    defaults = raw.get("defaults") or {}
    if not isinstance(targets, dict) or not isinstance(defaults, dict):
        return raw, {}  # a top-level problem: reported for the whole file
    named = dict(BUILTIN_CADENCES)
    if isinstance(raw.get("cadences"), dict):
        named.update({str(k): v for k, v in raw["cadences"].items()})
    healthy: dict[str, Any] = {}
    broken: dict[str, str] = {}
    for name, spec in targets.items():
        label = str(name)
        problems = []
        name_problem = target_name_problem(name)
        if name_problem:
            problems.append(f"target '{label}': {name_problem}")
        merged = deep_merge(defaults, spec) if isinstance(spec, dict) else spec
        try:
            settings = TargetSettings.model_validate(merged)
        except ValidationError as exc:
            problems.append(format_validation_error(exc, prefix=("targets", label)))
        else:
            problems += [f"target '{label}', {p}" for p in unknown_cadences(settings, named)]
        if problems:
            broken[label] = "\n".join(problems)
        else:
            healthy[name] = settings
    return {**raw, "targets": healthy}, broken


def load_config(
    path: str | os.PathLike[str] | None = None, *, isolate_targets: bool = False
) -> ProjectConfig:
    """Read and validate the targets file. Raises ConfigError with every problem listed.

    A problem in the file as a whole (unreadable, not YAML, a bad top-level key) always raises.
    A problem in one target's own settings raises too, unless ``isolate_targets``: then that
    target is left out of ``targets`` and its problems are kept in ``broken_targets`` (using it
    raises them), so one target's typo never stops the backups of the others. Everything that
    runs work (the command line, Dagster) loads the file that way; tests and tools that must
    see every problem at once load it strictly.
    """
    config_path = Path(path).expanduser().resolve() if path else default_config_path()
    raw = read_targets_file(config_path)
    if raw is None:
        raise ConfigError(
            f"targets file {config_path} is empty",
            hint="it needs at least 'backup_root' and 'targets' (see backup_targets.yaml in the "
            "project)",
        )
    if not isinstance(raw, dict):
        raise ConfigError(
            f"targets file {config_path} must be a mapping with 'backup_root' and 'targets'"
        )
    raw, broken = _set_aside_broken_targets(raw)
    try:
        config = ProjectConfig.model_validate(
            {**raw, "source_path": config_path, "broken_targets": broken}
        )
    except ValidationError as exc:
        lines = [format_validation_error(exc), *broken.values()]
        raise ConfigError(f"invalid targets file {config_path}:\n" + "\n".join(lines)) from None
    if broken and not isolate_targets:
        raise ConfigError(f"invalid targets file {config_path}:\n" + "\n".join(broken.values()))
    return config
