"""On a CUDA machine: are the compiled (Triton) moves bit-identical to the eager ones, and what does
a step cost against two forwards? Prints a report; used to decide ZOPTIM_COMPILE_CUDA's default.

Forward-applied directions (``module=model, rank=1``) on the GPU: the query output equals a model
whose weights were set to the point (CPU-built factors), queries leave the weights bit-identical,
and the step's cost against two forwards.

    PYTHONPATH=src python benchmarks/cuda_check.py
"""

from __future__ import annotations

import os
import time

import torch

from zoptim.engine import kernels
from zoptim.engine.inplace import SeededPerturbation


def sequence(params, distribution):
    e = SeededPerturbation(params, distribution=distribution, chunk_size=1 << 22)
    out = []
    e.move(11, 1e-3)
    out += [p.clone() for p in params] + [e.journal_elements()]
    e.move(11, -1e-3)
    out += [p.clone() for p in params] + [e.journal_elements()]
    e.update([(11, -0.5), (12, 0.125)], decay=[0.1] * len(params))
    out += [p.clone() for p in params]
    return out


def same(a, b):
    if isinstance(a, int):
        return a == b
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.view(bits), b.view(bits))


def step_against_two_forwards(opt, loss, reps: int = 5):
    """Median of (step / two forwards, two forwards s, step s) over ``reps`` interleaved repetitions."""
    r = []
    for _ in range(reps):
        torch.cuda.synchronize()
        a0 = time.perf_counter()
        with torch.no_grad():
            loss()
            loss()
        torch.cuda.synchronize()
        b0 = time.perf_counter()
        opt.step(loss)
        torch.cuda.synchronize()
        c0 = time.perf_counter()
        r.append(((c0 - b0) / (b0 - a0), b0 - a0, c0 - b0))
    return sorted(r)[len(r) // 2]


def main():
    dev = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name())
    ok = True
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for dist in ("normal", "rademacher", "uniform"):
            g = torch.Generator(device=dev).manual_seed(0)
            base = [(torch.randn(5_000_123, device=dev, generator=g) * 0.05).to(dtype),
                    torch.zeros(3000, device=dev, dtype=dtype)]
            os.environ["ZOPTIM_COMPILE_CUDA"] = "0"
            want = sequence([t.clone() for t in base], dist)
            os.environ["ZOPTIM_COMPILE_CUDA"] = "1"
            kernels.reset_routing()
            got = sequence([t.clone() for t in base], dist)
            eq = all(same(a, b) for a, b in zip(got, want))
            ok &= eq and kernels._compile_failed is None
            print(f"{str(dtype):15s} {dist:10s} compiled == eager: {eq}  journal {want[2]} "
                  f"fallback: {kernels._compile_failed}")
    # CPU eager stream == CUDA eager stream
    from zoptim.engine.noise import NoiseSource

    a = NoiseSource("normal").fill(torch.empty(100_000), 77)
    b = NoiseSource("normal").fill(torch.empty(100_000, device=dev), 77).cpu()
    print("cpu stream == cuda stream:", torch.equal(a, b))
    ok &= torch.equal(a, b)
    # step cost on a 350M-parameter float32 MLP stack, against two forwards
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(20)]).to(dev)
    x = torch.randn(512, 4096, device=dev)
    import zoptim

    for route in ("0", "1"):
        os.environ["ZOPTIM_COMPILE_CUDA"] = route
        kernels.reset_routing()
        for dist in ("normal", "rademacher"):
            opt = zoptim.ZOSGD(model.parameters(), lr=1e-6, eps=1e-3, distribution=dist)
            loss = lambda: model(x).square().mean()
            t0 = time.perf_counter()
            opt.step(loss)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            med = step_against_two_forwards(opt, loss)
            print(f"compiled={route} {dist:10s} step/2fwd {med[0]:.2f} (2 fwd {med[1]*1e3:.1f} ms, step "
                  f"{med[2]*1e3:.1f} ms, first step {first:.1f} s)")
    ok &= forward_check(dev, model, x)
    print("ALL BIT-IDENTICAL" if ok else "MISMATCH")


def forward_check(dev, model, x) -> bool:
    """Forward-applied rank-1 directions on ``dev``: no CPU-only op in the hooks, the query point is
    x + eps*s (the same factors as on the CPU), the weights untouched, and the step cost."""
    import copy

    import zoptim

    small = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 8)).to(dev)
    ids = torch.randint(0, 50, (4, 7), device=dev)
    before = [p.detach().clone() for p in small.parameters()]
    cpu = copy.deepcopy(small).cpu()
    opt = zoptim.ZOSGD(small.parameters(), lr=0.0, eps=0.05, seed=1, module=small, rank=1)
    at = zoptim.AskTell(opt)
    at.ask()
    with torch.no_grad():
        on_gpu = small(ids).cpu()
    at.tell(float(on_gpu.square().mean()))
    opt.close()
    cpu_opt = zoptim.ZOSGD(cpu.parameters(), lr=0.0, eps=0.05, seed=1, module=cpu, rank=1)
    at = zoptim.AskTell(cpu_opt)
    at.ask()
    with torch.no_grad():
        on_cpu = cpu(ids.cpu())
    close = torch.allclose(on_gpu, on_cpu, rtol=1e-4, atol=1e-5)
    untouched = all(torch.equal(a, b) for a, b in zip(before, small.parameters()))
    print(f"forward rank-1 on cuda == on cpu: {close}; weights untouched by queries: {untouched}")
    for dist in ("normal", "rademacher"):
        opt = zoptim.ZOSGD(model.parameters(), lr=1e-6, eps=1e-3, distribution=dist, module=model, rank=1)
        loss = lambda: model(x).square().mean()  # noqa: E731
        opt.step(loss)
        ratio = step_against_two_forwards(opt, loss)[0]
        opt.close()
        print(f"forward rank-1 {dist:10s} step/2fwd {ratio:.2f}")
    return close and untouched


if __name__ == "__main__":
    main()
