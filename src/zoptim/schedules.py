"""Decay strategies used inside the optimizers (the S2P paper's "Decay strategy", Alg. 2)."""

from __future__ import annotations

import math


def cosine_decay(init: float, end: float, step: int, total_steps: int) -> float:
    """Cosine decay from ``init`` at step 0 to ``end`` at ``total_steps`` (held there after).

    value_k = end + (init - end) * (1 + cos(pi * k / K)) / 2
    """
    k = min(max(step, 0), total_steps)
    return end + (init - end) * 0.5 * (1.0 + math.cos(math.pi * k / total_steps))
