"""The package's shape: ``worker/`` is the runtime; the simulator, demo and dev stack live in
``worker.tools`` and the runtime never imports them (the CLI loads them only for its
``sim`` and ``demo`` commands)."""

from __future__ import annotations

import ast
from pathlib import Path

import worker

PACKAGE = Path(worker.__file__).parent
CLI_TOOL_COMMANDS = {"sim", "demo", "dev"}


def _imports(tree: ast.Module) -> list[tuple[str, ast.AST]]:
    found: list[tuple[str, ast.AST]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, node))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, node) for alias in node.names)
    return found


def _enclosing_function(tree: ast.Module, target: ast.AST) -> str | None:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
            child is target for child in ast.walk(node)
        ):
            return node.name
    return None


def test_the_runtime_never_imports_the_tools() -> None:
    runtime = [p for p in PACKAGE.rglob("*.py") if "tools" not in p.relative_to(PACKAGE).parts]
    assert len(runtime) > 20
    offenders = []
    for path in runtime:
        tree = ast.parse(path.read_text("utf-8"))
        for module, node in _imports(tree):
            if not module.startswith("worker.tools"):
                continue
            where = _enclosing_function(tree, node)
            if path.name == "cli.py" and where in CLI_TOOL_COMMANDS:
                continue
            offenders.append(f"{path.relative_to(PACKAGE)}: {module} (in {where})")
    assert offenders == []


def test_the_tools_are_a_subpackage_of_their_own() -> None:
    tools = PACKAGE / "tools"
    assert (tools / "__init__.py").is_file()
    assert {p.name for p in tools.iterdir()} >= {"sim", "demo.py", "devstack.py", "dev.py"}
    assert not (PACKAGE / "sim").exists()
    assert not (PACKAGE / "demo.py").exists()
    assert not (PACKAGE / "devstack.py").exists()
