"""Every optimizer against the paper's formula, and the behaviour every optimizer must share.

One table, ``CASES``, lists each optimizer with the hyper-parameters of each test problem; a new
optimizer is tested by adding a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import pytest
import torch

import reference
import zoptim
from zoptim.problems import Quadratic, SoftmaxRegression

QUAD_DIM, QUAD_BUDGET = 250, 5_000  # 20 queries per dimension on the ill-conditioned quadratic
SOFTMAX_BUDGET = 4_000


@dataclass
class Case:
    name: str
    cls: type
    quadratic: dict  # hyper-parameters on Quadratic(QUAD_DIM, cond=1000)
    softmax: dict  # hyper-parameters on the regularised softmax regression
    tiny: dict = field(default_factory=dict)  # hyper-parameters on the tiny problem of the reference tests


def _k(budget, per_step):
    return budget // per_step


CASES = [
    Case("zosgd", zoptim.ZOSGD, dict(lr=1 / 252, eps=1e-3), dict(lr=0.3), dict(lr=0.05, eps=1e-2)),
    Case("zosgd-rademacher", zoptim.ZOSGD, dict(lr=4e-3, distribution="rademacher"),
         dict(lr=0.3, distribution="rademacher"), dict(lr=0.05, eps=1e-2, distribution="rademacher")),
    Case("zosgd-3spsa", zoptim.ZOSGD, dict(lr=1e-2, num_directions=3), dict(lr=0.6, num_directions=3),
         dict(lr=0.05, num_directions=3, weight_decay=0.1)),
    Case("stp", zoptim.STP, dict(lr=0.03), dict(lr=0.01), dict(lr=0.05)),
    Case("s2p-stationary", zoptim.S2P, dict(step_rule="stationary", lr=7.5, total_steps=_k(QUAD_BUDGET, 2)),
         dict(step_rule="stationary", lr=0.3, total_steps=_k(SOFTMAX_BUDGET, 2)),
         dict(step_rule="stationary", lr=2.0, total_steps=30)),
    Case("s2p-dynamic", zoptim.S2P, dict(step_rule="dynamic", L=0.5), dict(step_rule="dynamic", L=0.1),
         dict(step_rule="dynamic", L=2.0, rho=1e-2)),
    Case("s2p-relaxed-stationary", zoptim.S2P,
         dict(step_rule="relaxed_stationary", L1=0.12, total_steps=_k(QUAD_BUDGET, 2)),
         dict(step_rule="relaxed_stationary", L1=10.0, total_steps=_k(SOFTMAX_BUDGET, 2)),
         dict(step_rule="relaxed_stationary", L1=1.0, total_steps=30)),
    Case("s2p-relaxed-dynamic", zoptim.S2P, dict(step_rule="relaxed_dynamic", L0=0.5, L1=0.01),
         dict(step_rule="relaxed_dynamic", L0=0.1, L1=0.1), dict(step_rule="relaxed_dynamic", L0=2.0, L1=0.5)),
    Case("as2p", zoptim.AS2P, dict(eps=0.1, total_steps=_k(QUAD_BUDGET, 2)),
         dict(eps=0.1, total_steps=_k(SOFTMAX_BUDGET, 2)), dict(eps=0.1, total_steps=30)),
    Case("as2p-full-batch", zoptim.AS2P, dict(eps=0.03, batch_mode="full", total_steps=_k(QUAD_BUDGET, 2)),
         dict(eps=0.01, batch_mode="full", total_steps=_k(SOFTMAX_BUDGET, 2)),
         dict(eps=0.05, batch_mode="full", total_steps=30)),
    Case("zosgd-momentum", zoptim.ZOSGD, dict(lr=1 / 252, momentum=0.5, momentum_window=3),
         dict(lr=0.3, momentum=0.9), dict(lr=0.05, eps=1e-2, momentum=0.8, momentum_window=4)),
    Case("as2p-momentum", zoptim.AS2P, dict(eps=0.1, total_steps=_k(QUAD_BUDGET, 2), momentum=0.5, momentum_window=3),
         dict(eps=0.1, total_steps=_k(SOFTMAX_BUDGET, 2), momentum=0.9),
         dict(eps=0.1, total_steps=30, momentum=0.8, momentum_window=4)),
    Case("hizoo", zoptim.HiZOO, dict(lr=2 / 252, hessian_smooth=1e-6), dict(lr=0.3, hessian_smooth=1e-3),
         dict(lr=0.05, eps=1e-2, hessian_smooth=0.1, weight_decay=0.1)),
]
IDS = [c.name for c in CASES]


def tiny_f(x: torch.Tensor) -> float:
    """A smooth, non-quadratic test function of 7 variables (float64)."""
    a = torch.linspace(0.5, 2.0, x.numel(), dtype=torch.float64)
    return float(torch.log(torch.cosh(a * x - 0.3)).sum() + 0.05 * (x**4).sum())


def run(opt_cls, kw, x0, steps, f=tiny_f):
    p = torch.nn.Parameter(x0.clone())
    opt = opt_cls([p], **kw)
    xs = [p.detach().clone()]
    for _ in range(steps):
        opt.step(lambda: f(p.detach()))
        xs.append(p.detach().clone())
    return xs, opt


# -- the formulas ---------------------------------------------------------------------------------

REFERENCES = {
    "zosgd": lambda kw, x0, n: reference.zosgd(tiny_f, x0, n, lr=kw["lr"], eps=kw["eps"]),
    "zosgd-rademacher": lambda kw, x0, n: reference.zosgd(tiny_f, x0, n, lr=kw["lr"], eps=kw["eps"],
                                                          distribution="rademacher"),
    "zosgd-3spsa": lambda kw, x0, n: reference.zosgd(tiny_f, x0, n, lr=kw["lr"], eps=1e-3, k=3, wd=0.1),
    "stp": lambda kw, x0, n: reference.stp(tiny_f, x0, n, lr=kw["lr"]),
    "s2p-stationary": lambda kw, x0, n: reference.s2p(tiny_f, x0, n, "stationary", lr=kw["lr"], K=30),
    "s2p-dynamic": lambda kw, x0, n: reference.s2p(tiny_f, x0, n, "dynamic", L=2.0, rho=1e-2),
    "s2p-relaxed-stationary": lambda kw, x0, n: reference.s2p(tiny_f, x0, n, "relaxed_stationary", L1=1.0, K=30),
    "s2p-relaxed-dynamic": lambda kw, x0, n: reference.s2p(tiny_f, x0, n, "relaxed_dynamic", L0=2.0, L1=0.5),
    "as2p": lambda kw, x0, n: reference.as2p(tiny_f, x0, n, eps=0.1, K=30),
    "as2p-full-batch": lambda kw, x0, n: reference.as2p(tiny_f, x0, n, eps=0.05, K=30, full=True),
    "zosgd-momentum": lambda kw, x0, n: reference.zosgd(tiny_f, x0, n, lr=0.05, eps=1e-2, beta=0.8, m=4),
    "as2p-momentum": lambda kw, x0, n: reference.as2p(tiny_f, x0, n, eps=0.1, K=30, beta=0.8, m=4),
    "hizoo": lambda kw, x0, n: reference.hizoo(tiny_f, x0, n, lr=0.05, eps=1e-2, alpha=0.1, wd=0.1),
}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_iterates_match_the_papers_formula(case):
    x0 = torch.linspace(-1.0, 1.5, 7, dtype=torch.float64)
    got, _ = run(case.cls, case.tiny, x0, 30)
    want = REFERENCES[case.name](case.tiny, x0, 30)
    assert not torch.equal(got[-1], got[0]), "the optimizer never moved: the comparison would be vacuous"
    for k, (a, b) in enumerate(zip(got, want)):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), f"iterate {k} differs: {a} vs {b}"


@pytest.mark.parametrize("flags", [dict(auto_lr=False, lr=0.02), dict(clipping=False), dict(lr=0.05)])
def test_as2p_ablations_match_the_formula(flags):
    x0 = torch.linspace(-1.0, 1.5, 7, dtype=torch.float64)
    got, _ = run(zoptim.AS2P, dict(eps=0.1, total_steps=30, **flags), x0, 30)
    want = reference.as2p(tiny_f, x0, 30, eps=0.1, K=30, **flags)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pushed", [1, 2, 7, 40, 103])
def test_as2p_sigma_is_the_population_std_of_the_last_gammas(pushed):
    from zoptim.optim.as2p import GammaWindow

    gammas = torch.randn(pushed, generator=torch.Generator().manual_seed(pushed), dtype=torch.float64) * 1e3 + 7.0
    window = GammaWindow(capacity=16)  # 40 and 103 pushes wrap the ring buffer
    for g in gammas.tolist():
        window.push(g)
    for n in (1, 2, 5, 16, 50):
        recent = gammas[-min(n, 16):]
        want = float(recent.std(unbiased=False)) if len(recent) > 1 else abs(float(recent[0]))
        assert math.isclose(window.sigma(n), want, rel_tol=1e-12), (n, window.sigma(n), want)


# -- convergence within a query budget ------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reduces_an_ill_conditioned_quadratic_tenfold(case):
    problem = Quadratic(dim=QUAD_DIM, cond=1000.0)
    model = problem.make_model(seed=0)
    opt = case.cls(model.parameters(), **case.quadratic)
    start = problem.full_loss(model)
    # the tenfold fall must happen within the budget; the run stops once it has (checked every 50 steps)
    while opt.num_queries < QUAD_BUDGET and (opt.steps % 50 or problem.full_loss(model) > start / 10):
        opt.step(partial(problem.loss, model, None))
    assert opt.num_queries <= QUAD_BUDGET + opt.queries_per_step
    assert problem.full_loss(model) <= start / 10


@pytest.fixture(scope="module")
def softmax_problem():
    problem = SoftmaxRegression(n=32, d=16, num_samples=64, R=4.0, cond=4.0, reg=0.01)
    return problem, problem.minimum()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reduces_the_softmax_regression_gap_tenfold(case, softmax_problem):
    """L(x) - L* falls 10x on the regularised softmax loss of the softmax paper (Def. 2.8)."""
    problem, l_star = softmax_problem
    model = problem.make_model()
    opt = case.cls(model.parameters(), **case.softmax)
    gap0 = problem.full_loss(model) - l_star
    assert gap0 > 1e-4
    while opt.num_queries < SOFTMAX_BUDGET and (opt.steps % 50 or problem.full_loss(model) - l_star > gap0 / 10):
        opt.step(partial(problem.loss, model, None))
    assert problem.full_loss(model) - l_star <= gap0 / 10


# -- direction of the steps ---------------------------------------------------------------------

@pytest.mark.parametrize("cls,kw", [
    (zoptim.AS2P, dict(eps=1e-2, batch_mode="full")),
    (zoptim.AS2P, dict(eps=1e-2, total_steps=100)),
    (zoptim.S2P, dict(step_rule="dynamic", L=1.0)),
    (zoptim.S2P, dict(step_rule="stationary", lr=1.0, total_steps=50)),
])
def test_two_point_searches_step_towards_the_lower_evaluation(cls, kw):
    """On a linear f every step of S2P / AS2P must decrease f (AS2P's sign convention, Sec. 3.4)."""
    a = torch.linspace(-1, 1, 50, dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(50, dtype=torch.float64))
    opt = cls([p], **kw)
    f = lambda: float(a @ p.detach())  # noqa: E731
    for _ in range(50):
        before = f()
        opt.step(f)
        assert f() < before


def test_full_batch_stp_never_increases_the_loss():
    problem = Quadratic(dim=200, cond=100.0)
    model = problem.make_model()
    opt = zoptim.STP(model.parameters(), lr=0.3)
    losses = [problem.full_loss(model)]
    for _ in range(300):
        opt.step(partial(problem.loss, model, None))
        losses.append(problem.full_loss(model))
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0]  # and it does make progress


