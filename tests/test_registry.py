"""Issue 22: one place for each method, and hyper-parameters where torch looks for them.

The registry (``zoptim.optim.registry``) is the one map from a method's name to its class;
``minimize``, ``AskTell``, ``make_optimizer``/``zoptim finetune`` and the bench read it, so a
method registered once is usable everywhere. Every hyper-parameter a step uses sits in
``param_groups``, so a torch LR scheduler drives each registered method, and ``last_stats["lr"]``
(the lr the step used) is the scheduler's.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import zoptim
from zoptim.optim import registry
from zoptim.optim.base import ZerothOrderOptimizer

#: What a method strictly needs beyond its defaults (its schedules' length; S2P's stationary rule its lr).
NEEDS = {"as2p": dict(total_steps=10), "s2p": dict(lr=1.0, total_steps=10)}


def quadratic(x):
    return lambda: float(((x.detach() - 0.5) ** 2).sum())


def test_the_registry_is_the_one_map_from_names_to_optimizer_classes():
    exported = {obj for obj in vars(zoptim.optim).values()
                if isinstance(obj, type) and issubclass(obj, ZerothOrderOptimizer) and obj is not ZerothOrderOptimizer}
    assert {spec.cls for spec in registry.REGISTRY.values()} == exported
    # no other module writes a name -> class table
    table = re.compile(r"""["']\w+["']\s*:\s*(?:\w+\.)*(?:ZOSGD|AS2P|STP|S2P|HiZOO)\b""")
    src = Path(zoptim.__file__).parent
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py") if table.search(p.read_text())]
    assert offenders == []
    assert registry.get("AS2P").cls is zoptim.AS2P and registry.get(zoptim.HiZOO).name == "hizoo"
    with pytest.raises(ValueError, match="method must be one of 'zosgd', 'as2p', 'stp', 's2p', 'hizoo'; got 'sgd'"):
        registry.get("sgd")


def test_build_refuses_what_a_method_does_not_offer_naming_the_methods_that_do():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="momentum is an option of zosgd and as2p; got method 'stp'"):
        registry.build("stp", p, momentum=0.9)
    with pytest.raises(ValueError, match="rank is an option of zosgd, as2p, stp and s2p; got method 'hizoo'"):
        registry.build("hizoo", p, rank=1)
    with pytest.raises(ValueError, match="unknown option 'eta' for method 'as2p'; its hyper-parameters are eps, eps_end, eta_a, eta_b"):
        registry.build("as2p", p, eta=5.0)
    assert isinstance(registry.build("hizoo", p, rank=None), zoptim.HiZOO)  # "off" is not asking for it


@pytest.mark.parametrize("name", registry.names())
def test_every_method_follows_a_torch_lr_scheduler(name):
    x = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 20))
    opt = registry.build(name, [x], **NEEDS.get(name, {}))
    assert isinstance(opt.param_groups[0]["lr"], float)  # a number, which a scheduler can scale
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    used = []
    for _ in range(10):
        lr = scheduler.get_last_lr()[0]
        opt.step(quadratic(x))
        assert opt.last_stats["lr"] == lr  # the lr the step used is the scheduler's
        used.append(lr)
        scheduler.step()
    assert used[0] == opt.defaults["lr"] and all(a > b for a, b in zip(used, used[1:])) and used[-1] < 0.03 * used[0]


def test_as2p_has_one_decay_its_own_cosine_or_a_torch_schedulers():
    x = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 20))
    alone = zoptim.AS2P([x], eps=1e-2, total_steps=10)
    assert alone.param_groups[0]["lr"] == 1e-2  # lr_0 = rho_0, as a number
    lrs = []
    for _ in range(10):
        alone.step(quadratic(x))
        lrs.append(alone.last_stats["lr"])
    assert lrs[0] == 1e-2 and lrs[5] == pytest.approx(1e-2 * 0.5 * (1 + np.cos(np.pi * 5 / 10)))
    y = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 20))
    driven = zoptim.AS2P([y], eps=1e-2, lr=5e-3, total_steps=10)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(driven, T_max=10)
    for _ in range(6):
        driven.step(quadratic(y))
        scheduler.step()
    # step 5 used the scheduler's lr, 0.005 * 0.5 * (1 + cos(pi/2)) = 0.0025, not that times AS2P's own decay
    assert driven.last_stats["lr"] == pytest.approx(5e-3 * 0.5 * (1 + np.cos(np.pi * 5 / 10)))


