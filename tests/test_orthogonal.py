"""The orthogonalised update (``orthogonalize=True``, :mod:`zoptim.engine.polar`): each weight matrix steps
along the polar factor U V^T of its estimate, scaled to root-mean-square lr, every other tensor along
its normalised estimate. Checked against a reference written from the formulas: the estimate
materialised from the directions (``reference.lowrank_direction``) and ``torch.linalg.svd``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import reference
import zoptim
from test_forward import MODELS, build, trainable
from zoptim.engine.noise import mix
from zoptim.engine.polar import polar_factors

SEED = 3
#: every layer kind the forward engine covers (the model with a tensor moved in place is refused below)
COVERED = [name for name in MODELS if name != "mixed-in-place"]


def svd_polar(g: torch.Tensor, eps: float | None = None) -> tuple[torch.Tensor, int]:
    """U V^T over the singular values above NumPy's matrix_rank tolerance (``eps``: the machine
    epsilon of the precision g was computed in; default g's), and that rank t."""
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    t = int((s > s[0] * max(g.shape) * (eps or torch.finfo(g.dtype).eps)).sum())
    return u[:, :t] @ vh[:t], t


@pytest.mark.parametrize("m,n,q", [(7, 9, 3), (7, 9, 7), (7, 9, 20), (30, 4, 12), (1, 6, 4), (6, 1, 4)])
def test_the_factored_polar_factor_is_the_svd_polar_factor_of_the_materialised_product(m, n, q):
    """q below, at and above min(m, n), and the thin shapes: P Q^T = U V^T of L R^T (float64)."""
    g = torch.Generator().manual_seed(m * 100 + n * 10 + q)
    left, right = torch.randn(m, q, generator=g, dtype=torch.float64), torch.randn(n, q, generator=g, dtype=torch.float64)
    p, qf = polar_factors(left, right)
    want, t = svd_polar(left @ right.T)
    assert p.shape[1] == qf.shape[1] == t == min(m, n, q)
    torch.testing.assert_close(p @ qf.T, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(p.T @ p, torch.eye(t, dtype=torch.float64), rtol=0, atol=1e-12)


def test_a_rank_deficient_product_steps_only_along_its_real_directions():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 2, generator=g, dtype=torch.float64)
    left = torch.cat([base, base @ torch.randn(2, 3, generator=g, dtype=torch.float64)], dim=1)  # rank 2 in 5 columns
    right = torch.randn(6, 5, generator=g, dtype=torch.float64)
    p, q = polar_factors(left, right)
    want, t = svd_polar(left @ right.T)
    assert t == 2 and p.shape == (8, 2)
    torch.testing.assert_close(p @ q.T, want, rtol=0, atol=1e-12)


def test_a_zero_product_has_no_polar_factor():
    assert polar_factors(torch.zeros(5, 3), torch.randn(4, 3)) is None


def test_matrices_of_one_shape_share_a_batched_factorisation_with_the_same_result():
    """A full-rank, a rank-deficient and a zero estimate in one batch: each its own polar factor."""
    from zoptim.engine.polar import batched_polar_factors

    g = torch.Generator().manual_seed(1)
    left = torch.randn(3, 9, 4, generator=g, dtype=torch.float64)
    right = torch.randn(3, 7, 4, generator=g, dtype=torch.float64)
    left[1, :, 3] = left[1, :, 0]  # rank 3
    left[2] = 0.0
    p, q, t = batched_polar_factors(left, right)
    assert t.tolist() == [4, 3, 0]
    for b in range(2):
        want, rank = svd_polar(left[b] @ right[b].T)
        assert rank == t[b]
        torch.testing.assert_close(p[b] @ q[b].T, want, rtol=0, atol=1e-12)
    assert torch.equal(p[2] @ q[2].T, torch.zeros(9, 7, dtype=torch.float64))


