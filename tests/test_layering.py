"""The floors of the house, read from the code with the ast module: kmax_model <- pipeline <- ablations, the
rooms of pipeline in their order, no import cycle, and importing the config does not start Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("kmax_model", "pipeline", "ablations")
ROOMS = {"data": 1, "eval": 2, "train": 3, "serve": 3, "sweep": 4}
"""Floors of pipeline's rooms; the contracts at pipeline's root (config, tracking, storage, ray_setup,
checkpoint, cli) are floor 0. A module imports only from its own floor or below (train and serve share a
floor: neither may import the other without making a cycle, which test_no_import_cycle also catches)."""
MODEL_MUST_NOT_IMPORT = ("pipeline", "ablations", "ray", "mlflow")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every module a file imports, at module level or inside functions (a lazy import is still a tie).
    ``from a import b`` counts as ``a.b`` when that is a module of the project."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) for name, path in modules.items()}


def _floor(module: str) -> tuple[int, int]:
    """(package floor, room floor) of a project module."""
    parts = module.split(".")
    package = PACKAGES.index(parts[0])
    if parts[0] != "pipeline" or len(parts) < 2:
        return package, 0
    return package, ROOMS.get(parts[1], 0)


def test_kmax_model_imports_no_ray_mlflow_or_pipeline():
    bad = [
        (m, i) for m, imports in _graph().items() if m.startswith("kmax_model") for i in imports
        if i.split(".")[0] in MODEL_MUST_NOT_IMPORT
    ]  # fmt: skip
    assert bad == []


def test_nothing_imports_upward():
    graph = _graph()
    project = set(graph)
    upward = []
    for module, imports in graph.items():
        for imported in imports:
            if (
                imported.split(".")[0] in PACKAGES
                and imported in project
                and _floor(imported) > _floor(module)
            ):
                upward.append(f"{module} -> {imported}")
    assert upward == []


def test_the_rooms_are_what_the_floors_say():
    """pipeline's sub-packages are exactly the rooms the checker knows (a new room needs a floor)."""
    rooms = {p.name for p in (REPO / "pipeline").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert rooms == set(ROOMS)
    assert _floor("pipeline.sweep.driver") > _floor("pipeline.train.worker") > _floor("pipeline.eval.pq")
    assert _floor("pipeline.eval.pq") > _floor("pipeline.data.records") > _floor("pipeline.config")
    assert _floor("ablations.studies") > _floor("pipeline.sweep.driver") > _floor("kmax_model.model")


def test_no_import_cycle():
    graph = _graph()
    edges = {m: {i for i in imports if i in graph and i != m} for m, imports in graph.items()}
    # a package's __init__ is imported with each of its modules; that tie is not a cycle of its own
    edges = {m: {i for i in targets if not m.startswith(i + ".")} for m, targets in edges.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_importing_the_config_imports_no_ray():
    code = "import sys, pipeline.config, pipeline.data.augment; print([m for m in sys.modules if m == 'ray'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
