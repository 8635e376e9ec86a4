"""The black-box interfaces: same iterates as step(closure), scipy's conventions, every error, no thread."""

from __future__ import annotations

import gc
import io
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
import torch

import zoptim
from zoptim.optim import registry


def sphere(x):
    return float(((np.asarray(x) - 1.0) ** 2).sum())


def rosen(x):
    x = np.asarray(x)
    return float((100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum())


def bits(t):
    return t.detach().clone().view(torch.int64 if t.dtype == torch.float64 else torch.int32)


# Each method with hyper-parameters as minimize passes them to the optimizer (AS2P: the cosine
# schedules, total_steps = the steps the budget allows; S2P stationary likewise).
CASES = [
    ("as2p", dict(eps=0.05, seed=3)),
    ("zosgd", dict(lr=0.02, eps=1e-3, num_directions=2, seed=3)),
    ("stp", dict(lr=0.05, seed=3)),
    ("s2p", dict(step_rule="dynamic", L=2.0, seed=3)),
    ("s2p", dict(lr=2.0, seed=3)),
]


def torch_run(method, hp, x0, steps, f=sphere):
    x = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    hp = dict(hp)
    if method == "as2p":
        hp.setdefault("batch_mode", "minibatch")
        hp.setdefault("total_steps", max(steps, 1))
    if method == "s2p" and "L" not in hp:
        hp.setdefault("total_steps", max(steps, 1))
    opt = registry.build(method, [x], **hp)
    for _ in range(steps):
        opt.step(lambda: f(x.detach().numpy()))
    return x.detach().numpy(), opt


# -- same iterates ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method,hp", CASES)
def test_minimize_reproduces_the_torch_optimizers_iterates(method, hp):
    x0 = np.linspace(-1, 1, 12)
    qps = torch_run(method, hp, x0, 0, rosen)[1].queries_per_step  # asked of the built optimizer
    # two of these settings run away on Rosenbrock: the iterates are compared however far they go
    res = zoptim.minimize(rosen, x0, method=method, options={"maxfev": 60 * qps + 1, "divergence": None, **hp})
    x, opt = torch_run(method, hp, x0, res.nit, rosen)
    assert res.nit == 60 and res.nfev == 60 * qps + 1 == opt.num_queries + 1
    assert np.array_equal(res.x, x)  # bit for bit
    assert res.fun == rosen(res.x) and res.fun_best <= res.fun
    assert res.fun_best == res.loss_history.min() and rosen(res.x_best) == res.fun_best


@pytest.mark.parametrize("method,hp", CASES)
def test_ask_tell_on_a_vector_reproduces_the_torch_optimizers_iterates(method, hp):
    x0 = np.linspace(-1, 1, 12)
    hp = {**hp, "total_steps": 25} if method == "as2p" or "lr" in hp and method == "s2p" else hp
    if method == "as2p":
        hp["batch_mode"] = "full"  # AskTell's default for a vector (it does not know the budget)
    x, opt = torch_run(method, hp, x0, 25, rosen)
    at = zoptim.AskTell(method, x0, **hp)
    for _ in range(25 * opt.queries_per_step):
        at.tell(rosen(at.ask()))
    assert np.array_equal(at.recommend(), x) and at.steps == 25 and at.num_queries == opt.num_queries


@pytest.mark.parametrize("cls,kw", [(zoptim.AS2P, dict(total_steps=20)), (zoptim.STP, dict(lr=0.1)),
                                    (zoptim.ZOSGD, dict(lr=0.01, num_directions=2))])
def test_ask_tell_over_tensors_gives_the_iterates_of_step(cls, kw):
    a = torch.nn.Parameter(torch.zeros(30))
    opt = cls([a], seed=3, **kw)
    for _ in range(10):
        opt.step(lambda: sphere(a.detach()))
    b = torch.nn.Parameter(torch.zeros(30))
    with zoptim.AskTell(cls([b], seed=3, **kw)) as at:
        for _ in range(10 * opt.queries_per_step):
            (x,) = at.ask()
            assert x is b  # the tensor itself, perturbed in place
            at.tell(sphere(x.detach()))
    assert torch.equal(bits(a), bits(b))


# -- minimize: results and stopping rules -----------------------------------------------------------------
def test_minimize_returns_scipys_result_and_makes_progress():
    from scipy.optimize import OptimizeResult

    res = zoptim.minimize(sphere, np.zeros(20), options={"maxfev": 1500})  # every default
    assert isinstance(res, OptimizeResult)
    assert set(res) >= {"x", "fun", "nit", "nfev", "success", "status", "message", "x_best", "fun_best", "loss_history"}
    assert res.x.shape == (20,) and res.x.dtype == np.float64
    assert res.status == 1 and not res.success and "function evaluations" in res.message  # scipy's convention
    assert res.nfev == len(res.loss_history) <= 1500
    assert res.fun < sphere(np.zeros(20)) / 1000


def test_args_are_passed_to_fun():
    res = zoptim.minimize(lambda x, c, s: s * float(((x - c) ** 2).sum()), np.zeros(3), args=(2.0, 0.5),
                          options={"maxfev": 2000, "eps": 0.1})
    assert np.allclose(res.x_best, 2.0, atol=0.1)


@pytest.mark.parametrize("options,status,check", [
    ({"maxfev": 101}, 1, lambda r: r.nfev == 101 and r.nit == 50),
    ({"maxfev": 5000, "maxiter": 7}, 2, lambda r: r.nit == 7 and r.nfev == 15),
    ({"maxfev": 5000, "ftarget": 5.0}, 0, lambda r: r.success and r.fun_best <= 5.0 and r.loss_history[-2] <= 5.0),
    ({"maxfev": 5000, "timeout": 1e-9}, 3, lambda r: r.nfev == 2 and not r.success),
])
def test_stopping_rules(options, status, check):
    res = zoptim.minimize(sphere, np.zeros(10), options={"eps": 0.05, **options})
    assert res.status == status, res.message
    assert check(res)


def test_tol_stops_when_the_best_value_stalls():
    res = zoptim.minimize(lambda x: 1.0, np.zeros(4), tol=1e-8, options={"maxfev": 10_000, "patience": 20})
    assert res.status == 0 and res.success and res.nit == 21 and "tol" in res.message


@pytest.mark.parametrize("style", ["true", "numpy-true", "one", "stopiteration", "intermediate_result"])
def test_a_callback_can_stop_the_run(style):
    seen = []
    truth = {"numpy-true": np.bool_, "one": int}.get(style, bool)

    def cb_true(xk):
        seen.append(xk)
        return truth(len(seen) >= 3)

    def cb_stop(xk):
        seen.append(xk)
        if len(seen) >= 3:
            raise StopIteration

    def cb_result(intermediate_result):
        seen.append(intermediate_result.x)
        assert intermediate_result.nit == len(seen) and np.isfinite(intermediate_result.fun)
        return len(seen) >= 3

    cb = {"stopiteration": cb_stop, "intermediate_result": cb_result}.get(style, cb_true)
    res = zoptim.minimize(sphere, np.zeros(5), callback=cb, options={"maxfev": 1000})
    assert res.nit == 3 and res.status == 99 and not res.success
    assert np.array_equal(seen[-1], res.x)


def test_bounds_project_queries_and_iterates():
    calls = []

    def f(x):
        calls.append(x.copy())
        return sphere(x)

    res = zoptim.minimize(f, np.full(6, 0.2), bounds=[(0.0, 0.5)] * 5 + [(None, None)], options={"maxfev": 1500, "eps": 0.1})
    pts = np.array(calls)
    assert pts[:, :5].min() >= 0.0 and pts[:, :5].max() <= 0.5
    assert np.allclose(res.x[:5], 0.5, atol=0.02) and abs(res.x[5] - 1.0) < 0.2  # at the face of the box
    from scipy.optimize import Bounds

    with pytest.warns(UserWarning, match="x0 is not within the bounds"):
        res = zoptim.minimize(sphere, np.full(3, 5.0), bounds=Bounds(-1.0, 0.0), options={"maxfev": 11})
    assert res.x.max() <= 0.0


def test_a_progress_bar_can_be_shown(capsys):
    zoptim.minimize(sphere, np.zeros(3), options={"maxfev": 51, "progress": True})
    assert "zoptim as2p" in capsys.readouterr().err


# -- errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x0,exc,match", [
    ([], ValueError, "x0 must not be empty"),
    (np.array([1.0, np.nan]), ValueError, r"x0 must be finite; x0\[1\] = nan"),
    ([0.0, np.inf, 1.0], ValueError, "x0 must be finite"),
    (["a", "b"], TypeError, "x0 must be an array of real numbers"),
    ([object()], TypeError, "x0 must be an array of real numbers"),
    ([1j, 2], TypeError, "x0 must be real"),
    (np.zeros((2, 2)), ValueError, "x0 must be one-dimensional"),
    ([[1.0], [1.0, 2.0]], ValueError, "x0 must be a 1-D array"),
])
def test_bad_x0_is_rejected(x0, exc, match):
    with pytest.raises(exc, match=match):
        zoptim.minimize(sphere, x0)
    with pytest.raises(exc, match=match):
        zoptim.AskTell("as2p", x0)


