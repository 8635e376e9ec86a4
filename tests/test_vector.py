"""The vector route (zoptim.engine.vector) against the in-place route for functions of a NumPy vector.

Tolerance: none. For every registered method the vector engine visits the same query points and
reaches the same iterates as the in-place engine, bit for bit (``np.array_equal`` on float64),
over 20 steps at settings that contract (so no comparison runs into overflow).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zoptim
from zoptim import blackbox
from zoptim.engine import small
from zoptim.engine.inplace import SeededPerturbation
from zoptim.engine.vector import VectorPerturbation
from zoptim.optim import registry

A = np.linspace(-1.0, 2.0, 12)


def quadratic(x):
    return float(np.sum((np.asarray(x) - A) ** 2))


@pytest.fixture(autouse=True)
def in_place_engine(monkeypatch):
    """The torch route is the in-place engine's kernels, the reference, even for these short vectors
    (the small-model engine's equality with it is tested in test_small.py)."""
    monkeypatch.setattr(small, "SMALL_ELEMENTS", 0)


def routed(route, monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(blackbox, "ROUTE", route)
        return fn()


# Settings (beyond each method's defaults) under which 20 steps contract on the quadratic.
VARIANTS = {
    "zosgd": [dict(lr=0.05, eps=1e-3), dict(lr=0.02, num_directions=3, weight_decay=0.01, momentum=0.5),
              dict(lr=0.05, distribution="rademacher", normalize=True), dict(lr=0.05, exact_restore=False),
              dict(lr=0.05, distribution="uniform", guard=0.02)],
    "as2p": [dict(), dict(eps=0.05, distribution="rademacher", num_directions=2), dict(normalize=True)],
    "stp": [dict(lr=0.05), dict(lr=0.05, distribution="uniform", normalize=True)],
    "s2p": [dict(lr=1.0, total_steps=20), dict(step_rule="dynamic", L=2.0), dict(distribution="rademacher")],
    "hizoo": [dict(lr=0.05, eps=1e-2), dict(lr=0.05, eps=1e-2, weight_decay=0.01, exact_restore=False)],
}


def test_every_registered_method_has_variants():
    assert set(VARIANTS) == set(registry.names())  # a new method must be added here


@pytest.mark.parametrize("method,hp", [(m, hp) for m, hps in VARIANTS.items() for hp in hps])
def test_minimize_on_the_vector_route_is_bit_identical_to_the_torch_route(method, hp, monkeypatch):
    options = {"maxiter": 20, "maxfev": 10_000, "seed": 5, **hp}
    seen = {"torch": [], "vector": []}

    def run(route):
        def f(x):
            seen[route].append(x.copy())
            return quadratic(x)
        return zoptim.minimize(f, np.zeros(12), method=method, options=options)

    a = routed("torch", monkeypatch, lambda: run("torch"))
    b = routed("vector", monkeypatch, lambda: run("vector"))
    assert a.nit == b.nit == 20
    assert len(seen["torch"]) == len(seen["vector"]) == a.nfev == b.nfev
    for p, q in zip(seen["torch"], seen["vector"]):
        assert np.array_equal(p, q)  # every query point, bit for bit
    assert np.array_equal(a.x, b.x) and np.array_equal(a.loss_history, b.loss_history)
    assert b.fun < quadratic(np.zeros(12))  # it contracted: the comparison is not of overflowed values


@pytest.mark.parametrize("method", registry.names())
def test_ask_tell_batches_agree_across_routes(method, monkeypatch):
    hp = dict(VARIANTS[method][0], seed=2)

    def run():
        at = zoptim.AskTell(method, np.zeros(12), **hp)
        points = []
        for _ in range(20):
            xs = at.ask(8)
            points.append(xs.copy())
            at.tell([quadratic(x) for x in xs])
            while at.in_step:
                xs = at.ask(8)
                points.append(xs.copy())
                at.tell([quadratic(x) for x in xs])
        return at.recommend(), points, type(at.optimizer.engine)

    xa, pa, ea = routed("torch", monkeypatch, run)
    xb, pb, eb = routed("vector", monkeypatch, run)
    assert ea is SeededPerturbation and eb is VectorPerturbation
    assert len(pa) == len(pb) and all(np.array_equal(p, q) for p, q in zip(pa, pb))
    assert np.array_equal(xa, xb)


def test_the_route_is_checked(monkeypatch):
    monkeypatch.setattr(blackbox, "ROUTE", "numpy")
    with pytest.raises(ValueError, match="ROUTE must be 'vector' or 'torch'"):
        zoptim.AskTell("zosgd", np.zeros(3))


@pytest.mark.parametrize("distribution", ["normal", "rademacher", "uniform"])
def test_the_vector_engine_draws_the_in_place_engines_directions(distribution):
    x = torch.zeros(70_000, dtype=torch.float64)  # more than one chunk of the eager route
    vec = VectorPerturbation(x, distribution=distribution, chunk_size=1 << 16)
    ref = SeededPerturbation([x.clone()], distribution=distribution, chunk_size=1 << 16)
    key = 12345
    got = np.concatenate([z.numpy() for _, _, _, z in vec.direction_chunks(key)])
    want = np.concatenate([z.numpy().copy() for _, _, _, z in ref.direction_chunks(key)])
    assert np.array_equal(got, want)
    assert vec.direction_norm(key) == ref.direction_norm(key)


@pytest.mark.parametrize("exact", [True, False])
def test_vector_engine_moves_like_the_in_place_engine(exact):
    rng = np.random.default_rng(0)
    start = rng.standard_normal(1000) * 1e3
    x = torch.from_numpy(start.copy())
    y = torch.from_numpy(start.copy())
    vec = VectorPerturbation(x, exact=exact)
    ref = SeededPerturbation([y], exact=exact)
    plan = [("move", 7, 1e-3), ("move", 7, -1e-3), ("update", [(7, -0.3), (9, 0.1)], [0.01]),
            ("move", 8, 0.5), ("move", 9, 0.25), ("restore",), ("move", 10, 1.0), ("update", [(10, 0.0)], None)]
    for op in plan:
        for engine in (vec, ref):
            if op[0] == "move":
                engine.move(op[1], op[2])
            elif op[0] == "restore":
                engine.restore()
            else:
                engine.update(op[1], decay=op[2])
        assert np.array_equal(x.numpy(), y.numpy()), op
        assert vec.is_perturbed == ref.is_perturbed


def test_vector_engine_restores_bit_for_bit():
    start = np.random.default_rng(1).standard_normal(500) * np.logspace(-8, 8, 500)
    x = torch.from_numpy(start.copy())
    engine = VectorPerturbation(x)
    for key, scale in [(1, 1e-3), (1, -1e-3), (2, 10.0), (3, 1e-12)]:
        engine.move(key, scale)
        assert not np.array_equal(x.numpy(), start)
    engine.restore()
    assert np.array_equal(x.numpy(), start) and not engine.is_perturbed
    assert engine.journal_bytes() == 0


def test_vector_engine_completes_an_interrupted_update(monkeypatch):
    x = torch.zeros(10, dtype=torch.float64)
    engine = VectorPerturbation(x)
    engine.move(3, 0.1)
    want = VectorPerturbation(torch.zeros(10, dtype=torch.float64))
    want.update([(3, -0.5)])
    calls = [0]
    offset = engine._offset

    def failing(key, scale):
        calls[0] += 1
        if calls[0] == 1:
            raise KeyboardInterrupt
        return offset(key, scale)

    monkeypatch.setattr(engine, "_offset", failing)
    with pytest.raises(KeyboardInterrupt):
        engine.update([(3, -0.5)])
    assert not engine.is_perturbed and np.array_equal(x.numpy(), want.params[0].numpy())


def test_vector_engine_refuses_other_tensors():
    with pytest.raises(TypeError, match="1-D float64 CPU tensor"):
        VectorPerturbation(torch.zeros(3, dtype=torch.float32))
    with pytest.raises(TypeError, match="1-D float64 CPU tensor"):
        VectorPerturbation(torch.zeros(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("distribution", ["normal", "rademacher", "uniform"])
def test_directions_drawn_ahead_are_the_ones_drawn_one_at_a_time(distribution):
    from zoptim.engine.noise import mix, mix_array

    keys = mix_array(7, np.arange(40, 50)[:, None], np.arange(3))  # 10 steps x 3 directions
    assert [int(k) for k in keys.ravel()] == [mix(7, s, i) for s in range(40, 50) for i in range(3)]
    ahead = VectorPerturbation(torch.zeros(33, dtype=torch.float64), distribution=distribution)
    one = VectorPerturbation(torch.zeros(33, dtype=torch.float64), distribution=distribution)
    ahead.prefetch(keys)
    for key in [int(k) for k in keys.ravel()] + [mix(7, 99, 0)]:  # the last one was not drawn ahead
        assert np.array_equal(ahead.direction(key), one.direction(key))


def test_a_short_vector_draws_the_next_steps_directions_in_one_call(monkeypatch):
    calls = {"one key": 0, "ahead": 0}
    one_key, ahead = VectorPerturbation._bits, VectorPerturbation.prefetch

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(VectorPerturbation, "_bits", counted("one key", one_key))
    monkeypatch.setattr(VectorPerturbation, "prefetch", counted("ahead", ahead))
    res = zoptim.minimize(quadratic, np.zeros(12), method="zosgd", options={"maxiter": 300, "lr": 0.05})
    assert res.nit == 300
    assert calls == {"one key": 0, "ahead": 2}  # 256 steps' directions per call
