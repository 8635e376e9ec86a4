"""The step driver: a method's step as a generator of query points, driven one query at a time.

A method implements :meth:`zoptim.optim.base.ZerothOrderOptimizer._queries`, one step written as
a generator: it yields :class:`Query` points (``x + scales * s(key)``), receives each point's loss
by ``send``, and ends with one ``self._update(...)``. That generator never calls the loss itself,
so two drivers share it through :class:`StepRun`: ``step(closure)`` answers each query with the
closure, :class:`zoptim.AskTell` with ``tell()``; both produce the same iterates, bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Generator
from typing import Any, NamedTuple

import torch

from . import stall

Closure = Callable[[], Any]


class NonFiniteLossWarning(RuntimeWarning):
    """A step saw a NaN or infinite loss; its update was skipped and the parameters restored."""


class DivergedError(RuntimeError):
    """``max_nonfinite`` consecutive steps were skipped (non-finite losses or updates): the run has
    diverged. The parameters are at the last finite iterate."""


class SkippedUpdate(Exception):
    """Raised inside a step whose update would write a non-finite value: the driver skips the
    update and restores the parameters, as for a non-finite loss (internal; never reaches users)."""

    def __init__(self, value: float, what: str):
        super().__init__(what)
        self.value, self.what = value, what


#: A process's status in a direction-parallel step's exchange (see DirectionExchange._exchange_once).
_OK, _NONFINITE, _RAISED = 0.0, 1.0, 2.0


class Query(NamedTuple):
    """A point to evaluate: ``x + scales * s(key)``; ``key=None`` is the unperturbed iterate x.

    ``scales`` is one number or one per trainable tensor (the per-group step sizes).
    """

    key: int | None
    scales: float | list[float] = 0.0


#: One step of a method: yields the points to evaluate, one Query (sent its loss) or a list of
#: independent ones (sent their losses as a list), and returns the step's loss.
StepGenerator = Generator[Any, Any, float]


def loss_value(loss) -> float:
    """The closure's return value as a Python float, or a TypeError saying what it was."""
    if type(loss) is float:
        return loss
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


def loss_vector(loss) -> list[float]:
    """A per-example closure's return value (``per_example=True``) as a list of floats."""
    if isinstance(loss, torch.Tensor) and loss.dim() == 1 and loss.numel() >= 1:
        return [float(v) for v in loss.detach().float().cpu().tolist()]
    if isinstance(loss, (list, tuple)) and loss and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in loss):
        return [float(v) for v in loss]
    shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
    raise TypeError(
        "per_example=True: the closure must return one loss per example, a 1-D tensor (e.g. "
        f"cross_entropy(..., reduction='none')); got {shape}"
    )


_NULL_CONTEXT = contextlib.nullcontext()


def _no_grad():
    """``torch.no_grad()``, or a shared no-op context where grad mode is already off (a step's
    moves and sends happen a few times per step; the context object costs more than a small move)."""
    return torch.no_grad() if torch.is_grad_enabled() else _NULL_CONTEXT


