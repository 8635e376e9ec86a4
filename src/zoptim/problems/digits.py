"""A small MLP on scikit-learn's digits: the quick default problem of the benchmark."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..runloop import minibatch
from .base import Problem


def load_sklearn_digits():
    """scikit-learn's 1,797 8x8 digits (``images`` 0-16, ``data`` flattened, ``target``); no download."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is in the bench extra
        raise ImportError("the digits problems need scikit-learn: pip install 'zoptim[bench]'") from err
    return load_digits()


class DigitsMLP(Problem):
    r"""Cross-entropy of a 64-``hidden``-10 MLP (tanh) on the 1,797 8x8 digits of scikit-learn.

    The training set is the whole data set (pixels scaled to [0, 1]); minibatches of
    ``batch_size`` are drawn without replacement per step; :meth:`full_loss` is the mean
    cross-entropy over all 1,797 images. The model is initialised from ``seed`` with its own
    generator. d = 64 h + h + 10 h + 10 (2,410 for h = 32). Ships with scikit-learn, no download.
    """

    # From a search at 6,000 queries (seed 0): GA lr in {0.01, 0.02, 0.03, 0.05, 0.1}, eps in
    # {1e-3, 1e-2}; STP in {0.005, 0.01, 0.02, 0.05, 0.1, 0.2, ..., 4}; S2P alpha_0 in
    # {30, 100, 300, 1000}; AS2P eps in {1e-2, 3e-2, 0.1} x eta_b in {1, 5}.
    default_hparams: ClassVar[dict] = {"lr": 0.02, "eps": 1e-2, "stp_lr": 0.02, "s2p_lr": 30.0, "eta_b": 1.0}
    lr_grid = (0.05, 0.03, 0.02, 0.01, 0.005)
    stp_grid = (0.01, 0.02, 0.05, 0.1)
    orth_lr_grid = (0.1, 0.05, 0.03, 0.02, 0.01)  # trained from its random start: large steps
    eps_grid = (1e-2, 1e-3)

    def __init__(self, hidden: int = 32, batch_size: int = 64):
        data = load_sklearn_digits()
        self.X = torch.tensor(data.data, dtype=torch.float32) / 16.0
        self.y = torch.tensor(data.target, dtype=torch.long)
        self.hidden, self.batch_size = hidden, batch_size
        self.name = "digits-mlp"

    def make_model(self, seed: int = 0) -> torch.nn.Module:
        g = torch.Generator().manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, self.hidden), torch.nn.Tanh(), torch.nn.Linear(self.hidden, 10))
        with torch.no_grad():
            for p in model.parameters():
                bound = 1.0 / (p.shape[-1] ** 0.5) if p.dim() > 1 else 0.0
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
        return model

    def sample_batch(self, generator: torch.Generator):
        return minibatch(len(self.y), self.batch_size, generator)

    def loss(self, model, batch=None) -> torch.Tensor:
        return self.losses(model, batch).mean()

    def losses(self, model, batch=None) -> torch.Tensor:
        X, y = (self.X, self.y) if batch is None else (self.X[batch], self.y[batch])
        return torch.nn.functional.cross_entropy(model(X), y, reduction="none")
