"""The engine's shape: every module imports on its own (no import cycles), nothing in it imports
Dagster, wal-push / wal-fetch load neither the restore code nor Dagster, and what a package
offers from its ``__init__`` is imported from there (one way to import each thing)."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import backup_pipelines.engine
from backup_pipelines_tests.conftest import REPO_ROOT

ENGINE_MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(backup_pipelines.engine.__path__, "backup_pipelines.engine.")
)
SOURCE_ROOTS = ("backup_pipelines", "backup_pipelines_tests", "benchmarks")


def _python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_every_engine_module_imports_on_its_own_without_dagster() -> None:
    # One interpreter, our modules forgotten before each import: a cycle shows up as an
    # ImportError whichever module of the cycle is imported first.
    code = f"""
import importlib, json, sys
failures, loaded = {{}}, set()
for name in {ENGINE_MODULES!r}:
    for cached in [m for m in sys.modules if m.startswith("backup_pipelines")]:
        del sys.modules[cached]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failures[name] = f"{{type(exc).__name__}}: {{exc}}"
    loaded |= set(sys.modules)
print(json.dumps({{"failures": failures, "dagster": sorted(m for m in loaded if m.split(".")[0] == "dagster")}}))
"""
    report = json.loads(_python(code))
    assert len(ENGINE_MODULES) > 40
    assert report["failures"] == {}
    assert report["dagster"] == []


@pytest.mark.slow
def test_wal_push_and_fetch_load_neither_restore_nor_dagster() -> None:
    # What the CLI imports for `wal-fetch` (PostgreSQL runs it once per WAL segment).
    code = """
import json, sys
from backup_pipelines.cli import build_parser, _command_modules
build_parser(_command_modules(["wal-fetch", "000000010000000000000001", "/tmp/x"]))
import backup_pipelines.engine.wal
print(json.dumps(sorted(sys.modules)))
"""
    loaded = json.loads(_python(code))
    ours = [m for m in loaded if m.startswith("backup_pipelines.")]
    assert "backup_pipelines.engine.wal" in ours
    heavy = ("restore", "drills", "backup", "pitr", "migrations", "offsite", "retention")
    assert [
        m for m in ours if m.startswith("backup_pipelines.engine.") and m.split(".")[2] in heavy
    ] == []
    assert [
        m for m in ours if m.startswith(("backup_pipelines.defs", "backup_pipelines.cli.restore"))
    ] == []
    assert [m for m in loaded if m.split(".")[0] == "dagster"] == []


def _exported_by_packages() -> dict[str, set[str]]:
    """``package -> names`` for every engine package whose ``__init__`` declares ``__all__``."""
    exported = {}
    for info in pkgutil.walk_packages(backup_pipelines.engine.__path__, "backup_pipelines.engine."):
        if not info.ispkg:
            continue
        init = REPO_ROOT / Path(*info.name.split(".")) / "__init__.py"
        for node in ast.parse(init.read_text()).body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
            ):
                exported[info.name] = set(ast.literal_eval(node.value))
    return exported


def test_names_a_package_exports_are_imported_from_the_package() -> None:
    exported = _exported_by_packages()
    assert "backup_pipelines.engine.config" in exported
    assert "restore_database" in exported["backup_pipelines.engine.restore"]
    wrong = []
    for root in SOURCE_ROOTS:
        for path in sorted((REPO_ROOT / root).rglob("*.py")):
            module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom) or not node.module:
                    continue
                for package, names in exported.items():
                    inside = module == package or module.startswith(package + ".")
                    if inside or not node.module.startswith(package + "."):
                        continue
                    for alias in node.names:
                        if alias.name in names:
                            wrong.append(
                                f"{path.relative_to(REPO_ROOT)}: {alias.name} from {package}"
                            )
    assert wrong == []
