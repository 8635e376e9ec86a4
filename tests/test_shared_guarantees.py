"""What every method guarantees, checked for every method of the registry on both kernel routes.

The registry (``zoptim.optim.registry``) drives the table, so a method registered later is held
to the same guarantees without a line here (only ``NEEDS``, what it strictly needs, if anything).
Routes: the eager kernels and the compiled ones users get by default (``ZOPTIM_COMPILE=1``; the
rest of the suite runs eager, which gives the same bits: tests/test_kernels.py).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import zoptim
from zoptim.engine import kernels
from zoptim.optim import registry

NEEDS = {"as2p": dict(total_steps=12), "s2p": dict(lr=1.0, total_steps=12)}
#: A step size with a visible effect on the small problem below (the defaults are for large models).
LR = {"zosgd": 2e-3, "hizoo": 2e-3, "stp": 0.05, "as2p": 0.05}


@pytest.fixture(params=["eager", "compiled"])
def route(request, monkeypatch):
    monkeypatch.setenv("ZOPTIM_COMPILE", "0" if request.param == "eager" else "1")
    yield request.param
    if request.param == "compiled":
        assert kernels._compile_failed is None and len(kernels._compiled) > 0  # the compiled route was taken


def tensors():
    g = torch.Generator().manual_seed(0)
    # at least kernels.MIN_COMPILED_ELEMENTS each, so the compiled route runs its kernels
    return [torch.nn.Parameter(torch.randn(10, 8, generator=g)), torch.nn.Parameter(torch.randn(70, generator=g))]


def build(name, ps, **extra):
    hp = {**NEEDS.get(name, {}), "seed": 3, **extra}
    if name in LR:
        hp.setdefault("lr", LR[name])
    return registry.build(name, ps, **hp)


def loss_of(ps):
    return lambda: sum(float(((p - 0.3) ** 2).sum()) for p in ps)


def bits(ps):
    return [p.detach().clone().view(torch.int32) for p in ps]


def run(name, steps, **extra):
    ps = tensors()
    opt = build(name, ps, **extra)
    for _ in range(steps):
        opt.step(loss_of(ps))
    return ps, opt


@pytest.mark.parametrize("name", registry.names())
def test_every_method_keeps_its_guarantees(name, route):
    # it trains: the loss goes down
    ps, opt = run(name, 12)
    assert loss_of(ps)() < loss_of(tensors())()
    # the same seed gives the same run, bit for bit
    again, _ = run(name, 12)
    assert all(torch.equal(a, b) for a, b in zip(bits(ps), bits(again)))
    # a zero learning rate leaves every weight bit for bit where it was (exact restore)
    still, _ = run(name, 6, lr=0.0)
    assert all(torch.equal(a, b) for a, b in zip(bits(still), bits(tensors())))
    # a run resumed from its state_dict continues as if it had not stopped
    first, opt = run(name, 5)
    state = opt.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = build(name, resumed)
    opt2.load_state_dict(state)
    for _ in range(7):
        opt2.step(loss_of(resumed))
    assert all(torch.equal(a, b) for a, b in zip(bits(resumed), bits(ps)))
    # a non-finite loss skips the step and restores the weights exactly
    before = bits(resumed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = opt2.step(lambda: math.nan)
    assert math.isnan(value) and any(issubclass(w.category, zoptim.NonFiniteLossWarning) for w in caught)
    assert all(torch.equal(a, b) for a, b in zip(bits(resumed), before)) and not opt2.engine.is_perturbed
