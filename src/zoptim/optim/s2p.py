"""S2P: Stochastic Two-Point search, Algorithm 1 of the S2P paper, with its four step-size rules."""

from __future__ import annotations

import math

from .base import GroupValue, ZerothOrderOptimizer
from .checks import check_int, check_positive
from .step import Query, StepGenerator

STEP_RULES = ("stationary", "dynamic", "relaxed_stationary", "relaxed_dynamic")


class S2P(ZerothOrderOptimizer):
    r"""Stochastic Two-Point search (S2P paper, Algorithm 1).

    Each step draws s_k and moves to the better of two points,

    .. math:: x_{k+1} = \arg\min \{ f(x_k + \alpha_k s_k),\; f(x_k - \alpha_k s_k) \}

    (Alg. 1 line 8; ``+`` on a tie), with alpha_k from one of four rules (Alg. 1 lines 4-7):

    * ``"stationary"`` (Option 1, Theorem 3.1): :math:`\alpha_k = \alpha_0 / \sqrt{K d}`,
      alpha_0 = ``lr``, K = ``total_steps``.
    * ``"dynamic"`` (Option 2, Theorem 3.1): :math:`\alpha_k = |\gamma_k| / (L d)`.
    * ``"relaxed_stationary"`` (Option 3, Theorem 3.2):
      :math:`\alpha_k = \sqrt2 / (B L_1 \sqrt{d K})`.
    * ``"relaxed_dynamic"`` (Option 4, Theorem 3.2):
      :math:`\alpha_k = |\gamma_k| / ((A L_0 + \sqrt2 B L_1 |\gamma_k|) d)`,

    where :math:`\gamma_k = (f(x_k + \rho s_k) - f(x_k - \rho s_k)) / (2 \rho)`. The dynamic
    rules spend two extra queries on gamma: 4 queries per step, 2 for the stationary ones. Unlike
    STP, S2P always moves (there is no third point f(x_k)).

    Args:
        params: iterable of parameters or param groups.
        step_rule: one of ``"stationary"``, ``"dynamic"``, ``"relaxed_stationary"``,
            ``"relaxed_dynamic"``. Default ``"stationary"``.
        lr: alpha_0 of the stationary rule (per group). Required for ``"stationary"``.
        total_steps: K of the stationary rules. Required for both.
        L: smoothness constant of the dynamic rule (Assumption 1), per group.
        L0, L1: (L0, L1)-smoothness constants (Assumption 2) of the relaxed rules, per group.
        rho: smoothing parameter of the dynamic rules. Default 1e-3.
        A, B: constants of the relaxed rules (Lemma 3.3). Default 1.01 each.
        distribution, normalize, seed, exact_restore, max_nonfinite, module, rank: see
            :class:`~zoptim.optim.base.ZerothOrderOptimizer`. The paper analyses Rademacher
            directions; normal and uniform also apply (Alg. 1 line 2).

    References:
        S2P paper, Algorithm 1, Theorems 3.1 and 3.2.
    """

    def __init__(
        self,
        params,
        step_rule: str = "stationary",
        lr: float | None = None,
        total_steps: int | None = None,
        L: float | None = None,
        L0: float | None = None,
        L1: float | None = None,
        rho: float = 1e-3,
        A: float = 1.01,
        B: float = 1.01,
        distribution: str = "normal",
        seed: int = 0,
        *,
        normalize: bool = False,
        exact_restore: bool = True,
        max_nonfinite: int = 10,
        module=None,
        rank: int | None = None,
    ):
        if step_rule not in STEP_RULES:
            raise ValueError(f"step_rule must be one of {', '.join(map(repr, STEP_RULES))}; got {step_rule!r}")
        needs = {
            "stationary": ("lr", "total_steps"),
            "dynamic": ("L",),
            "relaxed_stationary": ("L1", "total_steps"),
            "relaxed_dynamic": ("L0", "L1"),
        }[step_rule]
        given = dict(lr=lr, total_steps=total_steps, L=L, L0=L0, L1=L1)
        for name in needs:
            if given[name] is None:
                raise ValueError(f"step_rule={step_rule!r} needs {name}; got None")
        check_positive("lr", lr, allow_none=True, allow_zero=True)
        self.total_steps = check_int("total_steps", total_steps, allow_none=True)
        for name in ("L", "L0", "L1"):
            check_positive(name, given[name], allow_none=True)
        check_positive("rho", rho)
        check_positive("A", A)
        check_positive("B", B)
        self.step_rule = step_rule
        super().__init__(
            params,
            dict(lr=lr, rho=rho, L=L, L0=L0, L1=L1, A=A, B=B),
            seed=seed,
            distribution=distribution,
            normalize=normalize,
            exact_restore=exact_restore,
            max_nonfinite=max_nonfinite,
            module=module,
            rank=rank,
        )
        self.queries_per_step = 4 if step_rule.endswith("dynamic") else 2

    rho = GroupValue()
    _group_checks = {**ZerothOrderOptimizer._group_checks, "rho": (False, True, None)}
    _settings = ("step_rule", "total_steps")

    def step_size(self, group: dict, gamma: float | None) -> float:
        """alpha_k for one param group (Alg. 1, Options 1-4)."""
        d, K = self.dim, self.total_steps
        if self.step_rule == "stationary":
            return group["lr"] / math.sqrt(K * d)
        if self.step_rule == "dynamic":
            return abs(gamma) / (group["L"] * d)
        if self.step_rule == "relaxed_stationary":
            return math.sqrt(2.0) / (group["B"] * group["L1"] * math.sqrt(d * K))
        return abs(gamma) / ((group["A"] * group["L0"] + math.sqrt(2.0) * group["B"] * group["L1"] * abs(gamma)) * d)

    def _queries(self) -> StepGenerator:
        key = self.direction_key()
        gamma = None
        if self.step_rule.endswith("dynamic"):
            f_rho_plus, f_rho_minus = yield [Query(key, self.rho), Query(key, -self.rho)]
            gamma = (f_rho_plus - f_rho_minus) / (2.0 * self.rho)
        alpha_of_group = [self.step_size(g, gamma) for g in self.param_groups]
        alphas = [alpha_of_group[g] for g in self._group_of]
        f_plus, f_minus = yield [Query(key, alphas), Query(key, [-a for a in alphas])]
        sign = 1.0 if f_plus <= f_minus else -1.0
        self._update([(key, [sign * a for a in alphas])])
        self.last_stats = {
            "loss": 0.5 * (f_plus + f_minus),
            "loss_after": min(f_plus, f_minus),
            "gamma": gamma if gamma is not None else (f_plus - f_minus) / (2.0 * alphas[0] or 1.0),
            "step_size": alpha_of_group[0],
            "rho": self.rho,
            "lr": self.param_groups[0]["lr"],
        }
        return self.last_stats["loss"]
