"""The black-box interfaces are thin: same iterates as step(closure), scipy's conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zoptim


def sphere(x):
    return float(((x - 1.0) ** 2).sum())


@pytest.mark.parametrize("method,options", [
    ("as2p", dict(eps=0.05)),
    ("zosgd", dict(lr=0.02, eps=1e-3)),
    ("stp", dict(lr=0.05)),
    ("s2p", dict(step_rule="dynamic", L=2.0)),
])
def test_minimize_follows_scipys_conventions_and_makes_progress(method, options):
    res = zoptim.minimize(sphere, np.zeros(20), method, maxfev=3000, **options)
    assert set(res) >= {"x", "fun", "nit", "nfev", "success", "message"}
    assert res.x.shape == (20,) and res.x.dtype == np.float64
    assert res.nfev <= 3001 and res.success
    assert res.fun == pytest.approx(sphere(res.x))
    assert res.fun < sphere(np.zeros(20)) / 5


def test_minimize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        zoptim.minimize(sphere, np.zeros(2), "nelder-mead")
    with pytest.raises(ValueError, match="maxfev must be a positive integer"):
        zoptim.minimize(sphere, np.zeros(2), maxfev=0)


def test_minimize_callback_can_stop_the_run():
    seen = []
    res = zoptim.minimize(sphere, np.zeros(5), "as2p", maxfev=1000, callback=lambda x: len(seen.append(x) or seen) >= 3)
    assert res.nit == 3 and res.message == "stopped by callback"


@pytest.mark.parametrize("cls,kw", [(zoptim.AS2P, dict(total_steps=20)), (zoptim.STP, dict(lr=0.1)),
                                    (zoptim.ZOSGD, dict(lr=0.01, num_directions=2))])
def test_ask_tell_gives_the_iterates_of_step(cls, kw):
    a = torch.nn.Parameter(torch.zeros(30))
    opt = cls([a], seed=3, **kw)
    for _ in range(10):
        opt.step(lambda: sphere(a.detach()))
    b = torch.nn.Parameter(torch.zeros(30))
    with zoptim.AskTell(cls([b], seed=3, **kw)) as at:
        for _ in range(10 * opt.queries_per_step):
            (x,) = at.ask()
            at.tell(sphere(x.detach()))
    assert torch.equal(a.detach(), b.detach())


def test_closing_mid_step_restores_the_parameters_exactly():
    p = torch.nn.Parameter(torch.randn(100, generator=torch.Generator().manual_seed(0)))
    before = p.detach().clone()
    at = zoptim.AskTell(zoptim.ZOSGD([p], lr=0.1))
    at.ask()
    assert not torch.equal(before, p.detach())  # perturbed for the query
    at.close()
    assert torch.equal(before, p.detach())


def test_ask_tell_misuse_is_reported():
    at = zoptim.AskTell(zoptim.ZOSGD([torch.nn.Parameter(torch.zeros(3))]))
    with pytest.raises(RuntimeError, match="tell\\(\\) without a pending ask"):
        at.tell(1.0)
    at.ask()
    with pytest.raises(RuntimeError, match="ask\\(\\) called twice"):
        at.ask()
    at.close()


def test_errors_in_the_step_reach_the_caller():
    at = zoptim.AskTell(zoptim.ZOSGD([torch.nn.Parameter(torch.zeros(3))]))
    at.ask()
    at.tell(None)
    with pytest.raises(TypeError, match="closure returned None"):
        at.ask()