@pytest.mark.parametrize("bounds,exc,match", [
    ([(0, 1)], ValueError, "one \\(low, high\\) pair per variable: x0 has 2, bounds has 1"),
    ([(0, 1), (2, 1)], ValueError, "lower bound > upper bound for variable 1"),
    ([(0, 1), (np.nan, 1)], ValueError, "lower bound 1 is NaN"),
    ([(0, 1), 3], ValueError, r"bounds\[1\] must be a \(low, high\) pair"),
    ([(0, 1), ("a", "b")], ValueError, "bounds must be real numbers"),
    (5, TypeError, "bounds must be a scipy.optimize.Bounds or a sequence"),
])
def test_bad_bounds_are_rejected(bounds, exc, match):
    with pytest.raises(exc, match=match):
        zoptim.minimize(sphere, np.zeros(2), bounds=bounds)


@pytest.mark.parametrize("value,match", [
    (np.zeros(3), r"fun\(x\) must be a scalar .* shape \(3,\)"),
    (None, r"fun\(x\) must be a real scalar .*closure returned None"),
    ("1.0", r"fun\(x\) must be a real scalar"),
    (1 + 2j, r"fun\(x\) must be a real scalar"),
    (torch.ones(2), r"fun\(x\) must be a real scalar .*shape \(2,\)"),
])
def test_fun_must_return_a_real_scalar(value, match):
    with pytest.raises(TypeError, match=match):
        zoptim.minimize(lambda x: value, np.zeros(2))


