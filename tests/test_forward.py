"""Forward-applied directions (``module=model, rank=r``): a query point that exists only inside the
forward computation must be the point x + rho*s, and the weights must never be written by a query.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

import reference
import zoptim
from zoptim.engine.noise import mix

SEED = 3


class Net(nn.Module):
    """Embedding -> LayerNorm -> Linear -> RMSNorm -> Linear head tied to the embedding."""

    def __init__(self, vocab=11, width=6, tied=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, width)
        self.rms = nn.RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        h = self.rms(torch.tanh(self.hidden(h)))
        return self.head(h)


class Scaled(nn.Module):
    """A parameter its parent uses directly: no hook covers it, so it moves in place."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 4)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 4).repeat(70, 1))  # 280 elements, 2-d

    def forward(self, x):
        return self.inner(x) * self.gain.mean(0)


class ScaleNorm(nn.Module):
    """A normalisation layer of a type zoptim does not know: recomputed by its own forward."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.shift = nn.Parameter(torch.zeros(width) + 0.1)

    def forward(self, x):
        return x / (x.norm(dim=-1, keepdim=True) + 1.0) * self.weight + torch.sin(self.shift)


def conv_net(groups):
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=groups), nn.GroupNorm(2, 4), nn.Tanh(),
                         nn.Conv2d(4, 3, 1), nn.Flatten(), nn.Linear(3 * 5 * 5, 2))


def conv1d_net():
    from transformers.pytorch_utils import Conv1D

    return nn.Sequential(Conv1D(7, 5), nn.Tanh(), Conv1D(3, 7))


def lora_net():
    from peft import LoraConfig, inject_adapter_in_model

    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    torch.manual_seed(1)
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False), base)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


MODELS = {
    "linear+norms+tied-embedding": (lambda: Net(), lambda: torch.randint(0, 11, (4, 5))),
    "untied-embedding": (lambda: Net(tied=False), lambda: torch.randint(0, 11, (3, 4))),
    "conv2d": (lambda: conv_net(1), lambda: torch.randn(2, 4, 5, 5)),
    "conv2d-depthwise": (lambda: conv_net(4), lambda: torch.randn(2, 4, 5, 5)),
    "transformers-conv1d": (conv1d_net, lambda: torch.randn(3, 2, 5)),
    "lora": (lora_net, lambda: torch.randn(4, 6)),
    "mixed-in-place": (lambda: nn.Sequential(Scaled(), nn.Tanh(), nn.Linear(4, 2)), lambda: torch.randn(3, 5)),
    "unknown-norm": (lambda: nn.Sequential(nn.Linear(5, 6), ScaleNorm(6), nn.Linear(6, 2)), lambda: torch.randn(3, 2, 5)),
    "conv2d-1-pixel": (lambda: nn.Sequential(nn.Conv2d(4, 6, 1), nn.Flatten(), nn.Linear(6, 2)),
                       lambda: torch.randn(3, 4, 1, 1)),
}


def build(name, seed=0):
    make, data = MODELS[name]
    torch.manual_seed(seed)
    model = make()
    torch.manual_seed(seed + 100)
    return model, data()


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def materialised_output(model, x, key, scale, ranks):
    """The output of (a copy of) the unperturbed ``model`` with every trainable tensor explicitly
    set to x + scale * s; ``ranks[j]``: the rank of tensor j's direction (None: full rank)."""
    plain = copy.deepcopy(model)
    params = trainable(plain)
    with torch.no_grad():
        for j, p in enumerate(params):
            p.add_(reference.lowrank_direction(key, j, tuple(p.shape), ranks[j]) * scale)
    return plain(x)


