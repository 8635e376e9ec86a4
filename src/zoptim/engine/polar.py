r"""The orthogonalised update: a weight matrix steps along the polar factor of its estimate.

A zeroth-order step with k directions (or one direction per example, ``per_example=True``) holds,
for every weight matrix, an estimate of its gradient as a sum of low-rank terms

.. math:: G = \sum_{i=1}^{q'} c_i\, \frac{A_i B_i^T}{\sqrt r} = L R^T, \qquad
          L = [c_1 A_1, \dots, c_{q'} A_{q'}] / \sqrt r \in \mathbb R^{m \times q},\quad
          R = [B_1, \dots, B_{q'}] \in \mathbb R^{n \times q},

with ``q = q' r`` (k r for k shared directions, B r for B examples). Plain SGD steps along G; the
orthogonalised update steps along its *polar factor* :math:`U V^T` (G = U S V^T, a thin SVD over
G's non-zero singular values), the matrix of G's singular directions with every singular value set
to one. Muon (Jordan et al. 2024) takes this step for first-order gradients, computing the factor
with Newton-Schulz iterations over the dense m x n matrix; ZO-Muon (arXiv 2602.17155) takes it for
zeroth-order estimates. Here G is held in factored form, so the factor is exact and cheap:

.. math:: L = Q_L R_L,\quad R = Q_R R_R \ \text{(thin QR)}, \qquad
          R_L R_R^T = U_c S V_c^T \ \text{(SVD of a } q \times q \text{ core)}, \qquad
          U V^T = (Q_L U_c)(Q_R V_c)^T,

``O((m + n) q^2)`` work per matrix, and the update is one rank-t product (t = G's numerical rank).
Singular values below ``max(S) * max(m, n) * eps_dtype`` (NumPy's ``matrix_rank`` rule) count as
zero, so a rank-deficient estimate steps only along its real directions and an all-zero one
(every delta 0) does not step at all.

Scale. U V^T of rank t has Frobenius norm sqrt(t), so its root-mean-square entry is
sqrt(t / (m n)). The update is

.. math:: W \leftarrow W - \mathrm{lr} \sqrt{\frac{m n}{t}}\; U V^T,

whose entries have root-mean-square exactly ``lr``, whatever the matrix's shape and the estimate's
rank: the convention Moonlight (Liu et al. 2025, "Muon is scalable for LLM training") uses to
make Muon's learning rate match AdamW's update RMS and transfer between model sizes (Muon's own
``sqrt(max(1, m/n))`` depends on the shape alone and not on t, which varies here with the batch).
An embedding matrix updated only in its looked-up rows (``sparse_embeddings=True``) is the k x n
block of those rows: its polar factor, and m = k in the scale, so the rows that move take steps of
root-mean-square ``lr`` as every other matrix's entries do (scaling over all m rows would put
sqrt(m / k) times larger steps on the few rows that move).
Tensors that are not matrices (biases, normalisation weights) take the normalised step
``x <- x - lr * g / rms(g)`` of their estimate g: root-mean-square ``lr`` too (no step where g = 0).

The forward engine (:mod:`zoptim.engine.forward`) writes this update when the optimizer passes
``orthogonal=`` step sizes (``ZOSGD(..., orthogonalize=True)``): :func:`orthogonal_update`.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch

from . import sparse, stacked


def batched_polar_factors(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P, Q, t)`` for a batch of products ``G_b = left_b @ right_b.T`` (left b x m x q, right
    b x n x q): ``P_b Q_b^T`` is the polar factor of G_b, ``t_b`` its numerical rank; the columns of
    P_b past t_b are zero (so P_b Q_b^T needs no trimming), and a G_b that is zero or not finite has
    t_b = 0 and P_b = 0. Thin QRs and a batched SVD of the cores, in float32 (float64 for float64
    input), never forming G."""
    dtype = torch.float64 if left.dtype == torch.float64 else torch.float32
    left, right = left.to(dtype), right.to(dtype)
    q_left, r_left = torch.linalg.qr(left)  # b x m x a, b x a x q (a = min(m, q))
    q_right, r_right = torch.linalg.qr(right)  # b x n x c, b x c x q
    u, s, vh = torch.linalg.svd(r_left @ r_right.transpose(1, 2), full_matrices=False)
    finite = torch.isfinite(s).all(dim=1, keepdim=True)
    tol = s[:, :1] * (max(left.shape[1], right.shape[1]) * torch.finfo(dtype).eps)
    keep = (s > tol) & (s[:, :1] > 0) & finite  # s is sorted: the kept columns come first
    u = torch.where(keep[:, None, :], u, torch.zeros((), dtype=dtype))
    u = torch.nan_to_num(u) if not bool(finite.all()) else u
    return q_left @ u, q_right @ vh.transpose(1, 2), keep.sum(dim=1)


