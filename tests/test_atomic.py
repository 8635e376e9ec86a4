"""Atomic moves: a failure of any kind inside a move leaves the parameters at a known point.

Specification (issue 20): an exception anywhere inside a query's move, the journal or the update,
``KeyboardInterrupt`` included, leaves every parameter bit for bit at the iterate the step started
from (a query's move) or at the iterate the completed update produces (a failure inside the
update), and ``engine.is_perturbed`` is False, so the next step starts from a consistent point.
The failures are injected at every call of ``zoptim.engine.kernels.run`` of a step (before the call and
after it has written), on both kernel routes, and by a timer-raised ``KeyboardInterrupt`` during
steps of a model of a few million weights.
"""

from __future__ import annotations

import random
import signal
import threading

import pytest
import torch

import zoptim
from zoptim.engine import kernels, small
from zoptim.engine.atomic import deferred_signals
from zoptim.optim import registry

#: Every registered method (a method registered later is held to this too); the arguments give
#: visible moves on the problem below (the defaults are for large models).
HP = {"zosgd": dict(lr=0.5, eps=0.1, weight_decay=0.01), "as2p": dict(eps=0.1, total_steps=50),
      "hizoo": dict(lr=0.5, eps=0.1), "s2p": dict(lr=1.0, total_steps=50), "stp": dict(lr=0.5)}
METHODS = registry.names()


class Injected(Exception):
    pass


def tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5000, generator=g)), torch.nn.Parameter(torch.randn(300, generator=g))]


def loss_of(ps):
    return lambda: sum(float(((p - 0.3) ** 2).sum()) for p in ps)


def build(name):
    ps = tensors()
    opt = registry.build(name, ps, seed=3, **HP.get(registry.get(name).name, {}))
    opt.engine.chunk_size = 2048  # several chunks per tensor: failures between chunks too
    for _ in range(2):  # a non-trivial start: journal, AS2P's window, HiZOO's estimate
        opt.step(loss_of(ps))
    return ps, opt


def snapshot(ps):
    return [p.detach().clone() for p in ps]


def same(ps, ref):
    return all(torch.equal(p.detach().view(torch.int32), r.view(torch.int32)) for p, r in zip(ps, ref))


def calls_of_one_step(name, monkeypatch):
    """The number of kernel calls of step 3, and which of them belong to the update."""
    ps, opt = build(name)
    real, in_update, phases = kernels.run, [False], []
    monkeypatch.setattr(kernels, "run", lambda *a, **k: (phases.append(in_update[0]), real(*a, **k))[1])
    update = opt.engine.update

    def flagged(*a, **k):
        in_update[0] = True
        try:
            return update(*a, **k)
        finally:
            in_update[0] = False

    monkeypatch.setattr(opt.engine, "update", flagged)
    opt.step(loss_of(ps))
    monkeypatch.setattr(kernels, "run", real)
    return phases


@pytest.fixture(autouse=True)
def in_place_engine(monkeypatch):
    """The failures are injected into the in-place engine's kernels: its route even for these small
    tensors (the small-model engine's atomicity is tested in test_small.py)."""
    monkeypatch.setattr(small, "SMALL_ELEMENTS", 0)


@pytest.fixture
def route(request, monkeypatch):
    if request.param == "eager":
        monkeypatch.setenv("ZOPTIM_COMPILE", "0")
        yield request.param
        return
    calls = request.getfixturevalue("compiled_route")
    yield request.param
    assert calls.count > 0  # the compiled route was taken


# Every method on the eager kernels; the compiled kernels (the default route) with ZOSGD: the sequence of
# kernel calls, where the failures are injected, is the engine's and the same on both routes.
@pytest.mark.parametrize("name,route", [(m, "eager") for m in METHODS] + [("zosgd", "compiled")],
                         indirect=["route"])
def test_a_failure_at_any_kernel_call_leaves_the_start_point_or_the_completed_update(name, route, monkeypatch):
    phases = calls_of_one_step(name, monkeypatch)
    assert len(phases) >= 9 and any(phases) and not all(phases)
    twin_ps, twin = build(name)
    start = snapshot(twin_ps)
    twin.step(loss_of(twin_ps))
    after = snapshot(twin_ps)
    real = kernels.run
    cases = [(k, when, exc) for k in range(len(phases)) for when, exc in (("before", Injected), ("after", KeyboardInterrupt))]
    for k, when, exc in cases:
        ps, opt = build(name)
        count = [0]

        def failing(*a, k=k, when=when, exc=exc, count=count, **kw):
            count[0] += 1
            if count[0] - 1 == k and when == "before":
                raise exc(f"injected before call {k}")
            out = real(*a, **kw)
            if count[0] - 1 == k:
                raise exc(f"injected after call {k}")
            return out

        monkeypatch.setattr(kernels, "run", failing)
        with pytest.raises(exc):
            opt.step(loss_of(ps))
        monkeypatch.setattr(kernels, "run", real)
        expected = after if phases[k] else start
        assert same(ps, expected), f"{name}: failure {when} kernel call {k} ({'update' if phases[k] else 'query'})"
        assert not opt.engine.is_perturbed and opt.engine.journal_elements() == 0
        value = opt.step(loss_of(ps))  # the next step runs from a consistent point
        assert torch.isfinite(torch.tensor(value)) and not opt.engine.is_perturbed


