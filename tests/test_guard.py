"""The loss guard (zoptim.optim.guard): its formula, what it must and must not react to, its state."""

from __future__ import annotations

import warnings

import pytest
import torch

import reference
import zoptim
from zoptim.optim.guard import LossGuard


def quad(x: torch.Tensor) -> float:
    """sum_i a_i x_i^2, a from 0.5 to 2 (float64): ZOSGD at lr 0.1 on its 7 variables runs away."""
    a = torch.linspace(0.5, 2.0, x.numel(), dtype=torch.float64)
    return float((a * x * x).sum())


X0 = torch.linspace(-1.0, 1.5, 7, dtype=torch.float64)


def run(cls, kw, steps, f=quad, x0=X0):
    p = torch.nn.Parameter(x0.clone())
    opt = cls([p], **kw)
    xs = [p.detach().clone()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zoptim.NonFiniteLossWarning)
        for _ in range(steps):
            opt.step(lambda: f(p.detach()))
            xs.append(p.detach().clone())
    return xs, opt


@pytest.mark.parametrize("cls,kw,ref,atol", [
    (zoptim.ZOSGD, dict(lr=0.1, eps=1e-2, guard=0.05),
     lambda n: reference.zosgd(quad, X0, n, lr=0.1, eps=1e-2, guard=0.05), 1e-6),
    (zoptim.ZOSGD, dict(lr=0.1, eps=1e-2, guard=0.05, momentum=0.8, momentum_window=4),
     lambda n: reference.zosgd(quad, X0, n, lr=0.1, eps=1e-2, beta=0.8, m=4, guard=0.05), 1e-6),
    # HiZOO keeps its Hessian estimate in float32: at lr 0.5 the iterates (|x| up to 10) differ
    # from the float64 formula by up to 5e-6 with or without the guard.
    (zoptim.HiZOO, dict(lr=0.5, eps=1e-2, hessian_smooth=0.1, guard=0.05),
     lambda n: reference.hizoo(quad, X0, n, lr=0.5, eps=1e-2, alpha=0.1, guard=0.05), 1e-5),
], ids=["zosgd", "zosgd-momentum", "hizoo"])
def test_guarded_iterates_match_the_formula_through_a_cut(cls, kw, ref, atol):
    got, opt = run(cls, kw, 60)
    assert opt.guard.cuts >= 1, "no cut happened: the comparison would not test the guard"
    for k, (a, b) in enumerate(zip(got, ref(60))):
        assert torch.allclose(a, b, atol=atol, rtol=0), f"iterate {k} differs: {a} vs {b}"


def test_the_guard_turns_a_run_that_blows_up_into_one_that_descends():
    free, _ = run(zoptim.ZOSGD, dict(lr=0.1, eps=1e-2), 60)
    guarded, opt = run(zoptim.ZOSGD, dict(lr=0.1, eps=1e-2, guard=0.05), 60)
    assert quad(free[-1]) > 10 * quad(X0)  # unguarded: runs away
    assert quad(guarded[-1]) < quad(X0)  # guarded: below where it started
    assert opt.guard.scale == 0.5**opt.guard.cuts < 1.0
    assert opt.num_queries == 2 * 60  # the guard reads the losses the step measured: no extra query


