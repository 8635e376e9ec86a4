"""Failure atomicity: critical sections that signal handlers cannot interrupt, and recovery.

A move of the parameters is a sequence of chunk writes (:mod:`zoptim.engine.inplace`). The engine
commits each chunk's new state only after its write, with a backup of the chunk taken first, so an
exception of any kind at any point leaves every chunk at a known state; recovering then means
either going back to the unperturbed point (a query's move) or finishing the update (an update
cannot be undone exactly: the journal covers query offsets only). The recovery must not itself be
interrupted, so it runs in :func:`deferred_signals`: every Python-level signal handler (Ctrl-C's
``KeyboardInterrupt`` included) is held back until the section ends and then runs, so the
exception it raises reaches the caller with the parameters consistent.
"""

from __future__ import annotations

import _signal
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager

_VALID: tuple[int, ...] | None = None


def _valid_signals() -> tuple[int, ...]:
    global _VALID
    if _VALID is None:
        _VALID = tuple(int(s) for s in signal.valid_signals())
    return _VALID


@contextmanager
def deferred_signals():
    """Run the body with every Python signal handler deferred to its end (main thread only).

    Signals that arrive meanwhile are recorded and their original handlers called, in order, on
    exit, so a Ctrl-C during the body raises ``KeyboardInterrupt`` after it. Outside the main
    thread (where Python runs no signal handler) this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, object]] = []

    def defer(signum, frame):
        pending.append((signum, frame))

    saved: dict[int, Callable] = {}
    try:
        # _signal: the functions under the signal module, on plain ints (signal's own wrappers convert
        # every number and handler to an enum, which made this section cost ~1 ms a step)
        for sig in _valid_signals():
            try:
                handler = _signal.getsignal(sig)
            except (ValueError, OSError):
                continue
            if callable(handler):
                saved[sig] = handler
                _signal.signal(sig, defer)
        yield
    finally:
        for sig, handler in saved.items():
            _signal.signal(sig, handler)
        for signum, frame in pending:
            saved[signum](signum, frame)


class RecoveryError(RuntimeError):
    """A failure interrupted a move and the recovery failed too: the parameters may be at a mixed point."""


def recover(action: Callable[[], None], error: BaseException, what: str, attempts: int = 3) -> None:
    """Run ``action`` (a recovery) with signals deferred, retrying up to ``attempts`` times.

    ``error`` is the failure being recovered from; if every attempt fails, :class:`RecoveryError`
    says so, chained to the last attempt's failure (the engine's state stays accurate, so a later
    restore can still finish the recovery once the cause is gone)."""
    last: BaseException | None = None
    with deferred_signals():
        for _ in range(attempts):
            try:
                action()
                return
            except Exception as again:  # noqa: BLE001 - retried, then reported below
                last = again
    raise RecoveryError(
        f"a move of the parameters failed ({type(error).__name__}: {error}) and so did {attempts} attempts to "
        f"recover ({what}); the last one raised {type(last).__name__}: {last}"
    ) from last


def write_all(ops: list[Callable[[], object]], completes_itself: int) -> None:
    """Run the write operations ``ops`` in order, as one atomic update.

    Signal handlers are deferred meanwhile, so a Ctrl-C lands after the last write. The first
    ``completes_itself`` operations are engine updates that finish their own writes before an
    exception leaves them; any other operation is one tensor write, which raises before writing.
    After a failure the remaining operations are run (with retries, :func:`zoptim.engine.atomic.recover`)
    and the exception re-raised."""
    done = 0
    with deferred_signals():
        try:
            for op in ops:
                op()
                done += 1
        except RecoveryError:
            raise  # an engine could not complete its own update: nothing more can be done here
        except BaseException as err:
            # an engine completes its update before an exception leaves it; a tensor write raises before writing
            state = {"next": done + 1 if done < completes_itself else done}

            def rest():
                while state["next"] < len(ops):
                    ops[state["next"]]()
                    state["next"] += 1

            recover(rest, err, "completing the update")
            raise
