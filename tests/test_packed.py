"""Small tensors in one pass (zoptim.engine.packed): the same bits and journal as moving them one by one."""

from __future__ import annotations

import pytest
import torch

import zoptim
from zoptim.engine import packed
from zoptim.engine.inplace import SeededPerturbation


def params(dtype, shapes=((64,), (10, 64), (10,), (3, 3), (1,))):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=dtype) * 10 ** torch.randint(-3, 4, (1,), generator=g).item() for s in shapes]


def history(dtype, distribution, exact, weighted, monkeypatch, pack, **shapes):
    """Bits of the tensors and the journal after each move of a scripted sequence."""
    with monkeypatch.context() as m:
        if not pack:
            m.setattr(packed, "PACK_ELEMENTS", 0)
        ps = params(dtype, **shapes)
        engine = SeededPerturbation(ps, distribution=distribution, exact=exact)
        if weighted:
            ws = [torch.rand(p.numel(), generator=torch.Generator().manual_seed(j)) + 0.5 for j, p in enumerate(ps)]
            buf = torch.empty(1000)  # one reused buffer, as HiZOO's multipliers are

            def weights(j, a, b):
                return buf[: b - a].copy_(ws[j][a:b])

            engine.weights = weights
        assert bool(engine._packed()) == pack
        ints = torch.int64 if dtype == torch.float64 else torch.int32
        seen = []
        for step in range(4):
            key = 100 + step
            scales = [1e-3 * (j + 1) for j in range(len(ps))]
            engine.move(key, scales)
            seen.append([p.clone().view(ints) for p in ps] + [engine.journal_elements()])
            engine.move(key, [-s for s in scales])
            seen.append([p.clone().view(ints) for p in ps] + [engine.journal_elements()])
            engine.update([(key, [-0.3] * len(ps)), (key + 50, 0.01)], decay=[0.01 * (step % 2)] * len(ps))
            seen.append([p.clone().view(ints) for p in ps] + [engine.journal_elements()])
            engine.move(key + 7, 1e-2)
            engine.restore()
            seen.append([p.clone().view(ints) for p in ps])
        return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("distribution", ["normal", "rademacher", "uniform"])
@pytest.mark.parametrize("exact", [True, False])
def test_packed_moves_equal_one_tensor_at_a_time(dtype, distribution, exact, monkeypatch):
    one_by_one = history(dtype, distribution, exact, False, monkeypatch, pack=False)
    together = history(dtype, distribution, exact, False, monkeypatch, pack=True)
    assert len(one_by_one) == len(together)
    for a, b in zip(one_by_one, together):
        assert all((torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y) for x, y in zip(a, b))
    if exact and dtype == torch.float32:
        assert max(s[-1] for s in together if isinstance(s[-1], int)) > 0  # the journal was exercised


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_a_lone_small_tensor_moves_as_one_chunk_would(distribution, monkeypatch):
    """One packed tensor: its keys and scales are then single values (broadcast, not repeated)."""
    one_by_one = history(torch.float32, distribution, True, False, monkeypatch, pack=False, shapes=((1000,),))
    together = history(torch.float32, distribution, True, False, monkeypatch, pack=True, shapes=((1000,),))
    for a, b in zip(one_by_one, together):
        assert all((torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y) for x, y in zip(a, b))


def test_packed_weighted_directions_equal_one_tensor_at_a_time(monkeypatch):
    a = history(torch.float32, "normal", True, True, monkeypatch, pack=False)
    b = history(torch.float32, "normal", True, True, monkeypatch, pack=True)
    for x, y in zip(a, b):
        assert all((torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v) for u, v in zip(x, y))


@pytest.mark.parametrize("name", ["zosgd", "as2p", "hizoo"])
def test_an_mlp_trains_to_the_same_bits_packed_or_not(name, monkeypatch):
    def run(pack):
        with monkeypatch.context() as m:
            if not pack:
                m.setattr(packed, "PACK_ELEMENTS", 0)
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
            x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))
            hp = {"zosgd": dict(lr=1e-2, weight_decay=0.1), "as2p": dict(total_steps=10), "hizoo": dict(lr=1e-2)}[name]
            opt = zoptim.optim.registry.build(name, model.parameters(), eps=1e-2, seed=1, **hp)
            for _ in range(10):
                opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
            return [p.detach().clone().view(torch.int32) for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))


def test_only_small_cpu_float_tensors_are_packed():
    ps = [torch.zeros(10), torch.zeros(packed.PACK_ELEMENTS + 1), torch.zeros(5, dtype=torch.bfloat16),
          torch.zeros(7, dtype=torch.float64)]
    assert list(SeededPerturbation(ps)._packed()) == [0, 3]
    assert list(SeededPerturbation(ps, chunk_size=8)._packed()) == [3]  # a tensor of two chunks is not packed
