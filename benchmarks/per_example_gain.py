"""What per-example directions can gain on a problem: tr(Sigma) / |g|^2 from autograd.

With g the minibatch gradient and Sigma the covariance of the B per-example gradients, the
back-of-envelope variance comparison of issue 23 between the two-point estimate along one shared
direction and the per-example estimate (1/B) sum_i delta_i s_i predicts a saving in queries of

    predicted saving = (B |g|^2 + tr Sigma) / (|g|^2 + tr Sigma)

(B when the examples agree, tr Sigma << |g|^2; none when tr Sigma >> B |g|^2).

This script measures |g|^2 and tr Sigma with autograd (a measurement aid, not a method) on a few
minibatches of each bench problem, at its starting point, and prints the prediction; the measured
saving is the ratio of the bench's GA@1 figures (ZOSGD-perexample against ZOSGD).

With ``sparse_embeddings=True`` each example's estimate keeps, of an embedding matrix, only the rows
that example looked up. A two-point estimate along a Gaussian direction has E|delta s|^2 about
(d + 2) |g|^2, so dropping the other rows' coordinates divides its noise by about d / d_eff, with
d_eff = d minus the rows not looked up times their width: the last column, from the ids the
examples' embedding lookups saw (1.00x for a model without embeddings, or with its embedding tied to
the output layer).

    python benchmarks/per_example_gain.py [--problems digits-efficientnet fashion-efficientnet lm-smollm2-trec]
"""

from __future__ import annotations

import argparse

import torch

import zoptim
from zoptim.problems import get_problem


def gradient_statistics(problem, batches: int = 4, seed: int = 0) -> tuple[float, float, int]:
    """(|g|^2, tr Sigma, B) averaged over ``batches`` minibatches at the problem's starting point."""
    model = problem.make_model(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1_000_003 * (seed + 1))
    g2, tr, size = 0.0, 0.0, 0
    dim = sum(p.numel() for p in params)
    embeddings = sparse_embeddings(model, params)
    seen: dict[int, set] = {}
    def record(module, args, out):
        seen.setdefault(id(module), set()).update(args[0].reshape(-1).tolist())

    hooks = [m.register_forward_hook(record) for m in embeddings]
    effective = []
    for _ in range(batches):
        batch = problem.sample_batch(gen)
        size = len(batch)
        per = []
        for i in range(size):
            seen.clear()
            loss = problem.losses(model, batch[i : i + 1]).sum()
            effective.append(dim - sum((m.num_embeddings - len(seen.get(id(m), ()))) * m.embedding_dim
                                       for m in embeddings))
            grads = torch.autograd.grad(loss, params, allow_unused=True)  # e.g. a pooler the loss does not use
            per.append(torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1)
                                  for p, t in zip(params, grads)]).double())
        per = torch.stack(per)
        mean = per.mean(0)
        g2 += float(mean.square().sum()) / batches
        tr += float((per - mean).square().sum(1).mean()) / batches
    for h in hooks:
        h.remove()
    return g2, tr, size, dim / (sum(effective) / len(effective))


def sparse_embeddings(model, params) -> list:
    """The nn.Embedding modules whose weight ``sparse_embeddings=True`` masks (the forward engine's
    ``sparse_rows``: not tied to another layer)."""
    probe = zoptim.ZOSGD(params, lr=0.0, module=model, rank=1, sparse_embeddings=True)
    masked = {id(params[j]) for j in probe.engine.sparse_rows}
    probe.close()
    return [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and id(m.weight) in masked]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", nargs="+", default=["digits-efficientnet", "fashion-efficientnet", "lm-smollm2-trec"])
    ap.add_argument("--batches", type=int, default=4)
    args = ap.parse_args()
    print(f"{'problem':24s} {'B':>4s} {'|g|^2':>11s} {'tr Sigma':>11s} {'trS/|g|^2':>10s} {'predicted saving':>17s} "
          f"{'sparse embeddings d/d_eff':>26s}")
    for name in args.problems:
        problem = get_problem(name)
        g2, tr, size, sparse = gradient_statistics(problem, args.batches)
        saving = (size * g2 + tr) / (g2 + tr)
        print(f"{name:24s} {size:4d} {g2:11.4g} {tr:11.4g} {tr / g2:10.2f} {saving:16.2f}x {sparse:25.2f}x", flush=True)


if __name__ == "__main__":
    main()