def test_scalars_of_every_usual_type_are_accepted():
    for value in (1, 1.5, np.float32(2.0), np.array(3.0), np.array([4.0]), torch.tensor(5.0), torch.ones(1, 1)):
        assert zoptim.minimize(lambda x, v=value: v, np.zeros(2), options={"maxfev": 11}).fun == float(np.asarray(value).ravel()[0])


def test_non_finite_values_are_skipped_then_reported():
    calls = iter([np.nan] + [1.0] * 100)
    with pytest.warns(zoptim.NonFiniteLossWarning, match="update skipped"):
        res = zoptim.minimize(lambda x: next(calls), np.zeros(2), options={"maxfev": 21})
    assert np.isnan(res.loss_history[0]) and res.fun_best == 1.0
    with warnings.catch_warnings():  # ten skipped steps in a row: a result that says the run diverged
        warnings.simplefilter("ignore", zoptim.NonFiniteLossWarning)
        res = zoptim.minimize(lambda x: np.inf, np.zeros(2), options={"maxfev": 100})
    assert res.status == 5 and not res.success and res.message.startswith("The run diverged")
    assert "10 consecutive steps" in res.message and np.array_equal(res.x, np.zeros(2))


@pytest.mark.parametrize("method", ["zosgd", "as2p", "stp", "s2p", "hizoo"])
def test_every_method_runs_with_its_defaults_on_a_plain_vector(method):
    res = zoptim.minimize(sphere, np.zeros(6), method=method, options={"maxfev": 401})
    assert res.status == 1 and res.nfev <= 401 and res.fun < sphere(np.zeros(6))


