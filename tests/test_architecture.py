"""The component import graph docs/ARCHITECTURE.md draws: read from the sources, every import
(module level or inside a function) counted."""

from __future__ import annotations

import ast
from pathlib import Path

import kdcache

ROOT = Path(kdcache.__file__).parent
COMPONENTS = ("formats", "kernels", "teacher_dump", "student_train", "evaluate")
GROUND = ("errors", "vllm_start", "model_config", "__init__")  # shared by every component, importing none
# the command line and the applications built on every component (`replicate`, the library
# face `train_api`): they import the components, and no component imports them
TOP = ("cli", "demo", "__main__", "replicate", "train_api")


def _unit(module: str) -> str | None:
    """The component or ground/top module a `kdcache.` module name belongs to."""
    parts = module.split(".")
    if parts[0] != "kdcache":
        return None
    if len(parts) == 1 or not ((ROOT / parts[1]).is_dir() or (ROOT / f"{parts[1]}.py").exists()):
        return "__init__"  # `kdcache` itself, or a name it defines (`from kdcache import __version__`)
    return parts[1]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {u for u in (_unit(m) for m in found) if u is not None}


def component_graph() -> dict[str, set[str]]:
    """unit -> the other units it imports (ground-floor modules included)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        unit = rel.parts[0]
        graph.setdefault(unit, set()).update(_imports(path) - {unit})
    return graph


def test_every_module_is_in_a_known_unit():
    assert set(component_graph()) <= set(COMPONENTS) | set(GROUND) | set(TOP)


def test_components_import_no_cycle():
    graph = {u: {v for v in deps if v in COMPONENTS} for u, deps in component_graph().items()
             if u in COMPONENTS}
    done: set[str] = set()

    def visit(unit: str, path: tuple[str, ...]) -> None:
        assert unit not in path, f"import cycle: {' -> '.join(path + (unit,))}"
        if unit in done:
            return
        for dep in sorted(graph.get(unit, ())):
            visit(dep, path + (unit,))
        done.add(unit)

    for unit in sorted(graph):
        visit(unit, ())


def test_formats_is_the_ground_floor():
    graph = component_graph()
    assert graph["formats"] & (set(COMPONENTS) | set(TOP)) == set()
    for unit in GROUND:
        assert graph.get(unit, set()) & (set(COMPONENTS) | set(TOP)) == set(), unit


def test_evaluate_imports_neither_the_dump_nor_the_trainer():
    assert component_graph()["evaluate"] & {"teacher_dump", "student_train"} == set()


def test_no_component_imports_the_command_line():
    graph = component_graph()
    for unit in COMPONENTS:
        assert graph[unit] & set(TOP) == set(), unit