def noise(kind: str, n: int, seed: int) -> torch.Tensor:
    """Unit-variance noise: Gaussian, or the mean of 4 exponential losses (a minibatch of 4
    cross-entropies), standardised."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, generator=g, dtype=torch.float64)
    v = -torch.log(torch.rand(n, 4, generator=g, dtype=torch.float64)).mean(1)
    return (v - 1.0) / 0.5  # mean 1, standard deviation 1/2 for the mean of 4 unit exponentials


@pytest.mark.parametrize("kind", ["gaussian", "minibatch-of-4"])
def test_minibatch_noise_alone_rarely_cuts(kind):
    """2,000 steps of a flat loss with 30 % noise (an LM minibatch of 4 prompts is this noisy):
    at most two cuts, where a guard without the noise margin (z = 0) cuts dozens of times."""
    values = [1.3 * (1 + 0.3 * float(v)) for v in noise(kind, 2000, 0)]
    guard, naive = LossGuard(0.02), LossGuard(0.02, z=0.0)
    assert sum(guard.observe(v) for v in values) <= 2
    assert sum(naive.observe(v) for v in values) >= 20


def test_a_sustained_rise_is_cut_within_a_few_dozen_steps():
    g = torch.Generator().manual_seed(1)
    guard = LossGuard(0.02)
    losses = [2.0 - 0.002 * i for i in range(300)]  # descent ...
    losses += [losses[-1] * 1.01**i for i in range(1, 200)]  # ... then a runaway of 1 % a step
    cut_at = None
    for i, v in enumerate(losses):
        if guard.observe(v * (1 + 0.05 * float(torch.randn((), generator=g)))):
            cut_at = i
            break
    assert cut_at is not None and 300 < cut_at < 300 + 40


def test_resume_through_a_cut_is_bit_identical(tmp_path):
    kw = dict(lr=0.1, eps=1e-2, guard=0.05)
    full, full_opt = run(zoptim.ZOSGD, kw, 60)
    half, opt = run(zoptim.ZOSGD, kw, 15)
    assert opt.guard.cuts < full_opt.guard.cuts  # a cut happens after the checkpoint
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed, opt2 = run(zoptim.ZOSGD, kw, 45, x0=half[-1])
    opt2_state = torch.load(tmp_path / "opt.pt", weights_only=True)
    p = torch.nn.Parameter(half[-1].clone())
    opt3 = zoptim.ZOSGD([p], **kw)
    opt3.load_state_dict(opt2_state)
    for _ in range(45):
        opt3.step(lambda: quad(p.detach()))
    assert torch.equal(p.detach(), full[-1])
    assert opt3.guard.state() == full_opt.guard.state()


def test_the_guard_holds_numbers_only_and_reports_its_scale():
    _, opt = run(zoptim.ZOSGD, dict(lr=0.1, eps=1e-2, guard=0.05), 60)
    state = opt.state_dict()["zoptim"]["guard"]
    assert all(isinstance(v, (int, float)) for v in state.values())
    assert not opt.state  # no per-parameter tensor
    assert opt.last_stats["lr_scale"] == opt.guard.scale
    assert opt.last_stats["lr"] == pytest.approx(opt.param_groups[0]["lr"] * opt.guard.scale)


def test_guard_errors_name_the_argument():
    p = [torch.nn.Parameter(torch.zeros(4))]
    with pytest.raises(ValueError, match=r"guard must be a finite number >= 0; got -0.1"):
        zoptim.ZOSGD(p, guard=-0.1)
    with pytest.raises(ValueError, match=r"guard must be a finite number >= 0"):
        zoptim.HiZOO(p, guard=float("nan"))
    with pytest.raises(ValueError, match=r"guard factor must be in \(0, 1\); got 1.5"):
        LossGuard(0.02, factor=1.5)
    plain = zoptim.ZOSGD([torch.nn.Parameter(torch.ones(5))])
    plain.step(lambda: 1.0)
    with pytest.raises(ValueError, match="saved without a guard; this optimizer has guard=0.02"):
        zoptim.ZOSGD([torch.nn.Parameter(torch.ones(5))], guard=0.02).load_state_dict(plain.state_dict())
    guarded = zoptim.ZOSGD([torch.nn.Parameter(torch.ones(5))], guard=0.02)
    guarded.step(lambda: 1.0)
    other_tol = zoptim.ZOSGD([torch.nn.Parameter(torch.ones(5))], guard=0.05)
    other_tol.load_state_dict(guarded.state_dict())  # the tol is a group entry: it comes with the state, as lr
    other_tol.step(lambda: 1.0)
    assert other_tol.param_groups[0]["guard"] == other_tol.guard.tol == 0.02


def test_a_guard_that_never_cuts_leaves_the_run_bit_identical_to_plain_zosgd():
    plain, _ = run(zoptim.ZOSGD, dict(lr=0.02, eps=1e-2), 60)
    guarded, opt = run(zoptim.ZOSGD, dict(lr=0.02, eps=1e-2, guard=0.05), 60)
    assert opt.guard.cuts == 0
    assert all(torch.equal(a, b) for a, b in zip(plain, guarded))
