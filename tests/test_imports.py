"""Imports run one way (DESIGN.md): no cycles between kiln modules, kernels are leaves, and a lower layer
never imports a higher one. Every import statement counts: top-level, lazy ones inside functions and
those under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "kiln"

# Bottom to top. A module belongs to the longest prefix listed; `kiln.<pkg>.cli` modules are command
# front-ends and sit with kiln.cli. A new top-level module or package must be given a layer here.
LAYERS: dict[str, int] = {
    "kiln.errors": 0,
    "kiln.config": 0,
    "kiln.parsing": 0,
    "kiln.tokenizer": 0,
    "kiln.tokenizer_training": 0,
    "kiln.paths": 0,
    "kiln.kernels": 1,
    "kiln.quant": 2,
    "kiln.models": 3,
    "kiln.generation": 3,
    "kiln.finetune": 4,
    "kiln.engine": 5,
    "kiln.train": 5,
    "kiln.data": 5,
    "kiln.batch": 6,
    "kiln.server": 6,
    "kiln.bench": 6,
    "kiln.recipes": 6,
    "kiln.cli": 7,
    "kiln.demo": 7,
    "kiln": 7,  # the public API re-exports every layer
}
CLI_LAYER = 7
# What kiln.kernels may import from kiln besides itself.
KERNEL_ALLOWED = ("kiln.errors",)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The kiln modules `path` imports anywhere in its body. `from pkg import x` names pkg.x when that
    is a module, else pkg itself."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m == "kiln" or m.startswith("kiln.")} - {name}


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def layer(name: str) -> int:
    if name.endswith(".cli"):
        return CLI_LAYER
    prefixes = [p for p in LAYERS if name == p or name.startswith(p + ".")]
    assert prefixes, f"{name} has no layer: add it to LAYERS in tests/test_imports.py"
    return LAYERS[max(prefixes, key=len)]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_path(graph, members) for members in components]


def _cycle_path(graph: dict[str, set[str]], members: list[str]) -> list[str]:
    """A shortest import path from the component's first module back to itself (breadth first)."""
    start, inside = members[0], set(members)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        next_frontier = []
        for node in frontier:
            for target in sorted(graph[node] & inside):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    next_frontier.append(target)
        frontier = next_frontier
    raise AssertionError(f"no cycle through {start}")


def test_the_checker_sees_cycles_and_lazy_imports(tmp_path):
    source = tmp_path / "kiln_fake.py"
    source.write_text(
        "def f():\n    from kiln.models import layers\nif TYPE_CHECKING:\n    import kiln.engine\n"
    )
    modules = {"kiln.models": source, "kiln.models.layers": source, "kiln.engine": source}
    assert imported_modules("kiln.x", source, modules) == {"kiln.models.layers", "kiln.engine"}
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_kernels_import_only_errors_and_each_other():
    bad = [
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        if name.startswith("kiln.kernels")
        for target in sorted(targets)
        if not target.startswith("kiln.kernels") and target not in KERNEL_ALLOWED
    ]
    assert not bad, "kiln.kernels must stay a leaf:\n" + "\n".join(bad)


def test_lower_layers_never_import_higher_ones():
    bad = [
        f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
        for name, targets in import_graph().items()
        for target in sorted(targets)
        if layer(target) > layer(name)
    ]
    assert not bad, "imports against the layer order of DESIGN.md:\n" + "\n".join(bad)
