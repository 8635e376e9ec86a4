"""Does a subspace held for T steps pay? A probe on the digits MLP (issue 33), before building it.

LOZO (arXiv 2410.07698), SubZero (arXiv 2410.08989) and ZO-Muon draw each weight matrix's
direction inside a low-rank subspace kept for several steps. Here: the B factor of each low-rank
matrix direction ``A B^T / sqrt(r)`` (the input side, LOZO's V) is drawn from a key that changes every
T steps, A stays fresh each step. It is patched into the forward engine's draws
(:class:`zoptim.engine.compact.CompactDraws`) for this script only: the library does not offer it.

Every configuration: ZOSGD with ``module=model`` on :class:`zoptim.problems.digits.DigitsMLP`
(64-32-10, minibatch 64, eps 1e-2), a cosine lr schedule over the budget, its lr the best of a
3-point grid on seed 0 (final full-data loss), then seeds 0-2 at that lr. Prints the final loss per
configuration (mean, std, each seed).

    python benchmarks/held_subspace_probe.py [--budget 3000] [--holds 10 50 200]
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

import zoptim
from zoptim.engine import compact
from zoptim.engine.noise import mix
from zoptim.problems.digits import DigitsMLP

HOLD = {"T": 0, "key": None}
_draw, _draw_stacked = compact.CompactDraws.draw, compact.CompactDraws.draw_stacked


def _held_factors(draws) -> dict:
    """The B factors of the current subspace key (drawn once per key)."""
    key = HOLD["key"]
    cached = draws.__dict__.get("_held")
    if cached is None or cached[0] != key:
        values = _draw(draws, key)
        draws._held = (key, {j: v[1] for j, v in values.items() if isinstance(v, tuple)})
    return draws._held[1]


def draw(self, key):
    out = _draw(self, key)
    if HOLD["T"]:
        held = _held_factors(self)
        out = {j: (v[0], held[j]) if isinstance(v, tuple) else v for j, v in out.items()}
    return out


def draw_stacked(self, keys):
    out = _draw_stacked(self, keys)
    if HOLD["T"]:
        held = _held_factors(self)
        out = {j: (v[0], held[j].expand(v[1].shape)) if isinstance(v, tuple) else v for j, v in out.items()}
    return out


def run(cfg: dict, lr: float, seed: int, budget: int) -> float:
    problem = DigitsMLP()
    model = problem.make_model(seed)
    HOLD["T"] = cfg.get("T", 0)
    per_example = cfg.get("per_example", False)
    forward = (dict(module=model, rank=cfg["rank"], num_directions=cfg.get("k", 1), per_example=per_example,
                    orthogonalize=cfg.get("orthogonalize", False)) if cfg.get("rank") else {})
    opt = zoptim.ZOSGD(model.parameters(), lr=lr, eps=1e-2, seed=seed, **forward)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=budget // opt.queries_per_step)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        while opt.num_queries + opt.queries_per_step <= budget:
            if HOLD["T"]:
                HOLD["key"] = mix(seed, 777, opt.steps // HOLD["T"])
            batch = problem.sample_batch(gen)
            opt.step(lambda b=batch: problem.losses(model, b) if per_example else problem.loss(model, b))
            schedule.step()
        final = float(problem.loss(model))
    opt.close()
    return final if math.isfinite(final) else math.inf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=3000, help="queries per run")
    ap.add_argument("--holds", type=int, nargs="+", default=[10, 50, 200], help="the T values tried")
    args = ap.parse_args()
    compact.CompactDraws.draw, compact.CompactDraws.draw_stacked = draw, draw_stacked
    plain, orth = [0.05, 0.03, 0.02], [0.1, 0.05, 0.02]
    configs = [("GA (in place)", {}, plain), ("rank 4", {"rank": 4}, plain)]
    configs += [(f"rank 4, held {t}", {"rank": 4, "T": t}, plain) for t in args.holds]
    configs += [("4 x rank 1, orth", {"rank": 1, "k": 4, "orthogonalize": True}, orth),
                ("4 x rank 4, orth", {"rank": 4, "k": 4, "orthogonalize": True}, orth)]
    configs += [(f"4 x rank 4, orth, held {t}", {"rank": 4, "k": 4, "orthogonalize": True, "T": t}, orth)
                for t in args.holds]
    configs += [("per-example rank 1", {"rank": 1, "per_example": True}, plain),
                ("per-example rank 1, orth", {"rank": 1, "per_example": True, "orthogonalize": True}, [0.05, 0.03, 0.01]),
                ("per-example rank 4, orth, held 50", {"rank": 4, "per_example": True, "orthogonalize": True, "T": 50},
                 [0.05, 0.03, 0.01])]
    print(f"digits MLP, {args.budget} queries, lr best of a 3-point grid on seed 0, seeds 0-2")
    print(f"{'configuration':36s} | {'lr':>6s} | final loss (mean +- std) | seeds")
    for name, cfg, grid in configs:
        best = min(grid, key=lambda lr: run(cfg, lr, 0, args.budget))
        finals = [run(cfg, best, seed, args.budget) for seed in range(3)]
        print(f"{name:36s} | {best:6g} | {statistics.mean(finals):.4f} +- {statistics.stdev(finals):.4f} | "
              f"{', '.join(f'{f:.4f}' for f in finals)}", flush=True)


if __name__ == "__main__":
    main()
