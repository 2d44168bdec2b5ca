"""The package's structure: layers import only downward (math -> kernels -> cache ->
passes -> entry points) and no module imports another that imports it back, at module level or
inside a function; no function outside the Triton kernels runs over 80 lines. Read from the
source (`ast`), so an import hidden in a function counts."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qvg_compile"
LAYERS = {"quant": 0, "kernels": 1, "cache": 2, "passes": 3}
ENTRY = 4  # backend, patch, explain, cli, demo_run, tiny, the package itself


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], ENTRY) if len(parts) > 1 else ENTRY


def imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports. ``from pkg import name`` counts as importing
    ``pkg.name`` when that is a module (a sibling, not the package's ``__init__``), else ``pkg``."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    stem = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(stem + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found.update(t for t in targets if t in paths and t != name)
        out[name] = found
    return out


def test_layers_import_only_downward():
    wrong = sorted((m, t) for m, ts in imports().items() for t in ts if layer(t) > layer(m))
    assert wrong == [], f"imports from a higher layer: {wrong}"


def find_cycles(graph: dict[str, set[str]], skip: set[str]) -> list[list[str]]:
    """Import cycles of ``graph`` (depth first), ignoring edges into ``skip``."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if t in skip:
                continue
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state and m not in skip:
            visit(m, [m])
    return cycles


def test_no_module_imports_one_that_imports_it_back():
    graph = imports()
    # A package's __init__ re-exports its modules (importing a sibling runs it first); the cycles
    # that matter are between modules.
    inits = {m for m in graph if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()}
    assert find_cycles(graph, inits) == []


def test_the_walker_resolves_relative_and_function_level_imports():
    graph = imports()
    assert "qvg_compile.cache.materialize" in graph["qvg_compile.cache.tensor"]
    assert "qvg_compile.cache.tensor" in graph["qvg_compile.cache.dispatch"]
    # cli imports the backend inside its command functions.
    assert "qvg_compile.backend" in graph["qvg_compile.cli"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, set()) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"p"}, "p": {"a"}}, {"p"}) == []


def test_no_function_over_80_lines_outside_triton_kernels():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                jit = any("jit" in ast.unparse(d) for d in node.decorator_list)
                if not jit and node.end_lineno - node.lineno + 1 > 80:
                    long.append(f"{module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []
