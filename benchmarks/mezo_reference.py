"""A MeZO step written from the paper's algorithm, as the baseline of the step-cost benchmark.

Malladi et al. (2023), "Fine-Tuning Language Models with Just Forward Passes", Algorithm 1: the
direction z is regenerated from ``torch.manual_seed(seed)`` for each of the four parameter passes
(+eps, -2eps, +eps, update), with ``torch.normal`` on every parameter tensor as in the authors'
``_perturb_parameters``. This is benchmark code, not part of zoptim: it seeds the global RNG.
"""

from __future__ import annotations

import torch


class MeZOReference:
    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, seed: int = 0):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.eps = lr, eps
        self.generator = torch.Generator().manual_seed(seed)  # draws the per-step seeds only

    def _perturb(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data + scale * z * self.eps

    @torch.no_grad()
    def step(self, closure) -> float:
        seed = int(torch.randint(0, 1 << 31, (1,), generator=self.generator))
        self._perturb(seed, 1.0)
        loss_plus = float(closure())
        self._perturb(seed, -2.0)
        loss_minus = float(closure())
        self._perturb(seed, 1.0)
        projected_grad = (loss_plus - loss_minus) / (2 * self.eps)
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data - self.lr * projected_grad * z
        return (loss_plus + loss_minus) / 2
