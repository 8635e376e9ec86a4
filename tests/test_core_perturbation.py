"""The perturbation engine's contract: seeded, memory-free, exact, and blind to the global RNG."""

from __future__ import annotations

import warnings

import pytest
import torch

import zoptim
from zoptim.engine.inplace import SeededPerturbation
from zoptim.engine.noise import NoiseSource, mix

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def weights(dtype, n=50_000, scale=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * scale).to(dtype)


def bits(t):
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()]).clone()


@pytest.mark.parametrize("dtype", DTYPES)
def test_moves_are_undone_bit_for_bit(dtype):
    p = weights(dtype)
    before = bits(p)
    engine = SeededPerturbation([p], chunk_size=4096)
    engine.move(key=1, scales=1e-3)
    assert not torch.equal(bits(p), before)
    engine.move(key=1, scales=-1e-3)
    engine.move(key=2, scales=5e-3)
    engine.restore()
    assert torch.equal(bits(p), before)
    assert engine.journal_elements() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_without_the_journal_the_round_trip_drifts(dtype):
    """Why the journal exists: MeZO's arithmetic undo is not exact (this test fails if it were)."""
    p = weights(dtype)
    before = bits(p)
    engine = SeededPerturbation([p], exact=False)
    for k in range(5):
        engine.move(key=k, scales=1e-3)
        engine.move(key=k, scales=-1e-3)
        engine.restore()
    assert (bits(p) != before).sum() > 100


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls,kw", [
    (zoptim.ZOSGD, dict(lr=0.0)),
    (zoptim.ZOSGD, dict(lr=0.0, num_directions=3)),
    (zoptim.AS2P, dict(lr=0.0, total_steps=20)),
    (zoptim.AS2P, dict(lr=0.0, total_steps=20, momentum=0.9)),
    (zoptim.HiZOO, dict(lr=0.0, hessian_smooth=0.1)),
    (zoptim.HiZOO, dict(lr=0.0, hessian_smooth=0.1, factored=True)),
    (zoptim.STP, dict(lr=1e-2)),  # every candidate is rejected at the minimum below
])
def test_zero_updates_leave_parameters_bit_identical(dtype, cls, kw):
    model = torch.nn.Linear(64, 64).to(dtype)
    before = [bits(t.detach()) for t in model.parameters()]
    opt = cls(model.parameters(), **kw)
    # f is minimal at the starting point, so STP rejects both of its moves.
    start = [t.detach().clone().float() for t in model.parameters()]
    closure = lambda: sum(float(((t.float() - s) ** 2).sum()) for t, s in zip(model.parameters(), start))  # noqa: E731
    for _ in range(20):
        opt.step(closure)
    assert all(torch.equal(b, bits(t.detach())) for b, t in zip(before, model.parameters()))


def test_chunks_bound_the_scratch_memory():
    p = torch.zeros(10_000)
    engine = SeededPerturbation([p], chunk_size=1000)
    engine.move(key=3, scales=1.0)
    engine.restore()
    assert max(t.numel() for t in engine._scratch.values()) <= 1000


def test_a_direction_is_a_pure_function_of_its_key():
    a, b = torch.zeros(3000), torch.zeros(3000)
    SeededPerturbation([a], chunk_size=1024).move(key=7, scales=1.0, temporary=False)
    SeededPerturbation([b], chunk_size=1024).move(key=7, scales=1.0, temporary=False)
    assert torch.equal(a, b)
    c = torch.zeros(3000)
    SeededPerturbation([c], chunk_size=1024).move(key=8, scales=1.0, temporary=False)
    assert not torch.equal(a, c)
    # tensor j moves along NoiseSource.fill(mix(key, j)): the stream's definition, whatever the chunks
    assert torch.equal(a, NoiseSource().fill(torch.empty(3000), mix(7, 0)))
    assert torch.equal(a[1024:2048], NoiseSource().fill(torch.empty(1024), mix(7, 0), start=1024))


