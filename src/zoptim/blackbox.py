"""Black-box interfaces over the optimizers: :class:`AskTell` and a scipy-style :func:`minimize`.

Neither re-implements a method. Every optimizer writes its step once, as a generator of queries
(:meth:`zoptim.optim.base.ZerothOrderOptimizer._queries`); ``step(closure)`` drives that generator
with the closure, :class:`AskTell` drives it with :meth:`AskTell.tell`, and :func:`minimize` is an
ask/tell loop over a function of a NumPy vector. So all three produce the same iterates, bit for
bit, for the same seed and hyper-parameters (tested), and there is no helper thread.
"""

from __future__ import annotations

import inspect
import math
import numbers
import time
import warnings
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .optim import registry
from .optim.base import ZerothOrderOptimizer
from .optim.step import DivergedError, StepRun, loss_value
from .runloop import progress_bar


class _DictResult(dict):
    """Stand-in for scipy.optimize.OptimizeResult: a dict whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    __setattr__ = dict.__setitem__
    __delattr__ = dict.__delitem__

    def __dir__(self):
        return list(self.keys())


def OptimizeResult(*args, **kwargs):  # noqa: N802 - named as the type it builds
    """scipy's own ``OptimizeResult`` when scipy is installed (imported on first use: importing
    scipy.optimize costs ~45 MB and ~0.7 s, which a training process should not pay), else a
    compatible dict with attribute access."""
    try:
        from scipy.optimize import OptimizeResult as result_type
    except ImportError:  # pragma: no cover - scipy comes with the bench extra
        result_type = _DictResult
    return result_type(*args, **kwargs)


#: Options of :func:`minimize` that control the run (every other option is a method hyper-parameter).
RUN_OPTIONS = ("maxfev", "maxiter", "ftarget", "timeout", "patience", "divergence", "progress", "disp")

#: Steps in a row whose every value is far above the first one that make minimize stop (status 5).
DIVERGED_STEPS = 10

_STATE_FORMAT = "zoptim.AskTell/1"


# -- argument checks -----------------------------------------------------------------------------
def _as_vector(x0, name: str = "x0") -> np.ndarray:
    """x0 as a fresh 1-D float64 array, or a TypeError/ValueError naming what is wrong with it."""
    if isinstance(x0, torch.Tensor):
        x0 = x0.detach().cpu().numpy()
    try:
        arr = np.asarray(x0)
    except (TypeError, ValueError) as err:  # ragged nested sequences
        raise ValueError(f"{name} must be a 1-D array of real numbers; got {x0!r} ({err})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} must be an array of real numbers; got dtype {arr.dtype} ({x0!r:.80})")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{name} must be real; got a complex array")
    arr = np.atleast_1d(arr).astype(np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (a vector); got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty: there is nothing to optimise")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name} must be finite; {name}[{bad[0]}] = {arr[bad[0]]} ({bad.size} non-finite entries)")
    return arr.copy()


def _scalar(value, who: str) -> float:
    """A fun/tell value as a float: a real number, or an array/tensor with one element."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        if value.size != 1:
            raise TypeError(f"{who} must be a scalar (a float, or an array of one element); got an array of shape {value.shape}")
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise TypeError(f"{who} must be a real number; got an array of dtype {value.dtype}")
        value = value.reshape(()).item()
    elif isinstance(value, np.generic) and not isinstance(value, (np.floating, np.integer)):
        raise TypeError(f"{who} must be a real number; got {type(value).__name__}: {value!r}")
    try:
        return loss_value(value)
    except TypeError as err:
        raise TypeError(f"{who} must be a real scalar (float, or an array or tensor of one element); {err}") from None


