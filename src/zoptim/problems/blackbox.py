"""Black-box problems: functions of a NumPy vector, from 10 to 100,000 dimensions.

Used by ``zoptim bench --suite blackbox`` (:mod:`zoptim.bench.blackbox`), where zoptim's methods
and other black-box optimisers get the same number of evaluations of ``fun``. Each problem knows
its starting point, its minimum value f* (analytic, or from L-BFGS with the exact gradient) and a
scale for the peers that need one (CMA-ES's sigma0).

* ``rosenbrock-d``: scipy's Rosenbrock function (``scipy.optimize.rosen``) from x0 = 0; f* = 0.
* ``quadratic-d``: an ill-conditioned, non-separable quadratic
  ``0.5 * sum_i lambda_i ((Q (x - 1))_i)^2``, eigenvalues log-spaced from 1 to ``cond`` = 1,000,
  Q = two random Householder reflections (O(d) to apply, so it scales to 100,000 dimensions
  while not being axis-aligned); from x0 = 0, f* = 0.
* ``softmax-d``: the softmax paper's regularised softmax regression
  (:class:`~zoptim.problems.softmax.SoftmaxRegression`, full batch); f* by L-BFGS.
* ``logreg-cancer``: L2-regularised logistic regression on scikit-learn's breast-cancer data
  (569 x 30, standardised; 31 parameters); ``logreg-digits``: multinomial logistic regression on
  scikit-learn's digits (1,797 x 64, 10 classes; 650 parameters). f* by L-BFGS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class BlackBoxProblem:
    """A function of a vector with what a benchmark needs to know about it."""

    name: str
    fun: Callable[[np.ndarray], float]
    x0: np.ndarray
    fstar: float
    #: the typical step scale (CMA-ES's sigma0, nevergrad's parametrization sigma)
    scale: float
    budget: int
    #: zoptim hyper-parameters per method (minimize options) and torchzero learning rates; AS2P's
    #: were searched in the paper's full-batch mode, so they name it (minimize's default is the
    #: cosine schedules)
    hparams: dict = field(default_factory=dict)
    description: str = ""

    @property
    def dim(self) -> int:
        return self.x0.size

    @property
    def f0(self) -> float:
        return self.fun(self.x0.copy())

    def target(self, fraction: float = 0.1) -> float:
        """The value that closes (1 - fraction) of the initial gap: f* + fraction (f(x0) - f*)."""
        return self.fstar + fraction * (self.f0 - self.fstar)


def rosenbrock(dim: int, budget: int) -> BlackBoxProblem:
    from scipy.optimize import rosen

    lr = 3e-4 * 12 / (dim + 2)  # the d = 10 grid's best, scaled by 1/(d + 2) (the estimate's variance grows with d)
    return BlackBoxProblem(
        f"rosenbrock-{dim}", lambda x: float(rosen(x)), np.zeros(dim), 0.0, 0.5, budget,
        hparams={"as2p": {"eps": 0.03, "batch_mode": "full"}, "zosgd": {"lr": lr, "eps": 1e-4}, "stp": {"lr": 0.003},
                 "torchzero_lr": lr, "torchzero_adam_lr": 0.01},
        description="scipy.optimize.rosen, x0 = 0",
    )


def _householder(dim: int, seed: int):
    g = np.random.default_rng(seed)
    vs = [v / np.linalg.norm(v) for v in (g.standard_normal(dim), g.standard_normal(dim))]

    def q(y):
        for v in vs:
            y = y - 2.0 * v * (v @ y)
        return y

    return q


def quadratic(dim: int, budget: int, cond: float = 1e3) -> BlackBoxProblem:
    lam = np.logspace(0.0, np.log10(cond), dim)
    q = _householder(dim, seed=dim)

    def fun(x):
        y = q(x - 1.0)
        return float(0.5 * (lam * y * y).sum())

    # ZOSGD's lr must stay below ~1/(lambda_max (d + 2)) to be stable (Nesterov & Spokoiny 2017)
    lr = 2.0 / (cond * (dim + 2))
    return BlackBoxProblem(
        f"quadratic-{dim}", fun, np.zeros(dim), 0.0, 0.5, budget,
        hparams={"as2p": {"eps": 0.1, "batch_mode": "full"}, "zosgd": {"lr": lr, "eps": 1e-4}, "stp": {"lr": 0.03},
                 "torchzero_lr": lr, "torchzero_adam_lr": 0.01},
        description=f"0.5 sum lambda_i (Q(x - 1))_i^2, cond {cond:g}, Q = 2 Householder reflections",
    )


def softmax(dim: int, budget: int) -> BlackBoxProblem:
    import torch

    from .softmax import SoftmaxRegression

    p = SoftmaxRegression(n=2 * dim, d=dim, num_samples=64, R=4.0, cond=2.0, reg=1e-3, regularized=True, seed=dim)
    A, b, w = p.A.double(), p.b.double(), p.w.double()

    def fun(x):
        with torch.no_grad():
            Ax = A @ torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
            per_j = 0.5 * ((torch.softmax(Ax, 1) - b) ** 2).sum(1) + 0.5 * ((w * Ax) ** 2).sum(1)
            return float(per_j.mean())

    return BlackBoxProblem(
        f"softmax-{dim}", fun, np.zeros(dim), p.minimum(), 0.1, budget,
        hparams={"as2p": {"eps": 0.01, "batch_mode": "full"}, "zosgd": {"lr": 10.0, "eps": 1e-4}, "stp": {"lr": 0.003},
                 "torchzero_lr": 10.0, "torchzero_adam_lr": 0.005},
        description=f"softmax paper's regularised softmax regression, n = {2 * dim}, 64 data points, w = 1e-3, full batch",
    )


def _lbfgs_minimum(fun_grad, x0) -> float:
    from scipy.optimize import minimize as scipy_minimize

    return float(scipy_minimize(fun_grad, x0, jac=True, method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-10}).fun)


def logreg_cancer(budget: int, reg: float = 1e-3) -> BlackBoxProblem:
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    s = 2.0 * y - 1.0

    def fun_grad(x):
        w, c = x[:-1], x[-1]
        m = s * (X @ w + c)
        loss = np.logaddexp(0.0, -m).mean() + 0.5 * reg * (w @ w)
        sig = -s * np.exp(-np.logaddexp(0.0, m)) / len(s)
        return loss, np.concatenate([X.T @ sig + reg * w, [sig.sum()]])

    x0 = np.zeros(X.shape[1] + 1)
    return BlackBoxProblem(
        "logreg-cancer", lambda x: float(fun_grad(x)[0]), x0, _lbfgs_minimum(fun_grad, x0), 0.5, budget,
        hparams={"as2p": {"eps": 0.03, "batch_mode": "full"}, "zosgd": {"lr": 0.5, "eps": 1e-4}, "stp": {"lr": 0.01},
                 "torchzero_lr": 0.5, "torchzero_adam_lr": 0.02},
        description="logistic regression, scikit-learn breast cancer (569 x 30, standardised), L2 1e-3",
    )


def logreg_digits(budget: int, reg: float = 1e-3) -> BlackBoxProblem:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    n, f = X.shape
    k = 10
    Y = np.eye(k)[y]

    def fun_grad(x):
        W, c = x[: f * k].reshape(f, k), x[f * k :]
        Z = X @ W + c
        Z = Z - Z.max(1, keepdims=True)
        logp = Z - np.log(np.exp(Z).sum(1, keepdims=True))
        loss = -(Y * logp).sum() / n + 0.5 * reg * (W * W).sum()
        G = (np.exp(logp) - Y) / n
        return loss, np.concatenate([(X.T @ G + reg * W).ravel(), G.sum(0)])

    x0 = np.zeros(f * k + k)
    return BlackBoxProblem(
        "logreg-digits", lambda x: float(fun_grad(x)[0]), x0, _lbfgs_minimum(fun_grad, x0), 0.5, budget,
        hparams={"as2p": {"eps": 0.03, "batch_mode": "full"}, "zosgd": {"lr": 0.05, "eps": 1e-4}, "stp": {"lr": 0.01},
                 "torchzero_lr": 0.05, "torchzero_adam_lr": 0.02},
        description="multinomial logistic regression, scikit-learn digits (1,797 x 64, 10 classes), L2 1e-3",
    )


#: name -> factory(budget); the suite's default budgets are in :mod:`zoptim.bench.blackbox`.
BLACKBOX_PROBLEMS: dict[str, Callable[[int], BlackBoxProblem]] = {
    "rosenbrock-10": lambda budget: rosenbrock(10, budget),
    "logreg-cancer": logreg_cancer,
    "softmax-64": lambda budget: softmax(64, budget),
    "quadratic-100": lambda budget: quadratic(100, budget),
    "logreg-digits": logreg_digits,
    "rosenbrock-1000": lambda budget: rosenbrock(1000, budget),
    "quadratic-100000": lambda budget: quadratic(100_000, budget),
}


def get_blackbox_problem(name: str, budget: int) -> BlackBoxProblem:
    if name not in BLACKBOX_PROBLEMS:
        raise ValueError(f"unknown black-box problem {name!r}; known: {', '.join(BLACKBOX_PROBLEMS)}")
    return BLACKBOX_PROBLEMS[name](budget)
