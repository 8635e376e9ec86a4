"""Would weighting the perturbation per tensor help? Gradient energy against Hessian trace, per tensor.

For a two-point step along ``u = W s`` (W diagonal, one weight w_j per tensor j, s ~ N(0, I)) at
its best lr, a quadratic model's expected decrease is about
``sum_j w_j^2 G_j / (2 sum_j w_j^2 T_j)``, with ``G_j = E||g_j||^2`` (minibatch gradient energy of
tensor j) and ``T_j = tr(H_jj)``. Plain directions (all w_j equal) get ``sum G / (2 sum T)``;
the best weighting puts everything on the tensor with the largest ``G_j / T_j``. So the gain any
per-tensor weighting can buy is ``max_j (G_j / T_j) / (sum G / sum T)``, the last column below.
Autograd is used here only to measure (gradients and Hutchinson's z^T H z with one
Hessian-vector product per tensor); no zoptim optimizer reads a gradient.

    .venv/bin/python benchmarks/block_curvature.py --problem digits-efficientnet --batches 8
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from zoptim.problems import get_problem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problem", default="digits-efficientnet")
    p.add_argument("--batches", type=int, default=8, help="minibatches averaged (one Hutchinson probe each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", type=float, nargs="*", metavar="LR", default=[],
                   help="then run GA (ZOSGD, cosine lr) at each LR twice, with plain directions and with the directions "
                        "weighted per tensor by w_j^2 ~ G_j / T_j as measured here (an oracle: it tests the headroom, "
                        "it is not a zeroth-order method), and print the final full loss of each")
    p.add_argument("--budget", type=int, default=1000, help="queries per --run run")
    p.add_argument("--eps", type=float, default=1e-3)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    problem = get_problem(args.problem)
    model = problem.make_model(args.seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    g = torch.Generator().manual_seed(args.seed)
    energy, trace = [0.0] * len(named), [0.0] * len(named)
    for _ in range(args.batches):
        # the math attention kernel: the fused CPU one has no double backward
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            grads = torch.autograd.grad(problem.loss(model, problem.sample_batch(g)), params, create_graph=True)
            for j, (p, gr) in enumerate(zip(params, grads)):
                energy[j] += float(gr.detach().square().sum()) / args.batches
                z = torch.randn(p.shape, generator=g)
                hz = torch.autograd.grad(gr, p, grad_outputs=z, retain_graph=True)[0]
                trace[j] += float((z * hz).sum()) / args.batches
    ratio = sum(energy) / sum(trace)
    print(f"{args.problem}: d = {sum(p.numel() for p in params):,}, {args.batches} minibatches, "
          f"sum G = {sum(energy):.4g}, tr H = {sum(trace):.4g} (1 / tr H = {1 / sum(trace):.3g})")
    print("| tensor | elements | share of G | share of tr H | (G_j / T_j) / (sum G / sum T) |")
    print("|---|---|---|---|---|")
    for (name, p), e, t in zip(named, energy, trace):
        rel = f"{(e / t) / ratio:.2f}" if t > 0 else "n/a (T_j <= 0)"
        print(f"| {name} | {p.numel():,} | {e / sum(energy):.4f} | {t / sum(trace):.4f} | {rel} |")
    if args.run:
        # w_j^2 = (G_j / T_j) / (sum G / sum T), floored at 1 % of the largest, then normalised so
        # sum_j w_j^2 d_j = d (the same total noise as plain directions)
        raw = [max(e / t, 0.0) if t > 0 else 0.0 for e, t in zip(energy, trace)]
        raw = [max(r, 0.01 * max(raw)) for r in raw]
        dims = [p.numel() for p in params]
        norm = sum(dims) / sum(r * n for r, n in zip(raw, dims))
        weights = [(r * norm) ** 0.5 for r in raw]
        print(f"\nGA, {args.budget} queries, eps {args.eps:g}, seed {args.seed}: final full-data loss")
        print("| lr | plain directions | weighted per tensor (oracle) |")
        print("|---|---|---|")
        for lr in args.run:
            plain = _run_ga(problem, args.seed, lr, args.eps, args.budget, None)
            weighted = _run_ga(problem, args.seed, lr, args.eps, args.budget, weights)
            print(f"| {lr:g} | {plain:.4f} | {weighted:.4f} |", flush=True)
    return 0


def _run_ga(problem, seed: int, lr: float, eps: float, budget: int, weights) -> float:
    """GA's step along ``W s``: queries at x +- eps W s, update -lr gamma W s (per-tensor scales)."""
    import zoptim
    from zoptim.optim.step import Query

    class Weighted(zoptim.ZOSGD):
        def _queries(self):
            key, w = self.direction_key(0), weights
            f_plus = yield Query(key, [eps * x for x in w])
            f_minus = yield Query(key, [-eps * x for x in w])
            gamma = (f_plus - f_minus) / (2 * eps)
            self.engine.update([(key, [-self.param_groups[0]["lr"] * gamma * x for x in w])])
            return 0.5 * (f_plus + f_minus)

    model = problem.make_model(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (zoptim.ZOSGD if weights is None else Weighted)(params, lr=lr, eps=eps, seed=seed)
    steps = budget // 2
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        opt.step(problem.closure(model, problem.sample_batch(g)))
        sched.step()
    return problem.full_loss(model)


if __name__ == "__main__":
    raise SystemExit(main())
