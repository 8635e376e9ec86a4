"""Does a bfloat16 zeroth-order run of SmolLM2 (all 134.5M weights) move, and does exact restore matter?

For each configuration it loads SmolLM2 afresh, takes a few steps on the seeded rt-sentiment
minibatches that ``zoptim finetune --seed 0`` draws, and after every step counts the weights that
differ from the pretrained ones, with the step's coefficient (``last_stats["step_size"]``: the
factor multiplying the unit-variance direction z in the update). Configurations: ZOSGD (MeZO's
full-parameter lr 1e-6, eps 1e-3) and AS2P (rho_0 1e-3, eta_b 50, total_steps 500) in bfloat16
with and without exact restore, and ZOSGD in float32 as the reference. No accuracy here: see
docs/finetune.md for the runs.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lm_bf16_restore.py --steps 4 --out docs/results/lm/bf16_restore.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from zoptim.lm.data import load_task
from zoptim.lm.models import load_model
from zoptim.lm.prompts import PromptClassifier, get_prompt
from zoptim.lm.train import make_optimizer

CONFIGS = [
    ("zosgd", "bf16", True),
    ("zosgd", "bf16", False),
    ("as2p", "bf16", True),
    ("as2p", "bf16", False),
    ("zosgd", "fp32", True),
]


def run(method, dtype, exact, steps, batch_size, seed=0):
    model, tok = load_model("smollm2", dtype=dtype)
    clf = PromptClassifier(model, tok, get_prompt("rt-sentiment"), kind="causal", max_length=64)
    start = {n: p.detach().clone() for n, p in clf.named_parameters()}
    total = sum(p.numel() for p in start.values())
    opt = make_optimizer(method, clf.parameters(), steps=500, lora=False, seed=seed, exact_restore=exact)
    task = load_task("rt-sentiment", seed=seed)
    gen = torch.Generator().manual_seed(seed)  # the same minibatches as zoptim.lm.train.Loop
    rows = []
    for step in range(1, steps + 1):
        idx = torch.randint(len(task.train), (batch_size,), generator=gen).tolist()
        batch = [task.train[i] for i in idx]
        t = time.perf_counter()
        loss = float(opt.step(lambda batch=batch: clf.loss(batch)))
        changed, largest = 0, 0.0
        with torch.no_grad():
            for n, p in clf.named_parameters():
                diff = p != start[n]
                changed += int(diff.sum())
                if diff.any():
                    largest = max(largest, float((p.float() - start[n].float()).abs().max()))
        row = {"step": step, "loss": loss, "step_size": float(opt.last_stats.get("step_size", float("nan"))),
               "changed_fraction": changed / total, "max_abs_change": largest, "seconds": time.perf_counter() - t}
        rows.append(row)
        print(method, dtype, "exact" if exact else "no-exact", row, flush=True)
    return {"method": method, "dtype": dtype, "exact_restore": exact, "parameters": total, "steps": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results = [run(m, d, e, args.steps, args.batch_size) for m, d, e in CONFIGS]
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
