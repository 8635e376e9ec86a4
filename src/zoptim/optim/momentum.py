"""Memory-free momentum: the last m directions, redrawn from their keys instead of stored."""

from __future__ import annotations

import warnings
from collections import deque

from .checks import check_int, check_positive


def warn_unused_group_momentum(optimizer) -> None:
    """Once per optimizer: a torch scheduler (``OneCycleLR``, ``CyclicLR`` with their default
    ``cycle_momentum=True``) wrote a momentum into ``param_groups`` of an optimizer built without
    seed momentum (``momentum=0``). ZOSGD and AS2P keep a ``momentum`` entry of 0 in their groups
    so that such schedulers run (their learning-rate schedule applies); the momentum they write
    drives the seed momentum only when the optimizer was built with one (``momentum=beta``)."""
    if optimizer.momentum is not None or getattr(optimizer, "_warned_group_momentum", False):
        return
    value = optimizer.param_groups[0].get("momentum") or 0.0
    if value:
        optimizer._warned_group_momentum = True
        warnings.warn(
            f"param_groups momentum {value:g} (set by a scheduler, e.g. OneCycleLR's cycle_momentum) is ignored: "
            f"{type(optimizer).__name__} was built without seed momentum; build it with momentum=beta to have the "
            "scheduler drive it, or pass cycle_momentum=False to the scheduler",
            UserWarning, stacklevel=4)


class SeedMomentum:
    r"""Heavy-ball momentum over a window of seeded directions, without a parameter-sized buffer.

    A zeroth-order step moves along ``c_t s_t``: a scalar (ZOSGD's projected gradient g_t, AS2P's
    signed, clipped, auto-scaled gamma) times a direction that a key names. The momentum direction
    is the normalised, truncated exponential average of the last ``window`` such steps,

    .. math:: v_t = \frac{1}{Z_t} \sum_{j=0}^{n-1} \beta^j\, c_{t-j}\, s_{t-j}, \qquad
              Z_t = \sum_{j=0}^{n-1} \beta^j, \quad n = \min(t + 1, m),

    and the optimizer moves by ``lr_t * v_t`` instead of ``lr_t * c_t s_t``. Each s is regenerated
    from its key by the engine (one pass over the weights per direction), so the state is m
    (key, coefficient) pairs: a few hundred bytes, against a parameter-sized buffer for a stored
    momentum (MeZO-momentum, ZO-AdaMU). Dividing by Z_t (Adam's bias correction, here for a
    truncated window) keeps ``lr`` on the scale of the method without momentum; what momentum
    changes is the noise: with independent directions the variance of v is
    :math:`\sum_j \beta^{2j} / Z^2` times that of one step (0.11 for beta = 0.9, m = 8), at the
    price of a bias towards past gradients.

    Cost: the update makes n passes over the weights instead of one (the first fused with the
    restore), and no extra forward pass.
    """

    def __init__(self, beta: float, window: int):
        beta = check_positive("momentum", beta, allow_zero=True)
        if beta >= 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {beta!r}")
        self.beta = beta
        self.window = check_int("momentum_window", window)
        self.history: deque[list[tuple[int, float]]] = deque(maxlen=self.window)

    def push(self, step: list[tuple[int, float]]) -> None:
        """Add one step's directions, ``[(key, coefficient), ...]`` (k of them for k directions)."""
        self.history.appendleft([(int(k), float(c)) for k, c in step])

    def terms(self) -> list[tuple[int, float]]:
        """The directions of v_t and their weights, newest first: ``beta^j c / Z`` for each."""
        weights = [self.beta**j for j in range(len(self.history))]
        z = sum(weights)
        return [(key, w * c / z) for w, step in zip(weights, self.history) for key, c in step]

    def state(self) -> dict:
        return {"beta": self.beta, "window": self.window, "history": [list(map(list, s)) for s in self.history]}

    def load(self, state: dict) -> None:
        self.history = deque(([(int(k), float(c)) for k, c in s] for s in state["history"]), maxlen=self.window)

