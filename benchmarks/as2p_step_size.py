"""Why AS2P is slow on the LM task: its step is tied to eps, and is a few times smaller than GA's.

AS2P (S2P paper, Algorithm 2) moves by |alpha_k| = lr_k * gamma'_k / (eta_b * sigma_k), with lr_k a
cosine decay from ``lr`` and, by default (the paper's choice), ``lr = eps``. GA (ZOSGD) moves by
lr * |gamma_k|. This script runs, on one problem and seed, GA at its lr and AS2P with lr tied to
eps and with lr decoupled (``AS2P(lr=...)``), at the same query budget, and prints for each the
median |step| per unit direction over the run and the final full-data loss.

    .venv/bin/python benchmarks/as2p_step_size.py --problem lm-minilm-trec --budget 1000 \
        --ga-lr 1e-3 --eps 1e-3 --as2p-lrs 3e-3 1e-2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import zoptim
from zoptim.problems import get_problem


def run(problem, make_opt, steps: int, seed: int, scheduled: bool) -> tuple[float, float]:
    model = problem.make_model(seed)
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if scheduled else None
    g = torch.Generator().manual_seed(seed)
    sizes = []
    for _ in range(steps):
        opt.step(problem.closure(model, problem.sample_batch(g)))
        sizes.append(opt.last_stats["step_size"])
        if sched is not None:
            sched.step()
    return statistics.median(sizes), problem.full_loss(model)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problem", default="lm-minilm-trec")
    p.add_argument("--budget", type=int, default=1000, help="function queries per run (2 per step)")
    p.add_argument("--ga-lr", type=float, default=1e-3)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--eta-b", type=float, default=1.0)
    p.add_argument("--as2p-lrs", type=float, nargs="*", default=[3e-3, 1e-2])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    problem = get_problem(args.problem)
    steps = args.budget // 2
    rows = [("GA (ZOSGD)", f"lr {args.ga_lr:g}", lambda ps: zoptim.ZOSGD(ps, lr=args.ga_lr, eps=args.eps, seed=args.seed), True),
            ("AS2P", f"lr tied to eps ({args.eps:g}), eta_b {args.eta_b:g}",
             lambda ps: zoptim.AS2P(ps, eps=args.eps, eta_b=args.eta_b, total_steps=steps, seed=args.seed), False)]
    for lr in args.as2p_lrs:
        rows.append(("AS2P", f"lr {lr:g} (decoupled), eta_b {args.eta_b:g}",
                     lambda ps, lr=lr: zoptim.AS2P(ps, eps=args.eps, eta_b=args.eta_b, total_steps=steps, lr=lr,
                                                   seed=args.seed), False))
    print(f"{args.problem}, {args.budget} queries, seed {args.seed}, start loss {problem.full_loss(problem.make_model(args.seed)):.4f}")
    print("| method | setting | median step per unit direction | ratio to GA's | final loss | wall s |")
    print("|---|---|---|---|---|---|")
    ga_step = None
    for name, setting, make, scheduled in rows:
        t = time.perf_counter()
        step, loss = run(problem, make, steps, args.seed, scheduled)
        ga_step = step if ga_step is None else ga_step
        print(f"| {name} | {setting} | {step:.3g} | {step / ga_step:.2f} | {loss:.4f} | {time.perf_counter() - t:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
