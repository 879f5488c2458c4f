"""The package's layers: the Flower app at the bottom, then the leaderboard tools, then the development
harness, then the command line. A module imports only from its own layer or the ones below, so the app
(what the FAB ships) runs without the tools and the harness."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flowertune_finance"
LAYERS = {"app": 0, "tools": 1, "dev": 2, "cli": 3}
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 60


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside the package."""
    parts = module.split(".")[1:]
    if parts[:1] == ["cli"]:
        return "cli"
    return parts[0] if parts and parts[0] in ("tools", "dev") else "app"


def package_imports(path: Path) -> set[str]:
    """Every `flowertune_finance...` module a file imports, lazily imported ones included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flowertune_finance"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if node.module in ("flowertune_finance", "flowertune_finance.tools", "flowertune_finance.dev"))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("flowertune_finance"))
    return found


def modules() -> list[tuple[str, Path]]:
    return [(".".join(("flowertune_finance", *path.relative_to(PACKAGE).with_suffix("").parts)), path)
            for path in sorted(PACKAGE.rglob("*.py"))]


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for name, path in modules():
        for imported in package_imports(path):
            if LAYERS[layer_of(imported)] > LAYERS[layer_of(name)]:
                upward.append(f"{name} ({layer_of(name)}) imports {imported} ({layer_of(imported)})")
    assert not upward, "\n".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "server_app.py"
    module.write_text("def f():\n    from flowertune_finance.dev import tiny\n")
    imported = package_imports(module)
    assert imported == {"flowertune_finance.dev", "flowertune_finance.dev.tiny"}
    assert max(LAYERS[layer_of(name)] for name in imported) > LAYERS[layer_of("flowertune_finance.server_app")]


def test_modules_and_functions_stay_readable_in_one_sitting():
    too_long = []
    for name, path in modules():
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)