class StepRun:
    """One step of an optimizer in progress, driven one query at a time.

    The driver loop is ``while not run.done: run.move(); run.tell(value_at_that_point)``.
    :meth:`ZerothOrderOptimizer.step` feeds it the closure's values, :class:`zoptim.AskTell` the
    values its caller tells. Both therefore produce the same iterates, bit for bit.

    A method's generator may yield a *round*, a list of queries whose points do not depend on one
    another's values (the two points of each of k directions, STP's three points); it is sent
    their values as a list, in the round's order, once all are told. Within a round the values
    may be told in any order (``move(i)``, ``tell(value, i)``, ``i`` counting the step's queries
    from 0), which is what lets :meth:`zoptim.AskTell.ask` hand out several points at once.

    Attributes:
        pending: the next :class:`Query` not yet told, in order (None once the step is done).
        values: the finite losses told so far in this step, in the order told.
        told: ``(index, value)`` of each of them (what a mid-step checkpoint saves).
        loss: the step's loss once done (the non-finite value for a skipped step).
    """

    def __init__(self, optimizer):  # a zoptim.optim.base.ZerothOrderOptimizer
        self.optimizer = optimizer
        self.update_started = False  # set by _update: the step's update is (being) written
        self._queries_at_start = optimizer.num_queries
        self.told: list[tuple[int, Any]] = []
        self.loss: float | None = None
        self._first = 0  # step index of the round's first query
        self._gen: StepGenerator | None = optimizer._queries()
        self._start_round(next(self._gen))

    def _start_round(self, yielded) -> None:
        self._batch = not isinstance(yielded, Query)  # a Query is itself a tuple: test it first
        self._round: list[Query] = list(yielded) if self._batch else [yielded]
        self._round_values: list = [None] * len(self._round)

    @property
    def done(self) -> bool:
        return self._gen is None

    @property
    def values(self) -> list:
        return [value for _, value in self.told]

    @property
    def pending(self) -> Query | None:
        untold = self.untold
        return None if not untold else self._round[untold[0] - self._first]

    @property
    def untold(self) -> list[int]:
        """Step indices of the current round's queries not yet told (empty once the step is done)."""
        if self._gen is None:
            return []
        return [self._first + j for j, v in enumerate(self._round_values) if v is None]

    def _slot(self, index: int | None) -> int:
        if index is None and self._gen is not None:  # the common case, without building the list
            return self._round_values.index(None)
        untold = self.untold
        if self._gen is None:
            raise RuntimeError("this step is finished; start another with begin_step()")
        if index is None:
            return untold[0] - self._first
        if index not in untold:
            raise ValueError(
                f"query {index} is not pending: the step's queries that can be evaluated now are {untold}"
                + (" (the next ones depend on their values)" if untold else "")
            )
        return index - self._first

    def move(self, index: int | None = None) -> None:
        """Move the parameters (in place) to the pending query point (``index``: that query of the
        current round; default the first not yet told)."""
        key, scales = self._round[self._slot(index)]
        engine = self.optimizer.engine
        if torch.is_grad_enabled():
            with torch.no_grad():
                engine.restore() if key is None else engine.move(key, scales)
        elif key is None:
            engine.restore()
        else:
            engine.move(key, scales)

    def tell(self, loss, index: int | None = None) -> None:
        """The loss at a pending point (``index`` as in :meth:`move`). A value that is not a
        scalar raises TypeError and changes nothing; a NaN/inf one ends the step as skipped
        (update skipped, parameters restored)."""
        slot = self._slot(index)
        opt = self.optimizer
        value = loss_vector(loss) if opt.per_example else loss_value(loss)
        opt.num_queries += 1
        if not (math.isfinite(value) if type(value) is float else all(math.isfinite(v) for v in value)):
            value = next(v for v in (value if isinstance(value, list) else [value]) if not math.isfinite(v))
            self._tell_other_ranks(_NONFINITE)
            self._finish()
            self.loss = value
            try:
                opt._on_nonfinite(value)
            finally:
                opt.steps += 1
            return
        self.told.append((self._first + slot, value))
        self._round_values[slot] = value
        if None in self._round_values:
            return
        sent = list(self._round_values) if self._batch else self._round_values[0]
        try:
            with _no_grad():
                yielded = self._gen.send(sent)
        except StopIteration as stop:
            self._gen, self.loss = None, float(stop.value)
            opt._nonfinite_run = 0
            opt.steps += 1
            if opt._run is self:
                opt._run = None
            stall.observe(opt, self.values)  # a word when the run stops learning (zoptim.optim.stall)
        except SkippedUpdate as skipped:
            self._finish()
            means = [sum(v) / len(v) if isinstance(v, list) else v for v in self.values]
            self.loss = sum(means) / len(means)  # the mean loss of the step's queries, all finite
            try:
                opt._on_nonfinite(skipped.value, what=skipped.what)
            finally:
                opt.steps += 1
        except BaseException:
            self.abandon()
            raise
        else:
            self._first += len(self._round)
            self._start_round(yielded)

    def _tell_other_ranks(self, status: float) -> None:
        """In a direction-parallel run, take part in the step's exchange with this rank's failure."""
        opt = self.optimizer
        if opt._exchange is not None and not opt._exchanged:
            opt._exchange_once([], status)

    def _finish(self) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.close()
        self.optimizer.engine.restore()
        if self.optimizer._run is self:
            self.optimizer._run = None

    def abandon(self, counted: bool = True) -> None:
        """End the step without its update: the parameters go back bit for bit to the iterate the
        step started from (with ``exact_restore``), the step counter advances as after an exception
        in the closure, the evaluations stay counted. No-op on a finished step.

        ``counted=False`` (what ``step`` does on a ``KeyboardInterrupt``, in a single process)
        leaves the optimizer as it was before the step, counters included, so the step is redone
        with the same direction and a checkpoint taken now resumes as if there had been no
        interruption. It is ignored once the update has started (the update is then completed
        and counts) and in a direction-parallel run (every rank must count the step alike)."""
        if self._gen is None:
            return
        opt = self.optimizer
        uncounted = not counted and not self.update_started and opt._exchange is None
        try:
            self._tell_other_ranks(_RAISED)
        finally:
            with _no_grad():
                self._finish()
            if uncounted:
                opt.num_queries = self._queries_at_start
            else:
                opt.steps += 1
