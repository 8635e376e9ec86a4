"""Per-example directions (``per_example=True``): example i of a minibatch sees its own direction
s_i inside the same forward pass, and a two-point step averages B directional derivatives.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reference
import zoptim
from test_forward import MODELS, build, trainable
from zoptim.engine.noise import mix

SEED = 5


def materialised_row_output(model, x, key, scale, ranks, row):
    """Row ``row`` of the output of a copy of the unperturbed model set to x + scale * s(key)."""
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for j, p in enumerate(trainable(plain)):
            p.add_(reference.lowrank_direction(key, j, tuple(p.shape), ranks[j]) * scale)
        return plain(x)[row]


PER_EXAMPLE_MODELS = [name for name in MODELS if name != "mixed-in-place"] + ["batchnorm-eval"]


def _build(name):
    if name == "batchnorm-eval":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        return model.eval(), torch.randn(3, 3, 5, 5)
    return build(name)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("name", PER_EXAMPLE_MODELS)
def test_example_i_sees_the_materialised_point_of_its_own_direction(name, rank):
    model, x = _build(name)
    unperturbed = copy.deepcopy(model)
    eps = 0.05
    opt = zoptim.ZOSGD(trainable(model), lr=0.0, eps=eps, seed=SEED, module=model, rank=rank, per_example=True)
    ranks = [rank if kind == "lowrank" else None for kind in opt.engine.layout().values()]
    at = zoptim.AskTell(opt)
    for sign in (1.0, -1.0):
        at.ask()
        with torch.no_grad():
            seen = model(x)
        for i in range(x.shape[0]):
            want = materialised_row_output(unperturbed, x, mix(SEED, 0, i), sign * eps, ranks, i)
            torch.testing.assert_close(seen[i], want, rtol=1e-5, atol=1e-5)
        at.tell(seen.reshape(x.shape[0], -1).square().mean(1))
    opt.close()


def _per_example_loss(model, x):
    return lambda: model(x).reshape(x.shape[0], -1).square().mean(1)


@pytest.mark.parametrize("cls,kw", [(zoptim.ZOSGD, dict(lr=0.05, eps=1e-2)), (zoptim.AS2P, dict(eps=0.05, total_steps=20))],
                         ids=["ZOSGD", "AS2P"])
def test_one_example_equals_the_plain_method_bit_for_bit(cls, kw):
    runs = []
    for per_example in (True, False):
        model, x = build("linear+norms+tied-embedding")
        x = x[:1]
        opt = cls(model.parameters(), seed=SEED, module=model, rank=1, per_example=per_example, **kw)
        loss = _per_example_loss(model, x) if per_example else (lambda m=model, x=x: m(x).square().mean())
        for _ in range(20):
            opt.step(loss)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_the_estimate_is_unbiased_for_the_minibatch_gradient():
    """l_i(W) = 0.5 ||W x_i - y_i||^2 has per-example gradients (W x_i - y_i) x_i^T, and its central
    difference is exact: the mean of many per-example estimates (one step with lr = 1 each, new
    directions every step) approaches the minibatch gradient within its standard error."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    w0 = torch.randn(3, 4, generator=g)
    true = ((x @ w0.T - y)[:, :, None] * x[:, None, :]).mean(0)
    model = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(w0)
    opt = zoptim.ZOSGD(model.parameters(), lr=1.0, eps=1e-2, seed=SEED, module=model, rank=1, per_example=True)
    samples = []
    with torch.no_grad():
        for _ in range(3000):
            model.weight.copy_(w0)
            opt.step(lambda: 0.5 * (model(x) - y).square().sum(1))
            samples.append(w0 - model.weight.detach().clone())  # -(x_new - x) / lr = g
    s = torch.stack(samples).double()
    err = (s.mean(0) - true.double()).square().sum()
    spread = s.var(0).sum() / len(samples)  # E||mean - truth||^2 for an unbiased estimator
    assert err < 3 * spread
    assert true.double().square().sum() > 30 * spread  # the test can tell a biased estimate apart


def test_wrong_return_values_say_what_was_expected():
    model, x = build("linear+norms+tied-embedding")
    opt = zoptim.ZOSGD(model.parameters(), seed=SEED, module=model, rank=1, per_example=True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="one loss per example"):
        opt.step(lambda: model(x).square().mean())
    with pytest.raises(ValueError, match="returned 3 and 3 losses, but the batch the layers saw has 4"):
        opt.step(lambda: model(x).reshape(4, -1).square().mean(1)[:3])
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_options_that_cannot_hold_are_refused():
    model, x = build("linear+norms+tied-embedding")
    with pytest.raises(ValueError, match="per_example=True needs rank=r"):
        zoptim.ZOSGD(model.parameters(), per_example=True)
    with pytest.raises(ValueError, match="per_example=True needs rank=r"):  # full-rank forward directions
        zoptim.ZOSGD(model.parameters(), module=model, per_example=True)
    with pytest.raises(ValueError, match=r"rank=r needs module=<the model>"):
        zoptim.ZOSGD(model.parameters(), rank=1, per_example=True)
    mixed, _ = build("mixed-in-place")
    with pytest.raises(ValueError, match="move in place"):
        zoptim.ZOSGD(mixed.parameters(), module=mixed, rank=1, per_example=True)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="BatchNorm1d in training mode"):
        zoptim.ZOSGD(bn.parameters(), module=bn, rank=1, per_example=True)


def test_failure_mid_step_restores_and_a_resumed_run_continues_bit_for_bit():
    model, x = build("conv2d")
    opt = zoptim.AS2P(model.parameters(), eps=0.05, total_steps=40, seed=SEED, module=model, rank=1, per_example=True)
    loss = _per_example_loss(model, x)
    for _ in range(5):
        opt.step(loss)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return loss()

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    for _ in range(10):
        opt.step(loss)
    model2, _ = build("conv2d")
    model2.load_state_dict(weights)
    opt2 = zoptim.AS2P(model2.parameters(), eps=0.05, total_steps=40, seed=SEED, module=model2, rank=1, per_example=True)
    opt2.load_state_dict(state)
    for _ in range(10):
        opt2.step(_per_example_loss(model2, x))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_per_example_training_lowers_the_loss_and_asktell_takes_the_vector():
    model, x = build("linear+norms+tied-embedding")
    target = torch.randn(4, 5, 11, generator=torch.Generator().manual_seed(0))
    loss = lambda: (model(x) - target).square().reshape(4, -1).mean(1)  # noqa: E731
    first = float(loss().mean())
    opt = zoptim.ZOSGD(model.parameters(), lr=0.02, eps=1e-2, seed=SEED, module=model, rank=1, per_example=True)
    at = zoptim.AskTell(opt)
    for _ in range(60):
        at.ask()
        with torch.no_grad():
            at.tell(loss())
    assert float(loss().mean()) < first
    assert opt.num_queries == 60  # a forward pass over the minibatch is one query
