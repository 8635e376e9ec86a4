"""What atomic moves cost: the in-place engine's two-point step with and without the chunk backups.

Each chunk of a move is copied to a scratch buffer before the fused kernel writes it
(``src/zoptim/engine/inplace.py``, "Atomic moves"), one extra memory-bound pass over the weights
per move. This script times the three moves of a ZOSGD step (``0 -> +eps``, ``+eps -> -eps``,
``-eps -> update``, exact-restore journal on) over float32 tensors of MiniLM's size (22.7M
values), with the backups on and off, interleaved in one process, and prints the ratio of the
medians at each thread count. The compiled kernels are the default route; they compile on the
first steps (warm-up).

    python benchmarks/atomic_cost.py [--threads 0 1] [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zoptim.engine.inplace import SeededPerturbation


def step(engine: SeededPerturbation, k: int, eps: float = 1e-3) -> None:
    engine.move(k, eps)
    engine.move(k, -eps)
    engine.update([(k, -1e-5)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="0: torch's default")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    default = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    sizes = [30522 * 384, 1536 * 384] * 2 + [384 * 384] * 24  # MiniLM-like: embeddings, FFN, attention
    params = [torch.randn(n, generator=g) * 0.02 for n in sizes]
    print(f"{sum(sizes) / 1e6:.1f}M float32 values in {len(sizes)} tensors")
    for threads in args.threads:
        torch.set_num_threads(threads or default)
        engines = {}
        for atomic in (True, False):
            engine = SeededPerturbation(params)
            engine._atomic = atomic
            for k in range(3):  # warm-up: compile and allocate
                step(engine, k)
            engines[atomic] = engine
        times = {True: [], False: []}
        for k in range(args.reps):
            for atomic in (True, False) if k % 2 == 0 else (False, True):
                start = time.perf_counter()
                step(engines[atomic], 100 + k)
                times[atomic].append(time.perf_counter() - start)
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(f"threads {threads or default}: step {on * 1e3:.1f} ms with backups, {off * 1e3:.1f} ms without: "
              f"ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
