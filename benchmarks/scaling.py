"""Scaling out: 1 and 2 processes (gloo, one intra-op thread each) in every mode of zoptim.distributed.wrap.

Model: all-MiniLM-L6-v2 with a linear probe on its mean-pooled output (as ``step_cost.py``), every
weight trainable (22.7M), a batch of 16 x 64 tokens *per process* (weak scaling: 2 processes see
twice the samples, or evaluate twice the directions, per step). Printed per configuration:

* bytes sent per step per worker: the payload this rank hands to collectives (counted by the
  wrapper), next to what DistributedDataParallel all-reduces for the same model, 4 d bytes
  (float32 gradients) a step;
* batch mode: samples per second; directions mode: directions per second (ZOSGD, 2 queries each);
* sharded mode (FSDP2, every encoder layer and the root ``fully_shard``-ed): peak resident memory
  per rank (VmHWM, reset after the model is built so that loading the full checkpoint does not
  count) against one unsharded process, and the parameter bytes each rank holds.

    python benchmarks/scaling.py [--steps 12] [--out docs/results/scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

BATCH, TOKENS = 16, 64
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from step_cost import _hwm_kib, _reset_hwm  # noqa: E402


def _model():
    import torch

    from zoptim.lm.models import load_model

    class Probe(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder, self.head = encoder, torch.nn.Linear(encoder.config.hidden_size, 2)

        def forward(self, ids):
            return self.head(self.encoder(input_ids=ids).last_hidden_state.mean(1))

    encoder, _ = load_model("minilm", torch.float32)
    torch.manual_seed(0)  # the probe's init (this script's, not the library's)
    model = Probe(encoder)
    with torch.no_grad():  # weights load memory-mapped: make them resident, as training will
        for p in model.parameters():
            p.data = p.data.clone()
    return model


def _batch(rank: int):
    import torch

    g = torch.Generator().manual_seed(1 + rank)
    return torch.randint(0, 30522, (BATCH, TOKENS), generator=g), torch.randint(0, 2, (BATCH,), generator=g)


def worker(rank: int, world: int, mode: str, steps: int, init: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    import zoptim
    from zoptim.distributed import wrap

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    model = _model()
    if mode == "sharded" and world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.encoder.embeddings, mesh=mesh)
        for layer in model.encoder.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    ids, labels = _batch(rank if mode != "directions" else 0)  # directions: the same batch on every rank

    def loss():
        return torch.nn.functional.cross_entropy(model(ids), labels)

    opt = wrap(zoptim.ZOSGD(model.parameters(), lr=1e-6, eps=1e-3, seed=0), mode=mode,
               module=model if mode == "sharded" else None)
    import gc

    gc.collect()
    _reset_hwm()
    with torch.no_grad():
        for _ in range(2):  # warm-up (first-step compilation, allocator)
            opt.step(loss)
        sent0 = opt.stats.bytes_sent
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            opt.step(loss)
        dist.barrier()
        seconds = (time.perf_counter() - start) / steps
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()) * 4
    result = {"rank": rank, "seconds_per_step": seconds, "bytes_per_step": (opt.stats.bytes_sent - sent0) / steps,
              "hwm_mib": _hwm_kib() / 1024, "param_bytes_held": held,
              "dim": sum(p.numel() for p in model.parameters())}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, mode: str, steps: int) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r")
        mp.spawn(worker, args=(world, mode, steps, os.path.join(tmp, "init"), out), nprocs=world, join=True)
        return [json.load(open(f"{out}.{r}")) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=None, help="write the raw results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    rows = {}
    for mode in ("batch", "directions", "sharded"):
        for world in (1, 2):
            if mode == "sharded" and world == 1:
                continue  # the unsharded process is batch mode at world 1
            print(f"measuring {mode} x {world} ...", file=sys.stderr, flush=True)
            rows[(mode, world)] = measure(world, mode, args.steps)

    dim = rows[("batch", 1)][0]["dim"]
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, gloo, 1 intra-op thread per "
          f"process, MiniLM + probe (d = {dim:,}), batch {BATCH} x {TOKENS} tokens per process, ZOSGD\n")
    print("| mode | processes | s / step | throughput | vs 1 process | bytes sent / step / worker | DDP all-reduce / step |")
    print("|---|---|---|---|---|---|---|")
    for mode, unit in (("batch", "samples/s"), ("directions", "directions/s")):
        base = None
        for world in (1, 2):
            r = rows[(mode, world)]
            sec = max(x["seconds_per_step"] for x in r)
            rate = (BATCH * world if mode == "batch" else world) / sec
            base = base or rate
            print(f"| {mode} | {world} | {sec:.3f} | {rate:.1f} {unit} | {rate / base:.2f}x | "
                  f"{r[0]['bytes_per_step']:.0f} | {4 * dim:,} |")
    single, sharded = rows[("batch", 1)][0], rows[("sharded", 2)]
    print("\n| sharded mode | peak RSS / rank (MiB) | vs unsharded | parameter MiB held / rank | bytes sent / step / worker |")
    print("|---|---|---|---|---|")
    print(f"| 1 process, unsharded | {single['hwm_mib']:.0f} | 1.00 | {single['param_bytes_held'] / 2**20:.1f} | "
          f"{single['bytes_per_step']:.0f} |")
    for r in sharded:
        print(f"| 2 processes, FSDP2, rank {r['rank']} | {r['hwm_mib']:.0f} | {r['hwm_mib'] / single['hwm_mib']:.2f} | "
              f"{r['param_bytes_held'] / 2**20:.1f} | {r['bytes_per_step']:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({f"{m}-{w}": v for (m, w), v in rows.items()}, f, indent=1)


if __name__ == "__main__":
    main()
