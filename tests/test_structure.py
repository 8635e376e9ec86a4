"""The package's imports point one way: no module imports itself back through others.

Every ``import`` and ``from ... import`` in ``src/zoptim`` counts, those inside functions (lazy
imports) included; ``from . import name`` counts as an import of the module ``name`` when there is
one, else of the package. A cycle makes import order matter and hides which layer depends on which.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "zoptim"


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in mods and t != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "zoptim.optim.guard" in graph["zoptim.optim.base"]  # imported inside _set_guard
    assert "zoptim.engine.kernels" in graph["zoptim.engine.inplace"]  # from . import kernels


def test_zoptim_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_optimizers_use_the_engines_through_their_contract_only():
    """Outside zoptim/engine no code asks which engine it holds or reaches into one's private
    members: what an engine offers is a member of zoptim.engine.protocol.Engine."""
    import re

    for path in ROOT.rglob("*.py"):
        if "engine" in path.relative_to(ROOT).parts[:1]:
            continue
        text = path.read_text()
        engines = "SeededPerturbation|ForwardPerturbation|SmallPerturbation|VectorPerturbation"
        assert not re.search(rf"isinstance\([^)]*({engines})", text), path
        assert not re.search(r"engine\._[a-z]", text), path


def test_every_engine_implements_the_contract_and_no_source_file_is_over_600_lines():
    import torch

    from zoptim.engine import Engine, ForwardPerturbation, SeededPerturbation
    from zoptim.engine.small import SmallPerturbation
    from zoptim.engine.vector import VectorPerturbation

    model = torch.nn.Linear(3, 2)
    forward = ForwardPerturbation(model, list(model.parameters()), rank=1)
    engines = (SeededPerturbation([torch.zeros(4)]), SmallPerturbation([torch.zeros(4)]),
               VectorPerturbation(torch.zeros(4, dtype=torch.float64)), forward)
    for engine in engines:
        assert isinstance(engine, Engine)
        assert all(hasattr(engine, name) for name in ("element_wise", "per_example", "exact", "normalize", "dim",
                                                      "draws_ahead"))
    forward.close()
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
