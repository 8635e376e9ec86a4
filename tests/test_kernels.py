"""The fused kernels: compiled = eager bit for bit, directions independent of chunks and threads,
one compilation per variant (not per step or key), and a fallback that keeps the values."""

from __future__ import annotations

import warnings

import pytest
import torch

import zoptim
from zoptim.engine import kernels
from zoptim.engine.inplace import SeededPerturbation
from zoptim.engine.noise import NoiseSource, mix


def bits(t):
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]).clone()


def weights(dtype, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, generator=g) * 0.05).to(dtype)
    w[:50] = 0.0
    w[50:60] = -0.0
    return w


def two_point_step(params, distribution, chunk_size=4096, decay=0.1, weighted=False):
    """The moves of a ZOSGD step, recording every intermediate state and the journals.
    ``weighted``: HiZOO's preconditioned directions (per-element multipliers)."""
    engine = SeededPerturbation(params, distribution=distribution, chunk_size=chunk_size)
    if weighted:
        mult = [torch.linspace(0.01, 30.0, p.numel()) for p in params]
        engine.weights = lambda j, a, b: mult[j][a:b]
    seen = []
    engine.move(11, 1e-3)
    seen += [bits(p) for p in params] + [engine.journal_elements()]
    engine.move(11, -1e-3)
    seen += [bits(p) for p in params] + [engine.journal_elements()]
    engine.update([(11, [-0.5, 0.25][: len(params)]), (12, 0.125)], decay=[decay] * len(params))
    seen += [bits(p) for p in params] + [engine.journal_elements()]
    return seen


@pytest.fixture
def compiled(compiled_route):
    """Route moves through torch.compile, and fail the test on any fallback to eager."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernels.CompileFallbackWarning)
        yield compiled_route
    assert kernels._compile_failed is None


# two sets of variants (each compiles its own kernels): float32 plain, and bfloat16 with Rademacher
# noise and element-wise weights (HiZOO's), which covers the half-precision and weighted paths at once
@pytest.mark.parametrize("dtype, distribution, weighted", [
    (torch.float32, "normal", False), (torch.bfloat16, "rademacher", True)])
def test_compiled_moves_equal_eager_moves_bit_for_bit(monkeypatch, compiled, dtype, distribution, weighted):
    base = [weights(dtype, 3 * 4096 + 77), weights(dtype, 300, seed=1)]
    got = two_point_step([t.clone() for t in base], distribution, weighted=weighted)
    assert compiled.count > 0  # the compiled route was taken
    monkeypatch.setenv("ZOPTIM_COMPILE", "0")
    want = two_point_step([t.clone() for t in base], distribution, weighted=weighted)
    assert got[-1] == 0 and got[2] > 0  # journals were exercised, and emptied by the update
    for a, b in zip(got, want):
        assert (a == b) if isinstance(a, int) else torch.equal(a, b)


def test_compiled_moves_do_not_depend_on_the_thread_count(compiled):
    """One kernel variant (a lasting move over three chunks and a partial one): inductor builds
    each variant anew for each thread count, and the other variants share its noise code."""
    base = weights(torch.float32, 3 * 4096 + 77)
    threads = torch.get_num_threads()
    moved = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            p = base.clone()
            SeededPerturbation([p], distribution="normal").move(11, 1e-3, temporary=False)
            moved.append(p)
    finally:
        torch.set_num_threads(threads)
    assert compiled.count > 0 and not torch.equal(moved[0], base)
    assert torch.equal(moved[0], moved[1])


def test_a_step_compiles_each_kernel_once_not_per_step_or_key(compiled):
    from torch._dynamo.utils import counters

    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 1))
    x = torch.randn(16, 40)
    opt = zoptim.ZOSGD(model.parameters(), lr=1e-3, weight_decay=1e-2)
    opt.step(lambda: model(x).square().mean())  # warm up: compiles the variants a step uses
    opt.step(lambda: model(x).square().mean())
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(3):  # new keys, new scales, new steps
        opt.step(lambda: model(x).square().mean())
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("distribution", ["normal", "rademacher", "uniform"])
def test_a_direction_does_not_depend_on_the_chunk_size(distribution):
    moved = []
    for chunk in (1000, 4096, 1 << 18):
        p = torch.zeros(10_000)
        SeededPerturbation([p], distribution=distribution, chunk_size=chunk).move(5, 1.0, temporary=False)
        moved.append(p)
    assert torch.equal(moved[0], moved[1]) and torch.equal(moved[0], moved[2])
    assert torch.equal(moved[0], NoiseSource(distribution).fill(torch.empty(10_000), mix(5, 0)))


def test_zoptim_compile_0_forces_the_eager_route(monkeypatch):
    monkeypatch.setenv("ZOPTIM_COMPILE", "0")
    monkeypatch.setattr(kernels, "_compiled", {})  # the other tests' compiled variants are kept
    assert not kernels.compile_allowed(torch.device("cpu"))
    p = weights(torch.float32, 5000)
    SeededPerturbation([p]).move(3, 1e-2)
    assert kernels._compiled == {}


def test_a_compiler_failure_warns_once_and_falls_back_to_the_same_values(monkeypatch):
    base = [weights(torch.float32, 5000)]
    monkeypatch.setenv("ZOPTIM_COMPILE", "0")
    want = two_point_step([t.clone() for t in base], "normal")

    def broken(fn, name, **flags):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return call

    monkeypatch.setenv("ZOPTIM_COMPILE", "1")
    monkeypatch.setattr(kernels, "_variant", broken)
    monkeypatch.setattr(kernels, "_compiled", {})  # every variant is built anew, by the broken compiler
    monkeypatch.setattr(kernels, "_compile_failed", None)
    with pytest.warns(kernels.CompileFallbackWarning, match="C\\+\\+ compiler") as record:
        got = two_point_step([t.clone() for t in base], "normal")
    assert len(record) == 1
    assert not kernels.compile_allowed(torch.device("cpu"))
    for a, b in zip(got, want):
        assert (a == b) if isinstance(a, int) else torch.equal(a, b)


def test_cuda_uses_the_eager_route_unless_enabled(monkeypatch):
    monkeypatch.setattr(kernels, "_compile_failed", None)
    monkeypatch.setenv("ZOPTIM_COMPILE", "1")
    monkeypatch.delenv("ZOPTIM_COMPILE_CUDA", raising=False)
    assert not kernels.compile_allowed(torch.device("cuda"))
    monkeypatch.setenv("ZOPTIM_COMPILE_CUDA", "1")
    assert kernels.compile_allowed(torch.device("cuda"))
