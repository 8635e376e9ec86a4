"""The hyperbolic regressions the softmax paper cites: exp(Ax), cosh(Ax), sinh(Ax) fitted to b."""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Problem, VectorModel

KINDS = {"exp": torch.exp, "cosh": torch.cosh, "sinh": torch.sinh}


class HyperbolicRegression(Problem):
    r"""L(x) = 1/2 \| u(A x) - b \|_2^2 with u in {exp, cosh, sinh} (entrywise), plus an optional
    1/2 \| W A x \|^2 regulariser.

    These are the exponential and hyperbolic regressions (Li, Song and Zhou 2023; Gao, Mahadevan
    and Song 2023) that the softmax paper's softmax regression generalises (its Sec. 1-2). A has
    rows of norm about R / sqrt(d) (so \|A\| ~ R), b = u(A x_true) + noise for a random x_true of
    norm 1/2, so the minimum is near zero but not exactly. Deterministic (full batch); x_0 = 0.
    """

    full_batch = True
    default_hparams: ClassVar[dict] = {"lr": 2e-3, "eps": 1e-3, "stp_lr": 0.02, "s2p_lr": 1.0, "eta_b": 5.0}
    lr_grid = (2e-2, 1e-2, 5e-3, 2e-3, 1e-3, 5e-4)

    def __init__(self, kind: str = "exp", n: int = 64, d: int = 16, R: float = 1.0, reg: float = 0.0,
                 noise: float = 0.01, seed: int = 0):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}; got {kind!r}")
        if n < 1 or d < 1:
            raise ValueError(f"n and d must be >= 1; got n={n}, d={d}")
        self.kind, self.u = kind, KINDS[kind]
        self.n, self.d, self.R, self.reg = n, d, float(R), float(reg)
        self.name = f"{kind}-regression-n{n}-d{d}"
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(n, d, generator=g) * (R / (n**0.5 + d**0.5))
        x_true = torch.randn(d, generator=g)
        x_true = 0.5 * x_true / x_true.norm()
        self.b = self.u(self.A @ x_true) + noise * torch.randn(n, generator=g)

    def make_model(self, seed: int = 0) -> VectorModel:
        return VectorModel(torch.zeros(self.d))

    def loss_at(self, x: torch.Tensor) -> torch.Tensor:
        Ax = self.A @ x
        value = 0.5 * ((self.u(Ax) - self.b) ** 2).sum()
        if self.reg:
            value = value + 0.5 * (self.reg * Ax).pow(2).sum()
        return value

    def loss(self, model, batch=None) -> torch.Tensor:
        return self.loss_at(model.x)