def test_a_non_finite_final_point_is_not_a_success():
    """ftarget is reached (status 0), then f is NaN at the final iterate: the result says so."""
    reached = []

    def f(x):
        if reached:
            return np.nan
        value = float(np.sum((x - 1.0) ** 2))
        if value <= 7.5:
            reached.append(True)
        return value

    res = zoptim.minimize(f, np.zeros(8), method="zosgd", options={"maxfev": 2001, "ftarget": 7.5, "lr": 0.05, "eps": 1e-2})
    assert not res.success and res.status == 4
    assert res.message.startswith("The final point is not finite") and "ftarget" in res.message
    assert np.isnan(res.fun) and res.fun_best <= 7.5


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(method="nelder-mead"), ValueError, "method must be one of 'zosgd', 'as2p', 'stp', 's2p', 'hizoo'"),
    (dict(options={"maxfev": 0}), ValueError, r"options\['maxfev'\] must be a positive integer"),
    (dict(options={"maxfev": 2}), ValueError, r"options\['maxfev'\] = 2 is below one step"),
    (dict(options={"maxiter": 1.5}), ValueError, r"options\['maxiter'\] must be a positive integer"),
    (dict(options={"timeout": -1}), ValueError, r"options\['timeout'\] must be a finite number > 0"),
    (dict(options={"ftarget": "low"}), ValueError, r"options\['ftarget'\] must be a real number"),
    (dict(options={"learning_rate": 0.1}), ValueError, "unknown option 'learning_rate' for method 'as2p'"),
    (dict(options={"eps": -1.0}), ValueError, "eps must be a finite number > 0"),
    (dict(options=[("maxfev", 10)]), TypeError, "options must be a dict"),
    (dict(tol=0.0), ValueError, r"options\['tol'\] must be a finite number > 0"),
    (dict(callback=3), TypeError, "callback must be callable"),
])
def test_bad_arguments_are_rejected(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        zoptim.minimize(sphere, np.zeros(2), **kwargs)
    with pytest.raises(TypeError, match="fun must be callable"):
        zoptim.minimize(None, np.zeros(2))


def test_ask_tell_misuse_is_reported():
    p = torch.nn.Parameter(torch.zeros(3))
    at = zoptim.AskTell(zoptim.ZOSGD([p]))
    with pytest.raises(RuntimeError, match=r"tell\(\) without a pending ask"):
        at.tell(1.0)
    at.ask()
    with pytest.raises(RuntimeError, match=r"ask\(\) called again before tell"):
        at.ask()
    with pytest.raises(TypeError, match=r"tell\(value\) must be a real scalar .*closure returned None"):
        at.tell(None)
    at.tell(1.0)  # the bad value changed nothing: the ask is still pending
    assert at.num_queries == 1
    with pytest.raises(TypeError, match="takes no x0 or hyper-parameters"):
        zoptim.AskTell(zoptim.ZOSGD([p]), np.zeros(3))
    with pytest.raises(TypeError, match="needs x0"):
        zoptim.AskTell("as2p")
    with pytest.raises(TypeError, match="AskTell takes a zoptim optimizer, or a method name"):
        zoptim.AskTell(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(ValueError, match="unknown option 'lrr' for method 'zosgd'"):
        zoptim.AskTell("zosgd", np.zeros(3), lrr=0.1)
    with pytest.raises(ValueError, match="state_dict is of method 'as2p'; this AskTell runs 'zosgd'"):
        zoptim.AskTell("zosgd", np.zeros(3)).load_state_dict(zoptim.AskTell("as2p", np.zeros(3)).state_dict())
    with pytest.raises(ValueError, match="shapes"):
        zoptim.AskTell("as2p", np.zeros(3)).load_state_dict(zoptim.AskTell("as2p", np.zeros(4)).state_dict())
    with pytest.raises(ValueError, match="not saved by AskTell.state_dict"):
        at.load_state_dict({"x": 1})


def test_a_non_finite_tell_skips_the_step_and_restores_exactly():
    p = torch.nn.Parameter(torch.randn(40, generator=torch.Generator().manual_seed(1)))
    before = bits(p)
    at = zoptim.AskTell(zoptim.AS2P([p], total_steps=10))
    at.ask()
    at.tell(1.0)
    at.ask()
    with pytest.warns(zoptim.NonFiniteLossWarning):
        at.tell(float("nan"))
    assert torch.equal(bits(p), before) and not at.in_step and at.steps == 1


# -- abandoned runs: exact parameters, no thread ------------------------------------------------------------
def _started(cls, kw, p, tells):
    at = zoptim.AskTell(cls([p], **kw))
    for i in range(tells):
        at.ask()
        at.tell(float(i))
    at.ask()
    return at


ABANDON_CASES = [(zoptim.AS2P, dict(total_steps=10), 1), (zoptim.ZOSGD, dict(lr=0.1, num_directions=3), 4),
                 (zoptim.STP, dict(lr=0.1), 2), (zoptim.S2P, dict(step_rule="dynamic", L=1.0), 3)]


@pytest.mark.parametrize("cls,kw,tells", ABANDON_CASES)
@pytest.mark.parametrize("how", ["close", "with", "del", "exception", "next step"])
def test_an_abandoned_ask_tell_leaves_the_parameters_bit_for_bit(cls, kw, tells, how):
    p = torch.nn.Parameter(torch.randn(300, generator=torch.Generator().manual_seed(0)))
    before = bits(p)
    if how == "close":
        at = _started(cls, kw, p, tells)
        assert not torch.equal(bits(p), before)  # perturbed for the query
        at.close()
    elif how == "with":
        with zoptim.AskTell(cls([p], **kw)) as at:
            at.ask()
    elif how == "del":
        at = _started(cls, kw, p, tells)
        del at
    elif how == "exception":
        def loop():
            at = zoptim.AskTell(cls([p], **kw))
            for i in range(100):
                at.ask()
                if i == tells:
                    raise KeyError("the simulator failed")
                at.tell(float(i))

        with pytest.raises(KeyError):
            loop()
    else:  # the optimizer is stepped directly: the ask/tell step in progress is abandoned first
        at = _started(cls, kw, p, tells)
        at.optimizer.step(lambda: 0.0)  # a flat loss: a zero update, so the bits must not change
        with pytest.raises(RuntimeError, match="abandoned"):
            at.tell(1.0)
    assert torch.equal(bits(p), before)


def test_abandoned_ask_tells_leave_no_thread_and_are_collected():
    p = torch.nn.Parameter(torch.randn(100))
    before = bits(p)
    opt = zoptim.AS2P([p], total_steps=100)
    zoptim.AskTell(opt).ask()  # warm-up (a shared noise helper thread may start once per process)
    gc.collect()
    threads = threading.active_count()
    refs = []
    for _ in range(20):
        at = zoptim.AskTell(opt)
        at.ask()
        import weakref

        refs.append(weakref.ref(at))
        del at
    assert threading.active_count() == threads
    assert all(r() is None for r in refs)  # nothing holds them: collected by reference counting
    assert torch.equal(bits(p), before)
    v = zoptim.AskTell("as2p", np.zeros(5))
    v.ask()
    del v
    gc.collect()
    assert threading.active_count() == threads


def test_recommend_mid_step_is_the_iterate_and_leaves_the_asked_point():
    at = zoptim.AskTell("zosgd", np.zeros(8), lr=0.1, num_directions=2)
    for _ in range(5):
        at.tell(sphere(at.ask()))
    x_iter = at.recommend()
    asked = at.ask()
    assert np.array_equal(at.recommend(), x_iter) and not np.array_equal(asked, x_iter)
    assert np.array_equal(at._vector.detach().numpy(), asked)


# -- state across a restart ---------------------------------------------------------------------------------
def _drive(at, n, f=rosen):
    for _ in range(n):
        at.tell(f(at.ask()))


@pytest.mark.parametrize("method,hp", [("as2p", dict(eps=0.05, total_steps=40)), ("zosgd", dict(lr=1e-3, num_directions=3)),
                                       ("stp", dict(lr=0.05))])
def test_state_round_trip_continues_the_same_run(method, hp):
    x0 = np.linspace(-1, 1, 7)
    full = zoptim.AskTell(method, x0, seed=5, **hp)
    _drive(full, 61)
    part = zoptim.AskTell(method, x0, seed=5, **hp)
    _drive(part, 31)  # mid-step for every method here
    assert part.in_step
    part.ask()  # an ask without a tell is not saved: asked again after the restart
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    del part
    gc.collect()
    resumed = zoptim.AskTell.from_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    _drive(resumed, 30)
    assert np.array_equal(resumed.recommend(), full.recommend())
    assert resumed.num_queries == full.num_queries and resumed.steps == full.steps


def test_state_round_trip_over_tensors():
    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(4, 1)

    def f(model):
        return float(model(torch.ones(3, 4)).pow(2).mean().detach())

    full = make()
    at_full = zoptim.AskTell(zoptim.AS2P(full.parameters(), total_steps=30, seed=2))
    for _ in range(41):
        at_full.ask()
        at_full.tell(f(full))
    part = make()
    at = zoptim.AskTell(zoptim.AS2P(part.parameters(), total_steps=30, seed=2))
    for _ in range(21):
        at.ask()
        at.tell(f(part))
    sd = at.state_dict()
    fresh = make()  # a new process: new model at its initial weights, new optimizer
    at2 = zoptim.AskTell(zoptim.AS2P(fresh.parameters(), total_steps=30, seed=2))
    at2.load_state_dict(sd)
    for _ in range(20):
        at2.ask()
        at2.tell(f(fresh))
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), fresh.parameters()))  # the same query point
    assert all(torch.equal(a, b) for a, b in zip(at_full.recommend(), at2.recommend()))  # the same iterate


