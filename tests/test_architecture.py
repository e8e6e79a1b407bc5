"""The import graph of ``torchquant/`` and ``triton_kernels/``, read with ``ast``.

Data flows one way: no import circles (counting the package ``__init__`` an import runs),
``triton_kernels/`` needs only torch, triton and the standard library, no module answers
attribute lookups with a module-level ``__getattr__``, and an import inside a function is
kept only where an optional dependency needs it (``LAZY_IMPORTS``).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"torchquant": ROOT / "torchquant", "torchquant.triton_kernels": ROOT / "triton_kernels"}

# -- module (glob) -> what it may import inside a function, and why
LAZY_IMPORTS = {
    "torchquant.offload": {"accelerate"},  # optional: the `hf` extra
    "torchquant.checkpoint.skeleton": {"accelerate", "transformers"},
    "torchquant.formats.compressed_tensors": {"accelerate"},
    "torchquant.tools.models": {"transformers"},
    "torchquant.ops.*": {"torchquant.triton_kernels"},  # triton is Linux-only
    "torchquant.triton_kernels._launch": {"triton"},  # triton.testing, for autotuning only
    # -- the `bench` command and the benchmark helpers, until their rework lands
    "torchquant.cli": {"torch", "torchquant.benchmark", "torchquant.formats.dispatch"},
    "torchquant.benchmark": {"copy"},
}
# -- lower layers never import the ones above them
LAYERS = {
    "torchquant.errors": ("torchquant.errors",),
    "torchquant.config*": ("torchquant.errors", "torchquant.config"),
    "torchquant.numerics*": ("torchquant.errors", "torchquant.config", "torchquant.numerics"),
    "torchquant.weights*": (
        "torchquant.errors",
        "torchquant.config",
        "torchquant.numerics",
        "torchquant.ops",
        "torchquant.weights",
    ),
}
KERNEL_DEPENDENCIES = {"torch", "triton"}


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: set[str] = field(default_factory=set)  # -- module level, resolved to our modules
    lazy: list[tuple[str, int]] = field(default_factory=list)  # -- (top-level name, line)
    external: set[str] = field(default_factory=set)  # -- top-level names of other packages


def _modules() -> dict[str, Module]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            name = ".".join([package, *(parts[:-1] if is_package else parts)])
            found[name] = Module(name, path, is_package)
    return found


def _targets(
    node: ast.Import | ast.ImportFrom, module: Module, modules: dict[str, Module]
) -> list[str]:
    """The dotted names an import statement reaches: ``from a import b`` reaches ``a.b``
    when that is a module, else ``a``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.name if module.is_package else module.name.rpartition(".")[0]
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*anchor, *([node.module] if node.module else [])])
    return [
        f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
        for alias in node.names
    ]


def _ours(name: str, modules: dict[str, Module]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module does: in its body, or under a top-level if/try."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try)):
            for block in ("body", "orelse", "finalbody"):
                pending += getattr(node, block, [])
            for handler in getattr(node, "handlers", []):
                pending += handler.body
    return found


def _graph() -> dict[str, Module]:
    modules = _modules()
    for module in modules.values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"))
        top = _top_level_imports(tree)
        for node in top:
            for target in _targets(node, module, modules):
                ours = _ours(target, modules)
                if ours is None:
                    if not (isinstance(node, ast.ImportFrom) and node.level):
                        module.external.add(target.split(".")[0])
                    continue
                if ours == module.name:
                    continue
                module.imports.add(ours)
                # -- importing a.b.c runs a.b's __init__ first (unless we are inside a.b)
                parts = ours.split(".")
                for k in range(2, len(parts)):
                    package = ".".join(parts[:k])
                    if package in modules and not module.name.startswith(package + "."):
                        module.imports.add(package)
        top_ids = {id(node) for node in top}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top_ids:
                if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                    continue
                for target in _targets(node, module, modules):
                    ours = _ours(target, modules)
                    name = ours if ours is not None else target.split(".")[0]
                    if name != module.name:
                        module.lazy.append((name, node.lineno))
        module.external -= {"__future__", ""}
    return modules


GRAPH = _graph()


def _cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(sorted(modules[root].imports)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(modules[child].imports))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_the_graph_covers_both_packages():
    assert "torchquant.plan" in GRAPH and "torchquant.triton_kernels.dequant" in GRAPH
    assert "torchquant.plan" in GRAPH["torchquant.convert"].imports


def test_no_import_circles():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    a, b, c = (Module(n, Path(n), False) for n in "abc")
    a.imports, b.imports, c.imports = {"b"}, {"c"}, {"a"}
    assert _cycles({"a": a, "b": b, "c": c}) == [["a", "b", "c"]]


def _allowed_lazy(module: str) -> set[str]:
    return set().union(*(v for k, v in LAZY_IMPORTS.items() if fnmatch(module, k)))


def test_imports_inside_functions_are_only_for_optional_dependencies():
    lazy = [(m.name, name, line) for m in GRAPH.values() for name, line in m.lazy]
    unexpected = [
        f"{module}:{line} imports {name}"
        for module, name, line in lazy
        if not any(name == a or name.startswith(a + ".") for a in _allowed_lazy(module))
    ]
    assert unexpected == [], f"{len(lazy)} imports inside functions; move these to the top"


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_lower_layers_do_not_import_upward(layer):
    allowed = LAYERS[layer]
    upward = {
        f"{m.name} imports {target}"
        for m in GRAPH.values()
        if fnmatch(m.name, layer)
        for target in m.imports
        if target != "torchquant" and not any(target.startswith(a) for a in allowed)
    }
    assert upward == set()


def test_triton_kernels_need_only_torch_triton_and_the_standard_library():
    kernels = [m for name, m in GRAPH.items() if name.startswith("torchquant.triton_kernels")]
    assert kernels
    ours = {
        f"{m.name} imports {target}"
        for m in kernels
        for target in m.imports
        if not target.startswith("torchquant.triton_kernels")
    }
    stdlib = set(sys.stdlib_module_names)
    foreign = {
        f"{m.name} imports {name}"
        for m in kernels
        for name in m.external
        if name not in KERNEL_DEPENDENCIES and name not in stdlib
    }
    assert ours | foreign == set()


def test_no_module_level_getattr():
    found = [
        m.name
        for m in GRAPH.values()
        if any(
            isinstance(node, ast.FunctionDef) and node.name in ("__getattr__", "__dir__")
            for node in ast.parse(m.path.read_text(encoding="utf-8")).body
        )
    ]
    assert found == []
