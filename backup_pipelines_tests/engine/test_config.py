"""The targets file: validation messages name the target and the field, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from backup_pipelines.engine.config import load_config
from backup_pipelines.engine.errors import ConfigError


def write(tmp_path: Path, document: dict) -> Path:
    path = tmp_path / "backup_targets.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_shipped_example_is_valid_and_has_the_guides_environments() -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "backup_targets.yaml")
    assert {"development", "staging", "production"} <= set(config.targets)
    assert config.targets["production"].dsn_env == "DATABASE_URL_PRODUCTION"


def test_relative_backup_root_resolves_against_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, {"backup_root": "backups", "targets": {"prod": {"dsn_env": "X"}}})
    monkeypatch.chdir("/")
    config = load_config(path)
    assert config.resolved_backup_root == (tmp_path / "backups").resolve()
    assert config.target("prod").backup_dir == (tmp_path / "backups" / "prod").resolve()


def test_defaults_apply_to_every_target_and_targets_override(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "backup_root": "b",
            "defaults": {"compression": "zstd", "format": "custom"},
            "targets": {"a": {"dsn_env": "A"}, "b": {"dsn_env": "B", "compression": "gzip"}},
        },
    )
    config = load_config(path)
    assert config.targets["a"].compression == "zstd"
    assert config.targets["b"].compression == "gzip"
    assert config.targets["b"].format == "custom"


@pytest.mark.parametrize(
    ("target_spec", "expected"),
    [
        ({"dsn_env": "A", "compresion": "gzip"}, "target 'prod', field 'compresion': unknown key"),
        ({"dsn_env": "A", "compression": "brotli"}, "target 'prod', field 'compression'"),
        (
            {"dsn_env": "A", "compression": "gzip", "compression_level": 42},
            "compression_level 42 is out of range",
        ),
        ({"dsn_env": "not a var"}, "target 'prod', field 'dsn_env'"),
        ({"format": "plain"}, "target 'prod', field 'dsn_env': Field required"),
        (
            {"dsn_env": "A", "size_drop_warn_ratio": 3},
            "target 'prod', field 'size_drop_warn_ratio'",
        ),
    ],
)
def test_bad_target_settings_name_target_and_field(
    tmp_path: Path, target_spec: dict, expected: str
) -> None:
    path = write(tmp_path, {"backup_root": "b", "targets": {"prod": target_spec}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value)


def test_unknown_top_level_key_and_bad_target_name(tmp_path: Path) -> None:
    path = write(
        tmp_path, {"backup_root": "b", "retension": 3, "targets": {"my-db": {"dsn_env": "A"}}}
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "field 'retension': unknown key" in message
    assert "'my-db' must start with a letter" in message


def test_missing_file_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="targets file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_missing_env_var_is_reported_with_target_and_field_when_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL_NOWHERE", raising=False)
    path = write(
        tmp_path, {"backup_root": "b", "targets": {"prod": {"dsn_env": "DATABASE_URL_NOWHERE"}}}
    )
    config = load_config(
        path
    )  # structure is fine; the variable is read only when the target is used
    with pytest.raises(ConfigError) as info:
        config.target("prod").dsn()
    assert (
        "target 'prod', field 'dsn_env': environment variable DATABASE_URL_NOWHERE is not set"
        in str(info.value)
    )


def test_unknown_target_lists_known_ones(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, {"backup_root": "b", "targets": {"prod": {"dsn_env": "A"}}})
    )
    with pytest.raises(ConfigError, match="(?s)unknown target 'prdo'.*use one of: prod"):
        config.target("prdo")


def test_hundreds_of_targets_load(tmp_path: Path) -> None:
    targets = {f"db_{i:03d}": {"dsn_env": f"DATABASE_URL_{i:03d}"} for i in range(500)}
    path = write(tmp_path, {"backup_root": "b", "targets": targets})
    config = load_config(path)
    assert sorted(config.targets) == sorted(targets)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"databases": ["app"]},
            "target 'srv', field 'databases': ['app'] is not supported: use 'databases: all'",
        ),
        (
            {"exclude": ["tmp_*"]},
            "exclude applies only to a server target: add 'databases: all'",
        ),
        (
            {"databases": "all", "exclude": ["app_[12"]},
            "exclude pattern 'app_[12' has an unclosed '['",
        ),
        ({"databases": "all", "exclude": [" "]}, "an exclude pattern is empty"),
        (
            {"databases": "all", "migrations": {"folder": "drizzle"}},
            "migrations belong to one database, not to a server target",
        ),
    ],
)
def test_bad_server_target_settings_say_what_to_do(
    tmp_path: Path, spec: dict, expected: str
) -> None:
    path = write(tmp_path, {"backup_root": "b", "targets": {"srv": {"dsn_env": "A", **spec}}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value)


def test_server_target_layout_keeps_single_targets_where_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        {
            "backup_root": "b",
            "targets": {
                "single": {"dsn_env": "DB_SINGLE"},
                "srv": {"dsn_env": "DB_SRV", "databases": "all", "exclude": ["tmp_*"]},
            },
        },
    )
    monkeypatch.setenv("DB_SRV", "postgresql://bk:secret-pw@db1:5433/postgres?sslmode=require")
    config = load_config(path)
    root = (tmp_path / "b").resolve()
    assert config.target("single").backup_dir == root / "single"
    server = config.target("srv")
    assert server.is_server and server.backup_dir == root / "srv"
    app = config.target("srv", "app")
    assert not app.is_server and app.backup_dir == root / "srv" / "app"
    assert app.storage_name == "srv/app" and app.label == "target 'srv', database 'app'"
    # The database replaces the URL's; everything else (user, password, TLS) stays.
    from backup_pipelines.engine.conninfo import ConnectionInfo

    info = ConnectionInfo.parse(app.dsn())
    assert (info.dbname, info.params["host"], info.params["port"]) == ("app", "db1", "5433")
    assert (info.params["sslmode"], info.password) == ("require", "secret-pw")
    # A name a folder cannot hold keeps a folder of its own.
    assert config.target("srv", "a/b").backup_dir == root / "srv" / "a%2Fb"
    assert config.target("srv", "..").backup_dir == root / "srv" / "%2E."
    with pytest.raises(ConfigError, match="target 'single' is one database"):
        config.target("single", "app")


def test_exclude_patterns_and_templates() -> None:
    from backup_pipelines.engine.databases import is_excluded

    patterns = ("postgres", "tmp_*", "app_[12]")
    assert is_excluded("template0", ()) and is_excluded("template1", ())
    assert is_excluded("postgres", patterns) and not is_excluded("postgres", ())
    assert is_excluded("tmp_x", patterns) and not is_excluded("TMP_x", patterns)
    assert is_excluded("app_1", patterns) and not is_excluded("app_3", patterns)
