"""Fixed cost per step on small problems: where launch and Python overhead, not the arithmetic, dominate.

Prints, measured in one process at each thread count (interleaved repetitions, medians):

* ``zoptim.minimize``'s overhead per function evaluation (its time minus the function's) for
  every registered method with its default options, at d = 10 and d = 1,000, against scipy's
  Powell on the same function, ``f(v) = sum((v - A)^2)``, 2,000 evaluations (Powell's overhead
  measured the same way). The ratio (zoptim - f) / (Powell - f) is issue 36's target (<= 3).
  ``--route torch`` measures the optimizers' own engine for the vector instead of the vector
  engine (``--small-elements 0``: the in-place kernels, the route before issue 36).
* a ZOSGD step on a 784-64-10 MLP (batch 128) against its two no-grad forwards, with directions
  in place (the small-model engine, ``zoptim.engine.small``; ``--small-elements 0``: the in-place
  kernels) and applied in the forward (``module=model, rank=1``).

    python benchmarks/small_step_cost.py [--threads 0 1] [--reps 3] [--route vector|torch] [--no-mlp]
                                         [--small-elements N]

Takes about a minute on a quiet 2-core machine. Timings on a loaded machine are distorted; the
ratios, measured interleaved in one process, less so.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import zoptim
from zoptim import blackbox
from zoptim.optim import registry

EVALS = 2000
#: the clock: wall time (default), or this process's CPU time (--clock process), steadier on a
#: loaded machine (nothing here waits), but summed over threads
CLOCK = time.perf_counter


def mlp_ratios(reps: int = 200) -> dict:
    torch.manual_seed(0)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    out = {}
    for label, forward in (("in place", False), ("module=model, rank=1", True)):
        model = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
        opt = zoptim.ZOSGD(model.parameters(), lr=1e-3, eps=1e-3, **(dict(module=model, rank=1) if forward else {}))

        def loss(m=model):
            return torch.nn.functional.cross_entropy(m(x), y)

        with torch.no_grad():
            for _ in range(20):  # warm-up (compiles the in-place kernels)
                opt.step(loss)
            ratios = []
            clock = CLOCK
            for _ in range(reps):
                a = clock()
                loss()
                loss()
                b = clock()
                opt.step(loss)
                c = clock()
                ratios.append((c - b) / (b - a))
        opt.close()
        out[label] = statistics.median(ratios)
    return out


def _timed_run(run, fun) -> tuple[float, float, int]:
    """(total seconds, seconds inside fun, evaluations) of ``run(fun)``."""
    inside = [0.0]
    clock = CLOCK

    def timed(v):
        a = clock()
        value = fun(v)
        inside[0] += clock() - a
        return value

    a = clock()
    n = run(timed)
    return clock() - a, inside[0], n


def minimize_table(d: int, reps: int) -> dict:
    """Per method: (zoptim us/eval, Powell us/eval, f us/eval, overhead ratio), medians over reps."""
    from scipy.optimize import minimize as scipy_minimize

    A = np.linspace(-1.0, 1.0, d)

    def f(v):
        return float(np.sum((v - A) ** 2))

    x0 = np.zeros(d)

    def powell(fun):
        return scipy_minimize(fun, x0, method="Powell", options={"maxfev": EVALS, "xtol": 0, "ftol": 0}).nfev

    def ours(method):
        return lambda fun: zoptim.minimize(fun, x0, method=method, options={"maxfev": EVALS}).nfev

    methods = registry.names()
    for m in methods:  # warm-up
        zoptim.minimize(f, x0, method=m, options={"maxfev": 50})
    powell(f)  # warm-up: scipy's first run is slower, which flattered the first method's ratio
    rows: dict[str, list] = {m: [] for m in methods}
    for _ in range(reps):
        for m in methods:
            p_total, p_f, p_n = _timed_run(powell, f)
            z_total, z_f, z_n = _timed_run(ours(m), f)
            rows[m].append((z_total / z_n, p_total / p_n, z_f / z_n,
                            ((z_total - z_f) / z_n) / ((p_total - p_f) / p_n)))
    return {m: tuple(statistics.median(col) for col in zip(*r)) for m, r in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="intra-op threads; 0 = torch's default")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each minimize run (median)")
    ap.add_argument("--route", choices=("vector", "torch"), default="vector", help="minimize's engine for a vector")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="clock: wall time, or CPU time of this process (steadier under load; at 1 thread only "
                         "comparable to wall time, since CPU time adds up the threads)")
    ap.add_argument("--no-mlp", action="store_true", help="skip the MLP rows")
    ap.add_argument("--small-elements", type=int, default=None,
                    help="zoptim.engine.small.SMALL_ELEMENTS (0: every model through the in-place kernels)")
    args = ap.parse_args()
    if args.small_elements is not None:
        from zoptim.engine import small

        small.SMALL_ELEMENTS = args.small_elements
    blackbox.ROUTE = args.route
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    default = torch.get_num_threads()
    for threads in args.threads:
        torch.set_num_threads(threads or default)
        print(f"\n## {torch.get_num_threads()} intra-op thread(s){' (torch default)' if not threads else ''}, "
              f"route {args.route}, clock {args.clock}")
        print(f"{'':8s} | {'d':>5s} | {'zoptim us/eval':>14s} | {'Powell us/eval':>14s} | {'f us/eval':>9s} | "
              "overhead ratio (zoptim - f) / (Powell - f)")
        worst = {}
        for d in (10, 1000):
            for m, (ours, powell, f_cost, ratio) in minimize_table(d, args.reps).items():
                print(f"{m:8s} | {d:5d} | {ours * 1e6:14.1f} | {powell * 1e6:14.1f} | {f_cost * 1e6:9.1f} | {ratio:6.2f}")
                worst[d] = max(worst.get(d, 0.0), ratio)
        print("worst overhead ratio: " + ", ".join(f"d = {d}: {r:.2f}" for d, r in worst.items()) + " (target <= 3)")
        if not args.no_mlp:
            for label, ratio in mlp_ratios().items():
                print(f"784-64-10 MLP, batch 128, ZOSGD step / two forwards, {label:22s}: {ratio:6.2f}")


if __name__ == "__main__":
    main()
