"""The black-box bench's zoptim rows on both routes of a function of a vector (issue 36).

Runs ``zoptim bench --suite blackbox``'s zoptim methods (AS2P, ZOSGD, STP) on the suite's problems
with the in-place engine (``zoptim.blackbox.ROUTE = "torch"``, the route before issue 36) and
with the vector engine, and prints per problem the summed wall and CPU time of the runs on each
route and whether every record (best loss, evaluations to the target, the curve) is identical.
The peers (nevergrad, pycma, scipy, torchzero) are not run: their time does not depend on the
route.

    python benchmarks/blackbox_route_speed.py [--problems rosenbrock-10 softmax-64 ...] [--seeds 1]
"""

from __future__ import annotations

import argparse

from zoptim import blackbox
from zoptim.bench.blackbox import BUDGETS, get_peer, run_one
from zoptim.problems.blackbox import get_blackbox_problem

METHODS = ("zoptim AS2P", "zoptim ZOSGD", "zoptim STP")
SAME = ("best", "nfev", "evals_to_target", "curve_best", "error")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", nargs="+", default=[p for p in BUDGETS if p != "quadratic-100000"])
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    warm = get_blackbox_problem("rosenbrock-10", 20)
    for route in ("torch", "vector"):
        blackbox.ROUTE = route
        for m in METHODS:
            run_one(get_peer(m), warm, 0)
    total = {"torch": [0.0, 0.0], "vector": [0.0, 0.0]}
    print(f"{'problem':18s} | {'torch wall s':>12s} | {'vector wall s':>13s} | {'speed-up':>8s} | same records")
    for name in args.problems:
        problem = get_blackbox_problem(name, BUDGETS[name])
        wall = {"torch": 0.0, "vector": 0.0}
        same = True
        for m in METHODS:
            for seed in range(args.seeds):
                recs = {}
                for route in ("torch", "vector"):
                    blackbox.ROUTE = route
                    recs[route] = run_one(get_peer(m), problem, seed)
                    wall[route] += recs[route]["wall_s"]
                    total[route][0] += recs[route]["wall_s"]
                    total[route][1] += recs[route]["cpu_s"]
                same &= all(recs["torch"][k] == recs["vector"][k] for k in SAME)
        print(f"{name:18s} | {wall['torch']:12.2f} | {wall['vector']:13.2f} | {wall['torch'] / wall['vector']:7.1f}x | {same}")
    print(f"{'all':18s} | {total['torch'][0]:12.2f} | {total['vector'][0]:13.2f} | "
          f"{total['torch'][0] / total['vector'][0]:7.1f}x | (CPU s: {total['torch'][1]:.2f} -> {total['vector'][1]:.2f})")


if __name__ == "__main__":
    main()
