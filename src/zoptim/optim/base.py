"""What every zeroth-order optimizer shares: closure queries, counters, non-finite handling, state.

Subclasses implement :meth:`ZerothOrderOptimizer._step`, a short sequence of
``self.query(closure, key, scales)`` calls (a function query at ``x + scales * s(key)``) followed
by one ``self.engine.update(...)``. Everything else, the checks on the closure's value, the
exact restore on a non-finite loss or an exception, the query counter and the state that makes a
resumed run bit-identical, lives here.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from ..noise import check_distribution, mix
from ..perturbation import SeededPerturbation

Closure = Callable[[], Any]


class NonFiniteLossWarning(RuntimeWarning):
    """A step saw a NaN or infinite loss; its update was skipped and the parameters restored."""


class _NonFinite(Exception):
    pass


def check_positive(name: str, value, *, allow_none: bool = False, allow_zero: bool = False):
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}")
    return float(value)


def check_int(name: str, value, *, minimum: int = 1, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def loss_value(loss) -> float:
    """The closure's return value as a Python float, or a TypeError saying what it was."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise TypeError(
                f"closure must return a scalar loss; got a tensor of shape {tuple(loss.shape)}"
            )
        return float(loss.detach().reshape(()).item())
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return float(loss)
    if loss is None:
        raise TypeError(
            "closure returned None; it must return the loss (a float or a one-element tensor) "
            "and must not call backward()"
        )
    raise TypeError(
        f"closure must return a float or a one-element tensor; got {type(loss).__name__}: {loss!r}"
    )


class ZerothOrderOptimizer(Optimizer):
    """Base class of zoptim's optimizers (a ``torch.optim.Optimizer`` that never reads ``.grad``).

    Args common to all subclasses:
        seed: the seed of the direction stream; direction i of step k is named by
            ``mix(seed, k, i)``. Same seed, same run.
        distribution: ``"normal"``, ``"rademacher"`` or ``"uniform"``.
        normalize: scale each direction to norm sqrt(d).
        exact_restore: keep the journal that makes every restore bit-exact (see
            :mod:`zoptim.perturbation`); ``False`` trades it for MeZO's arithmetic round trip.
        max_nonfinite: after this many consecutive steps with a NaN/inf loss, raise RuntimeError.

    Attributes:
        num_queries: closure evaluations so far (the x-axis of every plot in the S2P paper).
        last_stats: a dict describing the last step (loss, gamma, step size, rho, lr, ...).
    """

    queries_per_step = 2

    def __init__(
        self,
        params: Iterable,
        defaults: dict,
        *,
        seed: int = 0,
        distribution: str = "normal",
        normalize: bool = False,
        exact_restore: bool = True,
        max_nonfinite: int = 10,
    ):
        check_distribution(distribution)
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer; got {seed!r}")
        self.max_nonfinite = check_int("max_nonfinite", max_nonfinite)
        self.seed = int(seed)
        super().__init__(params, defaults)
        self._distribution = distribution
        self._normalize = bool(normalize)
        self._exact = bool(exact_restore)
        self.num_queries = 0
        self.steps = 0
        self.nonfinite_steps = 0
        self._nonfinite_run = 0
        self.last_stats: dict[str, float] = {}
        self._build_engine()

    # -- parameters -----------------------------------------------------------------------------
    def _build_engine(self) -> None:
        trainable, group_of = [], []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if not p.is_floating_point():
                    raise ValueError(f"parameters must be floating point; got one of dtype {p.dtype}")
                if not p.requires_grad:
                    continue
                if not p.is_contiguous():
                    raise ValueError("parameters must be contiguous tensors (call .contiguous() on the module's weights)")
                trainable.append(p)
                group_of.append(gi)
        if not trainable:
            raise ValueError("no trainable parameters: every parameter given has requires_grad=False")
        self._group_of = group_of
        self.engine = SeededPerturbation(
            trainable, distribution=self._distribution, normalize=self._normalize, exact=self._exact
        )

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "engine"):
            self._build_engine()

    @property
    def dim(self) -> int:
        """d, the number of trainable scalars."""
        return self.engine.dim

    def per_param(self, name: str) -> list[float]:
        """A group hyper-parameter spread to one value per trainable tensor."""
        return [self.param_groups[g][name] for g in self._group_of]

    def direction_key(self, index: int = 0) -> int:
        return mix(self.seed, self.steps, index)

    # -- queries ----------------------------------------------------------------------------------
    def query(self, closure: Closure, key: int | None = None, scales=0.0) -> float:
        """f(x + scales * s(key)): move there, evaluate the closure without autograd, count it."""
        if key is None:
            self.engine.restore()
        else:
            self.engine.move(key, scales)
        with torch.no_grad():
            value = loss_value(closure())
        self.num_queries += 1
        if not math.isfinite(value):
            raise _NonFinite(value)
        return value

    # -- the step -----------------------------------------------------------------------------------
    def _step(self, closure: Closure) -> float:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        """One step. ``closure()`` must return the loss and must not call ``backward()``."""
        if closure is None or not callable(closure):
            raise TypeError("zeroth-order optimizers need step(closure): a callable returning the loss")
        try:
            loss = self._step(closure)
        except _NonFinite as bad:
            self.engine.restore()
            self._on_nonfinite(float(bad.args[0]))
            return float(bad.args[0])
        except BaseException:
            self.engine.restore()
            raise
        finally:
            self.steps += 1
        self._nonfinite_run = 0
        return loss

    def _on_nonfinite(self, value: float) -> None:
        self.nonfinite_steps += 1
        self._nonfinite_run += 1
        self.last_stats = {"loss": value, "skipped": 1.0}
        if self._nonfinite_run >= self.max_nonfinite:
            raise RuntimeError(
                f"the loss was non-finite ({value}) in {self._nonfinite_run} consecutive steps "
                f"(max_nonfinite={self.max_nonfinite}); parameters were restored to their last finite "
                "point each time. Lower the learning rate or eps, or check the data and the closure."
            )
        warnings.warn(
            f"non-finite loss ({value}) at step {self.steps}: update skipped, parameters restored exactly",
            NonFiniteLossWarning,
            stacklevel=3,
        )

    # -- state ------------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {
            "seed": self.seed,
            "steps": self.steps,
            "num_queries": self.num_queries,
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_run": self._nonfinite_run,
        }

    def _load_extra_state(self, extra: dict) -> None:
        self.seed = int(extra["seed"])
        self.steps = int(extra["steps"])
        self.num_queries = int(extra["num_queries"])
        self.nonfinite_steps = int(extra["nonfinite_steps"])
        self._nonfinite_run = int(extra["nonfinite_run"])

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["zoptim"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("zoptim", None)
        if extra is None:
            raise ValueError("state_dict has no 'zoptim' entry: it was not saved by a zoptim optimizer")
        super().load_state_dict(state_dict)
        self._load_extra_state(extra)
