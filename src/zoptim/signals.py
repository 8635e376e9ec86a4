"""Stop signals (SIGTERM, SIGUSR1) handled as Ctrl-C is: checkpoint, one line, resume.

Batch schedulers, ``timeout`` and preemptible instances stop a job with SIGTERM (SLURM can send
SIGUSR1 ahead of it, ``--signal``). Inside :func:`stop_signals`, the first such signal raises
:class:`Terminated`, a ``KeyboardInterrupt``: every loop of zoptim that checkpoints on Ctrl-C
(the step in flight abandoned exactly, then a checkpoint) does the same for it, and the command
exits with ``128 + signum`` (143 for SIGTERM, the shell's convention). Later stop signals are
ignored, so that a scheduler repeating its SIGTERM cannot interrupt the checkpoint being written.

In a multi-process run a signal raised at an arbitrary point of one rank would leave the others
waiting in a collective; there :func:`defer` makes the handler only record the signal, and the
loop asks every rank at each step boundary (:func:`agreed`, one all-reduce of one number), so all
ranks stop after the same step and checkpoint together.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

#: The signals that stop a run as Ctrl-C does.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))

_state = {"defer": False, "pending": None, "raised": False}


class Terminated(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGUSR1) delivered to a run: handled as Ctrl-C. ``signum`` is the
    signal; ``exit_code`` is ``128 + signum``."""

    def __init__(self, signum: int, *args):
        super().__init__(*args)
        self.signum = int(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum, frame):
    if _state["pending"] is not None:  # already stopping: a repeated signal must not interrupt the checkpoint
        return
    _state["pending"] = signum
    if not _state["defer"]:
        _state["raised"] = True
        raise Terminated(signum)


@contextmanager
def stop_signals():
    """Within the body, SIGTERM and SIGUSR1 raise :class:`Terminated` (see the module's text).
    Outside the main thread (where Python runs no handler) this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    _state.update(defer=False, pending=None, raised=False)
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _handler)
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        _state.update(defer=False, pending=None, raised=False)


@contextmanager
def defer():
    """Within the body a stop signal is only recorded (:func:`pending`), for a loop that stops at
    a point every process agrees on (:func:`agreed`). A signal recorded when the body ends is
    raised then."""
    before = _state["defer"]
    _state["defer"] = True
    try:
        yield
    finally:
        _state["defer"] = before
        if not before and _state["pending"] is not None and not _state["raised"]:
            _state["raised"] = True
            raise Terminated(_state["pending"])


def pending() -> int | None:
    """The stop signal received and not yet acted on, if any."""
    return None if _state["raised"] else _state["pending"]


def agreed(group=None) -> int | None:
    """Every rank's answer to "was a stop signal received?", at one point of the run: the signal
    (the largest number any rank received) or None. A collective: every rank must call it."""
    import torch
    import torch.distributed as dist

    from .distributed import _reduce_device

    flag = torch.tensor([float(pending() or 0)], dtype=torch.float64, device=_reduce_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    signum = int(flag.item())
    if signum:
        _state["raised"] = True  # acted on now, by every rank
    return signum or None