def test_hyper_parameters_are_group_entries_that_the_step_reads_and_checks():
    x = torch.nn.Parameter(torch.zeros(4))
    opt = zoptim.ZOSGD([x], lr=0.1, eps=1e-2)
    assert opt.param_groups[0]["eps"] == opt.eps == 1e-2 and "eps" in opt.state_dict()["param_groups"][0]
    opt.param_groups[0]["eps"] = 3e-2  # as a scheduler would
    opt.step(quadratic(x))
    assert opt.last_stats["rho"] == 3e-2
    two = zoptim.HiZOO([{"params": [torch.nn.Parameter(torch.zeros(2))]},
                        {"params": [torch.nn.Parameter(torch.zeros(3))], "eps": 1e-2}])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['eps'\] = 0.01 differs from param_groups\[0\]\['eps'\]"):
        two.step(lambda: 1.0)
    opt.param_groups[0]["eps"] = 0.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['eps'\] must be .*checked at every step"):
        opt.step(quadratic(x))
    h = zoptim.HiZOO([torch.nn.Parameter(torch.zeros(2))])
    h.param_groups[0]["hessian_smooth"] = 1.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['hessian_smooth'\] must be < 1.0"):
        h.step(lambda: 1.0)


class _Toy(zoptim.ZOSGD):
    """A method added for this test: ZOSGD under another name (nothing else is written for it)."""


@pytest.fixture
def toy_registered():
    saved = dict(registry.REGISTRY)
    registry.register("toy", _Toy, "a test method", options=("momentum",))
    yield
    registry.REGISTRY.clear()
    registry.REGISTRY.update(saved)


def test_a_method_registered_once_is_usable_everywhere(toy_registered, tmp_path):
    from zoptim.bench.methods import get_method
    from zoptim.lm.train import finetune_methods, make_optimizer

    res = zoptim.minimize(lambda v: float(((v - 1) ** 2).sum()), np.zeros(5), method="toy",
                          options={"maxfev": 41, "lr": 0.05, "eps": 1e-2})
    assert res.nit == 20 and res.fun < 5.0
    at = zoptim.AskTell("TOY", np.zeros(5), lr=0.05)
    at.tell([float(np.sum(point)) for point in at.ask(2)])
    assert at.steps == 1 and isinstance(at.optimizer, _Toy)
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(make_optimizer("toy", p, steps=4, momentum=0.9), _Toy) and "toy" in finetune_methods()
    with pytest.raises(ValueError, match="guard is an option of zosgd and hizoo; got method 'toy'"):
        make_optimizer("toy", p, steps=4, guard=0.02)
    recipe = get_method("toy")
    opt, scheduler = recipe.build(p, {"lr": 0.1, "eps": 0.01}, total_steps=5, seed=0)
    assert isinstance(opt, _Toy) and recipe.queries_per_step == 2 and recipe.uses == ("lr", "eps")


def test_the_momentum_and_the_loss_guard_are_group_entries_a_scheduler_can_cycle():
    x = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 20))
    opt = zoptim.ZOSGD([x], lr=1e-2, momentum=0.9, guard=0.02)
    assert (opt.param_groups[0]["momentum"], opt.param_groups[0]["guard"]) == (0.9, 0.02)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10, base_momentum=0.8,
                                                    max_momentum=0.95)  # cycles group["momentum"], as for SGD
    for _ in range(10):
        beta = opt.param_groups[0]["momentum"]
        opt.step(quadratic(x))
        assert opt.momentum.beta == beta  # the step used the group's value
        scheduler.step()
    # without momentum the entry is 0, so that OneCycleLR runs (tests/test_long_runs.py: its cycle is then ignored)
    assert zoptim.ZOSGD([x]).param_groups[0]["momentum"] == 0.0
