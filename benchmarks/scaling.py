"""Scaling out: 1 and 2 processes (gloo, one intra-op thread each) in every mode of zoptim.distributed.wrap.

    python benchmarks/scaling.py [--model minilm|smollm2] [--steps 12] [--max-procs 2] [--out FILE.json]

Models: all-MiniLM-L6-v2 with a linear probe on its mean-pooled output (as ``step_cost.py``, 22.7M
weights, a batch of 16 x 64 tokens per process), or SmolLM2-135M with its language-model loss (a
batch of 4 x 64 tokens per process); every weight trainable. Printed:

* MiniLM only, throughput: bytes sent per step per worker (the payload this rank hands to
  collectives, counted by the wrapper) next to what DistributedDataParallel all-reduces for the
  same model (4 d bytes a step); batch mode samples per second (weak scaling: 2 processes see
  twice the samples); directions mode directions per second (ZOSGD, 2 queries each).
* Both models, memory: the worst rank's peak resident memory (VmHWM) during the steps (reset
  after the model is built) and over the whole process life (build included), against one
  unsharded process, for: one process (in place; and with ``module=model, rank=1``); FSDP2 as
  before issue 25 (the whole model loaded then sharded, in place, glibc's default allocator);
  FSDP2 in place with ``wrap``'s ``release_memory`` (the default); FSDP2 built with
  ``zoptim.lm.models.load_sharded`` (meta device, each rank reads its rows) and rank-1
  directions in the forward (at 2 and up to ``--max-procs`` processes), with the input embedding
  sharded (the default) or replicated (``shard_embeddings=False``); and FSDP2 + AdamW with
  backward passes (built the same way), what a user would otherwise run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

BATCHES = {"minilm": (16, 64), "smollm2": (4, 64)}  # examples x tokens per process
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from step_cost import _hwm_kib, _reset_hwm  # noqa: E402

#: the memory table's rows: (label, processes, how the model is built, optimizer, release_memory)
MEMORY_ROWS = [
    ("1 process, unsharded, in place", 1, "full", "zosgd", False),
    ("1 process, unsharded, rank-1 forward", 1, "full", "zosgd-forward", False),
    ("FSDP2, in place, full load, default allocator (before issue 25)", 2, "full", "zosgd", False),
    ("FSDP2, in place, full load, release_memory", 2, "full", "zosgd", True),
    ("FSDP2, load_sharded, rank-1 forward, release_memory", 2, "meta", "zosgd-forward", True),
    ("FSDP2, load_sharded, embedding replicated, rank-1 forward, release_memory", 2, "meta-replicated",
     "zosgd-forward", True),
    ("FSDP2 + AdamW (backward), load_sharded", 2, "meta", "adamw", False),
]


class Probe:
    """MiniLM + a linear probe on the mean-pooled output (built lazily: torch imports in workers)."""

    @staticmethod
    def wrap(encoder):
        import torch

        class _Probe(torch.nn.Module):
            def __init__(self, encoder):
                super().__init__()
                self.encoder, self.head = encoder, torch.nn.Linear(encoder.config.hidden_size, 2)

            def forward(self, ids):
                return self.head(self.encoder(input_ids=ids).last_hidden_state.mean(1))

        torch.manual_seed(0)  # the probe's init (this script's, not the library's)
        return _Probe(encoder)


def _build(name: str, build: str, world: int):
    """The model, loaded whole (``full``; sharded afterwards when world > 1) or with
    ``load_sharded`` (``meta``): each rank reads its rows only."""
    import torch

    from zoptim.lm.models import load_model, load_sharded, repeated_blocks

    if build.startswith("meta"):
        model, _ = load_sharded(name, shard_embeddings=build == "meta")
        if name == "minilm":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            model = Probe.wrap(model)
            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        return model
    model, _ = load_model(name, torch.float32)
    if name == "minilm":
        model = Probe.wrap(model)
    with torch.no_grad():  # weights load memory-mapped: make them resident, as training will
        for p in model.parameters():
            p.data = p.data.clone()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in repeated_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _loss_fn(name: str, model, rank: int):
    import torch

    batch, tokens = BATCHES[name]
    g = torch.Generator().manual_seed(1 + rank)
    if name == "smollm2":
        ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=g)
        return lambda: model(input_ids=ids, labels=ids).loss
    ids, labels = torch.randint(0, 30522, (batch, tokens), generator=g), torch.randint(0, 2, (batch,), generator=g)
    return lambda: torch.nn.functional.cross_entropy(model(ids), labels)


def worker(rank: int, world: int, job: dict, init: str, out: str) -> None:
    import gc

    import torch
    import torch.distributed as dist

    import zoptim
    from zoptim.distributed import wrap

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    name, mode, method = job["model"], job["mode"], job["method"]
    model = _build(name, job["build"], world if mode == "sharded" else 1)
    loss = _loss_fn(name, model, rank if mode != "directions" else 0)  # directions: one batch for all ranks
    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def step():
            with torch.enable_grad():
                loss().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        forward = dict(module=model, rank=1) if method.endswith("-forward") else {}
        opt = wrap(zoptim.ZOSGD(model.parameters(), lr=1e-6, eps=1e-3, seed=0, **forward), mode=mode,
                   module=model if mode == "sharded" else None, release_memory=job["release"])

        def step():
            with torch.no_grad():
                opt.step(loss)
    gc.collect()
    build_peak = _hwm_kib() / 1024
    _reset_hwm()
    for _ in range(2):  # warm-up (first-step compilation, allocator)
        step()
    sent0 = getattr(opt, "stats", None) and opt.stats.bytes_sent
    dist.barrier()
    start = time.perf_counter()
    for _ in range(job["steps"]):
        step()
    dist.barrier()
    seconds = (time.perf_counter() - start) / job["steps"]
    hwm = _hwm_kib() / 1024
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()) * 4
    result = {"rank": rank, "seconds_per_step": seconds, "hwm_mib": hwm, "life_peak_mib": max(hwm, build_peak),
              "bytes_per_step": (opt.stats.bytes_sent - sent0) / job["steps"] if sent0 is not None else None,
              "param_bytes_held": held, "dim": sum(p.numel() for p in model.parameters())}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, **job) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r")
        mp.spawn(worker, args=(world, job, os.path.join(tmp, "init"), out), nprocs=world, join=True)
        return [json.load(open(f"{out}.{r}")) for r in range(world)]


def throughput_table(model: str, steps: int) -> dict:
    rows = {}
    for mode in ("batch", "directions"):
        for world in (1, 2):
            print(f"measuring {mode} x {world} ...", file=sys.stderr, flush=True)
            rows[(mode, world)] = measure(world, model=model, mode=mode, build="full", method="zosgd", release=False,
                                          steps=steps)
    batch, _ = BATCHES[model]
    dim = rows[("batch", 1)][0]["dim"]
    print("| mode | processes | s / step | throughput | vs 1 process | bytes sent / step / worker | DDP all-reduce / step |")
    print("|---|---|---|---|---|---|---|")
    for mode, unit in (("batch", "samples/s"), ("directions", "directions/s")):
        base = None
        for world in (1, 2):
            r = rows[(mode, world)]
            sec = max(x["seconds_per_step"] for x in r)
            rate = (batch * world if mode == "batch" else world) / sec
            base = base or rate
            print(f"| {mode} | {world} | {sec:.3f} | {rate:.1f} {unit} | {rate / base:.2f}x | "
                  f"{r[0]['bytes_per_step']:.0f} | {4 * dim:,} |")
    print()
    return {f"{m}-{w}": v for (m, w), v in rows.items()}


def memory_table(model: str, steps: int, max_procs: int) -> dict:
    rows = list(MEMORY_ROWS)
    if max_procs > 2:  # the two load_sharded rows again, at max_procs
        for i in (5, 4):
            label, _, build, method, release = MEMORY_ROWS[i]
            rows.insert(6, (label.replace("FSDP2", f"FSDP2 x {max_procs}"), max_procs, build, method, release))
    results = {}
    for label, world, build, method, release in rows:
        print(f"measuring {label} ({world} processes) ...", file=sys.stderr, flush=True)
        results[label] = measure(world, model=model, mode="sharded" if world > 1 else "batch", build=build,
                                 method=method, release=release, steps=steps)
    single = results[rows[0][0]][0]
    print("| configuration | processes | worst rank's peak RSS, steps (MiB) | vs unsharded | peak RSS incl. build "
          "(MiB) | vs unsharded | parameter MiB held / rank | s / step |")
    print("|---|---|---|---|---|---|---|---|")
    for label, world, *_ in rows:
        r = results[label]
        worst, life = max(x["hwm_mib"] for x in r), max(x["life_peak_mib"] for x in r)
        print(f"| {label} | {world} | {worst:.0f} | {worst / single['hwm_mib']:.2f} | {life:.0f} | "
              f"{life / single['life_peak_mib']:.2f} | {max(x['param_bytes_held'] for x in r) / 2**20:.1f} | "
              f"{max(x['seconds_per_step'] for x in r):.2f} |")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(BATCHES), default="minilm")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per configuration (after 2 warm-up steps)")
    parser.add_argument("--max-procs", type=int, default=2, help="also measure load_sharded + forward at this many")
    parser.add_argument("--out", default=None, help="write the raw results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    batch, tokens = BATCHES[args.model]
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, gloo, 1 intra-op thread per "
          f"process, {args.model}, batch {batch} x {tokens} tokens per process, ZOSGD, {args.steps} steps\n")
    raw = {}
    if args.model == "minilm":
        raw["throughput"] = throughput_table(args.model, args.steps)
    raw["memory"] = memory_table(args.model, args.steps, args.max_procs)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
