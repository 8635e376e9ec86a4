"""Per-rank RSS timeline of zoptim's FSDP2-sharded mode on SmolLM2-135M (issue 25, measurement only).

    python benchmarks/shard_memory.py VARIANT [--steps 3] [--out DIR]   (default --out /tmp/zoptim-shard-memory)

VARIANT:
  base     2 gloo procs, fully_shard every decoder layer + root (defaults), ZOSGD exact_restore=True
  inexact  as base, ZOSGD(exact_restore=False)
  raf      as base, reshard_after_forward=True passed to every fully_shard call (root included)
  trim     as base, gc.collect() + malloc_trim(0) right after fully_shard (and again post-build)
  single   1 process, unsharded, same batch (4 x 64), ZOSGD exact_restore=True
  fwdonly  as base, but each 'step' is two no-grad forwards + reshard, no optimizer step (FSDP alone)
  meta     2 procs, zoptim.lm.models.load_sharded (meta device, each rank reads its rows from safetensors)
  forward, meta-forward, single-forward: as base / meta / single with ZOSGD(module=model, rank=1)
  meta-replicated-forward: meta-forward with load_sharded(shard_embeddings=False)
Extra env: ZOPTIM_COMPILE=0 (eager kernels) is passed through.

Recorded per rank at each point: VmRSS, and VmHWM since the previous point (HWM is reset after every
read, via /proc/self/clear_refs 5).  'peak_noreset' = max HWM over the whole process life;
'peak_postbuild' = max HWM from the post-build reset (as benchmarks/scaling.py) to the end.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import tempfile
import time

BATCH, TOKENS = 4, 64


def status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Recorder:
    def __init__(self):
        self.rows = []
        self.phase = "pre-build"

    def __call__(self, label):
        rss, hwm = status_kib("VmRSS"), status_kib("VmHWM")
        self.rows.append({"point": label, "phase": self.phase, "rss_mib": rss / 1024, "hwm_since_prev_mib": hwm / 1024,
                          "anon_mib": status_kib("RssAnon") / 1024, "file_mib": status_kib("RssFile") / 1024,
                          "t": time.perf_counter()})
        reset_hwm()


def load_full():
    import torch

    from zoptim.lm.models import load_model

    model, _ = load_model("smollm2", torch.float32)
    with torch.no_grad():  # mmap'd weights -> anonymous memory, as scaling.py / step_cost.py do
        for p in model.parameters():
            p.data = p.data.clone()
    return model


def worker(rank, world, variant, steps, init, out):
    import torch
    import torch.distributed as dist

    rec = Recorder()
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    import zoptim
    from zoptim.distributed import wrap

    rec("start (imports, process group)")
    import accelerate  # noqa: F401  the rest of the runtime a model needs, before any weight exists
    import transformers.modeling_utils  # noqa: F401

    rec("imports (transformers, accelerate)")
    libc = ctypes.CDLL("libc.so.6")
    fsdp_kwargs = {"reshard_after_forward": True} if variant == "raf" else {}
    if variant.startswith("meta"):
        from zoptim.lm.models import load_sharded

        model, _ = load_sharded("smollm2", shard_embeddings="replicated" not in variant)
        rec("load_sharded (meta build, fully_shard, local rows)")
    else:
        model = load_full()
        rec("after model load (cloned)")
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh, **fsdp_kwargs)
            fully_shard(model, mesh=mesh, **fsdp_kwargs)
            rec("after fully_shard")
    if variant == "trim":
        gc.collect()
        libc.malloc_trim(0)
        rec("after gc + malloc_trim")
    g = torch.Generator().manual_seed(1 + rank)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, TOKENS), generator=g)

    def loss():
        rec(f"q{len(qcount) + 1} start (after perturb, before forward)")
        out_ = model(input_ids=ids, labels=ids).loss
        rec(f"q{len(qcount) + 1} forward done (before reshard)")
        eng = getattr(opt_, "engine", None)
        if eng is not None:
            rec.rows[-1]["journal_mib"] = eng.journal_bytes() / 2**20
            rec.rows[-1]["scratch_mib"] = sum(t.numel() * t.element_size() for t in getattr(eng, "_scratch", {}).values()) / 2**20
        return out_

    qcount = []
    forward = dict(module=model, rank=1) if variant.endswith("forward") else {}
    opt_ = zoptim.ZOSGD(model.parameters(), lr=1e-6, eps=1e-3, seed=0, exact_restore=(variant != "inexact"), **forward)
    if world > 1:
        opt = wrap(opt_, mode="sharded", module=model)
        orig = opt._resharding

        def resharding(closure):  # record after the wrapper's reshard of every FSDP module
            inner = orig(closure)

            def q():
                try:
                    return inner()
                finally:
                    qcount.append(1)
                    rec(f"q{len(qcount)} after reshard")
                    if os.environ.get("TRIM_EACH") == "1":  # diagnostic: trim the heap after every query
                        libc.malloc_trim(0)
                        rec("  after malloc_trim")
            return q
        opt._resharding = resharding
    else:
        opt = opt_

        def loss_single():
            try:
                return loss()
            finally:
                qcount.append(1)
        rec_loss = loss_single
    rec("after optimizer build")
    gc.collect()
    if variant == "trim":
        libc.malloc_trim(0)
    rec("post-build (gc) -> HWM reset here")
    rec.phase = "steps"
    with torch.no_grad():
        for s in range(steps):
            qcount.clear()
            rec.phase = f"step{s + 1}"
            if variant == "fwdonly":  # no optimizer: two forwards + reshard per 'step' (FSDP alone)
                for _ in range(2):
                    opt._resharding(loss)()
                    if os.environ.get("TRIM_EACH") == "1":  # diagnostic: is the growth freed-but-retained heap?
                        gc.collect()
                        libc.malloc_trim(0)
                        rec("  after gc + malloc_trim")
            else:
                opt.step(loss if world > 1 else rec_loss)
            rec(f"step{s + 1} after update")
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()) * 4
    journal = max([r.get("journal_mib", 0) for r in rec.rows] or [0])
    rows = rec.rows
    pre = [r["hwm_since_prev_mib"] for r in rows if r["phase"] == "pre-build"]
    post = [r["hwm_since_prev_mib"] for r in rows if r["phase"] != "pre-build"]
    res = {"rank": rank, "variant": variant, "world": world, "param_mib_held": held / 2**20,
           "peak_noreset_mib": max(pre + post), "peak_postbuild_mib": max(post),
           "peak_steps2plus_mib": max([r["hwm_since_prev_mib"] for r in rows if r["phase"] not in ("pre-build", "step1")]
                                      or [0]),
           "journal_bytes": journal, "rows": rows,
           "compile": os.environ.get("ZOPTIM_COMPILE", "1")}
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(res, f, indent=1)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=["base", "inexact", "raf", "trim", "single", "meta", "fwdonly", "forward", "meta-forward", "meta-replicated-forward", "single-forward"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="/tmp/zoptim-shard-memory")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch.multiprocessing as mp

    os.makedirs(args.out, exist_ok=True)
    tag = args.variant + ("-eager" if os.environ.get("ZOPTIM_COMPILE") == "0" else "") + ("-trimeach" if os.environ.get("TRIM_EACH") == "1" else "")
    out = os.path.join(args.out, tag)
    world = 1 if args.variant.startswith("single") else 2
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, args.variant, args.steps, os.path.join(tmp, "init"), out), nprocs=world, join=True)
    res = [json.load(open(f"{out}.{r}.json")) for r in range(world)]
    print(f"{tag}: {time.time() - t0:.0f}s")
    for r in res:
        print(f"  rank {r['rank']}: held {r['param_mib_held']:.1f} MiB, peak no-reset {r['peak_noreset_mib']:.0f}, "
              f"post-build {r['peak_postbuild_mib']:.0f}, steps 2+ {r['peak_steps2plus_mib']:.0f}, max journal MiB {r['journal_bytes']:.2f}")
        for row in r["rows"]:
            print(f"    {row['phase']:9s} {row['point']:40s} RSS {row['rss_mib']:7.0f} (anon {row['anon_mib']:5.0f} file {row['file_mib']:4.0f})  HWM-since-prev {row['hwm_since_prev_mib']:7.0f}  {'journal %.2f scratch %.2f' % (row['journal_mib'], row['scratch_mib']) if 'journal_mib' in row else ''}")


if __name__ == "__main__":
    main()