def _check_bounds(bounds, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(lb, ub) arrays of length n from a scipy ``Bounds`` or a sequence of (low, high) pairs."""
    if bounds is None:
        return None
    if hasattr(bounds, "lb") and hasattr(bounds, "ub"):  # scipy.optimize.Bounds
        lo, hi = bounds.lb, bounds.ub
    else:
        if not isinstance(bounds, Sequence) and not isinstance(bounds, np.ndarray):
            raise TypeError(f"bounds must be a scipy.optimize.Bounds or a sequence of (low, high) pairs; got {bounds!r}")
        if len(bounds) != n:
            raise ValueError(f"bounds must have one (low, high) pair per variable: x0 has {n}, bounds has {len(bounds)}")
        lo, hi = [], []
        for i, pair in enumerate(bounds):
            if pair is None or np.ndim(pair) != 1 or len(pair) != 2:
                raise ValueError(f"bounds[{i}] must be a (low, high) pair (None for no bound); got {pair!r}")
            lo.append(-np.inf if pair[0] is None else pair[0])
            hi.append(np.inf if pair[1] is None else pair[1])
    try:
        lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), (n,)).copy()
        hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), (n,)).copy()
    except (TypeError, ValueError) as err:
        raise ValueError(f"bounds must be real numbers (or None), one pair per variable of x0 ({n}): {err}") from None
    for name, arr in (("lower", lo), ("upper", hi)):
        if np.isnan(arr).any():
            raise ValueError(f"bounds: {name} bound {int(np.flatnonzero(np.isnan(arr))[0])} is NaN")
    wrong = np.flatnonzero(lo > hi)
    if wrong.size:
        i = int(wrong[0])
        raise ValueError(f"bounds: lower bound > upper bound for variable {i} ({lo[i]} > {hi[i]})")
    return lo, hi


def _positive(name, value, integer=False):
    if value is None:
        return None
    kind = numbers.Integral if integer else numbers.Real
    if not isinstance(value, kind) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"options[{name!r}] must be a {'positive integer' if integer else 'finite number > 0'}; got {value!r}")
    return int(value) if integer else float(value)


def _build(method: str, x: torch.Tensor, hyperparameters: dict) -> ZerothOrderOptimizer:
    """The optimizer over the single tensor ``x``. A function of a vector is deterministic, so AS2P
    defaults to ``batch_mode="full"`` (the paper's full-batch mode: constant rho, lr_k = rho)."""
    hp = dict(hyperparameters)
    if registry.get(method).name == "as2p":
        hp.setdefault("batch_mode", "full")
    return registry.build(method, [x], **hp)


# -- ask / tell ----------------------------------------------------------------------------------------
class _Slot:
    """The step an AskTell is driving; held apart from the AskTell so that its finalizer (which
    abandons that step) does not keep the AskTell alive."""

    run: StepRun | None = None


def _abandon(slot: _Slot) -> None:
    if slot.run is not None:
        slot.run.abandon()
        slot.run = None


class AskTell:
    """Drive a zoptim optimizer point by point: ``ask()`` a point, evaluate it anywhere, ``tell()`` its loss.

    Two forms::

        at = zoptim.AskTell(optimizer)                 # over the optimizer's tensors (a model)
        at = zoptim.AskTell("as2p", x0, eps=1e-2)      # over a NumPy vector (method, x0, hyper-parameters)

    ``ask()`` moves to the next point the method wants evaluated and returns it: the optimizer's
    trainable tensors, perturbed in place (evaluate your model as it is), or a NumPy copy of the
    vector. ``tell(loss)`` reports its value; after a step's last ``tell`` the update is applied.
    ``recommend()`` returns the current iterate (never a perturbed point). ``ask(n)`` (vector
    form) hands out up to n points at once, the step's queries that do not depend on values not
    yet told; ``tell(values)`` or ``tell(value, index=j)`` takes their values in any order. The steps are the
    methods' own: ``AskTell(method, x0, seed=s, **hp)`` and ``method([x], seed=s, **hp).step(f)``
    visit the same points and reach the same iterates, bit for bit.

    Leaving a loop early is safe: ``close()``, the end of a ``with`` block, or the AskTell being
    garbage-collected (dropped, or its frame unwound by an exception) abandons the unfinished step
    and puts the parameters back bit for bit at the last iterate (with the default
    ``exact_restore=True``). There is no thread. An abandoned step counts like a step whose closure
    raised: its evaluations stay in ``num_queries`` and the next step draws a new direction.

    ``state_dict()`` / ``load_state_dict()`` (or :meth:`from_state_dict` for the vector form)
    carry a run across a process restart, even mid-step: the state holds the optimizer's state at
    the last step boundary, the values told since (replayed on load) and the current iterate. An
    ``ask()`` not yet told is not saved; after loading, ``ask()`` returns the same point again.

    With a NumPy vector, AS2P defaults to ``batch_mode="full"`` (a function of a vector is
    deterministic); pass ``total_steps`` to get its schedules. S2P's stationary rules need
    ``total_steps``.
    """

    def __init__(self, optimizer, x0=None, /, *, bounds=None, **hyperparameters):
        self._box = None
        if isinstance(optimizer, ZerothOrderOptimizer):
            if x0 is not None or hyperparameters:
                raise TypeError("AskTell(optimizer) takes no x0 or hyper-parameters: they belong to the optimizer")
            if bounds is not None:
                raise TypeError("bounds apply to the vector form, AskTell(method, x0, bounds=...)")
            self.method = type(optimizer).__name__.lower()
            self.hyperparameters: dict = {}
            self._vector: torch.Tensor | None = None
            self.optimizer = optimizer
        elif isinstance(optimizer, str):
            if x0 is None:
                raise TypeError(f"AskTell({optimizer!r}, x0, **hyperparameters) needs x0, the starting point")
            x = _as_vector(x0)
            self._box = _check_bounds(bounds, x.size)
            if self._box is not None and ((x < self._box[0]) | (x > self._box[1])).any():
                warnings.warn("x0 is not within the bounds; it was clipped to the box", UserWarning, stacklevel=2)
                x = np.clip(x, *self._box)
            self.method = registry.get(optimizer).name
            self.hyperparameters = dict(hyperparameters)
            self._vector = torch.nn.Parameter(torch.from_numpy(x))
            self.optimizer = _build(self.method, self._vector, self.hyperparameters)
        else:
            raise TypeError(
                "AskTell takes a zoptim optimizer, or a method name and x0 "
                f"({', '.join(map(repr, registry.names()))}); got {type(optimizer).__name__}"
            )
        self._slot = _Slot()
        self._asked: list[int] = []  # step indices of the points asked and not yet told
        self._rows: list[int] = []  # those of the last ask(), in its order
        self._batch = False  # the last ask was ask(n)
        self._finalizer = weakref.finalize(self, _abandon, self._slot)

    # -- the loop ---------------------------------------------------------------------------------------
    def _active(self) -> StepRun | None:
        """Our step in progress, or None (finished, abandoned, or replaced by another driver)."""
        run = self._slot.run
        if run is None or run.done or self.optimizer._run is not run:
            return None
        return run

    def _point(self):
        if self._vector is None:
            return self.optimizer.engine.params
        return self._vector.detach().numpy().copy()

    def ask(self, n: int | None = None):
        """Move to the next point to evaluate and return it (the perturbed tensors, or a NumPy copy).

        ``ask(n)`` (vector form) returns up to ``n`` points at once, as the rows of a 2-D array:
        the step's next queries that do not depend on values not yet told (both points of each
        of k directions, STP's and HiZOO's three points). Fewer than ``n`` when the method needs
        those values first; evaluate them in parallel and ``tell`` their values in any order.
        """
        if n is not None:
            if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
                raise ValueError(f"ask(n): n must be a positive integer; got {n!r}")
            if self._vector is None:
                raise TypeError("ask(n) needs the vector form, AskTell(method, x0): the optimizer form's point "
                                "is the model itself, perturbed in place, so it holds one point at a time")
        if self._asked and self._active() is not None:
            raise RuntimeError("ask() called again before tell(): report the values of the points already asked first")
        self._asked = []
        run = self._active()
        if run is None:
            run = self._slot.run = self.optimizer.begin_step()
        rows, points = run.untold[: 1 if n is None else int(n)], []
        for i in rows:
            run.move(i)
            point = self._point()
            if self._box is not None:  # bounds by projection: the loss is asked at the clipped point
                np.clip(point, *self._box, out=point)
            points.append(point)
        self._rows, self._asked, self._batch = rows, list(rows), n is not None
        return np.stack(points) if n is not None else points[0]

    def tell(self, value, index: int | None = None) -> None:
        """Report the loss of the point from the last ``ask()`` (a real scalar).

        After ``ask(n)``: ``tell(values)`` with one value per row, in the rows' order, or
        ``tell(value, index=j)`` for row j alone, in any order; the step goes on once every row
        is told.

        A value that is not a real scalar raises TypeError and changes nothing (tell again). A NaN
        or infinite value skips the step's update and restores the parameters exactly, with a
        :class:`zoptim.NonFiniteLossWarning` (rows of that step not yet told are dropped: ask
        again); ``max_nonfinite`` such steps in a row raise :class:`zoptim.DivergedError`.
        """
        if not self._asked:
            raise RuntimeError("tell() without a pending ask(): call ask() first")
        run = self._active()
        if run is None:
            self._asked = []
            raise RuntimeError("the step of the last ask() was abandoned (the optimizer started another step); ask() again")
        if not self._batch:
            if index is not None:
                raise TypeError("tell(value, index=...) applies to the rows of ask(n); after ask(), tell(value)")
            # a per-example optimizer takes the vector of its examples' losses (checked by the step)
            pairs = [(self._asked[0], value if getattr(self.optimizer, "per_example", False)
                      else _scalar(value, "tell(value)"))]
        elif index is None:
            if isinstance(value, (str, bytes)) or np.ndim(value) != 1:
                raise TypeError(f"after ask(n), tell(values) takes one value per row ({len(self._rows)}), or "
                                f"tell(value, index=j) one row; got {type(value).__name__}")
            values = [_scalar(v, f"tell(values)[{j}]") for j, v in enumerate(value)]
            if len(values) != len(self._rows) or len(self._asked) != len(self._rows):
                raise ValueError(f"tell(values) needs the values of the {len(self._asked)} rows of ask(n) not yet told; "
                                 f"got {len(values)}" + (" (tell the rest with index=)" if len(self._asked) != len(self._rows) else ""))
            pairs = list(zip(self._rows, values))
        else:
            if not isinstance(index, numbers.Integral) or isinstance(index, bool) or not 0 <= index < len(self._rows):
                raise ValueError(f"index must be a row of the last ask(n), 0 to {len(self._rows) - 1}; got {index!r}")
            if self._rows[index] not in self._asked:
                raise ValueError(f"row {index} of the last ask(n) was already told")
            pairs = [(self._rows[index], _scalar(value, "tell(value)"))]
        for i, v in pairs:
            self._asked.remove(i)
            run.tell(v, i)
            if self._active() is None:  # the step ended (its update, or a non-finite value)
                self._asked = []
                break
        if self._box is not None and self._active() is None:  # a step ended: its iterate is clipped to the box
            with torch.no_grad():
                lo, hi = (torch.from_numpy(b) for b in self._box)
                torch.clamp(self._vector, lo, hi, out=self._vector.data)

    @property
    def in_step(self) -> bool:
        """True between a step's first ask() and its last tell() (the update not yet applied)."""
        return self._active() is not None

    @property
    def num_queries(self) -> int:
        return self.optimizer.num_queries

    @property
    def steps(self) -> int:
        return self.optimizer.steps

    @torch.no_grad()
    def recommend(self):
        """The current iterate: copies of the trainable tensors, or a NumPy vector. Mid-step this is
        the point the step started from (the parameters are put back where they were after copying)."""
        engine = self.optimizer.engine
        run = self._active()
        if engine.is_perturbed:
            engine.restore()
            point = self._copy()
            if run is not None and self._asked and not self._batch:
                run.move(self._asked[0])  # back to the asked point (bit-exact with exact_restore)
            return point
        return self._copy()

    def _copy(self):
        if self._vector is None:
            return [p.detach().clone() for p in self.optimizer.engine.params]
        return self._vector.detach().numpy().copy()

    def close(self) -> None:
        """Abandon an unfinished step: the parameters go back bit for bit to the last iterate."""
        _abandon(self._slot)
        self._asked = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue elsewhere: optimizer state, the current iterate and the
        values told in the unfinished step. Tensors and plain Python values only, so
        ``torch.save``/``torch.load(weights_only=True)`` round-trip it."""
        run = self._active()
        point = self.recommend()
        sd = {
            "format": _STATE_FORMAT,
            "method": self.method,
            "optimizer": self.optimizer.state_dict(),
            "told": list(run.values) if run is not None else [],
            "told_at": [i for i, _ in run.told] if run is not None else [],
        }
        if self._vector is None:
            sd["params"] = point
        else:
            sd["x"] = torch.from_numpy(point)
            sd["hyperparameters"] = dict(self.hyperparameters)
            sd["bounds"] = None if self._box is None else [torch.from_numpy(b.copy()) for b in self._box]
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Continue the run saved by :meth:`state_dict` (in this or another process)."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != _STATE_FORMAT:
            raise ValueError("state_dict was not saved by AskTell.state_dict()")
        if state_dict["method"] != self.method:
            raise ValueError(f"state_dict is of method {state_dict['method']!r}; this AskTell runs {self.method!r}")
        if ("x" in state_dict) != (self._vector is not None):
            raise ValueError("state_dict is of the other AskTell form (NumPy vector vs. optimizer tensors)")
        self.close()
        engine = self.optimizer.engine
        engine.restore()
        saved = [state_dict["x"]] if self._vector is not None else state_dict["params"]
        if len(saved) != len(engine.params) or any(s.shape != p.shape for s, p in zip(saved, engine.params)):
            raise ValueError(
                "state_dict's parameters have shapes "
                f"{[tuple(s.shape) for s in saved]}; this AskTell's are {[tuple(p.shape) for p in engine.params]}"
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        for s, p in zip(saved, engine.params):
            p.detach().copy_(s)
        told = [v if isinstance(v, list) else float(v) for v in state_dict["told"]]
        at = state_dict.get("told_at") or [None] * len(told)  # None: told in order (a state without told_at)
        self.optimizer.num_queries -= len(told)  # counted again by the replay
        if told:
            run = self._slot.run = self.optimizer.begin_step()
            for i, v in zip(at, told):  # the same moves as the interrupted run, without evaluating anything
                run.move(i)
                run.tell(v, i)

    @classmethod
    def from_state_dict(cls, state_dict: dict) -> AskTell:
        """Rebuild a NumPy-vector AskTell from its :meth:`state_dict` (e.g. after a restart)."""
        if not isinstance(state_dict, dict) or "x" not in state_dict:
            raise ValueError("from_state_dict needs the state_dict of a NumPy-vector AskTell (AskTell(method, x0, ...))")
        box = state_dict.get("bounds")
        bounds = None if box is None else list(zip(box[0].numpy(), box[1].numpy()))
        at = cls(state_dict["method"], state_dict["x"].numpy(), bounds=bounds, **state_dict["hyperparameters"])
        at.load_state_dict(state_dict)
        return at


# -- minimize ------------------------------------------------------------------------------------------
_MESSAGES = {
    1: "Maximum number of function evaluations has been exceeded.",
    2: "Maximum number of iterations has been exceeded.",
    3: "Time limit (options['timeout']) reached.",
    4: "The final point is not finite: x has NaN/inf entries or f(x) is NaN/inf (see x_best, fun_best).",
    5: "The run diverged: too many steps in a row were skipped (non-finite values or updates); x is the last "
       "finite iterate.",
    6: "The run diverged: every value of {steps} steps in a row exceeded f(x0) + {factor:g} * (|f(x0)| + 1) = "
       "{limit:.4g}; x is the last iterate (lower lr or eps; x_best is the best point seen).",
    99: "`callback` stopped the run.",
}


def _callback_wants_result(callback) -> bool:
    try:
        return "intermediate_result" in inspect.signature(callback).parameters
    except (TypeError, ValueError):
        return False


def minimize(
    fun: Callable[..., float],
    x0,
    args: tuple = (),
    method: str = "as2p",
    bounds=None,
    tol: float | None = None,
    callback: Callable | None = None,
    options: dict | None = None,
) -> dict:
    """Minimise ``fun(x, *args)`` from ``x0`` with a zeroth-order method, like ``scipy.optimize.minimize``.

    Args:
        fun: f(x, *args) -> float, x a 1-D float64 NumPy array (a fresh copy each call). A NaN or
            infinite value is skipped as in ``step()`` (no update, a ``NonFiniteLossWarning``;
            ``max_nonfinite`` = 10 in a row raise RuntimeError); a value that is not a real
            scalar raises TypeError.
        x0: the starting point, a non-empty 1-D array of finite real numbers.
        args: extra positional arguments for ``fun``.
        method: ``"as2p"`` (default), ``"zosgd"``, ``"stp"``, ``"s2p"`` or ``"hizoo"``; the
            memory-free momentum is an option of zosgd and as2p (``momentum=0.9``).
        bounds: box bounds, a ``scipy.optimize.Bounds`` or one ``(low, high)`` pair per variable
            (``None`` for no bound). Handled by projection: ``fun`` is evaluated at the query
            point clipped to the box, and each iterate is clipped after its update. An ``x0``
            outside the box is clipped, with a warning.
        tol: stop (success) when the best value has improved by less than
            ``tol * max(1, |best|)`` over the last ``options["patience"]`` steps (default 100).
        callback: called after every step, as ``callback(xk)`` or, if its parameter is named
            ``intermediate_result``, with an OptimizeResult (``x``, ``fun`` = the step's loss,
            ``nit``, ``nfev``, ``x_best``, ``fun_best``). Returning a true value (True, 1, numpy.bool_(True)) or raising
            ``StopIteration`` stops the run (status 99).
        options: run options ``maxfev`` (evaluations in all, default 10,000, the final
            evaluation at x included; a step is only started if it fits), ``maxiter`` (steps),
            ``ftarget`` (stop, success, as soon as a value <= ftarget is seen), ``timeout``
            (seconds), ``patience`` (steps, for ``tol``), ``divergence`` (default 1,000: stop,
            status 5, once every value of 10 steps in a row exceeds
            ``f(x0) + divergence * (|f(x0)| + 1)``; None: never), ``progress`` (or ``disp``: a tqdm
            progress bar on stderr), and the method's hyper-parameters (``seed``, ``eps``,
            ``lr``, ``eta_b``, ...; see the optimizer classes). ``total_steps`` defaults to the
            steps the budget allows (AS2P, S2P's stationary rules). AS2P, the default method,
            defaults to ``eps = 0.1 * max(1, rms(x0))`` and the cosine schedules over that budget
            (``batch_mode="minibatch"``: rho from eps to eps / 10, the step's lr from eps to 0);
            pass ``batch_mode="full"`` for the paper's full-batch mode (constant rho = lr).
            These defaults were chosen from measurements on six problems
            (``benchmarks/minimize_defaults.py``; README, "Functions of a vector").

    Returns:
        ``scipy.optimize.OptimizeResult`` (a compatible dict when scipy is missing) with ``x`` (the
        final iterate), ``fun`` (f(x), one evaluation), ``nfev``, ``nit``, ``success``,
        ``status`` (0 converged or ftarget reached, 1 maxfev, 2 maxiter, 3 timeout, 4 the final
        point or its value is not finite after a stop that would be a success, 5 diverged: ``max_nonfinite``
        skipped steps in a row, or values far above f(x0), see ``divergence``; 99 callback),
        ``message``, ``x_best``/``fun_best`` (the best point evaluated, perturbed query points
        included) and ``loss_history`` (every value of fun, in order). Note that, as in scipy,
        using up the budget is ``success=False``. With a noisy ``fun``, ``fun_best`` is the
        minimum of noisy samples, so it is biased low (a lucky draw); ``fun`` (one evaluation at
        the final iterate) is not, and ``x_best`` should be re-evaluated before it is trusted.

    Example:
        >>> res = zoptim.minimize(lambda x: float(((x - 1) ** 2).sum()), np.zeros(10),
        ...                       options={"maxfev": 2000, "eps": 0.05})
    """
    if not callable(fun):
        raise TypeError(f"fun must be callable; got {type(fun).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None; got {type(callback).__name__}")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict; got {type(options).__name__}")
    hp = dict(options or {})
    run_opts = {k: hp.pop(k) for k in RUN_OPTIONS if k in hp}
    name = registry.check(method, hp, extra_names=RUN_OPTIONS).name
    maxfev = _positive("maxfev", run_opts.get("maxfev", 10_000), integer=True)
    maxiter = _positive("maxiter", run_opts.get("maxiter"), integer=True)
    timeout = _positive("timeout", run_opts.get("timeout"))
    patience = _positive("patience", run_opts.get("patience", 100), integer=True)
    tol = None if tol is None else _positive("tol", tol)
    ftarget = run_opts.get("ftarget")
    if ftarget is not None and (not isinstance(ftarget, numbers.Real) or isinstance(ftarget, bool) or math.isnan(ftarget)):
        raise ValueError(f"options['ftarget'] must be a real number; got {ftarget!r}")
    progress = bool(run_opts.get("progress", run_opts.get("disp", False)))
    divergence = _positive("divergence", run_opts.get("divergence", 1e3))

    x = _as_vector(x0)
    probe = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))  # a step's queries, asked of the method itself
    qps = _build(name, probe, _defaults_for_budget(name, hp, 1, x)).queries_per_step
    if maxfev < qps + 1:
        raise ValueError(f"options['maxfev'] = {maxfev} is below one step of {name!r} ({qps} evaluations) plus the final one")
    steps = (maxfev - 1) // qps
    if maxiter is not None:
        steps = min(steps, maxiter)
    at = AskTell(name, x, bounds=bounds, **_defaults_for_budget(name, hp, steps, x))  # checks and applies the bounds
    x = at._vector.detach().numpy().copy()  # x0, clipped to the bounds

    def evaluate(point: np.ndarray) -> float:
        return _scalar(fun(point, *args), "fun(x)")

    history: list[float] = []
    best, x_best = math.inf, x.copy()
    best_at_step: list[float] = []
    far_steps, step_min = 0, math.inf
    status = None
    message = ""
    nit = 0
    wants_result = callback is not None and _callback_wants_result(callback)
    start = time.monotonic()
    bar = progress_bar(maxfev, f"zoptim {name}", progress, unit="eval")
    try:
        while status is None:
            if not at.in_step:
                if len(history) + qps + 1 > maxfev:
                    status = 1
                    break
                if maxiter is not None and nit >= maxiter:
                    status = 2
                    break
            if not at.in_step:
                step_min = math.inf
            point = at.ask()  # clipped to the bounds, if any
            value = evaluate(point)
            history.append(value)
            step_min = min(step_min, value)
            bar.update(1)
            if value < best:
                best, x_best = value, point
            try:
                at.tell(value)
            except DivergedError as err:  # max_nonfinite steps in a row were skipped: stop, with the last finite iterate
                status, message = 5, f"{_MESSAGES[5]} ({err})"
                break
            if ftarget is not None and value <= ftarget:
                status, message = 0, f"A value <= ftarget ({ftarget}) was reached (x_best)."
                break
            if timeout is not None and time.monotonic() - start > timeout:
                status = 3
                break
            if at.in_step:
                continue
            nit += 1
            best_at_step.append(best)
            if divergence is not None:  # the iterate runs away although every value stays finite
                limit = history[0] + divergence * (abs(history[0]) + 1.0)
                far_steps = far_steps + 1 if step_min > limit else 0
                if far_steps >= DIVERGED_STEPS:
                    status = 5
                    message = _MESSAGES[6].format(steps=DIVERGED_STEPS, factor=divergence, limit=limit)
                    break
            if progress:
                bar.set_postfix(best=f"{best:.4g}", refresh=False)
            if callback is not None:
                xk = at.recommend()
                try:
                    if wants_result:
                        stop = callback(intermediate_result=OptimizeResult(
                            x=xk, fun=at.optimizer.last_stats.get("loss"), nit=nit, nfev=len(history),
                            x_best=x_best.copy(), fun_best=best))
                    else:
                        stop = callback(xk)
                except StopIteration:
                    stop = True
                if stop:  # any truthy value stops, as in scipy (True, numpy.bool_(True), 1)
                    status = 99
                    break
            if tol is not None and nit > patience:
                before = best_at_step[-1 - patience]
                if before - best <= tol * max(1.0, abs(best)):
                    status, message = 0, f"The best value improved by less than tol over the last {patience} steps."
    finally:
        bar.close()
        at.close()  # a run stopped mid-step goes back to its last iterate

    x_final = at.recommend()
    if np.all(np.isfinite(x_final)):
        fun_final = evaluate(x_final.copy())
        history.append(fun_final)
    else:
        fun_final = math.nan  # not evaluated: fun is not asked at a point with NaN/inf entries
    if fun_final < best:
        best, x_best = fun_final, x_final.copy()
    if not math.isfinite(fun_final):  # never a success; a run that already failed keeps its status
        if status == 0:
            status, message = 4, _MESSAGES[4] + (f" (before: {message})" if message else "")
        else:
            message = (message or _MESSAGES[status]) + " " + _MESSAGES[4]
    return OptimizeResult(
        x=x_final,
        fun=fun_final,
        nfev=len(history),
        nit=nit,
        success=status == 0,
        status=status,
        message=message or _MESSAGES[status],
        x_best=np.asarray(x_best, dtype=np.float64).copy(),
        fun_best=best,
        loss_history=np.asarray(history, dtype=np.float64),
        method=name,
    )


#: minimize's AS2P default eps, relative to the scale of x0 (``max(1, rms(x0))``): measured with
#: ``benchmarks/minimize_defaults.py`` (eps 0.03, 0.1, 0.3, 1 with the cosine schedules, and 0.01-0.3
#: in full-batch mode, on six problems); 0.1 was the one that made progress on all of them.
MINIMIZE_EPS = 0.1


def _defaults_for_budget(name: str, hp: dict, steps: int, x0: np.ndarray | None = None) -> dict:
    """The hyper-parameters minimize gives a method that the caller left out. minimize knows its
    budget, so AS2P gets the cosine schedules over it (``batch_mode="minibatch"``: rho from eps to
    eps / 10, lr_k from eps to 0) and eps = MINIMIZE_EPS * max(1, rms(x0)), a step scaled to the
    problem; the paper's full-batch mode (constant rho = lr) crept on Rosenbrock-10 and the noisy
    sphere with any single eps (docs/results/minimize_defaults.txt)."""
    hp = dict(hp)
    if name == "as2p":
        hp.setdefault("batch_mode", "minibatch")
        hp.setdefault("total_steps", steps)
        if "eps" not in hp:
            scale = 1.0 if x0 is None else max(1.0, float(np.sqrt(np.mean(np.square(x0)))))
            hp["eps"] = MINIMIZE_EPS * scale
    if name == "s2p" and not str(hp.get("step_rule", "stationary")).endswith("dynamic"):
        hp.setdefault("total_steps", steps)
    if name == "s2p" and hp.get("step_rule", "stationary") == "stationary":
        hp.setdefault("lr", 1.0)  # alpha_0: alpha_k = 1 / sqrt(K d), the bench problems' default (s2p_lr)
    return hp
