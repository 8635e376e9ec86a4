"""What exact restore costs in memory: journal bytes after one perturbation of the real models.

    python benchmarks/journal_memory.py [--models minilm smollm2] [--eps 1e-3]

Prints, per model, dtype and distribution, the fraction of elements journaled and the journal's
size in bytes per parameter and in MiB (``SeededPerturbation.journal_bytes`` right after
``move(key, eps)``, when the journal is largest).
"""

from __future__ import annotations

import argparse

import torch

from zoptim.engine.inplace import SeededPerturbation
from zoptim.lm.models import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    ap.add_argument("--eps", type=float, default=1e-3)
    args = ap.parse_args()
    print(f"{'model':8s} {'dtype':9s} {'distribution':12s} {'journaled':>9s} {'B/param':>8s} {'MiB':>7s} {'params MiB':>10s}")
    for name in args.models:
        for dtype in (torch.float32, torch.bfloat16):
            model, _ = load_model(name, dtype)
            params = [p for p in model.parameters() if p.requires_grad]
            d = sum(p.numel() for p in params)
            for dist in ("normal", "rademacher"):
                engine = SeededPerturbation(params, distribution=dist)
                engine.move(12345, args.eps)
                frac, nbytes = engine.journal_elements() / d, engine.journal_bytes()
                engine.restore()
                print(f"{name:8s} {str(dtype)[6:]:9s} {dist:12s} {frac:9.2%} {nbytes / d:8.3f} "
                      f"{nbytes / 2**20:7.1f} {d * params[0].element_size() / 2**20:10.0f}", flush=True)
            del model, params


if __name__ == "__main__":
    main()