@pytest.mark.parametrize("rank", [1, 3, None])
@pytest.mark.parametrize("name", list(MODELS))
def test_query_is_the_materialised_point(name, rank):
    """The output the closure sees at x + eps*s and x - eps*s is the output of a model whose
    weights were set to that point, for every supported layer type (float32 rounding)."""
    model, x = build(name)
    unperturbed = copy.deepcopy(model)
    eps = 0.05
    opt = zoptim.ZOSGD(trainable(model), lr=0.0, eps=eps, seed=SEED, module=model, rank=rank)
    at = zoptim.AskTell(opt)
    key = mix(SEED, 0, 0)
    # matrices under a hook take the rank-r direction; the rest (biases, norms, in place) full rank
    ranks = [rank if kind == "lowrank" else None for kind in opt.engine.layout().values()]
    assert (rank is None) == all(r is None for r in ranks)
    for sign in (1.0, -1.0):
        at.ask()
        with torch.no_grad():
            seen = model(x)
            want = materialised_output(unperturbed, x, key, sign * eps, ranks)
        torch.testing.assert_close(seen, want, rtol=1e-5, atol=1e-5)
        at.tell(float(seen.square().mean()))
    opt.close()


def test_layers_are_covered_as_documented():
    model, _ = build("mixed-in-place")
    opt = zoptim.ZOSGD(trainable(model), module=model, rank=1)
    assert opt.engine.layout() == {0: "in place", 1: "lowrank", 2: "full", 3: "lowrank", 4: "full"}
    net = Net()
    opt = zoptim.ZOSGD(net.parameters(), module=net, rank=2)
    layout, uses = opt.engine.layout(), opt.engine.uses
    assert set(layout.values()) == {"lowrank", "full"}  # nothing in place
    assert uses[0] == ["embed", "head"]  # the tied weight: one direction, applied in both modules


def _loss(model, x):
    return lambda: model(x).square().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_queries_never_write_the_weights(dtype):
    """After many queries and zero updates the weights are bit-identical, in every dtype, and no
    journal is kept for the covered tensors (only the one in-place tensor has one)."""
    model, x = build("mixed-in-place")
    model.to(dtype)
    x = x.to(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = zoptim.ZOSGD(model.parameters(), lr=0.0, eps=0.1, module=model, rank=1)
    for _ in range(20):
        opt.step(_loss(model, x))
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           b.detach().view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("failure", ["exception", "nan"])
def test_failure_mid_step_restores_bit_for_bit(failure):
    model, x = build("linear+norms+tied-embedding")
    opt = zoptim.AS2P(model.parameters(), eps=0.1, total_steps=20, module=model, rank=1)
    for _ in range(3):
        opt.step(_loss(model, x))
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            if failure == "exception":
                raise KeyboardInterrupt
            return float("nan")
        return model(x).square().mean()

    if failure == "exception":
        with pytest.raises(KeyboardInterrupt):
            opt.step(closure)
    else:
        with pytest.warns(zoptim.NonFiniteLossWarning):
            opt.step(closure)
    assert not opt.engine.is_perturbed
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    # and the model evaluates at the iterate again (no hook left applying an offset)
    with torch.no_grad():
        plain = copy.deepcopy(model)
        for m in plain.modules():
            m._forward_hooks.clear()
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("rank", [1, 2])
def test_run_equals_the_materialised_reference(rank):
    """50 ZOSGD steps with forward-applied directions equal ZOSGD written plainly, each query point
    built as explicit tensors from the same low-rank directions (float tolerance)."""
    model, x = build("linear+norms+tied-embedding")
    ref_model = copy.deepcopy(model)
    names = [n for n, p in ref_model.named_parameters() if p.requires_grad]

    def loss_at(tensors):
        with torch.no_grad():
            out = torch.func.functional_call(ref_model, dict(zip(names, tensors)), (x,))
        return float(out.square().mean())

    params0 = trainable(model)
    want = reference.zosgd_materialised(loss_at, params0, SEED, 50, lr=0.02, eps=1e-2, rank=rank)
    opt = zoptim.ZOSGD(params0, lr=0.02, eps=1e-2, seed=SEED, module=model, rank=rank)
    for _ in range(50):
        opt.step(_loss(model, x))
    for got, w in zip(trainable(model), want):
        torch.testing.assert_close(got.detach(), w, rtol=1e-4, atol=1e-5)


def test_full_rank_forward_equals_in_place():
    """rank=None with a module applies the in-place engine's own full-rank directions: the two
    runs agree to float tolerance over 50 steps."""
    runs = []
    for module in (True, False):
        model, x = build("linear+norms+tied-embedding")
        opt = zoptim.ZOSGD(model.parameters(), lr=0.02, eps=1e-2, seed=SEED, module=model if module else None)
        for _ in range(50):
            opt.step(_loss(model, x))
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_state_dict_records_rank_and_where_directions_apply():
    model, _ = build("linear+norms+tied-embedding")
    sd = zoptim.ZOSGD(model.parameters(), module=model, rank=1).state_dict()
    assert sd["zoptim"]["rank"] == 1 and sd["zoptim"]["forward"] is True
    gc.collect()
    with pytest.raises(ValueError, match="rank=1.*rank=2"):
        zoptim.ZOSGD(model.parameters(), module=model, rank=2).load_state_dict(sd)
    gc.collect()
    with pytest.raises(ValueError, match="forward"):
        zoptim.ZOSGD(model.parameters()).load_state_dict(sd)


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_go_with_the_optimizer_and_one_optimizer_per_model():
    model, x = build("linear+norms+tied-embedding")
    opt = zoptim.ZOSGD(model.parameters(), module=model, rank=1)
    assert _hook_count(model) > 0
    with pytest.raises(ValueError, match="another zoptim optimizer"):
        zoptim.AS2P(model.parameters(), total_steps=10, module=model, rank=1)
    opt.step(_loss(model, x))
    opt.close()
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError, match="closed"):
        opt.step(_loss(model, x))
    opt = zoptim.ZOSGD(model.parameters(), module=model, rank=1)  # free again after close()
    assert _hook_count(model) > 0
    del opt
    gc.collect()
    assert _hook_count(model) == 0