# -- queries ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_num_queries_counts_every_closure_call(case):
    calls = []
    p = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    opt = case.cls([p], **case.tiny)

    def closure():
        calls.append(1)
        return tiny_f(p.detach())

    for _ in range(4):
        opt.step(closure)
    assert opt.num_queries == len(calls) == 4 * opt.queries_per_step


def test_queries_per_step_match_the_paper():
    p = [torch.nn.Parameter(torch.ones(3))]
    assert zoptim.ZOSGD(p).queries_per_step == 2
    assert zoptim.ZOSGD(p, num_directions=4).queries_per_step == 8
    assert zoptim.STP(p).queries_per_step == 3
    assert zoptim.S2P(p, "dynamic", L=1.0).queries_per_step == 4
    assert zoptim.S2P(p, "stationary", lr=1.0, total_steps=5).queries_per_step == 2
    assert zoptim.AS2P(p, total_steps=5).queries_per_step == 2
    assert zoptim.HiZOO(p).queries_per_step == 3
    assert zoptim.ZOSGD(p, momentum=0.9).queries_per_step == 2


def test_factored_hizoo_matches_its_formula_on_a_matrix():
    """The rank-one factored estimate (H ~ r c^T / sum r) on a 3 x 4 weight matrix."""
    x0 = torch.linspace(-1.0, 1.5, 12, dtype=torch.float64)
    w = torch.nn.Parameter(x0.clone().reshape(3, 4))
    opt = zoptim.HiZOO([w], lr=0.05, eps=1e-2, hessian_smooth=0.2, factored=True)
    got = [w.detach().reshape(-1).clone()]
    for _ in range(30):
        opt.step(lambda: tiny_f(w.detach().reshape(-1)))
        got.append(w.detach().reshape(-1).clone())
    want = reference.hizoo(tiny_f, x0, 30, lr=0.05, eps=1e-2, alpha=0.2, shape=(3, 4))
    assert opt.memory_bytes() == 4 * (3 + 4)
    for k, (a, b) in enumerate(zip(got, want)):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), f"iterate {k} differs"


