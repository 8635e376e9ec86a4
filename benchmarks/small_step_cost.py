"""Fixed cost per step on small problems: where launch and Python overhead, not the weights, dominate.

Prints, measured in one process (interleaved, medians over repetitions):

* a ZOSGD step on a 784-64-10 MLP (batch 128) against its two no-grad forwards, with directions
  in place (the fused engine) and applied in the forward (``module=model, rank=1``);
* ``zoptim.minimize``'s overhead per function evaluation (its time minus the function's) at d = 10
  and d = 1,000, against scipy's Powell on the same function (scipy's overhead measured the same way).

    python benchmarks/small_step_cost.py [--threads 0 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import zoptim


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
            for _ in range(reps):
                a = time.perf_counter()
                loss()
                loss()
                b = time.perf_counter()
                opt.step(loss)
                c = time.perf_counter()
                ratios.append((c - b) / (b - a))
        opt.close()
        out[label] = statistics.median(ratios)
    return out


def _overhead_per_eval(run, fun, evals: int) -> float:
    calls = [0.0]

    def timed(v):
        a = time.perf_counter()
        value = fun(v)
        calls[0] += time.perf_counter() - a
        return value

    a = time.perf_counter()
    n = run(timed)
    total = time.perf_counter() - a
    return (total - calls[0]) / n


def minimize_overheads(d: int, evals: int = 2000) -> tuple[float, float]:
    from scipy.optimize import minimize as scipy_minimize

    def sphere(v):
        return float(np.dot(v, v))

    x0 = np.ones(d)

    def ours(f):
        res = zoptim.minimize(f, x0, options={"maxfev": evals, "eps": 1e-3, "lr": 1e-3})
        return res.nfev

    def powell(f):
        res = scipy_minimize(f, x0, method="Powell", options={"maxfev": evals, "xtol": 0, "ftol": 0})
        return res.nfev

    ours(lambda v: 0.0)  # warm-up
    return _overhead_per_eval(ours, sphere, evals), _overhead_per_eval(powell, sphere, evals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="intra-op threads; 0 = torch's default")
    args = ap.parse_args()
    default = torch.get_num_threads()
    for threads in args.threads:
        torch.set_num_threads(threads or default)
        print(f"\n## {torch.get_num_threads()} intra-op thread(s){' (torch default)' if not threads else ''}")
        for label, ratio in mlp_ratios().items():
            print(f"784-64-10 MLP, batch 128, ZOSGD step / two forwards, {label:22s}: {ratio:6.2f}")
        for d in (10, 1000):
            ours, powell = minimize_overheads(d)
            print(f"minimize overhead per evaluation, d = {d:5d}: zoptim {ours * 1e6:7.1f} us, scipy Powell "
                  f"{powell * 1e6:6.1f} us, ratio {ours / powell:5.1f}")


if __name__ == "__main__":
    main()