def test_bad_options_are_clear_errors():
    model, _ = build("linear+norms+tied-embedding")
    with pytest.raises(ValueError, match="rank=r needs module"):
        zoptim.ZOSGD(model.parameters(), rank=1)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        zoptim.ZOSGD(model.parameters(), module=model, rank=0)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        zoptim.ZOSGD(model.parameters(), module="model", rank=1)
    with pytest.raises(ValueError, match="module=<the model> is refused by HiZOO"):
        zoptim.HiZOO(model.parameters(), module=model, rank=1)


def test_ask_tell_over_a_forward_optimizer_matches_step():
    """AskTell(optimizer) drives the same step generator: same iterates as step(closure)."""
    runs = []
    for driver in ("step", "asktell"):
        model, x = build("conv2d")
        opt = zoptim.ZOSGD(model.parameters(), lr=0.005, eps=1e-2, seed=SEED, module=model, rank=1)
        if driver == "step":
            for _ in range(10):
                opt.step(_loss(model, x))
        else:
            at = zoptim.AskTell(opt)
            for _ in range(20):
                at.ask()
                with torch.no_grad():
                    at.tell(_loss(model, x)())
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("distribution", ["normal", "rademacher", "uniform"])
def test_a_small_model_draws_the_next_steps_directions_at_once(distribution):
    """On a small CPU model the coming steps' compact directions are drawn in one pass (prefetch);
    they are the values drawn one key at a time."""
    model, x = build("linear+norms+tied-embedding")
    opt = zoptim.ZOSGD(trainable(model), lr=0.02, eps=1e-2, seed=SEED, module=model, rank=2, distribution=distribution)
    engine = opt.engine
    assert engine.draws_ahead > 2
    opt.step(_loss(model, x))
    ahead = engine._draws.drawn_ahead()  # steps 1 .. draws_ahead - 1, drawn at step 0
    assert len(ahead) == engine.draws_ahead - 1 and ahead[0] == mix(SEED, 1, 0)
    for key in ahead[:5]:
        from_ahead = engine._values(key, cache=False)
        assert key not in engine._draws.drawn_ahead()
        one_at_a_time = engine._values(key, cache=False)
        for j, v in from_ahead.items():
            pairs = zip(v, one_at_a_time[j]) if isinstance(v, tuple) else [(v, one_at_a_time[j])]
            assert all(torch.equal(a, b) for a, b in pairs)
    opt.close()
