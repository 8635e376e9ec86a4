"""STP: Stochastic Three Points (Bergou, Gorbunov & Richtarik, 2020)."""

from __future__ import annotations

from .base import ZerothOrderOptimizer
from .checks import check_positive
from .step import Query, StepGenerator


class STP(ZerothOrderOptimizer):
    r"""Stochastic Three Points: keep the best of three points along a random direction.

    .. math:: x_{k+1} = \arg\min \{ f(x_k + \alpha s_k),\; f(x_k - \alpha s_k),\; f(x_k) \}

    (S2P paper, Sec. 1, "STP"). Three queries per step: f(x_k) cannot be reused from the last
    step when f is a minibatch loss. Ties keep x_k; between the two moves the lower wins, ``+``
    on a tie. With a deterministic (full-batch) closure the loss therefore never increases.

    Args:
        params: iterable of parameters or param groups.
        lr: the step size alpha (per group; schedulers drive it). Default 1e-3.
        distribution, normalize, seed, exact_restore, max_nonfinite, module, rank: see
            :class:`~zoptim.optim.base.ZerothOrderOptimizer`.

    References:
        Bergou, Gorbunov & Richtarik, SIAM J. Optim. 30(4), 2020; S2P paper, Sec. 1.
    """

    queries_per_step = 3

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        distribution: str = "normal",
        seed: int = 0,
        *,
        normalize: bool = False,
        exact_restore: bool = True,
        max_nonfinite: int = 10,
        module=None,
        rank: int | None = None,
    ):
        check_positive("lr", lr, allow_zero=True)
        super().__init__(
            params,
            dict(lr=lr),
            seed=seed,
            distribution=distribution,
            normalize=normalize,
            exact_restore=exact_restore,
            max_nonfinite=max_nonfinite,
            module=module,
            rank=rank,
        )

    def _queries(self) -> StepGenerator:
        key = self.direction_key()
        alphas = self.per_param("lr")
        f_here, f_plus, f_minus = yield [Query(None), Query(key, alphas), Query(key, [-a for a in alphas])]
        sign = 0.0
        if min(f_plus, f_minus) < f_here:
            sign = 1.0 if f_plus <= f_minus else -1.0
        self._update([(key, [sign * a for a in alphas])])
        self.last_stats = {
            "loss": f_here,
            "loss_after": min(f_here, f_plus, f_minus),
            "gamma": (f_plus - f_minus) / (2.0 * alphas[0]) if alphas[0] > 0 else 0.0,
            "step_size": abs(sign) * self.param_groups[0]["lr"],
            "lr": self.param_groups[0]["lr"],
            "accepted": abs(sign),
        }
        return f_here
