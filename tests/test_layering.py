"""The shape of the import graph: which part of fatscale may import what.

Read from the source (ast), so it needs no GPU and imports nothing: an import at module level runs
when the module is imported; one inside a function only when it is called (``TYPE_CHECKING``
imports never run). Two import-time checks are also made for real, in fresh interpreters.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fatscale"
HEAVY = ("torch", "timm", "nvidia.dali", "deepspeed", "mlflow", "torchvision", "safetensors")
# What runs training or drives it; everything else is below and never imports fatscale.train.
ABOVE_TRAIN = ("fatscale.train", "fatscale.launch", "fatscale.job", "fatscale.evaluate", "fatscale.tryout")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" or \
        isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"


@cache
def imports(module: str) -> tuple[frozenset[str], frozenset[str]]:
    """(imported when ``module`` is imported, imported by any of its code), as dotted names."""
    at_import, anywhere = set(), set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                # "from fatscale.checkpoint import layout": the module fatscale.checkpoint.layout, when it is one
                names = [f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in MODULES else child.module
                         for a in child.names]
            for name in names:
                anywhere.add(name)
                if top:
                    at_import.add(name)
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(ast.parse(MODULES[module].read_text()), True)
    return frozenset(at_import), frozenset(anywhere)


def parents(name: str) -> list[str]:
    """Importing a.b.c imports a and a.b first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def loaded_at_import(module: str) -> set[str]:
    """Every module importing ``module`` imports, fatscale's own followed."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        for loaded in parents(name):
            if loaded in seen:
                continue
            seen.add(loaded)
            if loaded in MODULES:
                todo.extend(imports(loaded)[0])
    return seen


def heavy(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == h or n.startswith(h + ".") for h in HEAVY))


def within(prefix: str) -> list[str]:
    return [m for m in MODULES if m == prefix or m.startswith(prefix + ".")]


def test_the_source_is_read():
    assert "fatscale.checkpoint.layout" in imports("fatscale.checkpoint.resume")[0]
    assert "timm" in imports("fatscale.config")[1] and "timm" not in imports("fatscale.config")[0]  # a lazy one
    assert "torch" in heavy(loaded_at_import("fatscale.train.trainer"))


@pytest.mark.parametrize("package", ["fatscale.prep", "fatscale.config", "fatscale.schema", "fatscale.preflight",
                                     "fatscale.data.config", "fatscale.data.manifest", "fatscale.checkpoint.layout",
                                     "fatscale.tracking", "fatscale.launch.slurm"])
def test_light_modules_import_nothing_heavy(package):
    for module in within(package):
        if module.endswith("__main__"):
            continue
        assert not heavy(loaded_at_import(module)), f"{module} imports {heavy(loaded_at_import(module))}"


def test_tracking_never_imports_deepspeed_or_dali():
    for module in within("fatscale.tracking"):
        used = imports(module)[1] | loaded_at_import(module)
        assert not [n for n in used if n.startswith(("deepspeed", "nvidia.dali"))], module


@pytest.mark.parametrize("package,forbidden", [
    ("fatscale.models", ("fatscale.train", "fatscale.data", "fatscale.checkpoint", "fatscale.config", "deepspeed",
                         "nvidia.dali", "mlflow")),
    ("fatscale.data", ("fatscale.train", "fatscale.config", "fatscale.checkpoint", "fatscale.tracking", "deepspeed")),
    ("fatscale.prep", ("fatscale.train", "fatscale.checkpoint", "fatscale.tracking")),
    ("fatscale.schema", ("fatscale.",)),
])
def test_lower_parts_never_import_upper_ones(package, forbidden):
    for module in within(package):
        wrong = sorted(n for n in imports(module)[1] if n.startswith(forbidden))
        assert not wrong, f"{module} imports {wrong}"


def test_nothing_below_training_imports_it():
    below = [m for m in MODULES if not m.startswith(ABOVE_TRAIN)]
    assert "fatscale.checkpoint.checkpointer" in below and "fatscale.data.loader" in below
    for module in below:
        wrong = sorted(n for n in imports(module)[1] if n.startswith(ABOVE_TRAIN))
        assert not wrong, f"{module} imports {wrong}"


def component(module: str) -> str:
    """fatscale.data.loader -> fatscale.data; fatscale.config -> fatscale.config."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_modules_or_components():
    def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
        state, stack = {}, []

        def visit(node: str) -> list[str] | None:
            state[node] = "open"
            stack.append(node)
            for nxt in sorted(graph.get(node, ())):
                if state.get(nxt) == "open":
                    return stack[stack.index(nxt):] + [nxt]
                if nxt not in state and (cycle := visit(nxt)):
                    return cycle
            state[node] = "done"
            stack.pop()
            return None

        for node in sorted(graph):
            if node not in state and (cycle := visit(node)):
                return cycle
        return None

    modules = {m: {n for n in imports(m)[0] if n in MODULES and n != m} for m in MODULES}
    assert find_cycle(modules) is None, " -> ".join(find_cycle(modules))
    components = {}
    for m in MODULES:  # every import, lazy ones too: a component's place does not depend on when it imports
        components.setdefault(component(m), set()).update(
            component(n) for n in imports(m)[1] if n in MODULES and component(n) != component(m))
    assert find_cycle(components) is None, " -> ".join(find_cycle(components))


@pytest.mark.parametrize("module", ["fatscale.prep.cli", "fatscale.config"])
def test_imported_for_real_they_stay_light(module):
    code = (f"import sys, {module}; heavy = {HEAVY!r}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('nvidia.dali')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