def test_a_failure_inside_a_forward_update_completes_it(monkeypatch):
    """module=model: the update writes low-rank matrices, small tensors (foreach) and uncovered ones
    (in place); a Ctrl-C raised by the small tensors' write still leaves the whole update done."""

    class Odd(torch.nn.Module):  # no hook covers it: its tensor moves in place
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.scale

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 8), Odd())

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

    def run(fail: bool):
        m = model()
        opt = zoptim.ZOSGD(m.parameters(), lr=0.1, eps=0.01, weight_decay=0.1, module=m, rank=2, seed=5)
        closure = lambda: float(m(x).pow(2).mean())  # noqa: E731
        opt.step(closure)
        if fail:
            real, calls = torch._foreach_add_, [0]

            def interrupted(*a, **k):
                calls[0] += 1
                if calls[0] == 1:
                    raise KeyboardInterrupt("injected into the small tensors' write")
                return real(*a, **k)

            monkeypatch.setattr(torch, "_foreach_add_", interrupted)
            with pytest.raises(KeyboardInterrupt):
                opt.step(closure)
            monkeypatch.setattr(torch, "_foreach_add_", real)
        else:
            opt.step(closure)
        assert not opt.engine.is_perturbed
        return snapshot(list(m.parameters()))

    assert same(run(True), run(False))


def test_a_timer_raised_ctrl_c_during_steps_of_a_3m_weight_model_never_leaves_a_mixed_point():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Tanh(), torch.nn.Linear(1000, 1000),
                                torch.nn.Tanh(), torch.nn.Linear(1000, 1000))
    x = torch.randn(4, 1000)
    ps = list(model.parameters())
    opt = zoptim.ZOSGD(ps, lr=1e-3, eps=1e-2, seed=0)
    closure = lambda: float(model(x).pow(2).mean())  # noqa: E731
    opt.step(closure)  # warm up (and time) one step

    def interrupt(signum, frame):
        raise KeyboardInterrupt("timer")

    previous = signal.signal(signal.SIGALRM, interrupt)
    rng = random.Random(0)
    interrupted = 0
    try:
        for _ in range(12):
            start, state = snapshot(ps), opt.state_dict()
            opt.step(closure)  # the uninterrupted step, from the same point and state
            after, state_after = snapshot(ps), opt.state_dict()
            for p, s in zip(ps, start):
                p.data.copy_(s)
            opt.load_state_dict(state)
            steps, queries = opt.steps, opt.num_queries
            try:
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.002, 0.25))
                opt.step(closure)
                signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:
                signal.setitimer(signal.ITIMER_REAL, 0)
                interrupted += 1
            assert not opt.engine.is_perturbed
            assert same(ps, start) or same(ps, after), "an interrupted step left the weights at a mixed point"
            if same(ps, start) and not same(ps, after):  # a Ctrl-C before the update: as if the step never began
                assert (opt.steps, opt.num_queries) == (steps, queries)
            else:  # the update was written: it counts
                assert opt.steps == steps + 1
            for p, s in zip(ps, after):  # go on from the completed step
                p.data.copy_(s)
            opt.load_state_dict(state_after)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert interrupted >= 6, f"only {interrupted} of 12 steps were interrupted"


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread only")
def test_deferred_signals_hold_a_ctrl_c_until_the_section_ends():
    order = []

    def handler(signum, frame):
        order.append("handler")
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred_signals():
                signal.raise_signal(signal.SIGUSR1)
                order.append("body done")
        assert order == ["body done", "handler"]
        assert signal.getsignal(signal.SIGUSR1) is handler
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_ctrl_c_during_the_recovery_waits_until_the_parameters_are_back(monkeypatch):
    """A query move fails at its second kernel call; while the recovery runs, a signal
    whose handler raises KeyboardInterrupt arrives. It is delivered after the recovery: the
    parameters are at the start point and the engine says it is not perturbed."""
    ps, opt = build("zosgd")
    start = snapshot(ps)
    real, count = kernels.run, [0]

    def failing(*a, **kw):
        count[0] += 1
        if count[0] == 2:
            raise Injected("the move fails")
        if count[0] == 3:  # the first call of the recovery
            signal.raise_signal(signal.SIGUSR1)
        return real(*a, **kw)

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt("arrived during the recovery")

    previous = signal.signal(signal.SIGUSR1, ctrl_c)
    monkeypatch.setattr(kernels, "run", failing)
    try:
        with pytest.raises(KeyboardInterrupt, match="arrived during the recovery"):
            opt.engine.move(12345, 0.1)  # the engine alone: no optimizer cleans up after it
    finally:
        signal.signal(signal.SIGUSR1, previous)
        monkeypatch.setattr(kernels, "run", real)
    assert same(ps, start) and not opt.engine.is_perturbed and count[0] >= 3  # the recovery ran
