"""What atomic moves cost: the in-place engine's two-point step against the same step less its chunk backups.

Each chunk of a move is copied to a scratch buffer before the fused kernel writes it
(``src/zoptim/engine/inplace.py``, "Atomic moves"), one extra memory-bound pass over the weights
per move. This script times the three moves of a ZOSGD step (``0 -> +eps``, ``+eps -> -eps``,
``-eps -> update``, exact-restore journal on) over float32 tensors of MiniLM's size (22.7M
values), and, interleaved with it, the backups alone: the same chunk-by-chunk copies into one
scratch buffer, three passes. It prints the ratio step / (step - backups) of the medians at each
thread count. The compiled kernels are the default route; they compile on the first steps
(warm-up).

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


def backups(engine: SeededPerturbation) -> None:
    """The copies a step's three moves make before writing each chunk (what atomicity adds)."""
    for _ in range(3):
        for p in engine.params:
            flat = p.view(-1)
            for a in range(0, flat.numel(), engine.chunk_size):
                b = min(a + engine.chunk_size, flat.numel())
                engine._buffer(p.device, "B", b - a, p.dtype).copy_(flat[a:b])


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
        engine = SeededPerturbation(params)
        for k in range(3):  # warm-up: compile and allocate
            step(engine, k)
            backups(engine)
        times = {"step": [], "backups": []}
        for k in range(args.reps):
            for what in ("step", "backups") if k % 2 == 0 else ("backups", "step"):
                start = time.perf_counter()
                step(engine, 100 + k) if what == "step" else backups(engine)
                times[what].append(time.perf_counter() - start)
        on, copies = statistics.median(times["step"]), statistics.median(times["backups"])
        print(f"threads {threads or default}: step {on * 1e3:.1f} ms, its backups {copies * 1e3:.1f} ms: "
              f"ratio {on / (on - copies):.3f}")

if __name__ == "__main__":
    main()