def polar_factors(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(P, Q)`` with ``P Q^T`` the polar factor ``U V^T`` of ``G = left @ right.T``.

    ``left`` is m x q, ``right`` n x q; P is m x t and Q n x t with orthonormal columns, t the
    numerical rank of G. None when G is zero (no singular value above the tolerance) or not
    finite. One matrix of :func:`batched_polar_factors`."""
    if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[1]:
        raise ValueError(f"left and right must be m x q and n x q; got {tuple(left.shape)} and {tuple(right.shape)}")
    p, q, t = batched_polar_factors(left[None], right[None])
    t = int(t[0])
    return None if t == 0 else (p[0, :, :t], q[0, :, :t])


def rms_scale(m: int, n: int, t: int) -> float:
    """sqrt(m n / t): the factor that gives a rank-t polar factor of an m x n matrix entries of
    root-mean-square one (see the module's docstring)."""
    return math.sqrt(m * n / t)


def normalized(g: torch.Tensor) -> torch.Tensor | None:
    """``g / rms(g)``, the step of a tensor that is not a matrix; None where g is zero or not finite."""
    rms = float(g.float().square().mean().sqrt())
    if not math.isfinite(rms) or rms == 0.0:
        return None
    return g / rms


def lowrank_steps(matrices: list[tuple[list[tuple[torch.Tensor, torch.Tensor, float]], float, tuple[int, int]]],
                  rank: int) -> list[tuple[torch.Tensor, torch.Tensor, float] | None]:
    """The orthogonalised steps of several matrices, each ``(factors, lr, (m, n))`` with its estimate
    ``sum_i c_i A_i B_i^T / sqrt(r)`` given as ``factors = [(A_i, B_i, c_i), ...]``: for each, ``(P, Q,
    alpha)`` such that its update is ``W += alpha * P @ Q.T`` with ``alpha = lr sqrt(m n / t)``, or
    None where the estimate is zero. Matrices of one shape share one batched QR and SVD (a transformer's
    layers repeat a few shapes), which keeps the per-matrix overhead of small factorisations down."""
    out: list = [None] * len(matrices)
    groups: dict[tuple, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for index, (factors, lr, _) in enumerate(matrices):
        live = [(a, b, c) for a, b, c in factors if c != 0.0]
        if not live or lr == 0.0:
            continue
        left = torch.cat([a * (c / math.sqrt(rank)) for a, _, c in live], dim=1)
        right = torch.cat([b for _, b, _ in live], dim=1)
        groups.setdefault((tuple(left.shape), tuple(right.shape), left.device), []).append((index, left, right))
    for members in groups.values():
        p, q, t = batched_polar_factors(torch.stack([m[1] for m in members]), torch.stack([m[2] for m in members]))
        for b, (index, _, _) in enumerate(members):
            tb = int(t[b])
            if tb:
                m, n = matrices[index][2]
                out[index] = (p[b], q[b], matrices[index][1] * rms_scale(m, n, tb))
    return out


#: Why the orthogonalised update needs every tensor in a hook with low-rank matrices.
COVERAGE = (
    "orthogonalize=True needs every trainable tensor applied in a forward hook with low-rank matrix directions "
    "(module=model, rank=r): the polar factor is computed from the estimate's factors A, B, which a full-rank "
    "direction (rank=None) or a tensor moved in place does not have"
)


def check_coverage(engine) -> None:
    """Refuse a forward engine (:class:`zoptim.engine.forward.ForwardPerturbation`) on which the
    orthogonalised update cannot apply: a tensor moved in place, or full-rank matrix directions."""
    if engine.in_place is not None or engine.writer is not None or engine.rank is None:
        where = "" if engine.in_place is None else f" (moved in place: tensor indices {engine._in_place_index})"
        raise ValueError(COVERAGE + where)


def orthogonal_update(engine, terms, steps: list[float], decay) -> list:
    """The writes (prepared, none done) of the orthogonalised update on a forward engine.

    ``terms`` ``[(key, scales), ...]`` give each tensor's estimate ``M_j = sum_i scales_ij s_j(key_i)``
    (its sign and shape; its magnitude does not matter); ``steps`` the step size lr_j per tensor;
    ``decay`` the weight decay factors. Each low-rank matrix moves by ``lr_j sqrt(m n / t) U V^T``
    (:func:`lowrank_steps`), each small tensor by ``lr_j g / rms(g)`` (:func:`normalized`); a sharded
    matrix writes the rows this process holds."""
    check_coverage(engine)
    engine._cache_keys = max(engine._cache_keys, len(terms) + 1)
    terms = [(key, [s * engine.direction_scale(key) for s in engine._as_scales(scales)]) for key, scales in terms]
    decay = [0.0] * len(engine.params) if decay is None else [float(d) for d in decay]
    ops = []
    matrices, rows_of = [], {}
    examples = stacked.examples_of(engine, terms)  # a per-example step: its examples' stacked directions
    values = None if examples is not None else [engine._values(key) for key, _ in terms]
    for j in engine._lowrank:
        shape = engine._matrix_shape(j)
        if examples is not None:
            stacks, c = examples[0], examples[1][:, j]
            if j in engine.sparse_rows:
                factors, live = [], [t for t in stacked.per_key(stacks, j, terms, c) if t[2] != 0.0]
            else:
                factors, live = ([(*stacked.lowrank_factors(*stacks[j], c), 1.0)] if bool(c.any()) else []), []
        else:
            factors = [(v[j][0], v[j][1], s[j]) for v, (_, s) in zip(values, terms)]
            live = [(key, v[j], s[j]) for v, (key, s) in zip(values, terms) if s[j] != 0.0]
        if j in engine.sparse_rows and live:  # only the looked-up rows: the polar factor of that block
            rows_of[j], factors = sparse.factors(engine, j, live)
            shape = (rows_of[j].numel(), shape[1])
        matrices.append((factors, float(steps[j]), shape))
    found_all = lowrank_steps(matrices, engine.rank)
    for j, found in zip(engine._lowrank, found_all):
        p, first, rows = engine._local_rows(j)
        if decay[j]:
            ops.append(partial(p.mul_, float(np.float32(1.0 - decay[j]))))
        if found is None or rows == 0:
            continue
        left, right, alpha = found
        if j in rows_of:
            delta = torch.mm(left, right.T).mul_(alpha).to(p.dtype)
            ops.append(partial(p.view(rows, -1).index_add_, 0, rows_of[j], delta))
            continue
        ops.append(partial(p.view(rows, -1).addmm_, left[first : first + rows].to(p.dtype), right.to(p.dtype).T,
                           alpha=alpha))
    for j in engine._small:
        tensor = engine.parts[j].tensor
        if decay[j]:
            ops.append(partial(tensor.mul_, float(np.float32(1.0 - decay[j]))))
        if examples is not None:
            c = examples[1][:, j]
            live = [(stacked.small_sum(examples[0][j], c), 1.0)] if bool(c.any()) else []
        else:
            live = [(v[j], s[j]) for v, (_, s) in zip(values, terms) if s[j] != 0.0]
        if not live or steps[j] == 0.0:
            continue
        g = live[0][0] * live[0][1]
        for z, c in live[1:]:
            g = g.add(z, alpha=c)
        step = normalized(g)
        if step is not None:
            ops.append(partial(tensor.add_, engine._local_values(j, step).to(tensor.dtype), alpha=float(steps[j])))
    return ops
