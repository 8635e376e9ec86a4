"""Black-box interfaces over the optimizers: a scipy-style :func:`minimize` and :class:`AskTell`.

Both are thin: the algorithm is always the optimizer's own ``step``; these only change who calls
whom. ``minimize`` wraps a function of a NumPy vector; ``AskTell`` turns ``step(closure)`` inside
out for loops that evaluate candidates elsewhere (a simulator, a remote service, a human rater).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import numpy as np
import torch

from . import optim

METHODS = {
    "zosgd": optim.ZOSGD,
    "stp": optim.STP,
    "s2p": optim.S2P,
    "as2p": optim.AS2P,
}


class OptimizeResult(dict):
    """scipy.optimize.OptimizeResult's shape: x, fun, nit, nfev, success, message (also as attributes)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


def minimize(
    fun: Callable[[np.ndarray], float],
    x0,
    method: str = "as2p",
    *,
    maxfev: int = 10_000,
    callback: Callable[[np.ndarray], object] | None = None,
    **options,
) -> OptimizeResult:
    """Minimise ``fun(x)`` from ``x0`` with a zeroth-order method, like ``scipy.optimize.minimize``.

    Args:
        fun: f(x) -> float, x a float64 NumPy vector of x0's shape.
        x0: starting point (array-like).
        method: ``"zosgd"``, ``"stp"``, ``"s2p"`` or ``"as2p"``.
        maxfev: budget of function evaluations (queries). The run stops at the first step that
            would exceed it.
        callback: called with a copy of x after every step; return True to stop.
        **options: the optimizer's keyword arguments (``lr``, ``eps``, ``seed``, ...). For AS2P,
            ``batch_mode`` defaults to ``"full"`` and ``total_steps`` to the number of steps that
            ``maxfev`` allows; for S2P's stationary rules ``total_steps`` likewise.

    Returns:
        OptimizeResult with ``x`` (best point seen at a step boundary is not tracked: the final
        iterate), ``fun`` (f at x, one extra evaluation, counted in nfev), ``nit``, ``nfev``,
        ``success`` and ``message``.

    Example:
        >>> res = zoptim.minimize(lambda x: float((x**2).sum()), np.ones(10), "as2p", maxfev=2000)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    if not isinstance(maxfev, int) or maxfev < 1:
        raise ValueError(f"maxfev must be a positive integer; got {maxfev!r}")
    x = torch.nn.Parameter(torch.as_tensor(np.asarray(x0, dtype=np.float64)).clone())
    cls = METHODS[method]
    per_step = {"stp": 3, "s2p": 4 if str(options.get("step_rule", "stationary")).endswith("dynamic") else 2}
    steps = max(1, maxfev // per_step.get(method, 2 * int(options.get("num_directions", 1))))
    if method == "as2p":
        options.setdefault("batch_mode", "full")
        options.setdefault("total_steps", steps)
    if method == "s2p" and not str(options.get("step_rule", "stationary")).endswith("dynamic"):
        options.setdefault("total_steps", steps)
    opt = cls([x], **options)

    def closure():
        return float(fun(x.detach().numpy().copy()))

    message, nit = "maximum number of function evaluations reached", 0
    while opt.num_queries + opt.queries_per_step <= maxfev:
        opt.step(closure)
        nit += 1
        if callback is not None and callback(x.detach().numpy().copy()):
            message = "stopped by callback"
            break
    value = closure()
    return OptimizeResult(
        x=x.detach().numpy().copy(), fun=value, nit=nit, nfev=opt.num_queries + 1,
        success=bool(np.isfinite(value)), message=message,
    )


class AskTell:
    """Ask/tell driving of any zoptim optimizer: ``ask()`` moves the parameters to the next point to
    evaluate and returns them; ``tell(loss)`` reports its loss. ::

        at = AskTell(zoptim.AS2P(model.parameters(), total_steps=1000))
        for _ in range(2000):
            at.ask()                      # the model's parameters now hold the candidate
            at.tell(evaluate_elsewhere(model))

    The optimizer's own ``step`` runs in a helper thread, blocked inside its closure between an
    ask and a tell, so every method works unchanged and the iterates are those of ``step``.
    ``close()`` (or leaving a ``with`` block) abandons an unfinished step and restores the
    parameters exactly.
    """

    def __init__(self, optimizer: optim.ZerothOrderOptimizer):
        self.optimizer = optimizer
        self._asks: queue.Queue = queue.Queue(maxsize=1)
        self._tells: queue.Queue = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._pending = False
        self._error: BaseException | None = None
        self._closing = False

    def _closure(self):
        self._asks.put("ask")
        value = self._tells.get()
        if value is _CLOSE:
            raise _Abandon
        return value

    def _run(self):
        try:
            while True:
                self.optimizer.step(self._closure)
                self._asks.put("stepped")
        except _Abandon:
            self._asks.put("closed")
        except BaseException as e:  # handed to the caller of ask()/tell()
            self._error = e
            self._asks.put("error")

    def _next_ask(self):
        while True:
            signal = self._asks.get()
            if signal == "error":
                raise self._error
            if signal == "ask":
                return

    def ask(self) -> list[torch.Tensor]:
        """Move to the next query point; returns the (perturbed, in place) trainable parameters."""
        if self._pending:
            raise RuntimeError("ask() called twice without tell(): report the last point's loss first")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        self._next_ask()
        self._pending = True
        return self.optimizer.engine.params

    def tell(self, loss) -> None:
        """Report the loss of the point returned by the last ``ask()``."""
        if not self._pending:
            raise RuntimeError("tell() without a pending ask()")
        self._pending = False
        self._tells.put(loss)

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            if not self._pending:
                self._next_ask()
            self._pending = False
            self._tells.put(_CLOSE)
            self._thread.join()
        self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Abandon(Exception):
    pass


_CLOSE = object()
