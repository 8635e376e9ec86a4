"""Benchmark problems: the softmax paper's loss and gradient, and the other problems' definitions."""

import math

import pytest
import torch

from zoptim.problems import PROBLEMS, HyperbolicRegression, RelaxedSmooth, SoftmaxRegression, get_problem


@pytest.mark.parametrize("regularized", [False, True])
def test_softmax_loss_matches_definitions_2_7_and_2_8(regularized):
    p = SoftmaxRegression(n=6, d=4, num_samples=5, reg=0.3, regularized=regularized, seed=1)
    x = torch.randn(4, generator=torch.Generator().manual_seed(0))
    total = 0.0
    for j in range(5):
        e = torch.exp(p.A[j] @ x)
        value = 0.5 * torch.sum((e / e.sum() - p.b[j]) ** 2)  # <exp(A_j x), 1>^-1 exp(A_j x)
        if regularized:
            value = value + 0.5 * torch.sum((torch.diag(p.w) @ p.A[j] @ x) ** 2)
        total += value
    assert float(p.loss_at(x)) == pytest.approx(float(total) / 5, rel=1e-5)
    assert torch.all(p.b.sum(1).sub(1).abs() < 1e-5)  # ||b_j||_1 = 1
    assert float(torch.linalg.matrix_norm(p.A[0], ord=2)) == pytest.approx(p.R, rel=1e-4)


@pytest.mark.parametrize("regularized", [False, True])
def test_softmax_gradient_of_lemma_2_10_matches_autograd(regularized):
    p = SoftmaxRegression(n=8, d=5, num_samples=7, reg=0.2, regularized=regularized, seed=2)
    x = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=torch.float32).requires_grad_(True)
    batch = torch.tensor([0, 3, 6])
    for b in (None, batch):
        (auto,) = torch.autograd.grad(p.loss_at(x, b), x)
        torch.testing.assert_close(p.gradient_at(x.detach(), b), auto, rtol=1e-4, atol=1e-6)


def test_softmax_minimum_is_a_stationary_point_below_the_start():
    """L* is below the start and no other solver gets lower: 3,000 Adam steps from the same start
    end within 1e-5 of it (a stationary point of the smooth loss), never below it."""
    p = SoftmaxRegression(n=8, d=4, num_samples=16, seed=0)
    l_star = p.minimum()
    assert l_star < float(p.loss_at(torch.zeros(4)))
    x = torch.zeros(4, requires_grad=True)
    adam = torch.optim.Adam([x], lr=1e-2)
    for _ in range(3000):
        adam.zero_grad()
        p.loss_at(x).backward()
        adam.step()
    other = float(p.loss_at(x.detach()))
    assert l_star <= other + 1e-6 and other - l_star < 1e-5


def test_relaxed_smooth_function_satisfies_L0_L1_but_not_L_smoothness():
    p = RelaxedSmooth(dim=10, cond=10.0)
    for scale in (0.0, 1.0, 5.0):
        x = torch.full((10,), scale)
        hess = torch.autograd.functional.hessian(lambda v: (p.lambdas * (torch.cosh(v) - 1)).sum(), x)
        grad = p.lambdas * torch.sinh(x)
        assert float(torch.linalg.matrix_norm(hess, ord=2)) <= p.L0 + p.L1 * float(grad.norm()) + 1e-5
    big = torch.linalg.matrix_norm(torch.diag(p.lambdas * torch.cosh(torch.full((10,), 20.0))), ord=2)
    assert float(big) > 1e6  # curvature unbounded: no global L


@pytest.mark.parametrize("kind,u", [("exp", torch.exp), ("cosh", torch.cosh), ("sinh", torch.sinh)])
def test_hyperbolic_regressions(kind, u):
    p = HyperbolicRegression(kind=kind, n=10, d=3, seed=0)
    x = torch.tensor([0.1, -0.2, 0.3])
    assert float(p.loss_at(x)) == pytest.approx(float(0.5 * ((u(p.A @ x) - p.b) ** 2).sum()), rel=1e-6)


def test_registry_builds_the_cheap_problems_and_their_models_are_seeded():
    for name in ["digits-mlp", "softmax", "quadratic", "relaxed-smooth", "exp-regression"]:
        p = get_problem(name)
        m0, m0b, m1 = p.make_model(0), p.make_model(0), p.make_model(1)
        v = lambda m: torch.cat([t.flatten() for t in m.parameters()])
        assert torch.equal(v(m0), v(m0b))
        assert math.isfinite(p.full_loss(m0))
        if name == "digits-mlp":
            assert not torch.equal(v(m0), v(m1))
    assert {"lm-smollm2-rt", "lm-minilm-rt", "fashion-efficientnet"} <= set(PROBLEMS)


def test_minibatches_come_from_the_given_generator_not_the_global_rng():
    p = get_problem("digits-mlp")
    state = torch.get_rng_state()
    b1 = p.sample_batch(torch.Generator().manual_seed(5))
    b2 = p.sample_batch(torch.Generator().manual_seed(5))
    assert torch.equal(b1, b2) and torch.equal(torch.get_rng_state(), state)


def test_missing_fashion_mnist_names_the_debian_package(monkeypatch, tmp_path):
    from zoptim.problems import vision

    monkeypatch.setattr(vision, "FASHION_MNIST_DIRS", (str(tmp_path),))
    monkeypatch.delenv("ZOPTIM_FASHION_MNIST", raising=False)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        vision.fashion_mnist_dir()


def test_digits_efficientnet_is_the_pretrained_network_with_its_frozen_part_cached():
    """make demo's problem: the loss on cached features equals EfficientNet-Lite0's own forward pass
    (ImageNet weights, the 10-class fc swapped in), and the tuned layers start at the pre-trained values."""
    from zoptim.problems.vision import IMAGENET_MEAN, IMAGENET_STD

    problem = get_problem("digits-efficientnet")
    assert problem.features.shape == (1797, 320, 1, 1)
    model = problem.make_model(seed=3)
    assert torch.equal(model.conv_head.weight, problem.net._conv_head.weight)
    assert sum(p.numel() for p in model.parameters()) == 424_970
    assert torch.equal(model.fc.weight, problem.make_model(seed=3).fc.weight)
    assert not torch.equal(model.fc.weight, problem.make_model(seed=4).fc.weight)

    from sklearn.datasets import load_digits

    net = problem.net
    net._fc = model.fc
    x = torch.tensor(load_digits().images[:16], dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = net.eval()(x)
        batch = torch.arange(16)
        expected = torch.nn.functional.cross_entropy(logits, problem.y[:16])
        assert float(problem.loss(model, batch)) == pytest.approx(float(expected), rel=1e-5)
