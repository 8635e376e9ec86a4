"""The spread-normalised step (``normalize_by_spread=True``, FZOO's normalised SGD, arXiv 2506.09034):
the step's estimate divided by the standard deviation of its directional derivatives."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch

import zoptim
from test_forward import build, trainable


def _run(model, x, **kw):
    """One per-example ZOSGD step; returns the deltas it measured."""
    seen = []

    def closure():
        out = model(x).reshape(x.shape[0], -1).square().mean(1)
        seen.append(out.double())
        return out

    opt = zoptim.ZOSGD(trainable(model), eps=0.01, seed=4, module=model, rank=1, per_example=True, **kw)
    opt.step(closure)
    opt.close()
    return ((seen[0] - seen[1]) / 0.02).tolist()


def test_a_step_is_the_plain_step_with_lr_divided_by_the_deltas_standard_deviation():
    model, x = build("linear+norms+tied-embedding")
    plain, spread = copy.deepcopy(model), copy.deepcopy(model)
    deltas = _run(copy.deepcopy(model), x, lr=0.0)
    std = statistics.stdev(deltas)
    assert std > 0
    _run(spread, x, lr=0.01, normalize_by_spread=True)
    _run(plain, x, lr=0.01 / std)
    for a, b, start in zip(trainable(spread), trainable(plain), trainable(model)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a, start)


def test_equal_deltas_give_no_step():
    model, x = build("linear+norms+tied-embedding")
    before = [p.detach().clone() for p in trainable(model)]
    opt = zoptim.ZOSGD(trainable(model), lr=0.01, eps=0.01, module=model, rank=1, per_example=True,
                       normalize_by_spread=True)
    opt.step(lambda: torch.ones(x.shape[0]))
    assert all(torch.equal(p, b) for p, b in zip(trainable(model), before))


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "one direction has none"),
    (dict(num_directions=2, module="model", rank=1, orthogonalize=True), "no effect with orthogonalize=True"),
])
def test_settings_where_it_cannot_apply_are_refused(kwargs, message):
    model, _ = build("linear+norms+tied-embedding")
    kwargs = {k: (model if v == "model" else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        zoptim.ZOSGD(model.parameters(), normalize_by_spread=True, **kwargs)
