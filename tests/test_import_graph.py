"""The package's import graph: no cycle, and the parts only depend downwards.

Every import counts: at module level, inside functions and under ``TYPE_CHECKING``, absolute or relative. The
layers follow the architecture (docs/architecture.md): the base modules (config, errors, logs; metrics and
build_record, standard library and prometheus-client only) <- ``comfy`` (the ComfyUI client and vocabulary both
parts share) <- ``supervision`` and ``jobs`` (neither knows the other) <- ``api`` (the front doors) <- ``main``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "supervisor"

# part -> the parts it may import (besides itself); a part is a subpackage, or a top-level module
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "errors": set(),
    "logs": set(),
    "metrics": set(),
    "build_record": set(),
    "comfy": {"config", "errors"},
    "supervision": {"config", "errors", "logs", "comfy", "metrics"},
    "jobs": {"config", "errors", "comfy", "metrics"},
    "api": {"config", "errors", "comfy", "jobs", "metrics", "build_record"},
    "main": {"config", "errors", "logs", "comfy", "supervision", "jobs", "api", "metrics"},
    "__main__": {"main"},
    "__init__": set(),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the package that ``name`` imports, wherever the import statement stands."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node, name, path.name == "__init__.py")
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            # "from supervisor.jobs import engine" names a module; "from supervisor.jobs.engine import X" does not
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("supervisor") and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None; packages' own __init__ edges count too."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(edges, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if colour.get(nxt) == GREY:
                return stack[stack.index(nxt):] + [nxt]
            if colour.get(nxt) == WHITE:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(edges):
        if colour[node] == WHITE:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The scanner itself: function-level, TYPE_CHECKING and relative imports are all edges."""
    pkg = tmp_path / "supervisor"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from supervisor.sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import X\n")
    (pkg / "c.py").write_text("import supervisor.a\n")
    mods = {module_name(p, tmp_path): p for p in pkg.rglob("*.py")}
    edges = {n: imports_of(n, p, set(mods)) for n, p in mods.items()}
    assert "supervisor.sub.b" in edges["supervisor.a"]
    assert "supervisor.c" in edges["supervisor.sub.b"]
    assert edges["supervisor.c"] == {"supervisor.a"}
    cycle = find_cycle(edges)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert {"supervisor.a", "supervisor.sub.b", "supervisor.c"} <= set(cycle)


def test_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("module", sorted(modules()))
def test_parts_depend_only_downwards(module: str) -> None:
    part = part_of(module)
    assert part in ALLOWED, f"{module}: a new part {part!r}; add it to the layers in this test and the docs"
    wrong = sorted(dep for dep in graph()[module] if part_of(dep) not in ALLOWED[part] | {part, "__init__"})
    assert not wrong, f"{module} ({part}) imports {wrong}; {part} may import only {sorted(ALLOWED[part])}"
