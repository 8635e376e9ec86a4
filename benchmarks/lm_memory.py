"""Memory and time of fine-tuning a language model: inference vs zoptim (full, LoRA) vs AdamW.

A table like MeZO's (Malladi et al. 2023, Table 4 / Fig. 3): the same batch (8 x 64 tokens) and the
same prompt loss (cross-entropy over two label words' logits at the last position) in every
configuration; each configuration runs in its own subprocess so peak memory is its own.

    .venv/bin/python benchmarks/lm_memory.py --model smollm2 --steps 3 --out docs/results/lm/memory_smollm2.json

Reported per configuration: peak resident memory during the steps (sampled every 2 ms from
/proc/self/statm by a thread), the process's peak from ``resource.getrusage`` (includes loading),
and the median seconds per step (a ZO step is two forward passes; an AdamW step is forward,
backward and update; inference is one forward pass). Ratios are to inference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

CONFIGS = ("inference", "zoptim-full", "zoptim-lora", "zoptim-momentum", "zoptim-momentum-inexact", "hizoo-full",
           "hizoo-factored", "adamw-full", "adamw-lora")


class PeakRSS:
    """Samples the current resident set size in a thread; ``peak`` in bytes."""

    def __init__(self, interval=0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.page = os.sysconf("SC_PAGE_SIZE")

    def current(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def child(config: str, model_name: str, steps: int, batch: int, seq: int) -> dict:
    import torch
    import torch.nn.functional as F

    import zoptim
    from zoptim.lm.models import apply_lora, load_model

    model, tokenizer = load_model(model_name)
    if config.endswith("lora"):  # every other zoptim / hizoo configuration tunes all parameters
        model = apply_lora(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, tokenizer.vocab_size, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (batch,), generator=g)
    label_ids = torch.tensor(tokenizer.encode(" negative positive", add_special_tokens=False)[:2])

    def loss():
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1, label_ids]
        return F.cross_entropy(logits, labels)

    params = [p for p in model.parameters() if p.requires_grad]
    if config == "inference":
        def step():
            with torch.no_grad():
                loss()
    elif config.startswith(("zoptim", "hizoo")):
        if config.startswith("zoptim-momentum"):  # the memory-free seed momentum: m (key, coefficient) pairs
            # "-inexact": without the exact-restore journal (MeZO's arithmetic round trip)
            opt = zoptim.ZOSGD(params, lr=1e-6, eps=1e-3, momentum=0.9, momentum_window=8,
                               exact_restore=not config.endswith("inexact"))
        elif config.startswith("hizoo"):  # a Hessian estimate: dense (a float32 copy) or factored (rows + cols)
            opt = zoptim.HiZOO(params, lr=1e-6, eps=1e-3, factored=config == "hizoo-factored")
        else:
            opt = zoptim.ZOSGD(params, lr=1e-6, eps=1e-3)

        def step():
            opt.step(loss)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()

    times = []
    with PeakRSS() as rss:
        for _ in range(steps + 1):  # the first step warms up (and allocates AdamW's state)
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    return {
        "config": config,
        "trainable_params": sum(p.numel() for p in params),
        "peak_rss_steps_mb": rss.peak / 2**20,
        "peak_rss_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds_per_step": statistics.median(times[1:]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--out", default=None, help="write the JSON (and a .md table beside it) here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        print(json.dumps(child(args.child, args.model, args.steps, args.batch, args.seq)))
        return 0
    rows = []
    for config in args.configs.split(","):
        if config not in CONFIGS:
            raise SystemExit(f"--configs: unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")
        cmd = [sys.executable, __file__, "--child", config, "--model", args.model, "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = next((r for r in rows if r["config"] == "inference"), rows[0])
    lines = [
        f"{args.model}, batch {args.batch} x {args.seq} tokens, median of {args.steps} steps after one warm-up",
        "",
        "| configuration | trainable params | peak RSS during steps (MB) | ratio to inference | "
        "process peak RSS (MB) | s/step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        r["rss_ratio"] = r["peak_rss_steps_mb"] / base["peak_rss_steps_mb"]
        lines.append(
            f"| {r['config']} | {r['trainable_params']:,} | {r['peak_rss_steps_mb']:.0f} | {r['rss_ratio']:.2f} | "
            f"{r['peak_rss_process_mb']:.0f} | {r['seconds_per_step']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "batch": args.batch, "seq": args.seq, "rows": rows},
                                             indent=2))
        Path(args.out).with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
