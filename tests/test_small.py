"""The small-model engine (zoptim.engine.small) against the in-place engine it stands in for.

Tolerance: none. A model of at most ``SMALL_ELEMENTS`` float32 or float64 numbers moves through
:class:`SmallPerturbation` by default; for every registered method and its variants it visits the
same query points and reaches the same iterates as the in-place engine's kernels, bit for bit,
over 20 steps at settings that contract. A failure anywhere in a step leaves the start point or
the completed update, as the in-place engine does (tests/test_atomic.py).
"""

from __future__ import annotations

import pytest
import torch

from test_vector import VARIANTS
from zoptim.engine import SeededPerturbation, build_engine, small
from zoptim.engine.shards import LocalPart
from zoptim.engine.small import SmallPerturbation
from zoptim.optim import registry

#: what the constructors need beyond each variant (minimize gives these from its budget)
NEEDS = {"as2p": dict(total_steps=20), "s2p": dict(total_steps=20, lr=1.0)}
TARGET = [torch.linspace(-1.0, 2.0, 12).view(3, 4), torch.linspace(0.5, -0.5, 5)]


def make_params(dtype):
    return [torch.zeros(3, 4, dtype=dtype, requires_grad=True), torch.zeros(5, dtype=dtype, requires_grad=True)]


def loss_of(params, seen):
    def closure():
        seen.append([p.detach().clone() for p in params])
        return float(sum(((p.detach() - t.to(p.dtype)) ** 2).sum() for p, t in zip(params, TARGET)))
    return closure


def run(name, hp, dtype, steps=20):
    params, seen = make_params(dtype), []
    opt = registry.build(name, params, seed=5, **{**NEEDS.get(name, {}), **hp})
    for _ in range(steps):
        opt.step(loss_of(params, seen))
    return params, seen, opt


CASES = [(m, hp, dtype) for m, hps in VARIANTS.items() for hp in hps for dtype in (torch.float32, torch.float64)]


@pytest.mark.parametrize("name,hp,dtype", CASES)
def test_the_small_engine_takes_the_in_place_engines_steps_bit_for_bit(name, hp, dtype, monkeypatch):
    ours, seen_ours, opt = run(name, hp, dtype)
    assert type(opt.engine) is SmallPerturbation
    monkeypatch.setattr(small, "SMALL_ELEMENTS", 0)
    ref, seen_ref, opt_ref = run(name, hp, dtype)
    assert type(opt_ref.engine) is SeededPerturbation
    assert len(seen_ours) == len(seen_ref) == opt.num_queries
    for a, b in zip(seen_ours, seen_ref):  # every query point
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(ours, ref))
    start = loss_of(make_params(dtype), [])()
    assert loss_of(ours, [])() < start  # it contracted: the comparison is not of overflowed values


def test_the_engine_is_chosen_by_size_dtype_and_wholeness(monkeypatch):
    def engine(tensors, parts=None):
        return type(build_engine(parts or [LocalPart(t, 0, t.numel()) for t in tensors]))

    assert engine([torch.zeros(100, 100)]) is SmallPerturbation
    assert engine([torch.zeros(100, 100, dtype=torch.float16)]) is SeededPerturbation  # half: the kernels
    assert engine([torch.zeros(small.SMALL_ELEMENTS + 1)]) is SeededPerturbation
    shard = torch.zeros(10)
    assert engine([shard], [LocalPart(shard, 10, 20)]) is SeededPerturbation  # an FSDP2 shard
    monkeypatch.setattr(small, "SMALL_ELEMENTS", 0)
    assert engine([torch.zeros(4)]) is SeededPerturbation


class Injected(Exception):
    pass


@pytest.mark.parametrize("name", registry.names())
def test_a_failure_anywhere_in_a_step_leaves_the_start_point_or_the_completed_update(name, monkeypatch):
    hp = dict(VARIANTS[name][0])
    clean, _, _ = run(name, hp, torch.float32, steps=3)
    started, _, _ = run(name, hp, torch.float32, steps=2)
    real, calls = torch._foreach_copy_, [0]

    def counting(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(torch, "_foreach_copy_", counting)
    run(name, hp, torch.float32, steps=2)
    before = calls[0]
    run(name, hp, torch.float32, steps=3)
    after = calls[0] - before
    failures = 0
    for fail_at in range(before + 1, after + 1):  # every write of the third step
        count = [0]

        def failing(*a, fail_at=fail_at, count=count, **kw):
            count[0] += 1
            if count[0] == fail_at:
                raise Injected(f"write {fail_at}")
            return real(*a, **kw)

        monkeypatch.setattr(torch, "_foreach_copy_", failing)
        params, seen = make_params(torch.float32), []
        opt = registry.build(name, params, seed=5, **{**NEEDS.get(name, {}), **hp})
        with pytest.raises(Injected):
            for _ in range(3):
                opt.step(loss_of(params, seen))
        monkeypatch.setattr(torch, "_foreach_copy_", real)
        failures += 1
        at = [p.detach() for p in params]
        assert not opt.engine.is_perturbed and opt.steps == 3
        # the start of the failed step (its query moves are undone) or its completed update
        assert any(all(torch.equal(x, y.detach()) for x, y in zip(at, ref)) for ref in (started, clean)), \
            f"a failure at write {fail_at} left a mixed point"
    assert failures >= 3
