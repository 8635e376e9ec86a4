"""What every method guarantees, on every engine it runs on: one table drives the checks.

The table is registered methods x engines: in place (:mod:`zoptim.engine.inplace`, on the eager
kernels and on the compiled ones users get by default for a large model), the small-model engine
(:mod:`zoptim.engine.small`, what a model this small gets by default), and applied in the forward
(:mod:`zoptim.engine.forward`) with full-rank and with rank-1 matrix directions, for the methods
that offer it (the registry says which). The registry (``zoptim.optim.registry``) drives the
table, so a method registered later is held to the same guarantees without a line here (only
``NEEDS``, what it strictly needs, if anything). The guarantees: it trains; the same seed gives
the same bits; a zero learning rate leaves every weight where it was; a run resumed from its
state_dict continues bit for bit; a non-finite loss, and an exception in the closure, restore the
weights exactly. Method-specific behaviour has its own tests beside this one; the distributed
modes' equalities are in tests/test_distributed.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import zoptim
from zoptim.engine import kernels, packed, small
from zoptim.optim import registry

NEEDS = {"as2p": dict(total_steps=12), "s2p": dict(lr=1.0, total_steps=12)}
#: A step size with a visible effect on the small problem below (the defaults are for large models).
LR = {"zosgd": 5e-3, "hizoo": 5e-3, "stp": 0.05, "as2p": 0.05}
#: engine -> (the optimizer's arguments, given the model), in place on both kernel routes.
ENGINES = {
    "small": lambda model: {},
    "in-place-eager": lambda model: {},
    "in-place-compiled": lambda model: {},
    "forward-full-rank": lambda model: dict(module=model),
    "forward-rank1": lambda model: dict(module=model, rank=1),
}
#: Options crossed with every engine: each registry option a method offers that changes its
#: update (several directions a step, the seed momentum's window of terms), and HiZOO's own.
VARIANTS = {"directions": dict(num_directions=2), "momentum": dict(momentum=0.9, momentum_window=3)}
OWN_VARIANTS = {"hizoo": {"factored": dict(factored=True)}, "zosgd": {"weight-decay": dict(weight_decay=0.1)}}


def variants(name):
    offered = {option: kw for option, kw in VARIANTS.items() if option in registry.get(name).options}
    return {"plain": {}, **offered, **OWN_VARIANTS.get(name, {})}


TABLE = [(name, engine, variant) for name in registry.names() for engine in ENGINES for variant in variants(name)
         if not engine.startswith("forward") or "forward" in registry.get(name).options]

g = torch.Generator().manual_seed(1)
X, Y = torch.randn(16, 8, generator=g), torch.randn(16, 7, generator=g)


@pytest.fixture
def route(request, monkeypatch):
    """The kernel route: compiled (the default users get) unless the engine says eager; the
    in-place engine even for this small model, unless the engine is the small-model one."""
    engine = request.node.callspec.params["engine"]
    if engine == "small":
        yield
        return
    monkeypatch.setattr(small, "SMALL_ELEMENTS", 0)
    if engine == "in-place-eager":
        monkeypatch.setenv("ZOPTIM_COMPILE", "0")
        yield
        return
    # these small tensors would move in one NumPy pass (zoptim.engine.packed) on both routes
    monkeypatch.setattr(packed, "PACK_ELEMENTS", 0)
    calls = request.getfixturevalue("compiled_route")
    yield
    if request.node.callspec.params["engine"] == "in-place-compiled":
        assert kernels._compile_failed is None and calls.count > 0  # the compiled route was taken


def make_model():
    # weight matrices of at least kernels.MIN_COMPILED_ELEMENTS, so the compiled route runs its kernels
    model = torch.nn.Sequential(torch.nn.Linear(8, 10), torch.nn.Tanh(), torch.nn.Linear(10, 7))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def build(name, engine, model, variant="plain", **extra):
    hp = {**NEEDS.get(name, {}), "seed": 3, **ENGINES[engine](model), **variants(name)[variant], **extra}
    if name in LR:
        hp.setdefault("lr", LR[name])
    return registry.build(name, model.parameters(), **hp)


def loss_of(model):
    return lambda: float(torch.nn.functional.mse_loss(model(X), Y))


def bits(model):
    return [p.detach().clone().view(torch.int32) for p in model.parameters()]


def run(name, engine, variant, steps, **extra):
    model = make_model()
    opt = build(name, engine, model, variant, **extra)
    for _ in range(steps):
        opt.step(loss_of(model))
    return model, opt


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(bits(a) if isinstance(a, torch.nn.Module) else a,
                                                  bits(b) if isinstance(b, torch.nn.Module) else b))


@pytest.mark.parametrize("name,engine,variant", TABLE)
def test_every_method_keeps_its_guarantees_on_every_engine(name, engine, variant, route, tmp_path):
    start = make_model()
    # it trains: the loss goes down
    model, opt = run(name, engine, variant, 12)
    assert loss_of(model)() < loss_of(start)()
    kind = type(opt.engine).__name__
    assert kind == {"small": "SmallPerturbation", "in-place-eager": "SeededPerturbation",
                    "in-place-compiled": "SeededPerturbation"}.get(engine, "ForwardPerturbation")
    opt.close()
    # the same seed gives the same run, bit for bit; another seed another run
    again, opt = run(name, engine, variant, 12)
    assert same(model, again)
    opt.close()
    other, opt = run(name, engine, variant, 12, seed=4)
    assert not same(model, other)
    opt.close()
    # a zero learning rate leaves every weight bit for bit where it was (exact restore)
    still, opt = run(name, engine, variant, 6, lr=0.0)
    assert same(still, start)
    opt.close()
    # a run resumed from its saved state (torch.save, read back with weights_only=True) continues
    # as if it had not stopped
    first, opt = run(name, engine, variant, 5)
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    opt.close()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = make_model()
    resumed.load_state_dict(saved["model"])
    opt2 = build(name, engine, resumed, variant)
    opt2.load_state_dict(saved["opt"])
    for _ in range(7):
        opt2.step(loss_of(resumed))
    assert same(resumed, model) and opt2.num_queries == 12 * opt2.queries_per_step
    # a non-finite loss skips the step and restores the weights exactly
    before = bits(resumed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = opt2.step(lambda: math.nan)
    assert math.isnan(value) and any(issubclass(w.category, zoptim.NonFiniteLossWarning) for w in caught)
    assert same(bits(resumed), before) and not opt2.engine.is_perturbed
    # an exception in the closure at the step's second query restores them exactly too
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return loss_of(resumed)()

    with pytest.raises(RuntimeError, match="boom"):
        opt2.step(failing)
    assert same(bits(resumed), before) and not opt2.engine.is_perturbed
    opt2.close()