def test_factored_hizoo_is_the_same_when_chunks_split_rows_and_its_scratch_stays_chunk_sized():
    """Chunks of 5 elements cut the 4-column rows in the middle: each chunk's row block is
    assembled and summed on its own, and the iterates still follow the formula; the scratch
    buffers hold at most a chunk plus two rows, never the matrix."""
    x0 = torch.linspace(-1.0, 1.5, 12, dtype=torch.float64)
    w = torch.nn.Parameter(x0.clone().reshape(3, 4))
    opt = zoptim.HiZOO([w], lr=0.05, eps=1e-2, hessian_smooth=0.2, factored=True)
    opt.engine.chunk_size = 5  # before the first move, so no journal refers to the default chunks
    got = [w.detach().reshape(-1).clone()]
    for _ in range(30):
        opt.step(lambda: tiny_f(w.detach().reshape(-1)))
        got.append(w.detach().reshape(-1).clone())
    want = reference.hizoo(tiny_f, x0, 30, lr=0.05, eps=1e-2, alpha=0.2, shape=(3, 4))
    for k, (a, b) in enumerate(zip(got, want)):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), f"iterate {k} differs"
    r, c = opt.hessian[0]
    assert torch.allclose(opt.diagonal_hessian()[0], torch.outer(r, c) / r.sum())
    assert opt._scratch and all(buf.numel() <= opt.engine.chunk_size + 2 * 4 for buf in opt._scratch.values())


