"""Black-box interfaces over the optimizers: :class:`AskTell` (here) and a scipy-style
:func:`zoptim.minimizer.minimize` (an ask/tell loop over this class).

Neither re-implements a method. Every optimizer writes its step once, as a generator of queries
(:meth:`zoptim.optim.base.ZerothOrderOptimizer._queries`); ``step(closure)`` drives that generator
with the closure, :class:`AskTell` drives it with :meth:`AskTell.tell`, and :func:`minimize` is an
ask/tell loop over a function of a NumPy vector. So all three produce the same iterates, bit for
bit, for the same seed and hyper-parameters (tested), and there is no helper thread.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Sequence

import numpy as np
import torch

from .optim import registry
from .optim.base import ZerothOrderOptimizer
from .optim.step import StepRun, loss_value


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


#: Constructor arguments about a model's forward, which a function of a NumPy vector has not.
MODEL_OPTIONS = ("module", "rank", "per_example", "orthogonalize")


def _check_vector_options(method, hp: dict, extra_names=()) -> str:
    """The method's name once every key of ``hp`` is one of its hyper-parameters for a function of a
    vector (or one of ``extra_names``); a ValueError naming the key otherwise. The message lists
    what can be given here, not a model's options (``module``, ``rank``, ``per_example``)."""
    spec = registry.get(method)
    known = [n for n in spec.hyperparameters() if n not in MODEL_OPTIONS]
    for key, value in hp.items():
        if key in MODEL_OPTIONS and value not in (None, False):
            raise ValueError(
                f"{key}= is an option of a model's optimizer (directions applied in the forward of a torch "
                f"module); a function of a NumPy vector has no forward. Hyper-parameters of {spec.name!r} "
                f"here: {', '.join(known)}"
            )
        if key not in known and key not in MODEL_OPTIONS and key not in extra_names:
            raise ValueError(
                f"unknown option {key!r} for method {spec.name!r}; its hyper-parameters are {', '.join(known)}"
                + (f", and the run's options are {', '.join(extra_names)}" if extra_names else "")
            )
    return registry.check(spec.name, {k: v for k, v in hp.items() if k not in extra_names}).name


#: How a function of a NumPy vector is optimised: ``"vector"`` (default), the vector engine
#: (:mod:`zoptim.engine.vector`: one flat array, one vectorised draw per direction), or ``"torch"``, the
#: in-place engine every model uses. Both give the same iterates, bit for bit
#: (``tests/test_vector.py``); "torch" is there to compare them.
ROUTE = "vector"


def _build(method: str, x: torch.Tensor, hyperparameters: dict) -> ZerothOrderOptimizer:
    """The optimizer over the single tensor ``x``. A function of a vector is deterministic, so AS2P
    defaults to ``batch_mode="full"`` (the paper's full-batch mode: constant rho, lr_k = rho)."""
    hp = dict(hyperparameters)
    if registry.get(method).name == "as2p":
        hp.setdefault("batch_mode", "full")
    opt = registry.build(method, [x], **hp)
    if ROUTE == "vector":
        from .engine.vector import attach

        attach(opt)
    elif ROUTE != "torch":
        raise ValueError(f"zoptim.blackbox.ROUTE must be 'vector' or 'torch'; got {ROUTE!r}")
    return opt


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

    With a NumPy vector the defaults are :func:`minimize`'s for the same method, with
    ``total_steps`` (when given) as the budget: AS2P gets ``eps = 0.1 * max(1, rms(x0))`` and,
    given ``total_steps``, the cosine schedules over it (``batch_mode="minibatch"``); without
    ``total_steps`` there is no length for a schedule, so AS2P runs the paper's full-batch mode
    (constant rho = lr = eps). S2P's stationary rules need ``total_steps`` (alpha_0 defaults to 1,
    as in minimize).
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
            self.method = _check_vector_options(optimizer, hyperparameters)
            self.hyperparameters = dict(hyperparameters)
            self._vector = torch.nn.Parameter(torch.from_numpy(x))
            # minimize's defaults for the method, over total_steps when given (minimize's budget)
            hp = _defaults_for_budget(self.method, self.hyperparameters, self.hyperparameters.get("total_steps"), x)
            self.optimizer = _build(self.method, self._vector, hp)
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


#: minimize's AS2P default eps, relative to the scale of x0 (``max(1, rms(x0))``): measured with
#: ``benchmarks/minimize_defaults.py`` (eps 0.03, 0.1, 0.3, 1 with the cosine schedules, and 0.01-0.3
#: in full-batch mode, on six problems); 0.1 was the one that made progress on all of them.
MINIMIZE_EPS = 0.1


def _defaults_for_budget(name: str, hp: dict, steps: int | None, x0: np.ndarray | None = None) -> dict:
    """The hyper-parameters minimize gives a method that the caller left out. minimize knows its
    budget, so AS2P gets the cosine schedules over it (``batch_mode="minibatch"``: rho from eps to
    eps / 10, lr_k from eps to 0) and eps = MINIMIZE_EPS * max(1, rms(x0)), a step scaled to the
    problem; the paper's full-batch mode (constant rho = lr) crept on Rosenbrock-10 and the noisy
    sphere with any single eps (docs/results/minimize_defaults.txt)."""
    hp = dict(hp)
    if name == "as2p":
        # steps None: AskTell without total_steps, no length for a schedule (the paper's full-batch mode)
        hp.setdefault("batch_mode", "full" if steps is None and hp.get("total_steps") is None else "minibatch")
        if steps is not None:
            hp.setdefault("total_steps", steps)
        if "eps" not in hp:
            scale = 1.0 if x0 is None else max(1.0, float(np.sqrt(np.mean(np.square(x0)))))
            hp["eps"] = MINIMIZE_EPS * scale
    if name == "s2p" and not str(hp.get("step_rule", "stationary")).endswith("dynamic") and steps is not None:
        hp.setdefault("total_steps", steps)
    if name == "s2p" and hp.get("step_rule", "stationary") == "stationary":
        hp.setdefault("lr", 1.0)  # alpha_0: alpha_k = 1 / sqrt(K d), the bench problems' default (s2p_lr)
    return hp
