"""The Dagster layer's layout: ``defs/`` holds definitions only, helpers live in ``lib/``, and
nothing reaches into Dagster's private modules."""

import ast

from backup_pipelines_tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "backup_pipelines"
DEFS = PACKAGE / "defs"
LIB = PACKAGE / "lib"
# The resource every area's assets and sensors take (one class, one definitions module).
SHARED_DEFS_MODULE = "backup_pipelines.defs.resources"


def _imports(tree: ast.Module) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def _definitions_functions(tree: ast.Module) -> list[str]:
    found = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                if ast.unparse(decorator) in ("dg.definitions", "definitions"):
                    found.append(node.name)
    return found


def test_every_module_under_defs_is_one_definitions_module() -> None:
    """load_from_defs_folder then takes exactly what each module's @dg.definitions returns, never
    module-level objects a helper happened to import (which would be loaded twice)."""
    modules = [p for p in DEFS.rglob("*.py") if p.name != "__init__.py"]
    assert len(modules) >= 15
    for path in modules:
        tree = ast.parse(path.read_text())
        relative = path.relative_to(REPO_ROOT)
        assert len(_definitions_functions(tree)) == 1, f"{relative}: one @dg.definitions function"
        others = [
            name
            for name in _imports(tree)
            if name.startswith("backup_pipelines.defs") and name != SHARED_DEFS_MODULE
        ]
        assert others == [], f"{relative} imports helpers from defs/ (move them to lib/): {others}"
    for path in DEFS.rglob("__init__.py"):
        body = ast.parse(path.read_text()).body
        assert all(isinstance(node, ast.Expr) for node in body), f"{path}: docstring only"


def test_lib_does_not_import_defs_and_nothing_imports_private_dagster() -> None:
    for path in LIB.rglob("*.py"):
        imports = _imports(ast.parse(path.read_text()))
        assert not [name for name in imports if name.startswith("backup_pipelines.defs")], path
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        private = [name for name in _imports(ast.parse(text)) if name.startswith("dagster._")]
        assert private == [] and "dagster._" not in text, f"{path}: private Dagster API {private}"
