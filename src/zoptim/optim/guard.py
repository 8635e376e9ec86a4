"""Loss guard: halve the learning rate when the smoothed training loss rises (a one-sided bold driver)."""

from __future__ import annotations

import math

from .checks import check_positive


class LossGuard:
    r"""Cut the learning rate by ``factor`` when the smoothed loss rises above its best level.

    A zeroth-order step is stable only while :math:`\mathrm{lr} \lesssim 1/(L d)` (the variance
    of the two-point estimate grows with the dimension d), and that bound moves during a run: on
    the pre-trained heads of the benchmark, ZOSGD at twice the best fixed learning rate first
    descends faster, then the projected gradients grow and the loss runs away. The guard watches
    the loss each step has already measured (no extra query), :math:`\ell_n` (ZOSGD: the mean of
    f(x + eps s) and f(x - eps s); HiZOO: f(x)), through a fast and a slow bias-corrected
    exponential average and the fast one's noise:

    .. math::

        \hat m^{(\beta)}_n &= \frac{m^{(\beta)}_n}{1 - \beta^n}, \qquad
        m^{(\beta)}_n = \beta\, m^{(\beta)}_{n-1} + (1-\beta)\, \ell_n
        \qquad (\beta = 0.9 \text{ fast}, \ \beta_s = 0.98 \text{ slow}) \\
        \hat\sigma_n &= \sqrt{\frac{v_n}{1 - \beta_v^{n-1}} \cdot \frac{1-\beta}{1+\beta}}, \qquad
        v_n = \beta_v v_{n-1} + (1-\beta_v) (\ell_n - \hat m^{(\beta)}_{n-1})^2, \quad \beta_v = 0.99 \\
        b_n &= \min_{w \le j \le n} \hat m^{(\beta_s)}_j .

    When :math:`\hat m^{(\beta)}_n > b_n + \mathrm{tol}\,|b_n| + z\, \hat\sigma_n` (after
    ``warmup`` observations and at least ``cooldown`` steps after the last cut), the
    learning-rate scale is multiplied by ``factor`` and b restarts at the fast average.
    :math:`\hat\sigma` is the standard deviation the fast average would have if the step losses
    were independent with the observed spread, so ``z`` keeps minibatch noise from cutting the
    rate (its spread is averaged over about 100 steps, so a few heavy-tailed minibatches do not
    make it small); the best level is taken on the slower average because the running minimum of a
    noisy average sits below its mean. With the defaults (z = 4, beta_s = 0.98), losses with 30 %
    noise and no trend cut 3 times in 5,000 steps (z = 3, beta_s = 0.95: 21-24), and a run-away
    of 0.3 % a step under 6 % noise is cut 46-59 steps after it begins
    (``python benchmarks/guard_noise.py``; ``tests/test_guard.py`` holds such cases).

    The optimizer moves with ``lr * scale``; ``param_groups`` and any torch LR scheduler driving
    them are untouched, so the guard composes with every schedule. This is the decreasing half
    of the "bold driver" rule (Vogl et al., 1988; Battiti, 1989, "Accelerated backpropagation
    learning: two optimization methods"), made robust to the noisy losses a zeroth-order step
    sees. State: eight numbers.
    """

    def __init__(self, tol: float, *, beta: float = 0.9, slow_beta: float = 0.98, noise_beta: float = 0.99, factor: float = 0.5,
                 z: float = 4.0, warmup: int = 10, cooldown: int = 10):
        self.tol = check_positive("guard", tol)
        for name, value in (("beta", beta), ("slow_beta", slow_beta), ("noise_beta", noise_beta), ("factor", factor)):
            if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"guard {name} must be in (0, 1); got {value!r}")
        self.beta, self.slow_beta, self.noise_beta = float(beta), float(slow_beta), float(noise_beta)
        self.factor = float(factor)
        self.z = check_positive("guard z", z, allow_zero=True)
        self.warmup, self.cooldown = int(warmup), int(cooldown)
        self.n, self.fast, self.slow, self.var = 0, 0.0, 0.0, 0.0
        self.best, self.wait, self.scale, self.cuts = math.inf, 0, 1.0, 0

    def smoothed(self, slow: bool = False) -> float:
        """The bias-corrected fast (or slow) average of the losses seen (nan before any)."""
        if not self.n:
            return math.nan
        beta = self.slow_beta if slow else self.beta
        return (self.slow if slow else self.fast) / (1.0 - beta**self.n)

    def noise(self) -> float:
        """:math:`\\hat\\sigma_n`, the standard deviation of the fast average under independent noise."""
        if self.n < 2:
            return 0.0
        return math.sqrt(self.var / (1.0 - self.noise_beta ** (self.n - 1)) * (1.0 - self.beta) / (1.0 + self.beta))

    def observe(self, loss: float) -> bool:
        """Record one step's (finite) loss; True when it cut the learning rate."""
        loss = float(loss)
        if self.n:
            self.var = self.noise_beta * self.var + (1.0 - self.noise_beta) * (loss - self.smoothed()) ** 2
        self.n += 1
        self.fast = self.beta * self.fast + (1.0 - self.beta) * loss
        self.slow = self.slow_beta * self.slow + (1.0 - self.slow_beta) * loss
        self.wait = max(0, self.wait - 1)
        if self.n < self.warmup:
            return False
        self.best = min(self.best, self.smoothed(slow=True))
        fast = self.smoothed()
        if self.wait == 0 and fast > self.best + self.tol * abs(self.best) + self.z * self.noise():
            self.scale *= self.factor
            self.best, self.wait, self.cuts = fast, self.cooldown, self.cuts + 1
            return True
        return False

    _FIELDS = ("n", "fast", "slow", "var", "best", "wait", "scale", "cuts")

    def state(self) -> dict:
        return {"tol": self.tol, **{k: getattr(self, k) for k in self._FIELDS}}

    def load(self, state: dict) -> None:
        for k in self._FIELDS:
            setattr(self, k, type(getattr(self, k))(state[k]))
