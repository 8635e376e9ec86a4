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
Tensors that are not matrices (biases, normalisation weights) take the normalised step
``x <- x - lr * g / rms(g)`` of their estimate g: root-mean-square ``lr`` too (no step where g = 0).
"""

from __future__ import annotations

import math

import torch


def polar_factors(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(P, Q)`` with ``P Q^T`` the polar factor ``U V^T`` of ``G = left @ right.T``.

    ``left`` is m x q, ``right`` n x q; P is m x t and Q n x t with orthonormal columns, t the
    numerical rank of G. None when G is zero (no singular value above the tolerance) or not
    finite. Computed in float32 (float64 for float64 input) by thin QRs and a q x q SVD, never
    forming G."""
    if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[1]:
        raise ValueError(f"left and right must be m x q and n x q; got {tuple(left.shape)} and {tuple(right.shape)}")
    dtype = torch.float64 if left.dtype == torch.float64 else torch.float32
    left, right = left.to(dtype), right.to(dtype)
    q_left, r_left = torch.linalg.qr(left)  # m x a, a x q (a = min(m, q))
    q_right, r_right = torch.linalg.qr(right)  # n x b, b x q
    u, s, vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    if s.numel() == 0 or not bool(torch.isfinite(s).all()):
        return None
    top = float(s[0])
    tol = top * max(left.shape[0], right.shape[0]) * torch.finfo(dtype).eps
    t = int((s > tol).sum())
    if top == 0.0 or t == 0:
        return None
    return q_left @ u[:, :t], q_right @ vh[:t].T


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


def lowrank_step(factors: list[tuple[torch.Tensor, torch.Tensor, float]], rank: int, lr: float,
                 shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """The orthogonalised step of one m x n matrix whose estimate is ``sum_i c_i A_i B_i^T / sqrt(r)``
    (``factors``: ``(A_i, B_i, c_i)``): ``(P, Q, alpha)`` such that the update is
    ``W += alpha * P @ Q.T``, ``alpha = lr * sqrt(m n / t)``; None where the estimate is zero."""
    live = [(a, b, c) for a, b, c in factors if c != 0.0]
    if not live or lr == 0.0:
        return None
    left = torch.cat([a * (c / math.sqrt(rank)) for a, _, c in live], dim=1)
    right = torch.cat([b for _, b, _ in live], dim=1)
    got = polar_factors(left, right)
    if got is None:
        return None
    p, q = got
    return p, q, lr * rms_scale(shape[0], shape[1], p.shape[1])
