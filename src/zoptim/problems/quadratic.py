"""An ill-conditioned quadratic, the simplest L-smooth test problem (Assumption 1 of the S2P paper)."""

from __future__ import annotations

import torch

from .base import Problem, VectorModel


class Quadratic(Problem):
    r"""f(x) = 1/2 sum_i lambda_i x_i^2 with lambda log-spaced from L/cond to L.

    L-smooth with L = ``L``, strongly convex with mu = L / ``cond``; f* = 0 at x = 0. Deterministic
    (full batch). The start point x_0 has i.i.d. N(0, 1) coordinates drawn from ``seed``.
    """

    full_batch = True

    def __init__(self, dim: int = 1000, cond: float = 1000.0, L: float = 1.0):
        if dim < 1:
            raise ValueError(f"dim must be >= 1; got {dim!r}")
        if cond < 1:
            raise ValueError(f"cond must be >= 1; got {cond!r}")
        self.dim, self.cond, self.L = dim, float(cond), float(L)
        self.name = f"quadratic-d{dim}-cond{cond:g}"
        self.lambdas = L * torch.logspace(-torch.log10(torch.tensor(self.cond)), 0.0, dim, dtype=torch.float64).float()

    def make_model(self, seed: int = 0) -> VectorModel:
        g = torch.Generator().manual_seed(seed)
        return VectorModel(torch.randn(self.dim, generator=g))

    def loss(self, model, batch=None) -> torch.Tensor:
        x = model.x
        return 0.5 * torch.dot(self.lambdas, x * x)