def reference_orthogonal_step(estimate: torch.Tensor, lr: float, matrix: bool) -> torch.Tensor:
    """The orthogonalised update's step for an estimate, from the formula: ``lr sqrt(m n / t) U V^T`` of a
    matrix (viewed shape[0] x rest; U V^T from torch.linalg.svd), ``lr g / rms(g)`` of any other tensor."""
    if not matrix:
        return lr * estimate / estimate.square().mean().sqrt()
    # the directions were materialised in float32: their rounding is not a direction
    polar, t = svd_polar(estimate.reshape(estimate.shape[0], -1), eps=torch.finfo(torch.float32).eps)
    return lr * math.sqrt(estimate.numel() / t) * polar.reshape(estimate.shape)


def reference_step(model, x, opt_kw, per_example: bool, k: int = 1):
    """One orthogonalised ZOSGD step written from the formulas: the queries' losses by hand, the
    estimate M = sum_i c_i S_i materialised per tensor, U V^T from torch.linalg.svd."""
    lr, eps = opt_kw["lr"], opt_kw["eps"]
    plain = copy.deepcopy(model)
    params = trainable(plain)
    rank = opt_kw["rank"]
    other = copy.deepcopy(model)
    probe = zoptim.ZOSGD(trainable(other), lr=0.0, eps=eps, module=other, rank=rank)
    ranks = [rank if kind == "lowrank" else None for kind in probe.engine.layout().values()]
    probe.close()
    n = x.shape[0] if per_example else k
    keys = [mix(SEED, 0, i) for i in range(n)]
    dirs = [[reference.lowrank_direction(key, j, tuple(p.shape), ranks[j]).double() for j, p in enumerate(params)]
            for key in keys]

    def losses_at(i, sign):
        point = copy.deepcopy(plain)
        with torch.no_grad():
            for p, s in zip(trainable(point), dirs[i]):
                p.add_((s * sign * eps).to(p.dtype))
            out = point(x).reshape(x.shape[0], -1).square().mean(1).double()
        return out[i] if per_example else out.mean()

    deltas = [(losses_at(i, 1.0) - losses_at(i, -1.0)) / (2 * eps) for i in range(n)]
    want = []
    for j, p in enumerate(params):
        estimate = sum(-d / n * dirs[i][j] for i, d in enumerate(deltas))  # the descent direction -g
        want.append(p.detach().double() + reference_orthogonal_step(estimate, lr, ranks[j] is not None))
    return want


@pytest.mark.parametrize("per_example,k", [(True, 1), (False, 3)], ids=["per-example", "3-shared-directions"])
@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("name", COVERED)
def test_one_step_moves_each_tensor_by_the_reference_orthogonalised_update(name, rank, per_example, k):
    """Every covered layer kind (Linear, Conv1D, Embedding tied and untied, Conv2d, depthwise Conv2d,
    LoRA, the norms), B r and k r above and below min(m, n) of its matrices."""
    model, x = build(name)
    kw = dict(lr=0.01, eps=0.01, rank=rank)
    want = reference_step(model, x, kw, per_example, k)
    opt = zoptim.ZOSGD(trainable(model), seed=SEED, module=model, per_example=per_example, num_directions=k,
                       orthogonalize=True, **kw)
    if per_example:
        opt.step(lambda: model(x).reshape(x.shape[0], -1).square().mean(1))
    else:
        opt.step(lambda: model(x).reshape(x.shape[0], -1).square().mean(1).mean())
    for p, w in zip(trainable(model), want):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-4, atol=2e-5)
    opt.close()


def test_every_entry_of_a_matrix_step_has_root_mean_square_lr():
    model, x = build("linear+norms+tied-embedding")
    before = [p.detach().clone() for p in trainable(model)]
    opt = zoptim.ZOSGD(trainable(model), lr=0.01, eps=0.01, seed=SEED, module=model, rank=1, per_example=True,
                       orthogonalize=True)
    opt.step(lambda: model(x).reshape(x.shape[0], -1).square().mean(1))
    for p, b in zip(trainable(model), before):
        rms = float((p.detach() - b).square().mean().sqrt())
        assert rms == pytest.approx(0.01, rel=1e-3)


