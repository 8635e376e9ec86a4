"""Convergence per query with zoptim's fast noise against torch's own generator.

Runs ZOSGD (normal and Rademacher directions) and AS2P on the 1,000-dimensional ill-conditioned
quadratic and on the regularised softmax regression of the softmax paper, for several seeds, once
with ``NoiseSource(sampler="fast")`` (the default) and once with ``sampler="torch"``
(``torch.randn`` / ``torch.rand``), and prints the final optimality gap relative to the start:
median and range over seeds. Equal quality means the fast sampler's median lies within the
torch sampler's seed-to-seed range.

    python benchmarks/noise_quality.py [--seeds 8]
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch

import zoptim
from zoptim.engine.noise import NoiseSource
from zoptim.problems import Quadratic, SoftmaxRegression

METHODS = {
    "zosgd-normal": (zoptim.ZOSGD, dict(lr=1 / 1002), dict(lr=0.3)),
    "zosgd-rademacher": (zoptim.ZOSGD, dict(lr=1e-3, distribution="rademacher"), dict(lr=0.3, distribution="rademacher")),
    "as2p-normal": (zoptim.AS2P, dict(eps=0.1, batch_mode="full"), dict(eps=0.1, batch_mode="full")),
}


def run(problem, budget, cls, kw, seed, sampler, l_star=0.0):
    model = problem.make_model()
    opt = cls(model.parameters(), seed=seed, **kw)
    opt.engine.noise = NoiseSource(opt.engine.noise.distribution, sampler)
    start = problem.full_loss(model) - l_star
    while opt.num_queries < budget:
        opt.step(partial(problem.loss, model, None))
    return (problem.full_loss(model) - l_star) / start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    quad = Quadratic(dim=1000, cond=1000.0)
    soft = SoftmaxRegression(n=32, d=16, num_samples=64, R=4.0, cond=4.0, reg=0.01)
    problems = [("quadratic d=1000", quad, 6000, 0.0, 1), ("softmax regression", soft, 4000, soft.minimum(), 2)]
    print(f"{'problem':20s} {'method':18s} {'sampler':7s} {'median gap ratio':>16s} {'min':>9s} {'max':>9s}")
    for pname, problem, budget, l_star, col in problems:
        for mname, spec in METHODS.items():
            cls, kw = spec[0], spec[col]
            for sampler in ("fast", "torch"):
                r = [run(problem, budget, cls, kw, s, sampler, l_star) for s in range(args.seeds)]
                print(f"{pname:20s} {mname:18s} {sampler:7s} {statistics.median(r):16.3e} {min(r):9.3e} {max(r):9.3e}",
                      flush=True)


if __name__ == "__main__":
    main()
