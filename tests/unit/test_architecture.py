"""The package tree is the architecture: these import rules keep it so (parsed, not imported)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cpinspect"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 400


def package_of(path: Path) -> str:
    """``core``, ``views``, ... for modules in a package; the module name for top-level ones."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement, at any depth (lazy imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def cpinspect_package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "cpinspect" and len(parts) > 1 else None


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_views_and_cli_import_rich_or_typer(path):
    if package_of(path) in ("views", "cli"):
        return
    offending = [m for m, _ in imports(path) if m.split(".")[0] in ("rich", "typer")]
    assert not offending, f"{path.relative_to(PACKAGE)} imports {offending}: rendering belongs in views/"


@pytest.mark.parametrize("path", [p for p in MODULES if package_of(p) == "core"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_imports_no_other_cpinspect_package(path):
    others = [m for m, _ in imports(path) if cpinspect_package(m) not in (None, "core")]
    others += [f"cpinspect.{n}" for m, names in imports(path) if m == "cpinspect" for n in names
               if n != "__version__"]
    assert not others, f"{path.relative_to(PACKAGE)} imports {others}; core/ sits at the bottom"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_but_main_imports_the_cli(path):
    if package_of(path) == "cli" or path.name == "__main__.py":
        return
    offending = [m for m, _ in imports(path) if cpinspect_package(m) == "cli"]
    assert not offending, f"{path.relative_to(PACKAGE)} imports {offending}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_crosses_a_package(path):
    own = package_of(path)
    offending = [f"{m}.{n}" for m, names in imports(path) if cpinspect_package(m) not in (None, own)
                 for n in names if n.startswith("_")]
    offending += [m for m, _ in imports(path) if cpinspect_package(m) not in (None, own)
                  and any(part.startswith("_") for part in m.split("."))]
    assert not offending, f"{path.relative_to(PACKAGE)} imports private {offending}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines (> {MAX_LINES}): split it by concept"


def test_every_package_says_what_it_is_for():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "TODO" not in doc, f"{init.relative_to(PACKAGE)} needs a one-line purpose"
