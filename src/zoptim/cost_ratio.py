"""The training cost ratio of the S2P paper, in its two forms (one module, two named functions).

* :func:`cost_ratios` reproduces Table 5 / Fig. 1a (pre-trained CNNs): targets are GA's loss
  after {1, 0.8, 0.6, 0.4, 0.2} of its budget ("GA reaching 500/400/300/200/100 epochs"), curves of
  evaluation points smoothed by an EMA and a running minimum. ``zoptim bench`` uses it.
* :func:`minibatch_cost_ratios` reproduces Table 6 / Fig. 2a (fine-tuning OPT-13B): targets are
  GA's minibatch loss after {1, 0.75, 0.5, 0.25} of its iterations ("20000/15000/10000/5000
  mini-batch iterations"), curves of per-step minibatch losses smoothed by a trailing mean.
  ``zoptim finetune``'s report uses it.

Definition (Table 5). Let Q_GA be the baseline's (GA = ZOSGD with Gaussian directions, i.e. MeZO) total
queries. For each fraction p in {1, 0.8, 0.6, 0.4, 0.2} the target is the baseline's smoothed
loss after p * Q_GA queries (the paper's "GA reaches 500/400/300/200/100 epochs"). A method's
ratio for that target is

    (queries the method needs to first reach the target on its smoothed curve) / Q_GA,

so the baseline's own row is about {1, 0.8, ...} (lower where its curve plateaued), and a method
that never reaches the target within its budget gets "not reached" (``None``), never a number.

Smoothing. Minibatch losses are noisy, and so, less, are full-loss curves of stochastic methods.
Each curve is smoothed by an exponential moving average over its evaluation points
(``s_i = beta s_{i-1} + (1 - beta) L_i``, ``s_0 = L_0``, beta = 0.6 by default) followed by a running
minimum, so "first reaches" is well defined (the smoothed curve is non-increasing). Targets are
read off the baseline's smoothed curve at the last evaluation point at or before p * Q_GA.

Seeds: the targets of seed s come from the baseline's run with seed s; tables report the mean and
the standard deviation over the seeds where the target was reached, with "(r/n)" when only r of n
seeds reached it, and "n/r" when none did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

FRACTIONS = (1.0, 0.8, 0.6, 0.4, 0.2)


def smooth(losses: Sequence[float], beta: float = 0.6) -> list[float]:
    """EMA (factor ``beta``) followed by a running minimum; non-finite values count as +inf."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1); got {beta!r}")
    out, ema, best = [], None, math.inf
    for value in losses:
        value = math.inf if value is None or not math.isfinite(value) else float(value)
        ema = value if ema is None or not math.isfinite(ema) else beta * ema + (1.0 - beta) * value
        best = min(best, ema)
        out.append(best)
    return out


def targets(queries: Sequence[int], losses: Sequence[float], fractions=FRACTIONS, beta: float = 0.6) -> list[float]:
    """The baseline's smoothed loss at each fraction of its total queries."""
    s = smooth(losses, beta)
    total = queries[-1]
    result = []
    for p in fractions:
        idx = max((i for i, q in enumerate(queries) if q <= p * total + 1e-9), default=0)
        result.append(s[idx])
    return result


def queries_to_reach(queries: Sequence[int], losses: Sequence[float], target: float, beta: float = 0.6) -> int | None:
    """First query count at which the smoothed curve is <= ``target``; None if never."""
    for q, value in zip(queries, smooth(losses, beta)):
        if value <= target:
            return int(q)
    return None


def cost_ratios(baseline: tuple, curves: dict, fractions=FRACTIONS, beta: float = 0.6) -> dict:
    """Ratios of each method for one seed.

    Args:
        baseline: (queries, losses) of the baseline run.
        curves: method name -> (queries, losses); include the baseline to get its own row.
    Returns:
        method name -> list (one per fraction) of a float ratio or None ("not reached").
    """
    base_q, base_l = baseline
    total = base_q[-1]
    tg = targets(base_q, base_l, fractions, beta)
    out = {}
    for name, (q, l) in curves.items():
        reached = [queries_to_reach(q, l, t, beta) for t in tg]
        out[name] = [None if r is None else r / total for r in reached]
    return out


def aggregate(per_seed: list[list[float | None]]) -> list[dict]:
    """Mean, std over the seeds that reached each target, and how many did."""
    out = []
    for column in zip(*per_seed):
        vals = [v for v in column if v is not None]
        n = len(column)
        if not vals:
            out.append({"mean": None, "std": None, "reached": 0, "seeds": n})
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        out.append({"mean": mean, "std": std, "reached": len(vals), "seeds": n})
    return out


def format_cell(cell: dict) -> str:
    """"0.52 ± 0.03", "0.52 ± 0.03 (2/3)" or "n/r"."""
    if cell["mean"] is None:
        return "n/r"
    text = f"{cell['mean']:.2f} ± {cell['std']:.2f}"
    if cell["reached"] < cell["seeds"]:
        text += f" ({cell['reached']}/{cell['seeds']})"
    return text


def markdown_table(rows: dict[str, dict[str, list[dict]]], fractions=FRACTIONS) -> str:
    """Tables 5/6 layout: | Task | Method | ratio at each GA fraction |, one block of rows per task."""
    head = "| Task | Method | " + " | ".join(f"GA@{p:g}" for p in fractions) + " |"
    sep = "|---|---|" + "---|" * len(fractions)
    lines = [head, sep]
    for task, methods in rows.items():
        for i, (name, cells) in enumerate(methods.items()):
            lines.append(f"| {task if i == 0 else ''} | {name} | " + " | ".join(format_cell(c) for c in cells) + " |")
    return "\n".join(lines)


# -- Table 6 / Fig. 2a: minibatch iterations ---------------------------------------------------------------
MINIBATCH_FRACTIONS = (1.0, 0.75, 0.5, 0.25)


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` values (the minibatch loss is noisy; the paper
    plots smoothed curves)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def minibatch_cost_ratios(base_log: list[dict], other_log: list[dict], window: int | None = None) -> list[float | None]:
    """Table 6 of the S2P paper: targets are the base method's (GA's) smoothed minibatch loss at
    100, 75, 50 and 25 % of its queries; each ratio is the queries the other method needs to first
    reach the target, divided by the base's total queries (None: never reached). ``*_log``: one
    record per step with ``queries`` and ``loss``. Curves are trailing means over ``window`` steps
    (default 10 % of the base run); points before the first full window do not count as
    reaching a target (a mean of fewer minibatches is one noisy batch at the start)."""
    window = window or max(1, len(base_log) // 10)
    base = trailing_mean([r["loss"] for r in base_log], window)
    other = trailing_mean([r["loss"] for r in other_log], window)
    total = base_log[-1]["queries"]
    ratios = []
    for frac in MINIBATCH_FRACTIONS:
        target = base[max(0, round(frac * len(base)) - 1)]
        hit = next((r["queries"] for i, (r, s) in enumerate(zip(other_log, other))
                    if i >= window - 1 and s <= target), None)
        ratios.append(None if hit is None else hit / total)
    return ratios
