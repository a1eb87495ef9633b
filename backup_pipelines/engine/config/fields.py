"""Building blocks of the settings models: strict models, environment variable names, durations,
absolute paths."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

ENV_VAR_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _valid_env_name(value: str) -> str:
    if not ENV_VAR_PATTERN.match(value):
        raise ValueError(f"{value!r} is not a valid environment variable name")
    return value


# The name of an environment variable that holds a secret or a URL (never the value itself).
EnvVarName = Annotated[str, AfterValidator(_valid_env_name)]


def _valid_database_pattern(value: str) -> str:
    if not value.strip():
        raise ValueError("an exclude pattern is empty: remove it or write a database name or glob")
    # fnmatch reads an unclosed '[' as a literal, so 'app_[12' would silently exclude nothing.
    depth = 0
    for char in value:
        if char == "[":
            depth += 1
        elif char == "]" and depth:
            depth -= 1
    if depth:
        raise ValueError(
            f"exclude pattern {value!r} has an unclosed '[': close it (e.g. 'app_[12]') or "
            "write '[[]' for a literal bracket"
        )
    return value


# A glob pattern (fnmatch: *, ?, [...]) matched against whole database names.
DatabasePattern = Annotated[str, AfterValidator(_valid_database_pattern)]
# The databases of a server target: ``all`` (every connectable, non-template database).
ServerDatabases = Literal["all"]

DumpFormat = Literal["plain", "custom", "directory"]
Compression = Literal["gzip", "zstd", "none"]

DEFAULT_COMPRESSION_LEVEL: dict[str, int] = {"gzip": 6, "zstd": 3, "none": 0}
COMPRESSION_LEVEL_RANGE: dict[str, tuple[int, int]] = {
    "gzip": (1, 9),
    "zstd": (1, 19),
    "none": (0, 0),
}


class StrictModel(BaseModel):
    # .inf / .nan in YAML would pass every "gt=0" bound and break time arithmetic later.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


OPT_OUT_WORDS = {"off", "none", "never", "disabled"}
_DURATION_PATTERN = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_DURATION = timedelta(days=3660)


def parse_duration(value: Any) -> Any:
    """``24h``, ``90m``, ``1h30m``, ``2d``, ``1w``, ``3600s`` or a number of seconds."""
    if value is False or (isinstance(value, str) and value.strip().lower() in OPT_OUT_WORDS):
        return None
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return timedelta(seconds=value)
        if isinstance(value, str):
            text = value.strip().lower()
            if re.fullmatch(r"\d+(\.\d+)?", text):
                return timedelta(seconds=float(text))
            parts = _DURATION_PATTERN.findall(text)
            if not parts or _DURATION_PATTERN.sub("", text).strip():
                raise ValueError(
                    f"{value!r} is not a duration: use e.g. 24h, 90m, 1h30m, 2d, 1w or seconds"
                )
            return timedelta(seconds=sum(float(n) * _DURATION_UNITS[u] for n, u in parts))
    except (OverflowError, ArithmeticError):
        raise ValueError(f"{value!r} is far too long a duration (at most 3660d)") from None
    return value


def _sensible_duration(value: timedelta | None) -> timedelta | None:
    if value is not None and not timedelta(0) < value <= MAX_DURATION:
        raise ValueError(
            f"{value} is not a sensible duration: more than 0 and at most 3660d (10 years)"
        )
    return value


OptionalDuration = Annotated[
    timedelta | None, BeforeValidator(parse_duration), AfterValidator(_sensible_duration)
]


def absolute_path(value: Path | None, key: str) -> Path | None:
    """``~`` expanded; relative paths are refused: they would depend on the working directory
    of whoever runs the tool (cron, Dagster, PostgreSQL's archive_command)."""
    if value is None:
        return None
    path = value.expanduser()
    if str(value).strip() in {"", "."}:  # YAML '' arrives as Path('.')
        raise ValueError(f"{key} is empty: give an absolute path or leave the key out")
    if not path.is_absolute():
        raise ValueError(f"{key} must be an absolute path (or ~/...), not {str(value)!r}")
    return path


def absolute_key_path(value: Path | None) -> Path | None:
    if value is None:
        return None
    path = value.expanduser()
    if not path.is_absolute():
        raise ValueError(f"{value}: key and passphrase files need an absolute path (or ~/...)")
    return path
