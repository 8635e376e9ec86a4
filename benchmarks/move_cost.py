"""Where a step's time goes: the engine's moves on one MiniLM-sized tensor, against the memory floor.

One float32 tensor of 22.7M elements (all-MiniLM-L6-v2's size), randn values, eps 1e-3:

* floor: ``p.add_(1e-3)``, one read-and-write pass, what any move costs at least;
* ``torch.randn(d)``: torch's own generator, for scale;
* the engine's three moves of a two-point step: ``0 -> +eps`` and ``+eps -> -eps`` (temporary:
  exactness check and journal), ``-eps -> update`` (final), per distribution;
* ``nonzero`` on one 2**20-element chunk of marks at 4 % density (the journal's index extraction).

    python benchmarks/move_cost.py [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, reps: int = 5) -> float:
    fn()
    out = []
    for _ in range(reps):
        a = time.perf_counter()
        fn()
        out.append(time.perf_counter() - a)
    return statistics.median(out) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--numel", type=int, default=22_700_000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from zoptim.engine import kernels
    from zoptim.engine.inplace import SeededPerturbation

    g = torch.Generator().manual_seed(0)
    p = torch.randn(args.numel, generator=g)
    print(f"# {args.numel:,} float32 elements, {torch.get_num_threads()} thread(s), "
          f"compiled route: {kernels.compile_allowed(p.device)}")
    print(f"floor, p.add_(1e-3): {timed(lambda: p.add_(1e-3)):.0f} ms")
    print(f"torch.randn(d): {timed(lambda: torch.randn(p.shape)):.0f} ms")
    marks = (torch.rand(1 << 20, generator=g) < 0.04).to(torch.int32)
    print(f"nonzero on a 2**20 chunk of marks at 4 %: {timed(lambda: marks.nonzero(), 20):.1f} ms "
          f"(x {-(-args.numel // (1 << 20))} chunks per temporary move)")
    for distribution in ("rademacher", "normal"):
        engine = SeededPerturbation([p], distribution=distribution)
        times = {"0 -> +eps (temporary)": [], "+eps -> -eps (temporary)": [], "-eps -> update (final)": []}
        for k in range(4):  # the first compiles the kernels
            key = 1000 + k
            a = time.perf_counter()
            engine.move(key, 1e-3)
            b = time.perf_counter()
            engine.move(key, -1e-3)
            c = time.perf_counter()
            engine.update([(key, 1e-6)])
            d = time.perf_counter()
            if k:
                for name, t in zip(times, (b - a, c - b, d - c)):
                    times[name].append(t * 1000)
        print(f"{distribution}: " + ", ".join(f"{n} {statistics.median(t):.0f} ms" for n, t in times.items()))


if __name__ == "__main__":
    main()
