"""ZOSGD: zeroth-order SGD with the two-point (SPSA) gradient estimate. GA, MeZO, k-SPSA."""

from __future__ import annotations

import math

from .base import GroupValue, ZerothOrderOptimizer
from .checks import check_int, check_positive
from .momentum import SeedMomentum, warn_unused_group_momentum
from .step import StepGenerator


class ZOSGD(ZerothOrderOptimizer):
    r"""Zeroth-order SGD: GA of the S2P paper, MeZO (Malladi et al., 2023), SPSA / k-SPSA.

    For each of k directions :math:`s_i` (``num_directions``) the projected gradient

    .. math:: g_i = \frac{f(x + \epsilon s_i) - f(x - \epsilon s_i)}{2 \epsilon}

    is measured with two queries, and the parameters move by the average estimate

    .. math:: x \leftarrow x - \mathrm{lr} \Big( \frac1k \sum_{i=1}^k g_i s_i + \lambda x \Big).

    This is GA of the S2P paper (Sec. 1, "GA", :math:`\rho = \epsilon`), the SPSA estimate of the
    softmax paper (Definition 2.21) and its k-SPSA average (Remark 2.22). ``eps`` is the S2P
    paper's smoothing parameter rho and MeZO's epsilon. With ``distribution="rademacher"`` it is
    GA_sign (Gao & Sener, 2022). Cost: 2k queries per step.

    Args:
        params: iterable of parameters or param groups; only ``requires_grad=True`` ones move.
        lr: learning rate (per group; torch LR schedulers drive it). Default 1e-3.
        eps: perturbation scale epsilon (rho), > 0. Default 1e-3. One value for all groups.
        num_directions: k, directions averaged per step. Default 1.
        weight_decay: lambda, decoupled as in SGD, per group. Default 0.
        momentum: beta of the memory-free momentum (:class:`~zoptim.optim.momentum.SeedMomentum`):
            the step follows the normalised average of the last ``momentum_window`` estimates
            ``g_i s_i``, each s redrawn from its key. 0 (default) is plain ZOSGD.
            It is a ``param_groups`` entry (0 without momentum), so torch's ``OneCycleLR`` and
            ``CyclicLR`` run with their defaults; their momentum cycle drives beta when the
            optimizer was built with momentum, and is ignored otherwise (one warning; pass
            ``cycle_momentum=False`` to say so).
        momentum_window: m, the number of past steps in that average. Default 8.
        guard: tol of the loss guard (:class:`~zoptim.optim.guard.LossGuard`): the step uses
            ``lr * scale``, and the scale halves when the smoothed step loss rises above its best
            by ``tol`` (relative) plus four times its noise. 0 (default) is off; 0.02 is the
            benchmark's ``ZOSGD-guard``. It costs no query.
        normalize_by_spread: divide the step by the standard deviation of the step's k (or B,
            per-example) directional derivatives, as FZOO does (Dang et al. 2025, arXiv 2506.09034,
            a normalised-SGD step whose length adapts to the estimate's noise). Needs k >= 2 or
            ``per_example=True``.
        orthogonalize: step along the polar factor of each matrix's estimate (and the normalised
            estimate of other tensors), root-mean-square step ``lr``: :mod:`zoptim.engine.polar`. Needs
            ``module`` and ``rank``; pays with several directions (``num_directions`` or
            ``per_example=True``), since with one rank-r direction the factor is that direction.
        distribution, normalize, seed, exact_restore, max_nonfinite, module, rank, per_example,
        sparse_embeddings: see
            :class:`~zoptim.optim.base.ZerothOrderOptimizer`.

    Example:
        >>> opt = zoptim.ZOSGD(model.parameters(), lr=1e-4, eps=1e-3)
        >>> loss = opt.step(lambda: loss_fn(model(x), y))

    References:
        Nesterov & Spokoiny (2017); Spall (1992); Malladi et al. (2023), Algorithm 1;
        S2P paper, Sec. 1 (GA); softmax paper, Definition 2.21 and Remark 2.22.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        eps: float = 1e-3,
        num_directions: int = 1,
        distribution: str = "normal",
        weight_decay: float = 0.0,
        seed: int = 0,
        *,
        momentum: float = 0.0,
        momentum_window: int = 8,
        guard: float = 0.0,
        normalize: bool = False,
        exact_restore: bool = True,
        max_nonfinite: int = 10,
        module=None,
        rank: int | None = None,
        per_example: bool = False,
        orthogonalize: bool = False,
        sparse_embeddings: bool = False,
        normalize_by_spread: bool = False,
    ):
        check_positive("lr", lr, allow_zero=True)
        if normalize_by_spread and num_directions == 1 and not per_example:
            raise ValueError(
                "normalize_by_spread=True divides the step by the standard deviation of the step's directional "
                "derivatives; one direction has none: use num_directions >= 2 or per_example=True"
            )
        if normalize_by_spread and orthogonalize:
            raise ValueError(
                "normalize_by_spread=True has no effect with orthogonalize=True: the polar factor and the normalised "
                "step do not depend on the estimate's scale; use one of the two"
            )
        self.normalize_by_spread = bool(normalize_by_spread)
        check_positive("eps", eps)
        self.num_directions = check_int("num_directions", num_directions)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        self._momentum_requested = bool(momentum)
        super().__init__(
            params,
            dict(lr=lr, eps=eps, weight_decay=weight_decay, momentum=momentum,
                 **({"guard": guard} if guard else {})),
            seed=seed,
            distribution=distribution,
            normalize=normalize,
            exact_restore=exact_restore,
            max_nonfinite=max_nonfinite,
            module=module,
            rank=rank,
            per_example=per_example,
            orthogonalize=orthogonalize,
            sparse_embeddings=sparse_embeddings,
        )
        self.queries_per_step = 2 * self.num_directions
        self.momentum = SeedMomentum(momentum, momentum_window) if momentum else None
        self._set_guard(guard)

    eps = GroupValue()
    _group_checks = {**ZerothOrderOptimizer._group_checks, "eps": (False, True, None)}
    _settings = ("num_directions", "normalize_by_spread")

    supports_direction_sharding = True

    def _queries(self) -> StepGenerator:
        keys, gammas, plus, minus = yield from self._two_point_directions(self.eps)
        k = len(keys)
        lrs = self._guarded_lrs()
        decay = [lr * wd for lr, wd in zip(lrs, self.per_param("weight_decay"))]
        spread = 1.0
        if self.normalize_by_spread:  # FZOO's normalised step: the estimate over the deltas' standard deviation
            mean = sum(gammas) / k
            spread = math.sqrt(sum((g - mean) ** 2 for g in gammas) / (k - 1)) if k > 1 else 0.0
            spread = spread if spread > 0.0 else math.inf  # all deltas equal (e.g. all 0): no step
        steps = [(key, g / (k * spread)) for key, g in zip(keys, gammas)]
        warn_unused_group_momentum(self)
        steps = self._momentum_terms(steps)
        if self.orthogonalize:  # the estimate's direction from the terms, each tensor's step length lr
            self._update([(key, -c) for key, c in steps], decay=decay if any(decay) else None, orthogonal=lrs)
        elif len(lrs) == 1 or lrs.count(lrs[0]) == len(lrs):  # one lr for every tensor: one scale a term
            self._update([(key, -lrs[0] * c) for key, c in steps], decay=decay if any(decay) else None)
        else:
            self._update([(key, [-lr * c for lr in lrs]) for key, c in steps], decay=decay if any(decay) else None)
        loss = (sum(plus) + sum(minus)) / (2 * k)
        self.last_stats = {
            "loss": loss,
            "gamma": gammas[-1],
            "step_size": abs(lrs[0] * sum(gammas) / k),
            "rho": self.eps,
            "lr": lrs[0],
        }
        self._observe(loss)
        return loss