def test_state_round_trip_across_a_real_process_restart(tmp_path):
    x0 = np.linspace(-1, 1, 9)
    full = zoptim.AskTell("as2p", x0, eps=0.05, total_steps=50, seed=1)
    _drive(full, 81)
    part = zoptim.AskTell("as2p", x0, eps=0.05, total_steps=50, seed=1)
    _drive(part, 41)
    torch.save(part.state_dict(), tmp_path / "state.pt")
    script = textwrap.dedent(f"""
        import numpy as np, torch, zoptim
        rosen = lambda x: float((100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum())
        at = zoptim.AskTell.from_state_dict(torch.load({str(tmp_path / 'state.pt')!r}, weights_only=True))
        for _ in range(40):
            at.tell(rosen(at.ask()))
        np.save({str(tmp_path / 'x.npy')!r}, at.recommend())
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert np.array_equal(np.load(tmp_path / "x.npy"), full.recommend())


def test_ask_tell_takes_bounds_as_minimize_does():
    box = [(-0.5, 0.5)] * 4
    at = zoptim.AskTell("zosgd", np.zeros(4), bounds=box, lr=0.2, eps=0.3, seed=1)
    for _ in range(200):
        point = at.ask()
        assert np.all(np.abs(point) <= 0.5)  # every point asked is in the box
        at.tell(sphere(point))
        if not at.in_step:
            assert np.all(np.abs(at.recommend()) <= 0.5)  # and so is every iterate
    assert np.all(at.recommend() > 0.3)  # on its way to the sphere's minimum (at 1) projected onto the box
    again = zoptim.AskTell.from_state_dict(at.state_dict())
    assert np.array_equal(again.recommend(), at.recommend()) and again._box is not None
    with pytest.raises(TypeError, match="bounds apply to the vector form"):
        zoptim.AskTell(zoptim.ZOSGD([torch.nn.Parameter(torch.zeros(2))]), bounds=box[:2])
    with pytest.warns(UserWarning, match="x0 is not within the bounds"):
        zoptim.AskTell("as2p", np.full(4, 2.0), bounds=box)


# -- batches: ask(n), tell(values) in any order (issue 21) ------------------------------------------------
BATCH_CASES = [("zosgd", dict(lr=1e-3, num_directions=3), 6), ("as2p", dict(eps=0.05, total_steps=20), 2),
               ("stp", dict(lr=0.05), 3), ("hizoo", dict(lr=1e-3), 3), ("s2p", dict(step_rule="dynamic", L=50.0), 2)]


@pytest.mark.parametrize("method,hp,width", BATCH_CASES)
def test_ask_n_hands_out_a_steps_independent_points_and_any_order_gives_the_same_run(method, hp, width):
    x0 = np.linspace(-1, 1, 9)
    one = zoptim.AskTell(method, x0, seed=4, **hp)
    _drive(one, 20 * one.optimizer.queries_per_step)
    many = zoptim.AskTell(method, x0, seed=4, **hp)
    order = np.random.default_rng(0)
    while many.steps < 20:
        points = many.ask(8)
        assert points.ndim == 2 and points.shape[1] == 9 and 1 <= len(points) <= width
        if method != "s2p":
            assert len(points) == width  # every query of the step at once
        values = [rosen(x) for x in points]
        if many.steps % 2:
            many.tell(values)  # all rows, in order
        else:
            for j in order.permutation(len(points)):  # one row at a time, in a random order
                many.tell(values[j], index=int(j))
    assert np.array_equal(many.recommend(), one.recommend()) and many.num_queries == one.num_queries


def test_ask_n_of_two_point_directions_returns_the_plus_and_minus_points():
    at = zoptim.AskTell("zosgd", np.zeros(5), lr=0.1, eps=0.01, num_directions=2, seed=0)
    p = at.ask(4)
    assert np.allclose(p[0] + p[1], 0) and np.allclose(p[2] + p[3], 0)  # x +- eps s_i around x = 0
    assert not np.allclose(np.abs(p[0]), np.abs(p[2]))  # two different directions
    assert np.allclose(np.linalg.norm(p[0]) / 0.01, np.linalg.norm(p[2]) / 0.01, rtol=2)


def test_ask_n_misuse_is_reported_and_changes_nothing():
    at = zoptim.AskTell("zosgd", np.zeros(4), lr=0.1, num_directions=2, seed=0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        at.ask(0)
    points = at.ask(4)
    with pytest.raises(RuntimeError, match="ask\\(\\) called again before tell"):
        at.ask(2)
    with pytest.raises(ValueError, match="values of the 4 rows"):
        at.tell([1.0, 2.0])
    with pytest.raises(TypeError, match=r"tell\(values\)\[1\] must be a real scalar"):
        at.tell([1.0, None, 1.0, 1.0])
    with pytest.raises(TypeError, match="one value per row"):
        at.tell(1.0)
    with pytest.raises(ValueError, match="index must be a row"):
        at.tell(1.0, index=4)
    at.tell(sphere(points[2]), index=2)
    with pytest.raises(ValueError, match="row 2 of the last ask\\(n\\) was already told"):
        at.tell(1.0, index=2)
    assert at.num_queries == 1 and at.in_step
    for j in (3, 0, 1):
        at.tell(sphere(points[j]), index=j)
    assert not at.in_step and at.steps == 1
    with pytest.raises(TypeError, match="needs the vector form"):
        zoptim.AskTell(zoptim.ZOSGD([torch.nn.Parameter(torch.zeros(2))])).ask(2)


def test_a_nonfinite_row_skips_the_step_and_drops_its_other_rows():
    at = zoptim.AskTell("zosgd", np.zeros(4), lr=0.1, num_directions=2, seed=0)
    points = at.ask(4)
    at.tell(1.0, index=1)
    with pytest.warns(zoptim.NonFiniteLossWarning):
        at.tell(float("nan"), index=3)
    assert not at.in_step and at.steps == 1 and np.array_equal(at.recommend(), np.zeros(4))
    with pytest.raises(RuntimeError, match="without a pending ask"):
        at.tell(1.0, index=0)
    assert not np.array_equal(at.ask(4), points)  # the next step, a new direction


def test_state_mid_batch_told_out_of_order_resumes_the_same_run():
    x0 = np.linspace(-1, 1, 7)
    full = zoptim.AskTell("zosgd", x0, seed=5, lr=1e-3, num_directions=3)
    _drive(full, 60)
    part = zoptim.AskTell("zosgd", x0, seed=5, lr=1e-3, num_directions=3)
    _drive(part, 54)
    rows = part.ask(6)
    for j in (4, 1):
        part.tell(rosen(rows[j]), index=j)
    resumed = zoptim.AskTell.from_state_dict(part.state_dict())
    rest = resumed.ask(6)
    assert len(rest) == 4 and np.array_equal(rest, rows[[0, 2, 3, 5]])  # the rows not yet told
    resumed.tell([rosen(x) for x in rest])
    assert np.array_equal(resumed.recommend(), full.recommend()) and resumed.num_queries == full.num_queries


# -- minimize's defaults on a plain vector (issue 21; the table: benchmarks/minimize_defaults.py) --------
def test_the_default_method_makes_progress_on_rosenbrock_and_a_noisy_sphere():
    res = zoptim.minimize(rosen, np.zeros(10), options={"maxfev": 2000, "seed": 0})
    assert res.method == "as2p" and res.fun < 7.5  # from 9 (the paper's full-batch mode with eps 1e-3: 8.6)
    rng = np.random.default_rng(0)
    noisy = zoptim.minimize(lambda x: sphere(x) + rng.normal(), np.zeros(10), options={"maxfev": 2000, "seed": 0})
    assert noisy.status == 1 and sphere(noisy.x) < 2.0  # from 10; the noise has standard deviation 1


def test_an_iterate_that_runs_away_stops_with_status_5_instead_of_running_on():
    res = zoptim.minimize(rosen, np.zeros(10), method="zosgd", options={"maxfev": 2000, "seed": 0})
    assert res.status == 5 and not res.success and "diverged" in res.message and "f(x0) + 1000" in res.message
    assert res.nfev < 2000 and res.fun_best <= rosen(np.zeros(10))
    unguarded = zoptim.minimize(rosen, np.zeros(10), method="zosgd", options={"maxfev": 2000, "divergence": None})
    assert unguarded.status == 1 and unguarded.fun > 1e100  # what the check prevents: running on
    with pytest.raises(ValueError, match="options\\['divergence'\\] must be a finite number > 0"):
        zoptim.minimize(rosen, np.zeros(10), options={"divergence": -1})
