"""What a benchmark problem is: a model to optimise, minibatches, a minibatch loss, a full loss.

A zeroth-order step queries the loss two (or three, four) times and every query of one step must
see the same minibatch, so problems hand out batches and losses separately: the caller draws a
batch per step and closes over it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch


class Problem:
    """Base class. Subclasses set ``name`` and implement the four methods below."""

    name: str = "problem"
    #: True when :meth:`sample_batch` always returns the whole data set (deterministic loss).
    full_batch: bool = False
    #: Hyper-parameters the benchmark uses when no search is run: ``lr`` (GA's alpha_0), ``eps``
    #: (rho_0, shared by GA and AS2P), ``stp_lr`` (STP's alpha_0), ``s2p_lr`` (S2P's alpha_0 of the
    #: stationary rule), ``eta_b`` (AS2P). Subclasses override; chosen by the grid search on the
    #: problem (see docs/benchmarks.md).
    default_hparams: ClassVar[dict] = {"lr": 1e-3, "eps": 1e-3, "stp_lr": 1e-2, "s2p_lr": 1.0, "eta_b": 5.0}
    #: Search grids (S2P paper, Appendix D.1): alpha_0 and rho_0 for every method. Problems whose
    #: scale differs from the paper's ResNets shift the alpha_0 grid by a constant factor.
    lr_grid: tuple = (2e-4, 1e-4, 8e-5, 5e-5, 2e-5, 1e-5)
    eps_grid: tuple = (1e-3, 5e-4, 1e-4, 5e-5, 1e-5)
    #: STP's alpha_0 grid; None: 10 x ``lr_grid`` (Table 3 picks STP's alpha_0 10x GA's).
    stp_grid: tuple | None = None
    #: The grid of the methods whose lr is the root-mean-square of each tensor's step (the
    #: orthogonalised update, :mod:`zoptim.engine.polar`): as many values as GA's alpha_0 grid, on that scale.
    #: The spread-normalised step (FZOO's) searches 10 x this grid: its step's RMS is about lr / sqrt(B).
    orth_lr_grid: tuple = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4)

    def make_model(self, seed: int = 0) -> torch.nn.Module:
        """A fresh model (or parameter holder) at the problem's starting point."""
        raise NotImplementedError

    def sample_batch(self, generator: torch.Generator) -> Any:
        """One minibatch, drawn with ``generator`` (never the global RNG)."""
        return None

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The training loss of ``model`` on ``batch`` (a 0-dim tensor)."""
        raise NotImplementedError

    @torch.no_grad()
    def full_loss(self, model: torch.nn.Module) -> float:
        """The training loss on all the data (what curves and cost ratios are computed from)."""
        return float(self.loss(model, None))

    def test_accuracy(self, model: torch.nn.Module) -> float | None:
        """Accuracy on a held-out test split, recorded at the end of a benchmark run; None (the
        default) for problems that have none."""
        return None

    def losses(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """One loss per example of ``batch`` (a 1-D tensor whose mean is :meth:`loss`), for
        per-example directions; problems whose loss is not a mean over examples do not have it."""
        raise NotImplementedError(f"problem {self.name} has no per-example losses")

    def closure(self, model: torch.nn.Module, batch: Any, per_example: bool = False):
        """The zoptim closure for one step: the loss of ``model`` on the fixed ``batch`` (the vector of
        per-example losses with ``per_example``)."""
        if per_example:
            return lambda: self.losses(model, batch)
        return lambda: self.loss(model, batch)


class VectorModel(torch.nn.Module):
    """A bare parameter vector x in R^d, for the analytic problems."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x = torch.nn.Parameter(x0.clone())
