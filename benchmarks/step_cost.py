"""Step cost of zeroth-order optimizers against the cost of inference, on two real models.

For all-MiniLM-L6-v2 and SmolLM2-135M with a batch of 8 x 64 tokens, prints for each
configuration

* time ratio: time of one optimizer step / time of two no-grad forward passes on the same batch
  (both measured in the same process, interleaved, median over repetitions of the per-repetition
  ratio), and
* memory ratio: peak resident memory of a process doing steps / peak of a process doing only
  inference (each configuration runs in its own subprocess; the peak is the kernel's high-water
  mark VmHWM, reset after the model is loaded so that loading does not count; ``ru_maxrss`` is
  printed too).

Configurations: zoptim ZOSGD and AS2P with normal and Rademacher directions (exact restore, the
default, and ZOSGD normal with ``exact_restore=False``; ``-eager`` rows with ``ZOPTIM_COMPILE=0``;
``-forward`` rows with forward-applied rank-1 directions, ``module=model, rank=1``, ``-forward-r4`` rank 4,
``-frozenemb`` with the embedding block not tuned (:func:`zoptim.lm.models.freeze_embeddings`) (these two on
request, ``--configs``, MiniLM only); ``-perexample`` rows
with one rank-1 direction per example, ``-orth`` with the orthogonalised update, ``orthogonalize=True``,
``-sparse`` with the embeddings updated in their looked-up rows, ``sparse_embeddings=True``), a MeZO-style
reference step written from
the paper (``mezo_reference.py``), torchzero's MeZO module if it is installed, and AdamW.

    python benchmarks/step_cost.py [--models minilm smollm2 efficientnet] [--threads 1] [--reps 7]

``efficientnet`` is the quick suite's trainable part of EfficientNet-Lite0 (conv_head, bn1, a new
fc; 425k weights) on its cached digits features, batch 64, as ``zoptim bench --suite quick`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = [
    "inference",
    "zosgd-normal",
    "zosgd-rademacher",
    "as2p-normal",
    "as2p-rademacher",
    "zosgd-normal-forward",
    "zosgd-rademacher-forward",
    "as2p-normal-forward",
    "as2p-rademacher-forward",
    "zosgd-normal-perexample",
    "zosgd-normal-perexample-orth",
    "zosgd-normal-perexample-sparse",
    "zosgd-normal-perexample-orth-sparse",
    "zosgd-normal-inexact",
    "zosgd-normal-eager",
    "as2p-rademacher-eager",
    "mezo-reference",
    "torchzero-mezo",
    "adamw",
]
BATCH, TOKENS = 8, 64


# -- worker: one configuration in its own process ---------------------------------------------------
def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _model_and_loss(name: str):
    import torch

    from zoptim.lm.models import load_model

    gen = torch.Generator().manual_seed(0)
    if name == "efficientnet":
        from zoptim.problems.vision import DigitsEfficientNet

        problem = DigitsEfficientNet()
        model = problem.make_model(0)
        batch = problem.sample_batch(gen)
        return model, lambda per_example=False: problem.closure(model, batch, per_example=per_example)()
    model, _ = load_model(name, torch.float32)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, TOKENS), generator=gen)
    if name == "smollm2":
        def loss_fn(per_example=False):
            if not per_example:
                return model(input_ids=ids, labels=ids).loss
            logits = model(input_ids=ids).logits[:, :-1]
            return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
    else:
        # A linear probe on the mean-pooled encoder output (the head starts random, as a
        # classification head would).
        head = torch.nn.Linear(model.config.hidden_size, 2)
        labels = torch.randint(0, 2, (BATCH,), generator=gen)
        model = torch.nn.ModuleDict({"encoder": model, "head": head})

        def loss_fn(per_example=False):
            hidden = model["encoder"](input_ids=ids).last_hidden_state.mean(1)
            return torch.nn.functional.cross_entropy(model["head"](hidden), labels,
                                                     reduction="none" if per_example else "mean")
    return model, loss_fn


def _optimizer(config: str, model):
    import torch

    import zoptim

    if config.endswith("-frozenemb"):  # the embedding block left out (MiniLM's best bench row)
        from zoptim.lm.models import freeze_embeddings

        freeze_embeddings(model)
    params = [p for p in model.parameters() if p.requires_grad]
    forward = dict(module=model, rank=1) if config.endswith("-forward") else {}
    if "-forward-r4" in config:
        forward = dict(module=model, rank=4)
    if "-perexample" in config:
        forward = dict(module=model, rank=1, per_example=True, orthogonalize="-orth" in config,
                       sparse_embeddings=config.endswith("-sparse"))
    if config.startswith("zosgd"):
        dist = config.split("-")[1]
        return zoptim.ZOSGD(params, lr=1e-6, eps=1e-3, distribution=dist,
                            exact_restore=not config.endswith("inexact"), **forward)
    if config.startswith("as2p"):
        return zoptim.AS2P(params, eps=1e-3, distribution=config.split("-")[1], batch_mode="full", **forward)
    if config == "mezo-reference":
        sys.path.insert(0, HERE)
        from mezo_reference import MeZOReference

        return MeZOReference(params, lr=1e-6, eps=1e-3)
    if config == "torchzero-mezo":
        import torchzero as tz

        return tz.Optimizer(params, tz.m.MeZO(h=1e-3, distribution="normal"), tz.m.LR(1e-6))
    if config == "adamw":
        return torch.optim.AdamW(params, lr=1e-6)
    raise ValueError(config)


def worker(name: str, config: str, reps: int, threads: int) -> dict:
    label = config
    if config.endswith("-eager"):  # zoptim's eager kernels (same values), without torch.compile
        os.environ["ZOPTIM_COMPILE"] = "0"
        config = config[: -len("-eager")]
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    model, loss_fn = _model_and_loss(name)
    # Weights load memory-mapped; inference touches only the embedding rows of its tokens, a
    # training step writes every weight. Copy all weights into anonymous memory first so that
    # both baselines hold the whole model resident (else MiniLM's 47 MB embedding table shows up
    # as a 'cost' of any optimizer).
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    import gc

    gc.collect()

    def two_forwards():
        with torch.no_grad():
            loss_fn()
            loss_fn()

    two_forwards()  # warm-up: first-call allocations belong to inference too
    opt = None if config == "inference" else _optimizer(config, model)
    if config == "adamw":
        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            opt.step()
    elif config == "torchzero-mezo":
        def step():
            def closure(backward=True):
                return loss_fn()
            with torch.no_grad():
                opt.step(closure)
    elif opt is not None:
        per_example = "-perexample" in config

        def step():
            opt.step(lambda: loss_fn(per_example))
    _reset_hwm()
    ratios, t_inf, t_step, first = [], [], [], None
    for r in range(reps + 1):
        a = time.perf_counter()
        two_forwards()
        b = time.perf_counter()
        if opt is not None:
            step()
        c = time.perf_counter()
        if r == 0:
            first = c - b  # allocations and, for zoptim, compiling the fused kernels: reported apart
            continue
        t_inf.append(b - a)
        if opt is not None:
            t_step.append(c - b)
            ratios.append((c - b) / (b - a))
    return {
        "model": name,
        "config": label,
        "two_forwards_s": statistics.median(t_inf),
        "step_s": statistics.median(t_step) if t_step else None,
        "time_ratio": statistics.median(ratios) if ratios else 1.0,
        "first_step_s": first if opt is not None else None,
        "threads": torch.get_num_threads(),
        "peak_kib": _hwm_kib(),
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


# -- driver ---------------------------------------------------------------------------------------------
def _available(config: str) -> bool:
    if config != "torchzero-mezo":
        return True
    import importlib.util

    return importlib.util.find_spec("torchzero") is not None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2", "efficientnet"])
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--reps", type=int, default=0, help="repetitions (default 9 MiniLM, 4 SmolLM2)")
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 1],
                    help="torch intra-op thread counts to measure; 0 = torch's default (default: 0 1)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args.reps, args.threads[0])), flush=True)
        return
    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"batch {BATCH} x {TOKENS} tokens; time ratio = step / two no-grad forwards, memory ratio = "
          "peak RSS / inference process; first = the first step (zoptim: compiling the fused kernels)")
    results = []
    for threads in args.threads:
        label = f"torch's default ({torch.get_num_threads()})" if threads == 0 else str(threads)
        for name in args.models:
            reps = args.reps or {"minilm": 9, "smollm2": 4}.get(name, 30)
            base = None
            print(f"\n## {name}, {label} intra-op thread(s)\n{'configuration':24s} {'2 fwd (s)':>9s} {'step (s)':>9s} "
                  f"{'time ratio':>10s} {'peak MiB':>9s} {'mem ratio':>9s} {'first (s)':>9s}", flush=True)
            for config in args.configs:
                if not _available(config):
                    print(f"{config:24s} (not installed)")
                    continue
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, config,
                       "--reps", str(reps), "--threads", str(threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{config:24s} FAILED: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                res = json.loads(line[7:])
                if config == "inference":
                    base = res["peak_kib"]
                res["mem_ratio"] = res["peak_kib"] / base if base else None
                results.append(res)
                step = f"{res['step_s']:9.3f}" if res["step_s"] is not None else f"{'-':>9s}"
                mem = f"{res['mem_ratio']:9.3f}" if res["mem_ratio"] else f"{'-':>9s}"
                first = f"{res['first_step_s']:9.1f}" if res.get("first_step_s") is not None else f"{'-':>9s}"
                print(f"{config:24s} {res['two_forwards_s']:9.3f} {step} {res['time_ratio']:10.2f} "
                      f"{res['peak_kib'] / 1024:9.0f} {mem} {first}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