def test_memory_free_momentum_holds_m_pairs_and_no_tensor():
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = zoptim.ZOSGD([p], lr=1e-3, momentum=0.9, momentum_window=5)
    for _ in range(12):
        opt.step(lambda: float(p.detach().sum()))
    extra = opt.state_dict()["zoptim"]["momentum"]
    assert len(extra["history"]) == 5 and all(len(step) == 1 for step in extra["history"])
    assert not opt.state  # torch.optim's per-parameter state stays empty: no momentum buffer


# -- torch.optim conventions ----------------------------------------------------------------------

def test_only_trainable_parameters_move():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    frozen = [t.clone() for t in model[0].parameters()]
    head = [t.clone() for t in model[1].parameters()]
    opt = zoptim.ZOSGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        opt.step(lambda: model(x).pow(2).mean())
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[0].parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(head, model[1].parameters()))


def test_lr_schedulers_drive_the_learning_rate():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = zoptim.ZOSGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    lrs = []
    for _ in range(10):
        opt.step(lambda: float(p.detach().sum()))
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[0] == 0.1 and lrs[-1] < 0.01
    assert all(b < a for a, b in zip(lrs, lrs[1:]))


def test_per_group_learning_rates():
    a, b = torch.nn.Parameter(torch.zeros(20)), torch.nn.Parameter(torch.zeros(20))
    opt = zoptim.ZOSGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.0}], eps=1e-3)
    opt.step(lambda: float(a.detach().sum() + b.detach().sum()))
    assert a.detach().abs().sum() > 0
    assert torch.equal(b.detach(), torch.zeros(20))


def test_last_stats_describe_the_step():
    p = torch.nn.Parameter(torch.ones(8))
    opt = zoptim.AS2P([p], eps=1e-2, total_steps=10)
    opt.step(lambda: float((p.detach() ** 2).sum()))
    stats = opt.last_stats
    for key in ("loss", "gamma", "sigma", "rho", "lr", "step_size"):
        assert math.isfinite(stats[key]), key
    assert stats["rho"] == pytest.approx(1e-2)
