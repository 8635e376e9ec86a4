"""One set of defaults for a function of a vector: AskTell(method, x0) and minimize (issue 35)."""

from __future__ import annotations

import numpy as np
import pytest

import zoptim
from zoptim.optim import registry


def noisy_free_sphere(x):
    return float(np.sum((np.asarray(x) - 0.5) ** 2))


def ask_tell_run(method, x0, steps, **hp):
    at = zoptim.AskTell(method, x0, **hp)
    for _ in range(steps):
        at.tell(noisy_free_sphere(at.ask()))
        while at.in_step:
            at.tell(noisy_free_sphere(at.ask()))
    return at


@pytest.mark.parametrize("method", registry.names())
def test_ask_tell_with_total_steps_uses_minimizes_defaults(method):
    x0 = np.full(20, 3.0)  # rms 3: AS2P's default eps is 0.3 here, not the optimizer's 1e-3
    steps = 30
    qps = ask_tell_run(method, x0, 0, total_steps=steps).optimizer.queries_per_step if method in ("as2p", "s2p") \
        else zoptim.AskTell(method, x0).optimizer.queries_per_step
    res = zoptim.minimize(noisy_free_sphere, x0, method=method, options={"maxfev": steps * qps + 1})
    assert res.nit == steps
    hp = {"total_steps": steps} if method in ("as2p", "s2p") else {}
    at = ask_tell_run(method, x0, steps, **hp)
    assert np.array_equal(at.recommend(), res.x)  # the same defaults give the same iterates, bit for bit


def test_ask_tell_as2p_defaults_scale_with_x0():
    at = zoptim.AskTell("as2p", np.full(20, 3.0), total_steps=100)
    opt = at.optimizer
    assert opt.batch_mode == "minibatch" and opt.total_steps == 100
    assert opt.eps == pytest.approx(0.3)
    # without a length there is no schedule: full-batch mode, with minimize's eps
    free = zoptim.AskTell("as2p", np.zeros(5)).optimizer
    assert free.batch_mode == "full" and free.eps == pytest.approx(0.1)
    # what the caller gives wins
    given = zoptim.AskTell("as2p", np.zeros(5), eps=1e-3, total_steps=10, batch_mode="full").optimizer
    assert given.eps == 1e-3 and given.batch_mode == "full"


def test_ask_tell_as2p_makes_progress_with_its_defaults():
    rng = np.random.default_rng(0)

    def noisy(x):
        return float(np.sum(x ** 2) + 0.01 * rng.standard_normal())

    x0 = np.ones(20)
    at = zoptim.AskTell("as2p", x0, total_steps=1000, seed=1)
    for _ in range(2000):
        at.tell(noisy(at.ask()))
    assert noisy(at.recommend()) < 0.5 * noisy(x0)  # issue 35: 20.00 -> 20.02 before


@pytest.mark.parametrize("where", ["minimize", "asktell"])
def test_unknown_option_lists_only_what_a_vector_takes(where):
    def attempt():
        if where == "minimize":
            zoptim.minimize(noisy_free_sphere, np.zeros(3), options={"nosuch": 1})
        else:
            zoptim.AskTell("zosgd", np.zeros(3), nosuch=1)

    with pytest.raises(ValueError, match="unknown option 'nosuch'") as err:
        attempt()
    message = str(err.value)
    assert "lr" in message or "eps" in message
    for model_option in ("module", "rank", "per_example"):
        assert model_option not in message


@pytest.mark.parametrize("key,value", [("module", object()), ("rank", 1), ("per_example", True)])
def test_model_options_are_refused_for_a_vector(key, value):
    with pytest.raises(ValueError, match=f"{key}= is an option of a model's optimizer"):
        zoptim.minimize(noisy_free_sphere, np.zeros(3), method="zosgd", options={key: value})
    with pytest.raises(ValueError, match=f"{key}= is an option of a model's optimizer"):
        zoptim.AskTell("zosgd", np.zeros(3), **{key: value})


def test_a_resumed_ask_tell_keeps_the_defaults_derived_from_x0():
    """eps is derived from x0; from_state_dict rebuilds from the saved iterate, so the saved
    groups' eps must win (the run continues bit for bit)."""
    def run(split):
        at = zoptim.AskTell("as2p", np.full(8, 5.0), total_steps=40, seed=1)
        for i in range(61):
            if i == split:
                at = zoptim.AskTell.from_state_dict(at.state_dict())
            at.tell(noisy_free_sphere(at.ask()))
        return at.recommend()

    assert np.array_equal(run(-1), run(31))
