"""Slows every query of a torchrun worker by ``ZOPTIM_TEST_QUERY_DELAY`` seconds.

tests/test_fault_tolerance.py puts this folder first on the PYTHONPATH of the runs it interrupts:
a step of the tiny test model takes about 13 ms, so a signal sent once step n is logged could land
after the last step on a loaded machine; with the delay, the run's end is seconds away. Python
imports ``sitecustomize`` at start-up; this one acts only in worker processes (``RANK`` set by
torchrun) and only when the variable is set.
"""

import os

_delay = float(os.environ.get("ZOPTIM_TEST_QUERY_DELAY") or 0.0)
if _delay > 0.0 and "RANK" in os.environ:
    import time

    from zoptim.lm.prompts import PromptClassifier

    _loss = PromptClassifier.loss

    def _slow_loss(self, *args, **kwargs):
        time.sleep(_delay)
        return _loss(self, *args, **kwargs)

    PromptClassifier.loss = _slow_loss
