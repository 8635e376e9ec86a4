"""A high-dimensional function that is (L0, L1)-smooth but not L-smooth (S2P paper, Assumption 2)."""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Problem, VectorModel


class RelaxedSmooth(Problem):
    r"""f(x) = sum_i lambda_i (cosh(x_i) - 1), lambda log-spaced from L0 / cond to L0.

    Its Hessian is diag(lambda_i cosh x_i), unbounded as |x| grows, so f is not L-smooth for any L;
    but cosh <= 1 + |sinh| gives
    :math:`\|\nabla^2 f(x)\| \le L_0 + L_1 \|\nabla f(x)\|` with L_0 = ``L0``, L_1 = 1, the
    relaxed smoothness of Assumption 2 in the S2P paper (Zhang et al., 2019). f* = 0 at x = 0.
    Deterministic (full batch); x_0 has i.i.d. N(0, ``scale``^2) coordinates drawn from ``seed``,
    where the curvature at the start is up to cosh(3 scale) times that at the optimum.
    """

    full_batch = True
    default_hparams: ClassVar[dict] = {"lr": 1e-3, "eps": 1e-3, "stp_lr": 0.05, "s2p_lr": 1.0, "eta_b": 5.0}
    lr_grid = (1e-2, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4)

    def __init__(self, dim: int = 1000, cond: float = 100.0, L0: float = 1.0, scale: float = 2.0):
        if dim < 1:
            raise ValueError(f"dim must be >= 1; got {dim!r}")
        if cond < 1:
            raise ValueError(f"cond must be >= 1; got {cond!r}")
        self.dim, self.cond, self.L0, self.L1, self.scale = dim, float(cond), float(L0), 1.0, float(scale)
        self.name = f"relaxed-smooth-d{dim}"
        self.lambdas = L0 * torch.logspace(-torch.log10(torch.tensor(self.cond)), 0.0, dim, dtype=torch.float64).float()

    def make_model(self, seed: int = 0) -> VectorModel:
        g = torch.Generator().manual_seed(seed)
        return VectorModel(self.scale * torch.randn(self.dim, generator=g))

    def loss(self, model, batch=None) -> torch.Tensor:
        return (self.lambdas * (torch.cosh(model.x) - 1.0)).sum()
