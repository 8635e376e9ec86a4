import os
import sys

# tests/reference.py is imported as a plain module by the spec tests.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# The fused kernels compile once per variant (seconds each); most of the suite runs the eager route,
# which gives the same bits. The route users get by default (compiled) runs the shared guarantees of
# every method (tests/test_shared_guarantees.py), and tests/test_kernels.py checks compiled = eager
# on every variant it uses.
os.environ.setdefault("ZOPTIM_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# The spec tests run tiny tensor ops, where intra-op threads only add contention: one thread keeps
# the suite fast and its timings independent of what else the machine runs.
torch.set_num_threads(1)


#: The tiers (markers registered in pyproject.toml), by file; a test may also mark itself.
TIERS = {
    "distributed": {"test_distributed", "test_fault_tolerance", "test_sharded_lm"},
    "integration": {"test_lm", "test_lm_io", "test_bench", "test_blackbox_bench", "test_problems"},
}


#: Files whose tests share processes started once per file (a module-scoped fixture that spawns
#: workers, or torchrun runs that should not overlap on two cores): their tests run on one xdist
#: worker, so the fixture starts its processes once, not once per worker.
ONE_WORKER = {"test_distributed", "test_sharded_lm", "test_fault_tolerance"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks (--dist loadgroup)
def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        # the tests of the compiled kernels share one xdist worker (``--dist loadgroup``): each kernel
        # variant is then compiled once, not once per worker, on a machine with a cold compile cache
        if "compiled" in item.fixturenames or "compiled" in item.name:
            item.add_marker(pytest.mark.xdist_group("compiled"))
        elif module in ONE_WORKER:
            item.add_marker(pytest.mark.xdist_group(module))
        if any(item.get_closest_marker(tier) for tier in ("unit", "integration", "distributed")):
            continue
        tier = next((t for t, files in TIERS.items() if module in files), "unit")
        item.add_marker(getattr(pytest.mark, tier))


class CompiledCalls:
    """Counts the kernel calls that took the compiled route (``kernels.run`` enters its
    ``_no_duck_shapes`` context there only)."""

    def __init__(self, inner):
        self.inner, self.count = inner, 0

    def __enter__(self):
        self.count += 1
        return self.inner.__enter__()

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


@pytest.fixture
def compiled_route(monkeypatch):
    """The compiled kernels users get by default (ZOPTIM_COMPILE=1), any earlier compile failure
    forgotten; yields the count of compiled kernel calls. The compiled variants stay cached across
    tests, so each is compiled once per process (the cold-cache cost of the suite)."""
    from zoptim.engine import kernels

    monkeypatch.setenv("ZOPTIM_COMPILE", "1")
    monkeypatch.setattr(kernels, "_compile_failed", None)
    calls = CompiledCalls(kernels._no_duck_shapes)
    monkeypatch.setattr(kernels, "_no_duck_shapes", calls)
    yield calls
