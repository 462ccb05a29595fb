"""The package's layout rules (issue 16): small files and functions, no private imports
across modules. They are checked on the source, so a change that breaks one fails here."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "numpyro_ebm"
FILES = sorted(PACKAGE.rglob("*.py"))
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 100


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(module: str, path: pathlib.Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def test_the_rules_see_the_whole_package():
    assert len(FILES) > 20 and PACKAGE / "training" / "core.py" in FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_and_functions_are_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path.name} is over {MAX_FILE_LINES} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines in {path.name}: {long}"


def _allowed(node: ast.ImportFrom, name: str, own_package: str) -> bool:
    """A private name may come from a sibling module of the importer's own sub-package, and a
    private MODULE (``_io``) from a package the importer is in."""
    if (PACKAGE.parent / node.module.replace(".", "/") / f"{name}.py").exists():
        return own_package == node.module or own_package.startswith(node.module + ".")
    source_package = node.module.rpartition(".")[0]
    return source_package == own_package and own_package != "numpyro_ebm"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_names_imported_from_other_modules(path):
    """``from numpyro_ebm.x.y import _name`` only inside package x (see ``_allowed``); the
    use of ``module._name`` attributes is not checked here."""
    own_package = _package_of(_module_name(path), path)
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith(
            "numpyro_ebm"
        ):
            continue
        for alias in node.names:
            private = alias.name.startswith("_") and not alias.name.startswith("__")
            if private and not _allowed(node, alias.name, own_package):
                bad.append(f"{alias.name} from {node.module}")
    assert not bad, f"{path.name} imports private names of other modules: {bad}"
