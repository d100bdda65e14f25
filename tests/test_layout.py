"""The package's shape. The direction of imports between worker's folders is import-linter's
(``[tool.importlinter]`` in pyproject.toml, ``lint-imports`` in ``make lint``); what it cannot
say is here: the CLI loads the tools only inside its ``sim``, ``demo`` and ``dev`` commands
(the contract ignores ``worker.cli.main -> worker.tools`` for them), and worker's modules import
one another without cycles."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import worker

PACKAGE = Path(worker.__file__).parent
CLI_TOOL_COMMANDS = {"sim", "demo", "dev"}
TOP_LEVEL_LIMIT = 14  # about a dozen modules at worker/'s top


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


def test_the_cli_loads_the_tools_only_in_its_tool_commands() -> None:
    cli = PACKAGE / "cli"
    offenders = []
    for path in sorted(cli.rglob("*.py")):
        tree = ast.parse(path.read_text("utf-8"))
        for module, node in _imports(tree):
            if not module.startswith("worker.tools"):
                continue
            where = _enclosing_function(tree, node)
            if path.name == "main.py" and where in CLI_TOOL_COMMANDS:
                continue
            offenders.append(f"{path.relative_to(PACKAGE)}: {module} (in {where})")
    assert offenders == []
    assert any(
        module.startswith("worker.tools")
        for module, _ in _imports(ast.parse((cli / "main.py").read_text("utf-8")))
    )


def test_the_contract_names_the_folders_and_ignores_only_the_clis_tool_imports() -> None:
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text("utf-8"))
    contracts = config["tool"]["importlinter"]["contracts"]
    sources = {module for c in contracts for module in c.get("source_modules", [])}
    assert {"worker.core", "worker.exchange", "worker.kafka", "worker.cli"} <= sources
    ignored = [i for c in contracts for i in c.get("ignore_imports", [])]
    assert ignored == ["worker.cli.main -> worker.tools.**"]
    # Every module at worker's top is named by the contracts (a new one must choose its tier).
    named = {
        m
        for c in contracts
        for key in ("source_modules", "forbidden_modules")
        for m in c.get(key, [])
    }
    top = {f"worker.{p.stem}" for p in PACKAGE.glob("*.py") if not p.stem.startswith("__")}
    assert top <= named, top - named
    assert len(top) <= TOP_LEVEL_LIMIT


def test_the_tools_are_a_subpackage_of_their_own() -> None:
    tools = PACKAGE / "tools"
    assert (tools / "__init__.py").is_file()
    assert {p.name for p in tools.iterdir()} >= {"sim", "demo.py", "devstack.py", "dev.py"}
    assert not (PACKAGE / "sim").exists()
    assert not (PACKAGE / "demo.py").exists()
    assert not (PACKAGE / "devstack.py").exists()


# -- no import cycles ---------------------------------------------------------------------------


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module → the package's modules it imports, at any depth of its code (``TYPE_CHECKING``
    blocks and imports inside functions count: a cycle there is a cycle of the design)."""
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from worker import decisions`` imports the module worker.core.decisions.
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for imported in targets:
                # The longest known module the name lies in (``worker.x.Name`` is worker.x).
                target = imported
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    # A package's ``__init__`` is not an edge worth a cycle: importing worker.x runs it anyway.
    for edges in graph.values():
        edges.difference_update(n for n in list(edges) if modules[n].name == "__init__.py")
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None if it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_cycle_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_import_graph_sees_every_form_of_import(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.c import X\n"
    )
    (package / "sub" / "c.py").write_text("def f():\n    from ..a import Y\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


def test_worker_has_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 20
    assert graph["worker.executor"] >= {"worker.core.retry_policy", "worker.killswitch"}
    assert find_cycle(graph) is None
