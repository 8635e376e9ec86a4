"""HiZOO: zeroth-order SGD preconditioned by a diagonal Hessian estimate (Zhao et al., ICLR 2025)."""

from __future__ import annotations

import math

import torch

from .base import GroupValue, ZerothOrderOptimizer
from .checks import check_positive
from .step import Query, SkippedUpdate, StepGenerator


class HiZOO(ZerothOrderOptimizer):
    r"""Hessian-informed zeroth-order optimization (Zhao et al., "Second-Order Fine-Tuning without
    Pain for LLMs: A Hessian Informed Zeroth-Order Optimizer", ICLR 2025, Algorithm 1).

    A diagonal estimate :math:`\Sigma_t^{-1} = \mathrm{diag}(H_t)` of the Hessian preconditions
    MeZO's step. Per step, with :math:`u \sim N(0, I)` and three queries on the same batch:

    .. math::

        \ell = f(x), \quad \ell_\pm &= f(x \pm \mu\, \Sigma_t^{1/2} u) \\
        H_{t+1} &= (1 - \alpha) H_t + \alpha\, \frac{|\ell_+ + \ell_- - 2 \ell|}{2 \mu^2}\, H_t \odot u \odot u \\
        x_{t+1} &= x_t - \mathrm{lr} \Big( \frac{\ell_+ - \ell_-}{2 \mu}\, H_{t+1}^{-1/2} \odot u + \lambda x_t \Big)

    (:math:`\Sigma^{1/2} u = H^{-1/2} \odot u`; the second line is the paper's Eq. for
    :math:`\Sigma_{t+1}^{-1}` with :math:`\Sigma_t^{-1/2} \mathrm{diag}(u u^\top) \Sigma_t^{-1/2}
    = H_t \odot u^2`, kept positive by the absolute value). H starts at 1, so the first step is
    MeZO's. ``eps`` is mu, ``hessian_smooth`` alpha.

    What the estimate measures. The one scalar :math:`\delta = |\ell_+ + \ell_- - 2\ell| / 2\mu^2`
    is the curvature along the whole direction; for a quadratic with Hessian A,
    :math:`E[\delta\, u_i^2] = \mathrm{tr}(B) + 2 B_{ii}` with
    :math:`B = \Sigma^{1/2} A \Sigma^{1/2}`. The update of H is multiplicative,
    :math:`H_i \leftarrow H_i (1 - \alpha + \alpha \delta u_i^2)`: its drift is the common factor
    tr(B), which pulls H towards about d times the diagonal (shrinking the step by up to sqrt(d)),
    and the per-coordinate signal 2 B_ii is one part in d of it. A large alpha therefore makes H a
    random walk in log scale rather than a curvature estimate (measured on a 2,000-dim diagonal
    quadratic: the learned H had no relation to the true diagonal at alpha = 1e-3 or 1e-2, and
    preconditioning by H / mean H diverged). The paper's small alpha (1e-6 to 1e-8 at d = 1e8 to
    1e10) keeps alpha * d near 1-100.

    Memory. The dense estimate is one float32 value per trainable scalar (4 bytes x d: a second
    copy of a float32 model's weights), held in optimizer state. ``factored=True`` is the reduced
    memory variant (the paper's HiZOO-L keeps a low-rank Hessian; here the rank-one, non-negative
    factorisation of Adafactor, Shazeer & Stern 2018, Sec. 3): each matrix (a tensor of two or
    more dimensions, viewed as rows x the rest) keeps an EMA of the row sums r and of the column
    sums c of the estimate, and uses :math:`H \approx r c^\top / \mathbf 1^\top r`; vectors keep the
    dense estimate. That is ``4 (rows + cols)`` bytes per matrix: 0.1 % of the model for a
    transformer. Neither variant stores a direction.

    Passes over the weights: 5 per step (+mu, -mu, the restore before H changes, the H update,
    the update), against ZOSGD's 3; 3 forward passes against 2.

    Args:
        params: iterable of parameters or param groups.
        lr: learning rate (per group). Default 1e-3.
        eps: mu, the perturbation scale. Default 1e-3.
        hessian_smooth: alpha, the EMA rate of the Hessian estimate, in [0, 1). The paper tunes it
            in {1e-6, 1e-7, 1e-8} for OPT / LLaMA; 0 is MeZO. Default 1e-6.
        weight_decay: lambda, per group. Default 0.
        factored: the rank-one factored estimate for matrices (see Memory). Default False.
        guard: tol of the loss guard on f(x) (:class:`~zoptim.optim.guard.LossGuard`), as in
            :class:`~zoptim.ZOSGD`. 0 (default) is off.
        module, rank: not supported; passing a module raises ValueError (the preconditioner
            multiplies each element of the direction, which a forward-applied low-rank
            direction does not have).
        seed, distribution, exact_restore, max_nonfinite: see
            :class:`~zoptim.optim.base.ZerothOrderOptimizer` (``normalize`` is not offered: the
            preconditioned direction is not normalized in the paper).

    Example:
        >>> opt = zoptim.HiZOO(model.parameters(), lr=1e-4, eps=1e-3, hessian_smooth=1e-6)
        >>> loss = opt.step(lambda: loss_fn(model(x), y))   # three forward passes

    References:
        Zhao et al. (2025), Algorithm 1 and Eqs. 6-9; Malladi et al. (2023) for the MeZO step it
        preconditions.
    """

    queries_per_step = 3
    element_wise_directions = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        eps: float = 1e-3,
        hessian_smooth: float = 1e-6,
        weight_decay: float = 0.0,
        seed: int = 0,
        *,
        factored: bool = False,
        guard: float = 0.0,
        distribution: str = "normal",
        exact_restore: bool = True,
        max_nonfinite: int = 10,
        module=None,
        rank: int | None = None,
        orthogonalize: bool = False,
    ):
        if orthogonalize:
            raise ValueError(
                "HiZOO does not support orthogonalize=True: its preconditioner multiplies every element of a "
                "full-rank direction written in place, so its estimate has no low-rank factors to orthogonalise; "
                "use ZOSGD(module=model, rank=r, orthogonalize=True)"
            )
        check_positive("lr", lr, allow_zero=True)
        check_positive("eps", eps)
        alpha = check_positive("hessian_smooth", hessian_smooth, allow_zero=True)
        if alpha >= 1.0:
            raise ValueError(f"hessian_smooth must be in [0, 1); got {hessian_smooth!r}")
        check_positive("weight_decay", weight_decay, allow_zero=True)
        self.factored = bool(factored)
        super().__init__(
            params,
            dict(lr=lr, eps=eps, hessian_smooth=alpha, weight_decay=weight_decay, **({"guard": guard} if guard else {})),
            seed=seed,
            distribution=distribution,
            normalize=False,
            exact_restore=exact_restore,
            max_nonfinite=max_nonfinite,
            module=module,
            rank=rank,
        )
        self._set_guard(guard)
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._last_inverse: tuple | None = None  # (j, a, b, multipliers) of the last request, until H changes
        self._init_hessian()
        self.engine.weights = self._inverse_sqrt

    eps = GroupValue()
    hessian_smooth = GroupValue()
    _group_checks = {**ZerothOrderOptimizer._group_checks, "eps": (False, True, None),
                     "hessian_smooth": (True, True, 1.0)}
    _settings = ("factored",)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group: its tensors start from H_0 = 1, the others keep their estimates."""
        super().add_param_group(param_group)
        old = getattr(self, "hessian", None)
        if old is None:
            return  # the constructor's own groups: __init__ builds the estimate
        self._init_hessian()
        self.hessian[: len(old)] = old  # the existing tensors come first in the rebuilt engine
        self._changed()
        self.engine.weights = self._inverse_sqrt

    # -- the estimate -----------------------------------------------------------------------------
    def _is_factored(self, j: int) -> bool:
        p = self.engine.params[j]
        return self.factored and p.dim() >= 2 and p.shape[0] > 1 and p.numel() // p.shape[0] > 1

    def _init_hessian(self) -> None:
        """H_0 = 1 (the paper's initialisation), in float32 on each parameter's device."""
        self._changed()
        self.hessian: list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = []
        self._max_cols = 0
        for j, p in enumerate(self.engine.params):
            kw = dict(dtype=torch.float32, device=p.device)
            if self._is_factored(j):
                rows, cols = p.shape[0], p.numel() // p.shape[0]
                self._max_cols = max(self._max_cols, cols)
                # row sums and column sums of an all-ones rows x cols matrix
                self.hessian.append((torch.full((rows,), float(cols), **kw), torch.full((cols,), float(rows), **kw)))
            else:
                self.hessian.append(torch.ones(p.numel(), **kw))

    def _chunk_hessian(self, j: int, a: int, b: int) -> torch.Tensor:
        """H at elements a:b of tensor j (float32)."""
        h = self.hessian[j]
        if isinstance(h, torch.Tensor):
            return h[a:b]
        r0, r1, offset, block = self._factored_block(j, a, b)
        return block.view(-1)[offset : offset + (b - a)]

    def _factored_block(self, j: int, a: int, b: int) -> tuple[int, int, int, torch.Tensor]:
        """``(r0, r1, offset, block)``: the factored estimate r c^T / 1^T r on the rows r0:r1 of
        matrix j that elements a:b fall in (a scratch buffer), a's offset in that block."""
        r, c = self.hessian[j]
        r0, r1, offset = self._row_span(j, a, b)
        block = self._buffer("block", (r1 - r0) * c.numel(), r.device).view(r1 - r0, -1)
        torch.outer(r[r0:r1], c, out=block).div_(r.sum())
        return r0, r1, offset, block

    def _buffer(self, name: str, n: int, device: torch.device) -> torch.Tensor:
        """A reused float32 scratch buffer of at least n elements (valid until the next call with
        this name): the step's passes then allocate nothing chunk-sized, which kept the heap from
        fragmenting into about 1.5x the model's bytes on top of ZOSGD's (measured on SmolLM2)."""
        buf = self._scratch.get((device, name))
        if buf is None or buf.numel() < n:
            buf = self._scratch[(device, name)] = torch.empty(max(n, self.engine.chunk_size + 2 * self._max_cols),
                                                              dtype=torch.float32, device=device)
        return buf[:n]

    def _row_span(self, j: int, a: int, b: int) -> tuple[int, int, int]:
        """The rows r0:r1 of matrix j (viewed rows x cols) that elements a:b fall in, and a's offset
        in that block (the factored path works on such blocks: at most a chunk plus two rows)."""
        cols = self.hessian[j][1].numel()
        r0 = a // cols
        return r0, (b - 1) // cols + 1, a - r0 * cols

    def _inverse_sqrt(self, j: int, a: int, b: int) -> torch.Tensor:
        """The direction's multipliers Sigma^(1/2) = H^(-1/2) at elements a:b of tensor j.

        Written into one reused buffer per device (the engine uses a chunk's multipliers before it
        asks for the next chunk's), so the five passes of a step allocate nothing chunk-sized. A
        request for the same elements of the same H as the last one (the +mu and -mu queries of a
        one-chunk tensor) returns the buffer as it is: H changes only through :meth:`_changed`."""
        last = self._last_inverse
        if last is not None and last[:3] == (j, a, b):
            return last[3]
        h = self._chunk_hessian(j, a, b)
        values = torch.rsqrt(h, out=self._buffer("inverse_sqrt", h.numel(), h.device))
        self._last_inverse = (j, a, b, values)
        return values

    def _changed(self) -> None:
        """H changed (an update, a new group, a loaded state): the next multipliers are recomputed."""
        self._last_inverse = None

    def diagonal_hessian(self) -> list[torch.Tensor]:
        """The current estimate H, one float32 tensor per trainable tensor (materialised)."""
        out = []
        for h, p in zip(self.hessian, self.engine.params):
            full = h.clone() if isinstance(h, torch.Tensor) else torch.outer(h[0], h[1]) / h[0].sum()
            out.append(full.view(p.shape))
        return out

    def _update_hessian(self, key: int, curvature: float) -> None:
        """H <- (1 - alpha) H + alpha * curvature * H * u^2 (u redrawn from its key, chunk by chunk)."""
        alpha = self.hessian_smooth
        if alpha == 0.0:
            return
        self._changed()
        # factored: the row and column sums of the estimate, accumulated over the chunks
        sums = {j: (torch.zeros_like(h[0]), torch.zeros_like(h[1]))
                for j, h in enumerate(self.hessian) if isinstance(h, tuple)}
        for j, a, b, u in self.engine.direction_chunks(key):
            h = self.hessian[j]
            if j in sums:
                # the estimate in place in its row block, the elements of those rows outside a:b zeroed
                r0, r1, offset, block = self._factored_block(j, a, b)
                flat = block.view(-1)
                flat[offset : offset + (b - a)].mul_(u.square()).mul_(curvature)
                flat[:offset].zero_()
                flat[offset + (b - a) :].zero_()
                sums[j][0][r0:r1] += block.sum(dim=1)
                sums[j][1].add_(block.sum(dim=0))
            else:
                h = h if a == 0 and b == h.numel() else h[a:b]  # a one-chunk tensor: no views
                estimate = (h * u.square()).mul_(curvature)
                h.mul_(1.0 - alpha).add_(estimate, alpha=alpha)
        for j, (row_sum, col_sum) in sums.items():
            self.hessian[j][0].mul_(1.0 - alpha).add_(row_sum, alpha=alpha)
            self.hessian[j][1].mul_(1.0 - alpha).add_(col_sum, alpha=alpha)

    def _hessian_range(self) -> tuple[float, float]:
        """The smallest and largest entries of the estimate H (of its outer product, if factored)."""
        lows, highs = [], []
        for h in self.hessian:
            if isinstance(h, torch.Tensor):
                lo, hi = torch.aminmax(h)
                lows.append(float(lo))
                highs.append(float(hi))
            else:
                (r_lo, r_hi), (c_lo, c_hi), total = torch.aminmax(h[0]), torch.aminmax(h[1]), float(h[0].sum())
                lows.append(float(r_lo) * float(c_lo) / total)
                highs.append(float(r_hi) * float(c_hi) / total)
        return min(lows), max(highs)

    def _multiplier_bound(self) -> float:
        """The largest multiplier H^(-1/2) of this step's direction: one over the root of a lower
        bound on H's smallest entry (taken before the estimate's update, see :meth:`_queries`)."""
        low = self._smallest_entry
        return 1.0 / math.sqrt(low) if low > 0 else math.inf

    def memory_bytes(self) -> int:
        """Bytes of optimizer state the estimate holds."""
        return sum(t.numel() * 4 for h in self.hessian for t in (h if isinstance(h, tuple) else (h,)))

    # -- the step -----------------------------------------------------------------------------------
    def _queries(self) -> StepGenerator:
        key, mu = self.direction_key(0), self.eps
        f0, f_plus, f_minus = yield [Query(None), Query(key, mu), Query(key, -mu)]
        self.engine.restore()  # undo with H_t before H changes (the multipliers of the offset)
        curvature = abs(f_plus + f_minus - 2.0 * f0) / (2.0 * mu * mu)
        # finite losses so large that the estimate would overflow H's float32 (and stall the run)
        low, high = self._hessian_range()
        growth = self.hessian_smooth * curvature * self.engine.direction_bound() ** 2 * high
        if not growth < torch.finfo(torch.float32).max / 2:
            raise SkippedUpdate(curvature, f"curvature estimate {curvature:.3g} would overflow the Hessian estimate")
        # the update adds a non-negative term, so H's smallest entry stays >= (1 - alpha) * low (dense; about so factored)
        self._smallest_entry = (1.0 - self.hessian_smooth) * low
        self._update_hessian(key, curvature)
        gamma = (f_plus - f_minus) / (2.0 * mu)
        lrs = self._guarded_lrs()
        decay = [lr * wd for lr, wd in zip(lrs, self.per_param("weight_decay"))]
        self._update([(key, [-lr * gamma for lr in lrs])], decay=decay if any(decay) else None)
        self.last_stats = {
            "loss": f0,
            "gamma": gamma,
            "curvature": curvature,
            "step_size": abs(lrs[0] * gamma),
            "rho": mu,
            "lr": lrs[0],
        }
        self._observe(f0)
        return f0

    # -- state ----------------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        extra = super()._extra_state()
        extra["hessian"] = [
            {"row": h[0].clone(), "col": h[1].clone()} if isinstance(h, tuple) else {"dense": h.clone()}
            for h in self.hessian
        ]
        return extra

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        saved = extra["hessian"]
        if len(saved) != len(self.hessian):
            raise ValueError(f"state_dict holds {len(saved)} Hessian estimates; this optimizer has {len(self.hessian)} tensors")
        loaded = []
        for h, s in zip(self.hessian, saved):
            mine = h if isinstance(h, tuple) else (h,)
            theirs = (s["row"], s["col"]) if "row" in s else (s["dense"],)
            if [t.shape for t in mine] != [t.shape for t in theirs]:
                raise ValueError("state_dict's Hessian estimate has other shapes than this optimizer's parameters")
            copies = tuple(t.to(device=m.device, dtype=torch.float32).clone() for m, t in zip(mine, theirs))
            loaded.append(copies if isinstance(h, tuple) else copies[0])
        self.hessian = loaded
        self._changed()
