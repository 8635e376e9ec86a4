"""A word when a run stops learning: one :class:`StallWarning`, once, in one line.

A zeroth-order run can go on spending queries after it has stopped learning, and nothing in its
numbers says so unless someone reads them: the iterate has run away (every loss far above the
first one), the step size has fallen to zero (the lr is 0, or the two query points of a step give
the same loss, e.g. a loss of 1e95 that a perturbation of 1e-3 cannot change), or a schedule
defined over ``total_steps`` has ended and steps continue (AS2P past ``total_steps``: lr_k = 0).

The detector watches every finished step of every optimizer, whatever drives it (``step``,
:class:`zoptim.AskTell`, :func:`zoptim.minimize`, ``zoptim finetune``): the step driver
(:class:`zoptim.optim.base.StepRun`) calls :func:`observe` once per step that completed (skipped
steps, non-finite losses, have their own warning). It only reads the step's values and
``last_stats``, so the run's arithmetic is the same with or without it. Each condition warns once
per optimizer; the detector's memory is not part of ``state_dict``, so a resumed run watches from
the step it resumes at (its first loss is then the reference of the runaway rule).

The runaway rule is :func:`zoptim.minimize`'s (``options["divergence"]``, status 5): every value
of :data:`DIVERGED_STEPS` steps in a row above ``f0 + DIVERGENCE * (|f0| + 1)``, with f0 the first
value seen. minimize's status and stopping are unchanged; the warning says the same thing to every
other interface.
"""

from __future__ import annotations

import math
import warnings

#: minimize's default ``options["divergence"]``: a value this many times ``|f0| + 1`` above f0 is far.
DIVERGENCE = 1e3
#: Steps in a row whose every value is far above the first one (minimize's DIVERGED_STEPS).
DIVERGED_STEPS = 10
#: Finished steps in a row that did not move the parameters (step size 0, with lr 0 or gamma 0).
ZERO_STEPS = 20


class StallWarning(UserWarning):
    """The run has stopped learning (ran away, step size zero, or past the end of its schedules)."""


class StallDetector:
    """What :func:`observe` remembers of one optimizer's run."""

    def __init__(self):
        self.reference: float | None = None  # f0: the first value seen
        self.far = 0  # steps in a row far above f0
        self.zero = 0  # steps in a row that did not move
        self.warned: set[str] = set()


def _step_min(values) -> float:
    """The lowest value of a step's queries (a per-example query counts as its mean)."""
    means = [sum(v) / len(v) if isinstance(v, (list, tuple)) else float(v) for v in values]
    return min(means) if means else math.nan


def _warn(detector: StallDetector, kind: str, message: str) -> None:
    if kind in detector.warned:
        return
    detector.warned.add(kind)
    warnings.warn(message, StallWarning, stacklevel=4)


def observe(optimizer, values) -> None:
    """Look at a finished step (``values``: its queries' losses, as told) and warn, once per kind,
    if the run has stopped learning."""
    detector = optimizer.__dict__.get("_stall")
    if detector is None:
        detector = optimizer.__dict__["_stall"] = StallDetector()
    name, k = type(optimizer).__name__, optimizer.steps
    stats = optimizer.last_stats
    low = _step_min(values)
    if detector.reference is None and math.isfinite(low):
        first = values[0]
        detector.reference = sum(first) / len(first) if isinstance(first, (list, tuple)) else float(first)
    f0 = detector.reference
    if f0 is not None:
        limit = f0 + DIVERGENCE * (abs(f0) + 1.0)
        detector.far = detector.far + 1 if low > limit else 0
        if detector.far >= DIVERGED_STEPS:
            _warn(detector, "diverged",
                  f"{name} has run away: every loss of the last {DIVERGED_STEPS} steps (now {low:.3g}) is above "
                  f"{limit:.3g}, far above the first one ({f0:.3g}) (the rule on which minimize stops with status 5); "
                  "lower lr or eps")
    size, lr, gamma = stats.get("step_size"), stats.get("lr"), stats.get("gamma")
    still = size == 0.0 and (lr == 0.0 or gamma == 0.0)
    detector.zero = detector.zero + 1 if still else 0
    if detector.zero >= ZERO_STEPS:
        why = ("its lr is 0" if lr == 0.0 else
               f"the two query points of each step give the same loss (now {low:.3g}): eps is below what the loss "
               "resolves")
        _warn(detector, "zero",
              f"{name}'s step size has been 0 for {ZERO_STEPS} steps in a row at step {k}: {why}; the parameters no "
              "longer move")
    total = getattr(optimizer, "total_steps", None)
    if total is not None and k > total:
        _warn(detector, "schedule",
              f"{name} took step {k}, past total_steps={total}: its schedules over total_steps have ended "
              f"(lr now {lr if lr is not None else 'unknown'}); give total_steps the run's real length")
