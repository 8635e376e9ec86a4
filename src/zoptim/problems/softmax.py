"""Softmax regression exactly as the softmax paper defines it (Definitions 2.7 and 2.8)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..runloop import minibatch
from .base import Problem, VectorModel


class SoftmaxRegression(Problem):
    r"""The (regularised) softmax regression loss of the softmax paper.

    For data points j = 1..m with :math:`A_j \in R^{n \times d}`, :math:`b_j \in R^n`,
    :math:`\|b_j\|_1 \le 1` and :math:`W = \mathrm{diag}(w)`:

    .. math::

        L_{exp,j}(x) &= \tfrac12 \| \langle \exp(A_j x), 1_n \rangle^{-1} \exp(A_j x) - b_j \|_2^2 \\
        L_{exp,reg,j}(x) &= L_{exp,j}(x) + \tfrac12 \| W A_j x \|_2^2

    (Definitions 2.7-2.8). The paper sums over j; here the loss is the *mean* over the j of a
    batch (same minimiser, a learning rate independent of m). ``regularized=False`` gives L_exp.

    Generator: :math:`A_j = U_j \mathrm{diag}(\sigma) V_j^T` with random orthogonal U_j, V_j and
    singular values log-spaced from R / cond to R, so :math:`\|A_j\| = R` and
    :math:`\kappa(A_j) = cond`; b_j is a random probability vector (:math:`\|b_j\|_1 = 1`);
    b_j = f_j(x_true) for a planted unit-norm x_true (so ||b_j||_1 = 1 and L_exp(x_true) = 0);
    w_i = ``reg``. Requires n >= d so the regularised loss is strongly convex (Lemma 5.1).
    x_0 = 0.
    """

    default_hparams: ClassVar[dict] = {"lr": 0.5, "eps": 1e-3, "stp_lr": 0.05, "s2p_lr": 10.0, "eta_b": 5.0}
    lr_grid = (2.0, 1.0, 0.5, 0.2, 0.1)
    stp_grid = (0.2, 0.1, 0.05, 0.02)
    eps_grid = (1e-3,)

    def __init__(
        self,
        n: int = 16,
        d: int = 8,
        num_samples: int = 64,
        R: float = 4.0,
        cond: float = 4.0,
        reg: float = 0.01,
        batch_size: int | None = None,
        regularized: bool = True,
        seed: int = 0,
    ):
        if n < d:
            raise ValueError(f"n must be >= d for a strongly convex regularised loss; got n={n}, d={d}")
        if batch_size is not None and not 1 <= batch_size <= num_samples:
            raise ValueError(f"batch_size must be in [1, num_samples={num_samples}]; got {batch_size!r}")
        self.n, self.d, self.m = n, d, num_samples
        self.R, self.cond, self.regularized = float(R), float(cond), regularized
        self.batch_size = batch_size
        self.full_batch = batch_size is None or batch_size == num_samples
        self.name = f"softmax-n{n}-d{d}-m{num_samples}" + ("-reg" if regularized else "")
        g = torch.Generator().manual_seed(seed)
        sigma = R * torch.logspace(-torch.log10(torch.tensor(self.cond)), 0.0, d, dtype=torch.float64)
        A = []
        for _ in range(num_samples):
            U, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
            V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
            A.append(U @ torch.diag(sigma) @ V.T)
        self.A = torch.stack(A).float()  # (m, n, d)
        x_true = torch.randn(d, generator=g, dtype=torch.float64)
        self.x_true = (x_true / x_true.norm()).float()
        # Planted targets b_j = f_j(x_true): probability vectors, ||b_j||_1 = 1.
        self.b = torch.softmax(self.A @ self.x_true, dim=1)
        self.w = torch.full((n,), float(reg))

    def make_model(self, seed: int = 0) -> VectorModel:
        return VectorModel(torch.zeros(self.d))

    def sample_batch(self, generator: torch.Generator):
        if self.full_batch:
            return None
        return minibatch(self.m, self.batch_size, generator)

    def loss_at(self, x: torch.Tensor, batch=None) -> torch.Tensor:
        A, b = (self.A, self.b) if batch is None else (self.A[batch], self.b[batch])
        Ax = A @ x  # (B, n)
        f = torch.softmax(Ax, dim=1)  # <exp(A_j x), 1_n>^{-1} exp(A_j x)
        per_j = 0.5 * ((f - b) ** 2).sum(dim=1)
        if self.regularized:
            per_j = per_j + 0.5 * ((self.w * Ax) ** 2).sum(dim=1)
        return per_j.mean()

    def gradient_at(self, x: torch.Tensor, batch=None) -> torch.Tensor:
        r"""The exact gradient, written from the paper's decomposition (Lemma 2.10, Defs. 2.11-2.14).

        .. math::

            \nabla L_{exp,j}(x) = A_j^T G_j(x), \quad
            G_j(x) = -f_j(x) \, c_j(x)^T f_j(x) + \mathrm{diag}(f_j(x)) \, c_j(x),

        with f_j(x) = <exp(A_j x), 1_n>^{-1} exp(A_j x) and c_j(x) = f_j(x) - b_j; the regulariser
        adds A_j^T W^2 A_j x. Averaged over the j of the batch, like :meth:`loss_at`.
        """
        A, b = (self.A, self.b) if batch is None else (self.A[batch], self.b[batch])
        f = torch.softmax(A @ x, dim=1)  # f_j(x), (B, n)
        c = f - b  # c_j(x)
        G = -f * (c * f).sum(dim=1, keepdim=True) + f * c  # G_j(x)
        grad = torch.einsum("bnd,bn->bd", A, G)  # A_j^T G_j(x)
        if self.regularized:
            grad = grad + torch.einsum("bnd,bn->bd", A, self.w**2 * (A @ x))
        return grad.mean(dim=0)

    def loss(self, model, batch=None) -> torch.Tensor:
        return self.loss_at(model.x, batch)

    def minimum(self, iters: int = 500) -> float:
        """L* from a first-order solver (L-BFGS on the full loss, float64)."""
        x = torch.zeros(self.d, dtype=torch.float64, requires_grad=True)
        A64, b64, w64 = self.A.double(), self.b.double(), self.w.double()
        opt = torch.optim.LBFGS([x], max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            Ax = A64 @ x
            per_j = 0.5 * ((torch.softmax(Ax, 1) - b64) ** 2).sum(1)
            if self.regularized:
                per_j = per_j + 0.5 * ((w64 * Ax) ** 2).sum(1)
            val = per_j.mean()
            val.backward()
            return val

        opt.step(closure)
        with torch.no_grad():
            return float(self.loss_at(x.float()))
