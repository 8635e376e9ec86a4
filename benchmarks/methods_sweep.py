"""One-seed probes of HiZOO's alpha and of a larger learning rate with the seed momentum (issue 12).

    python benchmarks/methods_sweep.py digits-mlp [OUT]

On the problem's default hyper-parameters (GA's lr and eps, as in ``zoptim bench --suite
methods``), 6,000 queries, seed 0: ZOSGD; HiZOO at alpha 1e-4, 1e-3, 1e-2; ZOSGD with
momentum 0.9 over 8 steps at 2x and 4x GA's lr; ZOSGD at 2x GA's lr. Prints each run's final
full training loss. Runs are resumable harness runs under OUT (default runs/methods-sweep).
"""

from __future__ import annotations

import sys
from pathlib import Path

from zoptim.bench import harness
from zoptim.bench.harness import RunSpec
from zoptim.problems import get_problem


def main(problem_name: str, out: Path) -> None:
    problem = get_problem(problem_name)
    base = dict(problem.default_hparams)
    runs = [("ZOSGD", {}), ("HiZOO", {"hessian_smooth": 1e-4}), ("HiZOO", {"hessian_smooth": 1e-3}),
            ("HiZOO", {"hessian_smooth": 1e-2}), ("ZOSGD-momentum", {"lr": base["lr"] * 2}),
            ("ZOSGD-momentum", {"lr": base["lr"] * 4}), ("ZOSGD", {"lr": base["lr"] * 2})]
    for method, extra in runs:
        records = harness.run(RunSpec("sweep", problem_name, method, 0, 6000, {**base, **extra}, 20), problem, out,
                              progress=False)
        _, losses = harness.curve(records)
        print(f"{method:16s} {extra}  final loss {losses[-1]:.4f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "digits-mlp", Path(sys.argv[2] if len(sys.argv) > 2 else "runs/methods-sweep"))
