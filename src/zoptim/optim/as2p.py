"""AS2P: Accelerated Stochastic Two-Point search, Algorithm 2 of the S2P paper."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..schedules import cosine_decay
from .base import GroupValue, ZerothOrderOptimizer
from .checks import check_int, check_positive
from .momentum import SeedMomentum, warn_unused_group_momentum
from .step import StepGenerator

BATCH_MODES = ("minibatch", "full")


class GammaWindow:
    """Ring buffer of the most recent gammas; sigma = their standard deviation (bounded memory)."""

    def __init__(self, capacity: int):
        self.values = torch.zeros(capacity, dtype=torch.float64)
        self.count = 0

    @property
    def values(self) -> torch.Tensor:
        return self._values

    @values.setter
    def values(self, tensor: torch.Tensor) -> None:
        self._values, self._numpy = tensor, tensor.numpy()  # the NumPy view: a tenth of torch's indexing cost

    @property
    def capacity(self) -> int:
        return self._numpy.shape[0]

    def push(self, gamma: float) -> None:
        self._numpy[self.count % self.capacity] = gamma
        self.count += 1

    def recent(self, n: int) -> np.ndarray:
        """The last min(n, count, capacity) values (in ring order; order does not matter to sigma)."""
        n = min(n, self.count, self.capacity)
        end = self.count % self.capacity
        v = self._numpy
        if n == self.capacity:
            return v
        if n <= end:
            return v[end - n : end]
        return np.concatenate((v[self.capacity - (n - end) :], v[:end]))

    def sigma(self, n: int) -> float:
        """Std Dev(gamma_recent) over the last n values (population std, ddof=0).

        Two passes in float64 NumPy, ``sqrt(sum((g - mean)^2) / n)`` with ``mean = sum(g) / n``: a
        host-side statistic of at most a few thousand scalars, for which one torch reduction's fixed
        cost (about 10 us) was a third of a small problem's step. It agrees with ``torch.std`` to a
        few ulps (summation order; ``tests/test_core_optimizers.py`` checks 1e-12).

        With fewer than two values, or when they are all equal, the spread is undefined or zero;
        then sigma is their root mean square, |gamma| for a single value, which keeps the step of
        Alg. 2 finite: gamma'/(eta_b sigma) <= 1/eta_b. Zero only when every gamma was zero.
        """
        v = self.recent(n)
        size = v.size
        if size >= 2:
            deviation = v - v.sum() / size
            s = math.sqrt(float(deviation @ deviation) / size)
            if s > 0.0:
                return s
        return math.sqrt(float(v @ v) / size) if size else 0.0


class AS2P(ZerothOrderOptimizer):
    r"""Accelerated Stochastic Two-Point search (S2P paper, Algorithm 2).

    Per step, with :math:`s_k` a random direction and two queries:

    .. math::

        \rho_k &= \text{cosine}(\rho_0 \to \rho_{end}, k)\ \text{(minibatch)}, \quad \rho_0\ \text{(full batch)} \\
        \gamma_k &= \frac{f(x_k + \rho_k s_k) - f(x_k - \rho_k s_k)}{2 \rho_k}, \quad
        \sigma_k = \mathrm{StdDev}(\gamma_{recent}) \\
        \tau^a_k &= \text{cosine}(2\eta_a \to \eta_a, k) \cdot \sigma_k, \quad
        \gamma'_k = \frac{1}{1/|\gamma_k| + 1/\tau^a_k} \quad \text{(progressive } \gamma\text{-clipping)} \\
        |\alpha_k| &= \mathrm{lr}_k \, \frac{\gamma'_k}{\eta_b \sigma_k} \quad \text{(automatic learning rate)} \\
        x_{k+1} &= x_k - \mathrm{sign}(\gamma_k)\, |\alpha_k|\, s_k

    (Alg. 2 lines 3-8, Sec. 3.4). lr_k is the group's lr (default: ``eps``, so rho_k) in
    full-batch mode and a cosine decay from it to 0 in minibatch mode (Table 3: cosine decay for
    every method), or what a torch LR scheduler sets, if one drives the group.

    Sign convention: Alg. 2 as printed updates ``x + beta*alpha*s`` with
    ``beta = sign(f(x+rho s) - f(x-rho s))``, which moves towards the *larger* evaluation. Its
    stated intent (Sec. 3.4, the "sign trick": ``x + beta*|alpha|*s`` should be the argmin of
    f(x +- alpha s)) is a step towards the lower one, and that is what is implemented.

    gamma_recent: the most recent ``window`` fraction of the gammas, the current one included. With
    ``total_steps`` K the window holds ceil(window * K) values (at least 2) in a ring buffer;
    without it (full-batch mode only), the last ceil(window * (k + 1)) values, at most
    ``max_window``. Before the window holds two distinct values sigma is their root mean square
    (see :meth:`GammaWindow.sigma`), so the first step has magnitude lr_0 * 2 eta_a /
    ((2 eta_a + 1) eta_b). Without ``total_steps`` tau^a uses eta_a (no progression).

    Args:
        params: iterable of parameters or param groups.
        eps: rho_0, the initial smoothing parameter (the paper's rho, MeZO's epsilon). Default 1e-3.
        eps_end: rho_end. Default eps / 10.
        eta_a: clipping threshold multiplier (tau^a decays from 2 eta_a to eta_a). Default 5.
        eta_b: automatic-learning-rate divisor. Default 5 (Table 3; the paper uses 50 for OPT-13B).
        window: fraction of recent gammas in Std Dev(gamma_recent), in (0, 1]. Default 0.1.
        total_steps: K, length of the cosine schedules. Required in minibatch mode.
        batch_mode: ``"minibatch"`` (closure draws a batch each call) or ``"full"``.
        lr: lr_0, the initial value of lr_k (per group); ``None`` (default) sets it to eps, as in
            the paper. It is a ``param_groups`` entry: without a torch LR scheduler AS2P decays it
            by its own cosine (minibatch mode), and a scheduler driving the group (it records
            ``initial_lr`` there) replaces that decay, so the two never multiply.
        auto_lr: use the automatic learning rate 1/(eta_b sigma). ``False`` is the "W.O. auto LR"
            ablation of Fig. 3a: |alpha_k| = lr_k * gamma'_k, a GA-like learning rate (set ``lr``).
        clipping: use progressive gamma-clipping. ``False`` is the "W.O. gamma-clipping" ablation:
            gamma'_k = |gamma_k|.
        max_window: ring-buffer capacity when total_steps is None. Default 1024.
        num_directions: k directions per step (2k queries), an extension beyond Alg. 2 (which has
            k = 1), made for direction-parallel runs (:func:`zoptim.distributed.wrap`,
            ``mode="directions"``): all k gammas of a step join the window, in direction order,
            before sigma is taken (so the window holds ceil(window * K * k) gammas, the same
            fraction of the run); each direction gets its own clipped, auto-scaled step, and the
            update is their average, x <- x - (1/k) sum_i sign(gamma_i) |alpha_i| s_i. Default 1.
        momentum: beta of the memory-free momentum (:class:`~zoptim.optim.momentum.SeedMomentum`),
            an extension beyond Alg. 2: the step follows the normalised average of the last
            ``momentum_window`` clipped, auto-scaled steps ``sign(gamma_j) |alpha_j| s_j``
            (each s redrawn from its key), all scaled by today's lr_k. 0 (default) is Alg. 2.
            It is a ``param_groups`` entry (0 without momentum), so torch's ``OneCycleLR`` and
            ``CyclicLR`` run with their defaults; their momentum cycle drives beta when the
            optimizer was built with momentum, and is ignored otherwise (one warning; pass
            ``cycle_momentum=False`` to say so).
        momentum_window: m, the number of past steps in that average. Default 8.
        distribution, normalize, seed, exact_restore, max_nonfinite, module, rank, per_example,
        sparse_embeddings: see
            :class:`~zoptim.optim.base.ZerothOrderOptimizer`.

    Example:
        >>> opt = zoptim.AS2P(model.parameters(), eps=1e-3, total_steps=1000)
        >>> for x, y in loader:
        ...     opt.step(lambda: loss_fn(model(x), y))

    References:
        S2P paper, Algorithm 2 and Sec. 3.4; hyper-parameters from its Tables 3 and 4.
    """

    def __init__(
        self,
        params,
        eps: float = 1e-3,
        eps_end: float | None = None,
        eta_a: float = 5.0,
        eta_b: float = 5.0,
        window: float = 0.1,
        total_steps: int | None = None,
        batch_mode: str = "minibatch",
        lr: float | None = None,
        distribution: str = "normal",
        seed: int = 0,
        *,
        num_directions: int = 1,
        momentum: float = 0.0,
        momentum_window: int = 8,
        auto_lr: bool = True,
        clipping: bool = True,
        max_window: int = 1024,
        normalize: bool = False,
        exact_restore: bool = True,
        max_nonfinite: int = 10,
        module=None,
        rank: int | None = None,
        per_example: bool = False,
        orthogonalize: bool = False,
        sparse_embeddings: bool = False,
    ):
        if orthogonalize:
            raise ValueError(
                "AS2P does not support orthogonalize=True: its automatic learning rate sets each step's length from "
                "the clipped gamma against the spread of recent gammas (S2P paper, Algorithm 2), while the "
                "orthogonalised update sets its own length (root-mean-square lr); use ZOSGD(orthogonalize=True)"
            )
        check_positive("eps", eps)
        eps_end = eps / 10.0 if eps_end is None else check_positive("eps_end", eps_end)
        if eps_end > eps:
            raise ValueError(f"eps_end must be <= eps ({eps}); got {eps_end!r}")
        check_positive("eta_a", eta_a)
        check_positive("eta_b", eta_b)
        if not isinstance(window, (int, float)) or isinstance(window, bool) or not 0.0 < window <= 1.0:
            raise ValueError(f"window must be a fraction in (0, 1]; got {window!r}")
        self.window = float(window)
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be 'minibatch' or 'full'; got {batch_mode!r}")
        self.batch_mode = batch_mode
        self.total_steps = check_int("total_steps", total_steps, allow_none=True)
        if batch_mode == "minibatch" and total_steps is None:
            raise ValueError(
                "total_steps is required in batch_mode='minibatch' (the cosine decays of rho_k and lr_k "
                "need their length); pass total_steps=K or use batch_mode='full'"
            )
        check_positive("lr", lr, allow_none=True, allow_zero=True)
        if not auto_lr and lr is None:
            raise ValueError("auto_lr=False needs an explicit lr (the GA-like learning rate); got lr=None")
        lr = eps if lr is None else lr  # the paper's lr_0 = rho_0
        self.auto_lr, self.clipping = bool(auto_lr), bool(clipping)
        self.max_window = check_int("max_window", max_window, minimum=2)
        self.num_directions = check_int("num_directions", num_directions)
        self.queries_per_step = 2 * self.num_directions
        self._momentum_requested = bool(momentum)
        super().__init__(
            params,
            dict(lr=lr, eps=eps, eps_end=eps_end, eta_a=eta_a, eta_b=eta_b, momentum=momentum),
            seed=seed,
            distribution=distribution,
            normalize=normalize,
            exact_restore=exact_restore,
            max_nonfinite=max_nonfinite,
            module=module,
            rank=rank,
            per_example=per_example,
            sparse_embeddings=sparse_embeddings,
        )
        self.gammas = GammaWindow(self._window_capacity())
        self.momentum = SeedMomentum(momentum, momentum_window) if momentum else None

    eps = GroupValue()
    eps_end = GroupValue()
    eta_a = GroupValue()
    eta_b = GroupValue()
    _group_checks = {**ZerothOrderOptimizer._group_checks, "eps": (False, True, None), "eps_end": (False, True, None),
                     "eta_a": (False, True, None), "eta_b": (False, True, None)}
    _settings = ("window", "total_steps", "batch_mode", "auto_lr", "clipping", "max_window", "num_directions")

    def _window_capacity(self) -> int:
        if self.total_steps is None:
            return self.max_window
        per_step = self.num_directions * self._directions_world_size
        return max(2, math.ceil(self.window * self.total_steps * per_step))

    supports_direction_sharding = True

    def shard_directions(self, process_rank, world_size, exchange) -> None:
        super().shard_directions(process_rank, world_size, exchange)
        self.gammas = GammaWindow(self._window_capacity())  # the window holds every rank's gammas

    # -- schedules ----------------------------------------------------------------------------------
    def rho(self, k: int) -> float:
        """rho_k (Alg. 2 line 3)."""
        if self.batch_mode == "full":
            return self.eps
        return cosine_decay(self.eps, self.eps_end, k, self.total_steps)

    def lr_at(self, k: int, group: dict) -> float:
        """lr_k for ``group``: its ``lr`` in full-batch mode or when a torch LR scheduler drives it
        (it records ``initial_lr`` in the group; the scheduler is then the one decay), else the
        paper's cosine decay from it to 0 (minibatch mode). An lr of None is eps."""
        base = self.eps if group["lr"] is None else group["lr"]
        if self.batch_mode == "full" or "initial_lr" in group:
            return base
        return cosine_decay(base, 0.0, k, self.total_steps)

    def tau_a_factor(self, k: int) -> float:
        if self.total_steps is None:
            return self.eta_a
        return cosine_decay(2.0 * self.eta_a, self.eta_a, k, self.total_steps)

    def window_length(self, k: int) -> int:
        if self.total_steps is not None:
            return self.gammas.capacity
        return max(1, math.ceil(self.window * (k + 1) * self.num_directions * self._directions_world_size))

    # -- the step -------------------------------------------------------------------------------------
    def _queries(self) -> StepGenerator:
        k = self.steps
        rho = self.rho(k)
        keys, gammas, plus, minus = yield from self._two_point_directions(rho)
        if self.per_example and self.gammas.count == 0 and len(keys) > 1:
            # B gammas a step: the window keeps the same fraction of the run as k directions would
            self.gammas = GammaWindow(self._window_capacity() * len(keys))
        for gamma in gammas:  # every direction's gamma, in direction (rank) order, joins the window
            self.gammas.push(gamma)
        sigma = self.gammas.sigma(self.window_length(k))
        tau_a = self.tau_a_factor(k) * sigma
        lr_of_group = [self.lr_at(k, grp) for grp in self.param_groups]
        steps, ratios = [], []
        for key, gamma in zip(keys, gammas):
            g = abs(gamma)
            if self.clipping:
                clipped = g * tau_a / (g + tau_a) if g > 0.0 and tau_a > 0.0 else 0.0
            else:
                clipped = g
            if self.auto_lr:
                ratio = clipped / (self.eta_b * sigma) if sigma > 0.0 else 0.0
            else:
                ratio = clipped
            direction = -math.copysign(1.0, gamma) if gamma != 0.0 else 0.0
            # k directions: the average of their steps, as k-SPSA averages its estimates
            steps.append((key, direction * ratio / len(keys)))
            ratios.append(ratio)
        warn_unused_group_momentum(self)
        steps = self._momentum_terms(steps)
        if len(lr_of_group) == 1:  # one group: one scale a term
            self._update([(key, c * lr_of_group[0]) for key, c in steps])
        else:
            self._update([(key, [c * lr_of_group[gi] for gi in self._group_of]) for key, c in steps])
        loss = sum(0.5 * (fp + fm) for fp, fm in zip(plus, minus)) / len(keys)
        self.last_stats = {
            "loss": loss,
            "gamma": gammas[-1],
            "gamma_clipped": clipped,
            "sigma": sigma,
            "rho": rho,
            "lr": lr_of_group[0],
            "step_size": lr_of_group[0] * sum(ratios) / len(ratios),
        }
        return loss

    # -- state ----------------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        extra = super()._extra_state()
        extra["gamma_window"] = {"values": self.gammas.values.clone(), "count": self.gammas.count}
        return extra

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        window = extra["gamma_window"]
        self.gammas.values = window["values"].clone().to(torch.float64)
        self.gammas.count = int(window["count"])
