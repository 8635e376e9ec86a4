"""Bad input gets a clear error that names the argument and what was expected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zoptim


def params():
    return [torch.nn.Parameter(torch.zeros(4))]


@pytest.mark.parametrize("make,match", [
    (lambda: zoptim.ZOSGD(params(), eps=0.0), r"eps must be a finite number > 0; got 0.0"),
    (lambda: zoptim.ZOSGD(params(), eps=-1e-3), r"eps must be"),
    (lambda: zoptim.ZOSGD(params(), lr=-1.0), r"lr must be a finite number >= 0"),
    (lambda: zoptim.ZOSGD(params(), lr=float("nan")), r"lr must be"),
    (lambda: zoptim.ZOSGD(params(), num_directions=0), r"num_directions must be an integer >= 1"),
    (lambda: zoptim.ZOSGD(params(), weight_decay=-0.1), r"weight_decay must be"),
    (lambda: zoptim.ZOSGD(params(), distribution="gaussian"), r"distribution must be one of 'normal', 'rademacher', 'uniform'; got 'gaussian'"),
    (lambda: zoptim.ZOSGD(params(), seed=1.5), r"seed must be an integer"),
    (lambda: zoptim.ZOSGD(params(), max_nonfinite=0), r"max_nonfinite must be an integer >= 1"),
    (lambda: zoptim.STP(params(), lr=-1), r"lr must be"),
    (lambda: zoptim.S2P(params(), step_rule="fast"), r"step_rule must be one of 'stationary', 'dynamic'"),
    (lambda: zoptim.S2P(params(), step_rule="dynamic"), r"step_rule='dynamic' needs L; got None"),
    (lambda: zoptim.S2P(params(), step_rule="relaxed_dynamic", L0=1.0), r"needs L1"),
    (lambda: zoptim.S2P(params(), step_rule="stationary", lr=1.0), r"needs total_steps"),
    (lambda: zoptim.S2P(params(), step_rule="dynamic", L=-2.0), r"L must be a finite number > 0"),
    (lambda: zoptim.AS2P(params()), r"total_steps is required in batch_mode='minibatch'"),
    (lambda: zoptim.AS2P(params(), total_steps=0), r"total_steps must be an integer >= 1"),
    (lambda: zoptim.AS2P(params(), total_steps=10, window=0.0), r"window must be a fraction in \(0, 1\]; got 0.0"),
    (lambda: zoptim.AS2P(params(), total_steps=10, window=1.5), r"window must be a fraction"),
    (lambda: zoptim.AS2P(params(), total_steps=10, eps=0), r"eps must be"),
    (lambda: zoptim.AS2P(params(), total_steps=10, eps_end=1.0), r"eps_end must be <= eps"),
    (lambda: zoptim.AS2P(params(), total_steps=10, eta_b=0), r"eta_b must be"),
    (lambda: zoptim.AS2P(params(), batch_mode="online"), r"batch_mode must be 'minibatch' or 'full'"),
    (lambda: zoptim.AS2P(params(), total_steps=10, auto_lr=False), r"auto_lr=False needs an explicit lr"),
    (lambda: zoptim.ZOSGD(params(), momentum=1.0), r"momentum must be in \[0, 1\); got 1.0"),
    (lambda: zoptim.ZOSGD(params(), momentum=-0.5), r"momentum must be a finite number >= 0"),
    (lambda: zoptim.AS2P(params(), total_steps=10, momentum=0.9, momentum_window=0), r"momentum_window must be an integer >= 1"),
    (lambda: zoptim.HiZOO(params(), hessian_smooth=1.0), r"hessian_smooth must be in \[0, 1\); got 1.0"),
    (lambda: zoptim.HiZOO(params(), hessian_smooth=-1e-3), r"hessian_smooth must be a finite number >= 0"),
    (lambda: zoptim.HiZOO(params(), eps=0.0), r"eps must be"),
    (lambda: zoptim.HiZOO(params(), lr=float("inf")), r"lr must be"),
])
def test_bad_hyper_parameters_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_empty_and_frozen_and_integer_parameters_are_rejected():
    with pytest.raises(ValueError, match="empty parameter list"):
        zoptim.ZOSGD([])
    with pytest.raises(ValueError, match="no trainable parameters"):
        zoptim.ZOSGD([torch.zeros(3)])
    with pytest.raises(ValueError, match="floating point"):
        zoptim.ZOSGD([torch.zeros(3, dtype=torch.int64)])


@pytest.mark.parametrize("value,match", [
    (None, "closure returned None"),
    (torch.ones(3), r"scalar loss; got a tensor of shape \(3,\)"),
    ("0.5", "got str"),
    ([1.0], "got list"),
])
def test_a_closure_that_returns_no_scalar_raises_type_error(value, match):
    p = torch.nn.Parameter(torch.randn(5))
    before = p.detach().clone()
    opt = zoptim.AS2P([p], total_steps=5)
    with pytest.raises(TypeError, match=match):
        opt.step(lambda: value)
    assert torch.equal(before, p.detach())  # and nothing is lost


@pytest.mark.parametrize("value", [1.5, 2, np.float32(0.5), torch.tensor(1.0), torch.tensor([2.0]), torch.tensor([[3.0]])])
def test_scalar_losses_of_every_usual_type_are_accepted(value):
    opt = zoptim.ZOSGD(params())
    loss = opt.step(lambda: value)
    assert isinstance(loss, float) and loss == float(torch.as_tensor(value).reshape(()))  # read as that number
    assert (opt.steps, opt.num_queries, opt.nonfinite_steps) == (1, 2, 0)  # a step taken, not skipped


def test_step_without_a_closure_is_an_error():
    with pytest.raises(TypeError, match="need step\\(closure\\)"):
        zoptim.ZOSGD(params()).step()


def test_a_foreign_state_dict_is_rejected():
    opt = zoptim.ZOSGD(params())
    sgd = torch.optim.SGD(params(), lr=0.1)
    with pytest.raises(ValueError, match="not saved by a zoptim optimizer"):
        opt.load_state_dict(sgd.state_dict())


def test_a_tensor_given_twice_is_rejected():
    w = torch.nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"same tensor appears twice.*shape \(3, 4\)"):
        zoptim.ZOSGD([w, torch.nn.Parameter(torch.zeros(2)), w])
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's own check
        zoptim.AS2P([{"params": [w]}, {"params": [w], "lr": 1e-3}], total_steps=10)


def _trained_state(cls=zoptim.ZOSGD, n=5, **kw):
    p = torch.nn.Parameter(torch.ones(n))
    opt = cls([p], **kw)
    opt.step(lambda: float(p.detach().square().sum()))
    return opt.state_dict()


def test_a_state_dict_of_another_class_another_model_or_another_noise_version_is_rejected():
    opt = zoptim.ZOSGD([torch.nn.Parameter(torch.ones(5))])
    with pytest.raises(ValueError, match="saved by AS2P"):
        opt.load_state_dict(_trained_state(zoptim.AS2P, total_steps=10))
    with pytest.raises(ValueError, match="saved for 6 trainable scalars; this optimizer has 5"):
        opt.load_state_dict(_trained_state(n=6))
    old = _trained_state()
    old["zoptim"]["noise_version"] = 1
    with pytest.raises(ValueError, match="noise_version 1"):
        opt.load_state_dict(old)
    opt.load_state_dict(_trained_state())  # the same class, model and stream loads
    assert opt.steps == 1


def test_a_state_dict_with_other_momentum_or_hessian_settings_is_rejected():
    with pytest.raises(ValueError, match="saved without momentum; this optimizer has momentum=0.9"):
        zoptim.ZOSGD([torch.nn.Parameter(torch.ones(5))], momentum=0.9).load_state_dict(_trained_state())
    with pytest.raises(ValueError, match="saved with momentum_window=8; this optimizer has momentum_window=4"):
        zoptim.ZOSGD([torch.nn.Parameter(torch.ones(5))], momentum=0.9, momentum_window=4).load_state_dict(
            _trained_state(momentum=0.9))
    other_beta = zoptim.ZOSGD([torch.nn.Parameter(torch.ones(5))], momentum=0.5)
    other_beta.load_state_dict(_trained_state(momentum=0.9))  # beta is a group entry: it comes with the state
    assert other_beta.param_groups[0]["momentum"] == 0.9
    w = torch.nn.Parameter(torch.ones(3, 4))
    dense = zoptim.HiZOO([w])
    dense.step(lambda: float(w.detach().sum()))
    with pytest.raises(ValueError, match="saved with factored=False; this optimizer has factored=True"):
        zoptim.HiZOO([torch.nn.Parameter(torch.ones(3, 4))], factored=True).load_state_dict(dense.state_dict())


# -- hyper-parameters set after construction, and updates too large for the dtype (issue 20) ---------
GUARDED = {
    "ZOSGD": lambda ps: zoptim.ZOSGD(ps, lr=1e-2, eps=1e-2, weight_decay=0.1),
    "AS2P": lambda ps: zoptim.AS2P(ps, lr=1e-2, auto_lr=False, total_steps=20, eps=1e-2),
    "HiZOO": lambda ps: zoptim.HiZOO(ps, lr=1e-2, eps=1e-2, weight_decay=0.1),
    "STP": lambda ps: zoptim.STP(ps, lr=1e-2),
}


def quadratic():
    p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 300))
    return p, (lambda: float((p - 0.5).square().sum()))


@pytest.mark.parametrize("name", list(GUARDED))
@pytest.mark.parametrize("field,value", [("lr", float("nan")), ("lr", float("inf")), ("lr", -1.0),
                                         ("weight_decay", float("nan")), ("weight_decay", -0.5)])
def test_a_bad_lr_or_weight_decay_set_after_construction_raises_before_any_write(name, field, value):
    p, closure = quadratic()
    opt = GUARDED[name]([p])
    opt.step(closure)
    if field not in opt.param_groups[0]:
        pytest.skip(f"{name} has no {field}")
    before = p.detach().clone()
    opt.param_groups[0][field] = value
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['{field}'\] must be a finite number >= 0; got {value!r}"):
        opt.step(closure)
    assert torch.equal(p.detach(), before)


def test_a_scheduler_that_produces_a_nan_lr_is_caught_at_the_next_step():
    p, closure = quadratic()
    opt = zoptim.ZOSGD([p], lr=1e-2, eps=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 2 else float("nan"))
    for _ in range(2):
        opt.step(closure)
        sched.step()
    with pytest.raises(ValueError, match=r"\['lr'\] must be a finite number >= 0; got nan"):
        opt.step(closure)
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("name,magnitude", [("ZOSGD", 1e38), ("AS2P", 1e300), ("HiZOO", 1e300), ("ZOSGD", 1e300)])
def test_huge_finite_losses_skip_the_update_instead_of_writing_inf(name, magnitude):
    """Alternating losses of +-magnitude: the update would overflow the weights' dtype, so it is
    skipped and counted like a non-finite loss, and the weights stay finite and where they were."""
    p, _ = quadratic()
    opt = GUARDED[name]([p])
    calls = [0]

    def closure():
        calls[0] += 1
        return magnitude if calls[0] % 2 else -magnitude

    before = p.detach().clone()
    with pytest.warns(zoptim.NonFiniteLossWarning, match="update skipped"):
        for _ in range(3):
            opt.step(closure)
    assert torch.isfinite(p).all()
    assert torch.equal(p.detach(), before)
    assert opt.nonfinite_steps == 3 and not opt.engine.is_perturbed


# -- parameters the optimizer cannot own (issue 20) ------------------------------------------------
def test_parameters_that_share_storage_are_refused_naming_both():
    w = torch.nn.Parameter(torch.randn(100))
    v = torch.nn.Parameter(w.data[:50])
    with pytest.raises(ValueError, match=r"group 0 index 0 \(shape \(100,\)\).*group 0 index 1 \(shape \(50,\)\) share storage"):
        zoptim.ZOSGD([w, v], lr=0.0)
    u = torch.nn.Parameter(w.data[40:60])  # overlapping, neither contains the start of the other
    with pytest.raises(ValueError, match="share storage"):
        zoptim.AS2P([u, v], total_steps=5)
    tail = torch.nn.Parameter(w.data[50:])  # adjacent views of one buffer do not overlap: fine
    zoptim.ZOSGD([v, tail], lr=0.0)


def test_aliases_are_named_by_their_module_names():
    model = torch.nn.Linear(4, 4)
    model.view = torch.nn.Parameter(model.weight.data[0])
    with pytest.raises(ValueError, match=r"parameter 'weight' .* and parameter 'view' .* share storage"):
        zoptim.ZOSGD(model.parameters(), module=model, rank=1)


def test_tied_weights_as_one_parameter_stay_fine():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # as transformers ties an embedding and its LM head
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    ids = torch.tensor([1, 2, 3])
    opt = zoptim.ZOSGD(model.parameters(), lr=1e-2, eps=1e-3)
    before = emb.weight.detach().clone()
    opt.step(lambda: float(head(emb(ids)).logsumexp(-1).mean()))
    assert not torch.equal(emb.weight, before) and head.weight is emb.weight


def test_parameters_that_are_not_materialised_are_refused_at_construction():
    with pytest.raises(ValueError, match=r"group 0 index 0 \(shape \(3, 4\)\) is not materialised \(on the meta device"):
        zoptim.ZOSGD(torch.nn.Linear(4, 3, device="meta").parameters())
    with pytest.raises(ValueError, match="lazy module's uninitialised parameter"):
        zoptim.HiZOO(torch.nn.LazyLinear(3).parameters())


def test_add_param_group_during_a_pending_ask_is_refused_and_close_still_restores():
    p = torch.nn.Parameter(torch.randn(50))
    opt = zoptim.ZOSGD([p], lr=1e-2, eps=1e-1)
    at = zoptim.AskTell(opt)
    start = p.detach().clone()
    at.ask()
    assert not torch.equal(p.detach(), start)
    with pytest.raises(RuntimeError, match=r"add_param_group during a step in progress .* tell\(\) the pending values or close\(\)"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
    at.close()
    assert torch.equal(p.detach(), start) and len(opt.param_groups) == 1


def test_hizoo_add_param_group_keeps_the_estimate_and_steps():
    a, b = torch.nn.Parameter(torch.randn(20)), torch.nn.Parameter(torch.randn(4, 5))
    loss = lambda: float(a.square().sum() + b.square().sum())  # noqa: E731
    opt = zoptim.HiZOO([a], lr=1e-2, eps=1e-2, hessian_smooth=0.1)
    for _ in range(3):
        opt.step(loss)
    estimate = opt.diagonal_hessian()[0].clone()
    opt.add_param_group({"params": [b], "lr": 1e-3})
    assert torch.equal(opt.diagonal_hessian()[0], estimate)
    assert torch.equal(opt.diagonal_hessian()[1], torch.ones(4, 5))
    before = b.detach().clone()
    opt.step(loss)
    assert not torch.equal(b.detach(), before)


# -- strict state loading (issue 20) ------------------------------------------------------------------
def _state_of(make, steps=3):
    ps = [torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(4))]
    opt = make(ps)
    for _ in range(steps):
        opt.step(lambda: float(sum(p.square().sum() for p in ps)))
    return opt.state_dict()


@pytest.mark.parametrize("saved,loading,field", [
    (lambda ps: zoptim.ZOSGD(ps), lambda ps: zoptim.ZOSGD(ps, distribution="rademacher"),
     r"distribution='normal'; this optimizer has distribution='rademacher'"),
    (lambda ps: zoptim.ZOSGD(ps), lambda ps: zoptim.ZOSGD(ps, num_directions=4),
     r"num_directions=1; this optimizer has num_directions=4"),
    (lambda ps: zoptim.AS2P(ps, total_steps=10), lambda ps: zoptim.AS2P(ps, total_steps=1000),
     r"total_steps=10; this optimizer has total_steps=1000"),
    (lambda ps: zoptim.AS2P(ps, total_steps=10), lambda ps: zoptim.AS2P(ps, total_steps=10, window=0.5),
     r"window=0.1; this optimizer has window=0.5"),
    (lambda ps: zoptim.S2P(ps, step_rule="stationary", lr=1.0, total_steps=10),
     lambda ps: zoptim.S2P(ps, step_rule="stationary", lr=1.0, total_steps=20),
     r"total_steps=10; this optimizer has total_steps=20"),
])
def test_a_state_dict_saved_with_other_settings_is_refused_naming_the_field(saved, loading, field):
    state = _state_of(saved)
    ps = [torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(4))]
    opt = loading(ps)
    with pytest.raises(ValueError, match=r"state_dict was saved with " + field):
        opt.load_state_dict(state)
    assert opt.steps == 0 and opt.num_queries == 0


@pytest.mark.parametrize("saved,loading,key", [
    (lambda ps: zoptim.ZOSGD(ps, eps=1e-3), lambda ps: zoptim.ZOSGD(ps, eps=1e-2), "eps"),
    (lambda ps: zoptim.HiZOO(ps), lambda ps: zoptim.HiZOO(ps, hessian_smooth=1e-3), "hessian_smooth"),
    (lambda ps: zoptim.AS2P(ps, total_steps=10), lambda ps: zoptim.AS2P(ps, total_steps=10, eta_b=50.0), "eta_b"),
])
def test_hyper_parameters_in_param_groups_come_back_with_the_state_as_lr_does(saved, loading, key):
    state = _state_of(saved)
    ps = [torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(4))]
    opt = loading(ps)
    opt.load_state_dict(state)
    assert getattr(opt, key) == state["param_groups"][0][key] != loading(ps).param_groups[0][key]


def test_a_state_dict_of_groups_with_other_shapes_is_refused():
    state = _state_of(lambda ps: zoptim.AS2P(ps, total_steps=10))
    opt = zoptim.AS2P([torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))], total_steps=10)
    with pytest.raises(ValueError, match=r"group_shapes=\[\[\[2, 3\], \[4\]\]\]; this optimizer has group_shapes=\[\[\[3, 2\], \[4\]\]\]"):
        opt.load_state_dict(state)


def test_a_load_that_fails_part_way_leaves_the_optimizer_as_it_was():
    state = _state_of(lambda ps: zoptim.HiZOO(ps, lr=1e-2), steps=5)
    state["param_groups"][0]["lr"] = 0.5
    state["zoptim"]["hessian"][1] = {"dense": torch.ones(7)}  # crafted: another shape than the tensor's
    ps = [torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(4))]
    opt = zoptim.HiZOO(ps, lr=1e-2)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="Hessian estimate has other shapes"):
        opt.load_state_dict(state)
    after = opt.state_dict()
    assert (opt.steps, opt.num_queries, opt.param_groups[0]["lr"]) == (0, 0, 1e-2)
    assert all(torch.equal(a, b) for a, b in zip(opt.diagonal_hessian(), [torch.ones(2, 3), torch.ones(4)]))
    assert after["zoptim"]["settings"] == before["zoptim"]["settings"]