def test_an_all_zero_estimate_leaves_the_weights_unchanged_bit_for_bit():
    """Every delta 0 (the loss does not depend on the weights): no step, no NaN."""
    model, x = build("linear+norms+tied-embedding")
    before = [p.detach().clone() for p in trainable(model)]
    opt = zoptim.ZOSGD(trainable(model), lr=0.01, eps=0.01, module=model, rank=1, per_example=True, orthogonalize=True)
    for _ in range(3):
        assert opt.step(lambda: torch.zeros(x.shape[0])) == 0.0
    assert all(torch.equal(p, b) for p, b in zip(trainable(model), before))
    assert opt.nonfinite_steps == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "orthogonalize=True needs rank=r"),
    (dict(module="model"), "orthogonalize=True needs rank=r"),
    (dict(module="model", rank=None), "orthogonalize=True needs rank=r"),
])
def test_orthogonalize_without_low_rank_forward_directions_is_refused(kwargs, message):
    model, _ = build("linear+norms+tied-embedding")
    kwargs = {k: (model if v == "model" else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        zoptim.ZOSGD(model.parameters(), orthogonalize=True, **kwargs)


def test_orthogonalize_with_a_tensor_moved_in_place_is_refused_naming_it():
    model, _ = build("mixed-in-place")
    with pytest.raises(ValueError, match="moved in place: tensor indices"):
        zoptim.ZOSGD(model.parameters(), module=model, rank=1, orthogonalize=True)


@pytest.mark.parametrize("method,why", [("as2p", "automatic learning rate"), ("hizoo", "preconditioner")])
def test_as2p_and_hizoo_refuse_it_and_say_why(method, why):
    model, _ = build("linear+norms+tied-embedding")
    cls = zoptim.optim.registry.get(method).cls
    with pytest.raises(ValueError, match=why):
        cls(model.parameters(), module=model, rank=1, orthogonalize=True,
            **({"total_steps": 10} if method == "as2p" else {}))


def test_the_state_records_the_option_and_a_run_resumes_bit_for_bit():
    def run(steps, state=None):
        model, x = build("conv2d")
        opt = zoptim.ZOSGD(trainable(model), lr=1e-3, eps=1e-2, module=model, rank=1, per_example=True,
                           orthogonalize=True, seed=SEED)
        if state is not None:
            model.load_state_dict(state[0])
            opt.load_state_dict(state[1])
        for _ in range(steps):
            opt.step(lambda: model(x).reshape(x.shape[0], -1).square().mean(1))
        return model, opt

    straight, _ = run(6)
    half, opt = run(3)
    resumed, _ = run(3, (copy.deepcopy(half.state_dict()), copy.deepcopy(opt.state_dict())))
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
    assert opt.state_dict()["zoptim"]["orthogonalize"] is True
    model, _ = build("conv2d")
    other = zoptim.ZOSGD(trainable(model), lr=1e-3, eps=1e-2, module=model, rank=1, per_example=True, seed=SEED)
    with pytest.raises(ValueError, match="orthogonalize=True"):
        other.load_state_dict(opt.state_dict())


def test_per_example_orthogonalised_steps_train_a_small_network():
    """sklearn's digits, an MLP: 60 steps of batch 32 lower the full-data loss."""
    from sklearn.datasets import load_digits

    data, labels = load_digits(return_X_y=True)
    x, y = torch.tensor(data / 16.0, dtype=torch.float32), torch.tensor(labels)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = zoptim.ZOSGD(model.parameters(), lr=3e-2, eps=1e-2, module=model, rank=1, per_example=True,
                       orthogonalize=True, seed=SEED)
    loss = lambda: torch.nn.functional.cross_entropy(model(x), y).item()  # noqa: E731
    start, g = loss(), torch.Generator().manual_seed(0)
    for _ in range(60):
        rows = torch.randint(0, len(x), (32,), generator=g)
        opt.step(lambda r=rows: torch.nn.functional.cross_entropy(model(x[r]), y[r], reduction="none"))
    assert loss() < start - 0.05

# torch.distributed (batch and directions modes with orthogonalize=True): tests/test_distributed.py