@pytest.mark.parametrize("distribution", ["normal", "rademacher", "uniform"])
def test_distributions_have_zero_mean_and_unit_variance(distribution):
    z = NoiseSource(distribution).fill(torch.empty(200_000), key=11)
    assert abs(float(z.mean())) < 5 / 200_000**0.5
    assert float(z.var()) == pytest.approx(1.0, abs=0.02)
    if distribution == "rademacher":
        assert set(z.unique().tolist()) == {-1.0, 1.0}
    if distribution == "uniform":
        assert float(z.abs().max()) <= 3**0.5


def test_normalize_scales_directions_to_sqrt_d():
    p = torch.zeros(5000)
    SeededPerturbation([p], normalize=True, chunk_size=1024).move(key=1, scales=1.0, temporary=False)
    assert float(p.norm()) == pytest.approx(5000**0.5, rel=1e-5)


# -- the optimizers' guarantees (the shared ones, every method x engine: tests/test_shared_guarantees.py) --

def test_the_global_rng_is_untouched():
    model = torch.nn.Linear(8, 1)
    opt = zoptim.AS2P(model.parameters(), total_steps=10, distribution="rademacher")
    x = torch.ones(4, 8)
    state = torch.get_rng_state()
    for _ in range(5):
        opt.step(lambda: model(x).sum())
    assert torch.equal(state, torch.get_rng_state())


# -- non-finite losses and failures --------------------------------------------------------------

def test_a_non_finite_loss_skips_the_update_and_restores_exactly():
    p = torch.nn.Parameter(torch.randn(100, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    before = bits(p.detach())
    opt = zoptim.ZOSGD([p], lr=0.1)
    with pytest.warns(zoptim.NonFiniteLossWarning):
        opt.step(lambda: float("nan"))
    assert torch.equal(before, bits(p.detach()))
    assert opt.nonfinite_steps == 1
    opt.step(lambda: float(p.detach().float().sum()))
    assert not torch.equal(before, bits(p.detach()))


@pytest.mark.parametrize("cls,kw", [(zoptim.HiZOO, dict(lr=0.1, hessian_smooth=0.1)),
                                    (zoptim.ZOSGD, dict(lr=0.1, momentum=0.9)),
                                    (zoptim.AS2P, dict(total_steps=10, momentum=0.9))])
@pytest.mark.parametrize("bad_query", [0, 1, 2])
def test_new_methods_restore_exactly_on_a_non_finite_loss_at_any_query(cls, kw, bad_query):
    """After a few real steps (H or the momentum window is populated), a NaN at any query of a
    step leaves the bf16 weights bit for bit where the step began and the state unchanged."""
    p = torch.nn.Parameter(torch.randn(300, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16))
    opt = cls([p], **kw)
    f = lambda: float(p.detach().float().square().sum())  # noqa: E731
    for _ in range(3):
        opt.step(f)
    before, state = bits(p.detach()), opt.state_dict()["zoptim"]
    calls = []

    def closure():
        calls.append(1)
        return float("nan") if len(calls) == bad_query + 1 else f()

    if bad_query >= opt.queries_per_step:
        pytest.skip("the method has fewer queries per step")
    with pytest.warns(zoptim.NonFiniteLossWarning):
        opt.step(closure)
    assert torch.equal(before, bits(p.detach()))
    after = opt.state_dict()["zoptim"]
    for key in ("hessian", "momentum", "gamma_window"):
        if key in state:
            assert repr(state[key]) == repr(after[key]), key


def test_consecutive_non_finite_losses_raise_after_the_limit():
    p = torch.nn.Parameter(torch.ones(10))
    opt = zoptim.AS2P([p], total_steps=100, max_nonfinite=3)
    calls = iter([1.0, float("inf")] * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zoptim.NonFiniteLossWarning)
        opt.step(lambda: next(calls))
        opt.step(lambda: next(calls))
        with pytest.raises(zoptim.DivergedError, match="non-finite.*3 consecutive"):
            opt.step(lambda: next(calls))
    assert torch.equal(p.detach(), torch.ones(10))


def test_an_exception_in_the_closure_restores_the_parameters():
    p = torch.nn.Parameter(torch.randn(1000))
    before = p.detach().clone()
    opt = zoptim.ZOSGD([p], lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return float(p.detach().sum())

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert torch.equal(before, p.detach())
