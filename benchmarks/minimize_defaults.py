"""``zoptim.minimize`` with its defaults (no options but the budget) against scipy's Powell and
Nelder-Mead, also with their defaults (issue 21).

Every method gets the same number of function evaluations. The value reported is the noise-free
f at the returned ``x`` (median over seeds; scipy's deterministic methods see the same noisy
function, one run per seed). Problems: Rosenbrock in 10 dimensions from 0, a noisy sphere
(``sum (x - 1)^2 + N(0, 1)`` in 10 dimensions from 0: f(x0) = 10), and the black-box suite's
problems at d <= 650 (``zoptim.problems.blackbox``).

    python benchmarks/minimize_defaults.py [--budgets 2000 10000] [--seeds 3] [--out docs/results/minimize_defaults.txt]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
import warnings

import numpy as np
from scipy.optimize import minimize as scipy_minimize

import zoptim
from zoptim.problems.blackbox import get_blackbox_problem

PROBLEMS = ["rosenbrock-10", "noisy-sphere-10", "logreg-cancer", "softmax-64", "quadratic-100", "logreg-digits"]
ZOPTIM = ["as2p", "zosgd", "stp", "s2p", "hizoo"]


def problem(name: str, budget: int, seed: int):
    """(fun as the optimiser sees it, noise-free fun, x0)."""
    if name == "noisy-sphere-10":
        rng = np.random.default_rng(seed)

        def clean(x):
            return float(((x - 1.0) ** 2).sum())

        return (lambda x: clean(x) + float(rng.normal())), clean, np.zeros(10)
    p = get_blackbox_problem(name, budget)
    return p.fun, p.fun, p.x0


def run(method: str, name: str, budget: int, seed: int) -> float:
    fun, clean, x0 = problem(name, budget, seed)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if method in ("Powell", "Nelder-Mead"):
            res = scipy_minimize(fun, x0, method=method, options={"maxfev": budget})
        else:
            try:
                kwargs = {} if method == "default" else {"method": method}
                res = zoptim.minimize(fun, x0, options={"maxfev": budget, "seed": seed}, **kwargs)
            except Exception as err:  # a method that fails on defaults: reported, not hidden
                return f"error: {type(err).__name__}"
    x = np.asarray(res.x, dtype=np.float64)
    return clean(x) if np.all(np.isfinite(x)) else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--problems", nargs="+", default=PROBLEMS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    methods = ["default"] + ZOPTIM + ["Powell", "Nelder-Mead"]
    lines = [f"# zoptim.minimize defaults vs scipy defaults; noise-free f(x) at the returned x, median of "
             f"{args.seeds} seeds; {time.strftime('%Y-%m-%d')}",
             "| problem | f(x0) | evals | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    print("\n".join(lines), flush=True)
    for name in args.problems:
        for budget in args.budgets:
            _, clean, x0 = problem(name, budget, 0)
            cells = []
            for m in methods:
                vals = [run(m, name, budget, s) for s in range(args.seeds)]
                errs = [v for v in vals if isinstance(v, str)]
                cells.append(errs[0] if errs else f"{float(np.median(vals)):.3g}")
            line = f"| {name} | {clean(x0):.3g} | {budget:,} | " + " | ".join(cells) + " |"
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
