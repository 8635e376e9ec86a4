"""What every zeroth-order optimizer shares: closure queries, counters, non-finite handling, state.

Subclasses implement :meth:`ZerothOrderOptimizer._queries`, one step written as a generator: it
yields :class:`Query` points (``x + scales * s(key)``), receives each point's loss by ``send``,
and ends with one ``self._update(...)`` (the engine's update, checked). That generator is the only implementation of a
method's step, and it never calls the loss itself, so two drivers share it (:class:`StepRun`):
``step(closure)`` answers each query with the closure, :class:`zoptim.AskTell` with ``tell()``.
Everything else, moving the parameters to each query point, the checks on the loss, the
learning rates and the update, the exact restore on a non-finite loss or update, an exception or an abandoned step, the query counter and the state
that makes a resumed run bit-identical, lives here.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable
from typing import Any, NamedTuple

import torch
from torch.optim import Optimizer

from ..engine.forward import ForwardPerturbation
from ..engine.noise import NOISE_VERSION, check_distribution, mix
from ..engine.inplace import SeededPerturbation
from ..engine.shards import local_part
from .checks import check_int, check_positive

Closure = Callable[[], Any]


class NonFiniteLossWarning(RuntimeWarning):
    """A step saw a NaN or infinite loss; its update was skipped and the parameters restored."""


class DivergedError(RuntimeError):
    """``max_nonfinite`` consecutive steps were skipped (non-finite losses or updates): the run has
    diverged. The parameters are at the last finite iterate."""


class SkippedUpdate(Exception):
    """Raised inside a step whose update would write a non-finite value: the driver skips the
    update and restores the parameters, as for a non-finite loss (internal; never reaches users)."""

    def __init__(self, value: float, what: str):
        super().__init__(what)
        self.value, self.what = value, what


#: A rank's status in a direction-parallel step's exchange (see ZerothOrderOptimizer._exchange_once).
_OK, _NONFINITE, _RAISED = 0.0, 1.0, 2.0


class Query(NamedTuple):
    """A point to evaluate: ``x + scales * s(key)``; ``key=None`` is the unperturbed iterate x.

    ``scales`` is one number or one per trainable tensor (the per-group step sizes).
    """

    key: int | None
    scales: float | list[float] = 0.0


#: One step of a method: yields the points to evaluate, one Query (sent its loss) or a list of
#: independent ones (sent their losses as a list), and returns the step's loss.
StepGenerator = Generator[Any, Any, float]


def loss_value(loss) -> float:
    """The closure's return value as a Python float, or a TypeError saying what it was."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise TypeError(
                f"closure must return a scalar loss; got a tensor of shape {tuple(loss.shape)}"
            )
        return float(loss.detach().reshape(()).item())
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return float(loss)
    if loss is None:
        raise TypeError(
            "closure returned None; it must return the loss (a float or a one-element tensor) "
            "and must not call backward()"
        )
    raise TypeError(
        f"closure must return a float or a one-element tensor; got {type(loss).__name__}: {loss!r}"
    )


def loss_vector(loss) -> list[float]:
    """A per-example closure's return value (``per_example=True``) as a list of floats."""
    if isinstance(loss, torch.Tensor) and loss.dim() == 1 and loss.numel() >= 1:
        return [float(v) for v in loss.detach().float().cpu().tolist()]
    if isinstance(loss, (list, tuple)) and loss and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in loss):
        return [float(v) for v in loss]
    shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
    raise TypeError(
        "per_example=True: the closure must return one loss per example, a 1-D tensor (e.g. "
        f"cross_entropy(..., reduction='none')); got {shape}"
    )


class ZerothOrderOptimizer(Optimizer):
    """Base class of zoptim's optimizers (a ``torch.optim.Optimizer`` that never reads ``.grad``).

    Args common to all subclasses:
        seed: the seed of the direction stream; direction i of step k is named by
            ``mix(seed, k, i)``. Same seed, same run.
        distribution: ``"normal"``, ``"rademacher"`` or ``"uniform"``.
        normalize: scale each direction to norm sqrt(d).
        exact_restore: keep the journal that makes every restore bit-exact (see
            :mod:`zoptim.engine.inplace`); ``False`` trades it for MeZO's arithmetic round trip.
        max_nonfinite: after this many consecutive steps with a NaN/inf loss, raise RuntimeError.
        module: the model the closure runs. Given, each query's offset is applied inside the
            forward of its layers (:mod:`zoptim.engine.forward`) instead of being written into the
            weights: queries never touch them, and only the update writes. None (default): the
            in-place engine (:mod:`zoptim.engine.inplace`), for any tensors.
        rank: r of the low-rank direction of each weight matrix, ``S = A B^T / sqrt(r)``
            (needs ``module``); None (default) keeps full-rank directions.
        per_example: (ZOSGD, AS2P; needs ``module`` and ``rank``) each example of the minibatch
            (dim 0 of every layer's input) is evaluated at its own point ``x + rho s_i``: the
            closure returns one loss per example (a 1-D tensor, e.g. ``reduction="none"``), and a
            two-point step measures B directional derivatives for the price of two forward passes
            (see :meth:`_two_point_directions`).

    Attributes:
        num_queries: closure evaluations so far (the x-axis of every plot in the S2P paper).
        last_stats: a dict describing the last step (loss, gamma, step size, rho, lr, ...).
    """

    queries_per_step = 2
    #: The step being driven query by query (AskTell between ask and tell), if any.
    _run: StepRun | None = None
    #: Direction parallelism (:func:`zoptim.distributed.wrap` with ``mode="directions"``): this
    #: process evaluates directions ``rank*k .. rank*k + k - 1`` of a step that has ``world*k``;
    #: ``_exchange`` all-gathers each rank's list of floats (see :meth:`shard_directions`).
    _direction_rank, _direction_world = 0, 1
    _example_rank, _example_world = 0, 1
    _exchange: Callable[[list[float]], list[list[float]]] | None = None
    _exchanged = False  # whether this step's exchange has happened
    #: The memory-free seed momentum (:class:`zoptim.optim.momentum.SeedMomentum`) of methods that
    #: offer it (ZOSGD, AS2P), else None; its (key, coefficient) window is part of the state.
    momentum = None
    #: The loss guard (:class:`zoptim.optim.guard.LossGuard`) of methods that offer it (ZOSGD,
    #: HiZOO), else None: it scales their learning rate down when the smoothed loss rises.
    guard = None

    def __init__(
        self,
        params: Iterable,
        defaults: dict,
        *,
        seed: int = 0,
        distribution: str = "normal",
        normalize: bool = False,
        exact_restore: bool = True,
        max_nonfinite: int = 10,
        module: torch.nn.Module | None = None,
        rank: int | None = None,
        per_example: bool = False,
    ):
        check_distribution(distribution)
        self.per_example = bool(per_example)
        if self.per_example and (module is None or rank is None):
            raise ValueError(
                "per_example=True needs module=<the model> and rank=r: each example's direction is applied inside "
                "the forward of the model's layers, as a rank-r product"
            )
        if module is not None and not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module (the model the closure runs) or None; got {type(module).__name__}")
        self._rank = check_int("rank", rank, allow_none=True)
        if self._rank is not None and module is None:
            raise ValueError(
                "rank=r needs module=<the model>: low-rank directions are applied inside the forward of the "
                "model's layers; pass module=model (or rank=None for full-rank directions in place)"
            )
        self._module = module
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer; got {seed!r}")
        self.max_nonfinite = check_int("max_nonfinite", max_nonfinite)
        self.seed = int(seed)
        super().__init__(params, defaults)
        self._distribution = distribution
        self._normalize = bool(normalize)
        self._exact = bool(exact_restore)
        self.num_queries = 0
        self.steps = 0
        self.nonfinite_steps = 0
        self._nonfinite_run = 0
        self.last_stats: dict[str, float] = {}
        self._build_engine()

    # -- parameters -----------------------------------------------------------------------------
    def _build_engine(self) -> None:
        self._names = self._dtype_limit = None  # caches of the parameters' names and dtypes
        trainable, group_of, seen, where = [], [], {}, []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if id(p) in seen:
                    raise ValueError(
                        f"the same tensor appears twice in params (group {seen[id(p)][0]} index "
                        f"{seen[id(p)][1]} and group {gi} index {pi}, shape {tuple(p.shape)}): it would "
                        "be perturbed twice per query; give each parameter once"
                    )
                seen[id(p)] = (gi, pi)
                if isinstance(p, torch.nn.parameter.UninitializedParameter) or p.is_meta:
                    raise ValueError(
                        f"{self._param_name(gi, pi, p)} is not materialised (on the meta device, or a lazy module's "
                        "uninitialised parameter): move the model to a real device, or run one forward pass of "
                        "a lazy module, before building the optimizer"
                    )
                if not p.is_floating_point():
                    raise ValueError(f"parameters must be floating point; got one of dtype {p.dtype}")
                if not p.requires_grad:
                    continue
                part = local_part(p)
                if not part.tensor.is_contiguous():
                    raise ValueError("parameters must be contiguous tensors (call .contiguous() on the module's weights)")
                trainable.append(part)
                group_of.append(gi)
                where.append((gi, pi, p))
        self._refuse_aliases(trainable, where)
        if not trainable:
            raise ValueError("no trainable parameters: every parameter given has requires_grad=False")
        self.sharded = any(part.tensor.numel() != part.global_numel for part in trainable)
        if self.sharded and self._normalize:
            raise ValueError(
                "normalize=True needs the norm of the whole direction, which a rank holding a shard does not "
                "see; use normalize=False with sharded (FSDP2) parameters"
            )
        self._group_of = group_of
        self._global_dim = sum(part.global_numel for part in trainable)
        old = getattr(self, "engine", None)
        if isinstance(old, ForwardPerturbation):
            old.close()
        if self._module is not None:
            self.engine = ForwardPerturbation(
                self._module,
                [p for _, _, p in where],  # the module's own tensors (DTensors when sharded): its hooks find them
                parts=trainable,
                distribution=self._distribution,
                rank=self._rank,
                normalize=self._normalize,
                exact=self._exact,
                per_example=self.per_example,
            )
            # the hooks go when the optimizer does (they hold the engine, never the optimizer)
            self._close_hooks = weakref.finalize(self, self.engine.close)
            return
        self.engine = SeededPerturbation(
            [part.tensor for part in trainable],
            distribution=self._distribution,
            normalize=self._normalize,
            exact=self._exact,
            offsets=[part.offset for part in trainable],
        )

    def _param_name(self, gi: int, pi: int, p: torch.Tensor) -> str:
        """How an error names a parameter: its name in ``module`` if known, and its place and shape."""
        names = self._names
        if names is None:
            names = self._names = {} if self._module is None else {id(q): n for n, q in self._module.named_parameters()}
        name = names.get(id(p))
        shape = "unknown" if isinstance(p, torch.nn.parameter.UninitializedParameter) else tuple(p.shape)
        return f"parameter {name!r} (group {gi} index {pi}, shape {shape})" if name else \
            f"parameter group {gi} index {pi} (shape {shape})"

    def _refuse_aliases(self, trainable: list, where: list) -> None:
        """Refuse two trainable tensors whose storage overlaps (views of one another): each query
        and update would move the shared elements twice. One Parameter used twice (tied weights)
        is listed once by ``model.parameters()`` and is fine."""
        spans = []
        for part, (gi, pi, p) in zip(trainable, where):
            t = part.tensor
            if t.numel() == 0:
                continue
            size = t.element_size()
            start = t.untyped_storage().data_ptr() + t.storage_offset() * size
            spans.append((t.device, start, start + t.numel() * size, gi, pi, p))
        spans.sort(key=lambda s: (str(s[0]), s[1]))
        reach = None  # the span reaching furthest so far on this device
        for b in spans:
            a = reach
            if reach is None or reach[0] != b[0] or b[2] > reach[2]:
                reach = b
            if a is not None and a[0] == b[0] and b[1] < a[2]:
                raise ValueError(
                    f"{self._param_name(*a[3:])} and {self._param_name(*b[3:])} share storage (one is a view of "
                    "the other): every move would apply to the shared elements twice. Give the optimizer each "
                    "storage once (tied weights as one Parameter are fine)"
                )

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (``torch.optim.Optimizer``'s contract); its tensors join the engine after the
        existing ones. Refused while a step is in progress (an AskTell ``ask()`` not yet told):
        its parameters are at a query point."""
        if self._run is not None and not self._run.done:
            raise RuntimeError(
                "add_param_group during a step in progress (an AskTell ask() not yet told): the parameters are at "
                "a query point; tell() the pending values or close() first"
            )
        super().add_param_group(param_group)
        if hasattr(self, "engine"):
            self._build_engine()

    @property
    def module(self) -> torch.nn.Module | None:
        """The model whose forward applies the directions (``module=``), or None (in place)."""
        return self._module

    @property
    def rank(self) -> int | None:
        """r of the low-rank matrix directions, or None (full rank)."""
        return self._rank

    def close(self) -> None:
        """Abandon a step in progress (parameters restored bit for bit) and, with ``module=``, remove
        the forward hooks from the model. The optimizer cannot step afterwards."""
        if self._run is not None:
            self._run.abandon()
        self.engine.restore()
        if isinstance(self.engine, ForwardPerturbation):
            self.engine.close()
        self._closed = True

    @property
    def dim(self) -> int:
        """d, the number of trainable scalars (of the whole model, when its parameters are sharded)."""
        return self._global_dim

    def per_param(self, name: str) -> list[float]:
        """A group hyper-parameter spread to one value per trainable tensor."""
        return [self.param_groups[g][name] for g in self._group_of]

    def direction_key(self, index: int = 0) -> int:
        return mix(self.seed, self.steps, index)

    supports_direction_sharding = False

    def shard_directions(self, rank: int, world: int, exchange: Callable[[list[float]], list[list[float]]]) -> None:
        """Split each step's directions over ``world`` processes (what ``mode="directions"`` does).

        This process then evaluates only its own ``num_directions`` directions, global indices
        ``rank * num_directions + i`` of the step's ``world * num_directions``; after its queries it
        calls ``exchange(values)``, which must return every rank's list in rank order (an
        all-gather), and applies all the directions' updates in rank order. The step is then the
        single-process step with ``num_directions * world`` directions. Only before the first step.
        """
        if not self.supports_direction_sharding:
            raise ValueError(
                f"{type(self).__name__} does not split its directions over processes; mode='directions' "
                "supports ZOSGD and AS2P (use mode='batch' for the others)"
            )
        if self.steps:
            raise ValueError("shard_directions must be called before the first step")
        if self.per_example:
            raise ValueError("per_example=True already gives each example its own direction; it does not combine "
                             "with mode='directions' (use mode='batch')")
        self._direction_rank, self._direction_world, self._exchange = int(rank), int(world), exchange

    def share_examples(self, rank: int, world: int) -> None:
        """Split a per-example step's examples over ``world`` processes (what ``wrap(mode="batch")``
        does with ``per_example=True``): this process's row i is example ``rank + world * i`` of the
        minibatch and takes that example's direction; its closure must then return the losses of all
        the minibatch's examples in order (the wrapper all-gathers and interleaves the ranks'
        vectors). The step is the single-process step on the whole minibatch."""
        if not self.per_example:
            raise ValueError("share_examples is for per_example=True optimizers")
        if self.steps:
            raise ValueError("share_examples must be called before the first step")
        self._example_rank, self._example_world = int(rank), int(world)

    def _two_point_directions(self, rho: float):
        """Query ``x + rho s_i`` and ``x - rho s_i`` for this process's ``num_directions``
        directions (a sub-generator: ``keys, gammas, f_plus, f_minus = yield from ...``) and return
        every direction's key, gamma = (f+ - f-) / (2 rho) and the two values, all ranks' in rank order."""
        if self.per_example:
            return (yield from self._per_example_directions(rho))
        first = self._direction_rank * self.num_directions
        keys = [self.direction_key(first + i) for i in range(self.num_directions)]
        values = yield [q for key in keys for q in (Query(key, rho), Query(key, -rho))]  # one round
        plus, minus = values[0::2], values[1::2]
        gammas = [(f_plus - f_minus) / (2.0 * rho) for f_plus, f_minus in zip(plus, minus)]
        keys, (gammas, plus, minus) = self._gather_directions(keys, [gammas, plus, minus])
        return keys, gammas, plus, minus

    def _per_example_directions(self, rho: float):
        r"""Per-example two-point queries: example i of the minibatch sits at ``x +- rho s_i`` within
        the same two forward passes, so

        .. math:: \delta_i = \frac{\ell_i(x + \rho s_i) - \ell_i(x - \rho s_i)}{2 \rho}, \qquad
                  g = \frac1B \sum_{i=1}^B \delta_i s_i

        is an unbiased estimate of the minibatch gradient (of the smoothed loss) built from B
        directional derivatives: the per-example analogue of the Flipout estimator (Wen et al.,
        ICLR 2018). Returns the B keys, deltas (the methods' gammas) and per-example values."""
        from ..engine.forward import RowKeys

        rows = RowKeys(self.seed, self.steps, self._example_rank, self._example_world)
        plus = yield Query(rows, rho)
        minus = yield Query(rows, -rho)
        n = self.engine.rows
        if n is not None:  # the examples of every rank (equal shares: the wrapper checks)
            n *= self._example_world
        if len(plus) != len(minus) or (n is not None and len(plus) != n):
            raise ValueError(
                f"per_example=True: the closure returned {len(plus)} and {len(minus)} losses, but the batch the "
                f"layers saw has {n} examples; return one loss per example (reduction='none')"
            )
        keys = [self.direction_key(i) for i in range(len(plus))]  # example i of the whole minibatch
        gammas = [(p - m) / (2.0 * rho) for p, m in zip(plus, minus)]
        return keys, gammas, list(plus), list(minus)

    def _gather_directions(self, keys: list[int], values: list[list[float]]):
        """All directions of this step: ``(keys, values)`` with every rank's, in rank order.

        ``values`` holds parallel lists (one per quantity, one entry per local direction). In a
        single process they come back unchanged. Every rank then applies the same update terms in
        the same order; since the engine's undo of each rank's own offset is exact, the replicas
        stay bit-identical, and equal to one process running all the directions. Without the
        exact-restore journal the undo is arithmetic, so the parameters are first restored.
        """
        if self._direction_world == 1:
            return keys, values
        k = len(keys)
        rows = self._exchange_once([v for column in values for v in column], _OK)
        gathered = [[v for row in rows for v in row[q * k : (q + 1) * k]] for q in range(len(values))]
        if not self.engine.exact:
            self.engine.restore()
        return [self.direction_key(i) for i in range(k * len(rows))], gathered

    def _exchange_once(self, values: list[float], status: float) -> list[list[float]]:
        """The step's one all-gather (direction parallelism), with this rank's status appended.

        Every rank takes part exactly once per step, whatever happens on it: a rank whose loss
        was non-finite, or whose closure raised, sends its status instead of its values (from
        :meth:`StepRun.tell` / :meth:`StepRun.abandon`), so the collectives of different steps
        never pair up across ranks. Seeing another rank's status, every rank skips the step (a
        non-finite loss, :class:`SkippedUpdate`) or abandons it (an exception: ``RuntimeError``),
        so the replicas stay bit-identical and no rank waits for a timeout."""
        self._exchanged = True
        width = 3 * getattr(self, "num_directions", 1)
        row = list(values) if status == _OK else [math.nan] * width
        rows = self._exchange(row + [status])
        statuses = [row[-1] for row in rows]
        failed = [r for r, st in enumerate(statuses) if st == _RAISED]
        if failed and status != _RAISED:
            raise RuntimeError(
                f"rank(s) {failed} raised during step {self.steps} of a direction-parallel run; this rank abandons "
                "the step too (parameters restored), so the replicas stay identical"
            )
        bad = [r for r, row in enumerate(rows) if row[-1] == _NONFINITE or not all(math.isfinite(v) for v in row[:-1])]
        if bad and status == _OK:
            raise SkippedUpdate(math.nan, f"non-finite loss on rank(s) {bad}")
        return [row[:-1] for row in rows]

    def _momentum_terms(self, steps: list[tuple[int, float]]) -> list[tuple[int, float]]:
        """This step's ``(key, coefficient)`` directions, or, with momentum, the window's average
        after they join it (see :class:`zoptim.optim.momentum.SeedMomentum`)."""
        if self.momentum is None:
            return steps
        self.momentum.beta = self.param_groups[0]["momentum"]  # a group entry: a scheduler may drive it
        self.momentum.push(steps)
        return self.momentum.terms()

    def _set_guard(self, tol: float) -> None:
        """Give the method a loss guard of ``tol`` (0: none); for the methods that offer one."""
        from .guard import LossGuard

        self.guard = LossGuard(tol) if check_positive("guard", tol, allow_zero=True) else None

    def _guarded_lrs(self) -> list[float]:
        """Each trainable tensor's lr times the loss guard's scale (the plain lr without a guard)."""
        scale = 1.0 if self.guard is None else self.guard.scale
        return [lr * scale for lr in self.per_param("lr")]

    def _observe(self, loss: float) -> None:
        """Show the loss guard, if any, this step's loss (after the update: it scales the next step)."""
        if self.guard is not None:
            self.guard.tol = self.param_groups[0]["guard"]  # a group entry, like lr
            self.guard.observe(loss)
            self.last_stats["lr_scale"] = self.guard.scale

    #: Hyper-parameters kept in ``param_groups``, checked at the start of every step (wherever they
    #: were set): name -> (zero allowed, one value for every group, exclusive upper bound or None).
    #: A "one value" entry is what a step uses once (eps: every tensor moves to x + eps s at once);
    #: it sits in each group so that schedulers, ``state_dict`` and logs see it, and must agree.
    _group_checks: dict[str, tuple[bool, bool, float | None]] = {"lr": (True, False, None),
                                                                  "weight_decay": (True, False, None),
                                                                  "momentum": (True, True, 1.0),
                                                                  "guard": (False, True, None)}

    def _check_groups(self) -> None:
        """Refuse a non-finite or negative hyper-parameter of ``param_groups`` before any weight is written.

        The constructor checks its arguments, but ``param_groups`` can be edited and schedulers
        write into them, so every step checks again."""
        where = " (checked at every step, wherever it was set: the constructor, param_groups or a scheduler)"
        for name, (zero, shared, upper) in self._group_checks.items():
            for gi, group in enumerate(self.param_groups):
                if group.get(name) is None:  # absent, or chosen by the method's rule
                    continue
                value = group[name]
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    value = float(value)
                try:
                    check_positive(f"param_groups[{gi}]['{name}']", value, allow_zero=zero)
                except ValueError as err:
                    raise ValueError(f"{err}{where}") from None
                if upper is not None and not value < upper:
                    raise ValueError(f"param_groups[{gi}]['{name}'] must be < {upper}; got {value!r}{where}")
                if shared and value != self.param_groups[0][name]:
                    raise ValueError(
                        f"param_groups[{gi}]['{name}'] = {value!r} differs from param_groups[0]['{name}'] = "
                        f"{self.param_groups[0][name]!r}: {type(self).__name__} uses one {name} per step, so every "
                        f"group must hold the same{where}"
                    )

    def _multiplier_bound(self) -> float:
        """The largest element-wise multiplier of a direction (HiZOO's preconditioner; 1 otherwise)."""
        return 1.0

    def _update(self, terms: list[tuple[int, float | list[float]]], decay: list[float] | None = None) -> None:
        """Write the step's update ``x <- x (1 - decay) + sum_i c_i s(key_i)`` (``engine.update``),
        unless it could write a non-finite value.

        A coefficient that is not finite, or whose sum over the terms times the largest entry a
        direction can hold reaches half the largest value of the parameters' dtype, skips the
        update: the driver restores the parameters, counts the step as non-finite and warns, as for
        a non-finite loss (:class:`SkippedUpdate`). The check is on the coefficients, before
        anything is written."""
        bound = self.engine.direction_bound() * self._multiplier_bound()
        limit = self._dtype_limit
        if limit is None:
            limit = self._dtype_limit = min(torch.finfo(p.dtype).max for p in self.engine.params) / 2
        total = 0.0
        for key, scales in terms:
            m = max(abs(c) for c in (scales if isinstance(scales, (list, tuple)) else [scales]))
            if not math.isfinite(m):
                raise SkippedUpdate(m, f"non-finite update coefficient ({m})")
            if m and self._normalize:
                m *= self.engine._factor(key)
            total += m
        if decay is not None and not all(math.isfinite(d) for d in decay):
            raise SkippedUpdate(math.inf, "non-finite weight decay factor")
        if not total * bound < limit:
            raise SkippedUpdate(
                total, f"update of magnitude up to {total * bound:.3g}, beyond what the parameters' dtype holds"
            )
        if self._run is not None:
            self._run.update_started = True  # from here on the update is applied (completed on failure)
        self.engine.update(terms, decay=decay)

    # -- the step -----------------------------------------------------------------------------------
    def _queries(self) -> StepGenerator:
        """One step as a generator (subclasses implement it; it is the method's only step).

        Yield a :class:`Query` for each function evaluation, e.g. ``f_plus = yield Query(key, eps)``;
        the driver moves the parameters there, evaluates the loss and sends it back (a finite
        float). Queries whose points do not depend on one another's values are best yielded as
        one round, ``f_plus, f_minus = yield [Query(key, eps), Query(key, -eps)]``: a driver may
        then evaluate them in any order or at once (:meth:`zoptim.AskTell.ask` with ``n``). After the last query, call ``self._update(...)``, set ``last_stats`` and
        return the step's loss. Do not change optimizer state before the last value is received:
        a step can be abandoned at any yield (non-finite loss, exception, closed AskTell).
        """
        raise NotImplementedError

    def begin_step(self) -> StepRun:
        """Start one step to be driven query by query (what ``step`` and AskTell do).

        A step still in progress on this optimizer is abandoned first (see :meth:`StepRun.abandon`).
        """
        if getattr(self, "_closed", False):
            raise RuntimeError("this optimizer was closed (close()); build a new one to continue")
        self._check_groups()
        if self._run is not None:
            self._run.abandon()
        self._exchanged = False
        self._run = StepRun(self)
        return self._run

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        """One step. ``closure()`` must return the loss and must not call ``backward()``.

        Drives :meth:`_queries` with the closure: for each query the parameters are moved to the
        point and ``closure()`` is called (without autograd). On a non-finite loss the update is
        skipped, the parameters restored bit for bit and the value returned (see
        ``max_nonfinite``); on an exception they are restored and it propagates. Either way the
        step counter advances, so the next step draws a new direction.
        """
        if closure is None or not callable(closure):
            raise TypeError("zeroth-order optimizers need step(closure): a callable returning the loss")
        run = self.begin_step()
        try:
            while not run.done:
                run.move()
                run.tell(closure())
        except KeyboardInterrupt:
            run.abandon(counted=False)  # Ctrl-C: as if the step had not started (a checkpoint then resumes exactly)
            raise
        except BaseException:
            run.abandon()
            raise
        return run.loss

    def _on_nonfinite(self, value: float, stacklevel: int = 4, what: str | None = None) -> None:
        what = what or f"non-finite loss ({value})"
        self.nonfinite_steps += 1
        self._nonfinite_run += 1
        self.last_stats = {"loss": value, "skipped": 1.0}
        if self._nonfinite_run >= self.max_nonfinite:
            raise DivergedError(
                f"{what}: the step was skipped in {self._nonfinite_run} consecutive steps "
                f"(max_nonfinite={self.max_nonfinite}); parameters were restored to their last finite "
                "point each time. Lower the learning rate or eps, or check the data and the closure."
            )
        warnings.warn(
            f"{what} at step {self.steps}: update skipped, parameters restored exactly",
            NonFiniteLossWarning,
            stacklevel=stacklevel,
        )

    # -- state ------------------------------------------------------------------------------------
    #: Attributes set by a subclass's constructor that shape a run (its directions, schedules and
    #: windows): recorded by ``state_dict`` and compared by ``load_state_dict``.
    _settings: tuple[str, ...] = ()

    def _run_settings(self) -> dict:
        """Every constructor setting that shapes the run, as plain values (see :meth:`load_state_dict`)."""
        settings = {
            "distribution": self._distribution,
            "normalize": self._normalize,
            "exact_restore": self._exact,
            "group_shapes": [[list(p.shape) for p in g["params"]] for g in self.param_groups],
        }
        for name in self._settings:
            settings[name] = getattr(self, name)
        return settings

    def _extra_state(self) -> dict:
        return {
            "settings": self._run_settings(),
            "class": type(self).__name__,
            "noise_version": NOISE_VERSION,
            "dim": self.dim,
            "seed": self.seed,
            "steps": self.steps,
            "num_queries": self.num_queries,
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_run": self._nonfinite_run,
            "rank": self._rank,
            "forward": self._module is not None,
            "per_example": self.per_example,
            **({"momentum": self.momentum.state()} if self.momentum is not None else {}),
            **({"guard": self.guard.state()} if self.guard is not None else {}),
        }

    def _load_extra_state(self, extra: dict) -> None:
        self.seed = int(extra["seed"])
        self.steps = int(extra["steps"])
        self.num_queries = int(extra["num_queries"])
        self.nonfinite_steps = int(extra["nonfinite_steps"])
        self._nonfinite_run = int(extra["nonfinite_run"])
        if self.momentum is not None:
            self.momentum.load(extra["momentum"])
        if self.guard is not None:
            self.guard.load(extra["guard"])

    def _check_compatible(self, extra: dict) -> None:
        """Refuse a state_dict from another class, another noise stream or another model."""
        cls = extra.get("class", type(self).__name__)
        if cls != type(self).__name__:
            raise ValueError(f"state_dict was saved by {cls}; it cannot be loaded into {type(self).__name__}")
        version = extra.get("noise_version", 1)
        if version != NOISE_VERSION:
            raise ValueError(
                f"state_dict was saved with noise_version {version}, this zoptim draws noise_version "
                f"{NOISE_VERSION}: its directions would differ, so the run could not resume as it was. "
                "Start a new run, or resume with the zoptim version that saved it."
            )
        dim = extra.get("dim", self.dim)
        if int(dim) != self.dim:
            raise ValueError(
                f"state_dict was saved for {dim} trainable scalars; this optimizer has {self.dim} "
                "(another model, or other parameters frozen)"
            )
        for field, mine_value in (("forward", self._module is not None), ("rank", self._rank),
                                  ("per_example", self.per_example)):
            saved_value = extra.get(field, None if field == "rank" else False)
            if saved_value != mine_value:
                raise ValueError(
                    f"state_dict was saved with {field}={saved_value!r}; this optimizer has {field}={mine_value!r} "
                    "(the directions would differ, so the run could not resume as it was)"
                )
        saved, mine = extra.get("momentum"), self.momentum
        if (saved is None) != (mine is None):
            have = "no momentum" if mine is None else f"momentum={mine.beta}"
            was = "without momentum" if saved is None else f"with momentum={saved['beta']}"
            raise ValueError(f"state_dict was saved {was}; this optimizer has {have}")
        if mine is not None and int(saved["window"]) != mine.window:  # beta comes with the state's groups
            raise ValueError(
                f"state_dict was saved with momentum_window={saved['window']}; this optimizer has "
                f"momentum_window={mine.window}"
            )
        saved_settings, mine_settings = extra.get("settings"), self._run_settings()
        if saved_settings is not None:  # (state_dicts of zoptim before 0.5 do not record them)
            # hyper-parameters held in param_groups come with the state's groups, as lr does in torch
            for field in sorted((set(saved_settings) | set(mine_settings)) - set(self.defaults)):
                was, have = saved_settings.get(field), mine_settings.get(field)
                if was != have:
                    raise ValueError(f"state_dict was saved with {field}={was!r}; this optimizer has {field}={have!r}")
        saved_guard = extra.get("guard")
        if (saved_guard is None) != (self.guard is None):  # its tol comes with the state's groups
            was = "without a guard" if saved_guard is None else f"with guard={saved_guard['tol']}"
            have = "none" if self.guard is None else f"guard={self.guard.tol}"
            raise ValueError(f"state_dict was saved {was}; this optimizer has {have}")

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["zoptim"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict()`` of an optimizer built with the same settings.

        Every recorded setting (the distribution, the directions, eps, schedules and windows, where
        directions are applied, the groups' shapes, ...) is compared first; a difference raises
        ``ValueError`` naming the field and both values. Loading is all or nothing: if anything
        fails part way, the optimizer is put back as it was before the exception propagates."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("zoptim", None)
        if extra is None:
            raise ValueError("state_dict has no 'zoptim' entry: it was not saved by a zoptim optimizer")
        self._check_compatible(extra)
        before = self.state_dict()
        try:
            super().load_state_dict(state_dict)
            saved_settings = extra.get("settings") or {}
            for group in self.param_groups:  # states saved before these moved into param_groups
                for name, default in self.defaults.items():
                    group.setdefault(name, saved_settings.get(name, default))
            self._load_extra_state(extra)
        except BaseException:
            before_extra = before.pop("zoptim")
            super().load_state_dict(before)
            self._load_extra_state(before_extra)
            raise


class GroupValue:
    """A hyper-parameter that lives in ``param_groups`` (one value for the whole step, see
    ``_group_checks``), read and written as an attribute: ``opt.eps`` is ``param_groups[0]["eps"]``
    and ``opt.eps = v`` sets it in every group."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return obj.param_groups[0][self.name]

    def __set__(self, obj, value):
        for group in obj.param_groups:
            group[self.name] = value


class StepRun:
    """One step of an optimizer in progress, driven one query at a time.

    The driver loop is ``while not run.done: run.move(); run.tell(value_at_that_point)``.
    :meth:`ZerothOrderOptimizer.step` feeds it the closure's values, :class:`zoptim.AskTell` the
    values its caller tells. Both therefore produce the same iterates, bit for bit.

    A method's generator may yield a *round*, a list of queries whose points do not depend on one
    another's values (the two points of each of k directions, STP's three points); it is sent
    their values as a list, in the round's order, once all are told. Within a round the values
    may be told in any order (``move(i)``, ``tell(value, i)``, ``i`` counting the step's queries
    from 0), which is what lets :meth:`zoptim.AskTell.ask` hand out several points at once.

    Attributes:
        pending: the next :class:`Query` not yet told, in order (None once the step is done).
        values: the finite losses told so far in this step, in the order told.
        told: ``(index, value)`` of each of them (what a mid-step checkpoint saves).
        loss: the step's loss once done (the non-finite value for a skipped step).
    """

    def __init__(self, optimizer: ZerothOrderOptimizer):
        self.optimizer = optimizer
        self.update_started = False  # set by _update: the step's update is (being) written
        self._queries_at_start = optimizer.num_queries
        self.told: list[tuple[int, Any]] = []
        self.loss: float | None = None
        self._first = 0  # step index of the round's first query
        self._gen: StepGenerator | None = optimizer._queries()
        self._start_round(next(self._gen))

    def _start_round(self, yielded) -> None:
        self._batch = not isinstance(yielded, Query)  # a Query is itself a tuple: test it first
        self._round: list[Query] = list(yielded) if self._batch else [yielded]
        self._round_values: list = [None] * len(self._round)

    @property
    def done(self) -> bool:
        return self._gen is None

    @property
    def values(self) -> list:
        return [value for _, value in self.told]

    @property
    def pending(self) -> Query | None:
        untold = self.untold
        return None if not untold else self._round[untold[0] - self._first]

    @property
    def untold(self) -> list[int]:
        """Step indices of the current round's queries not yet told (empty once the step is done)."""
        if self._gen is None:
            return []
        return [self._first + j for j, v in enumerate(self._round_values) if v is None]

    def _slot(self, index: int | None) -> int:
        untold = self.untold
        if self._gen is None:
            raise RuntimeError("this step is finished; start another with begin_step()")
        if index is None:
            return untold[0] - self._first
        if index not in untold:
            raise ValueError(
                f"query {index} is not pending: the step's queries that can be evaluated now are {untold}"
                + (" (the next ones depend on their values)" if untold else "")
            )
        return index - self._first

    def move(self, index: int | None = None) -> None:
        """Move the parameters (in place) to the pending query point (``index``: that query of the
        current round; default the first not yet told)."""
        key, scales = self._round[self._slot(index)]
        engine = self.optimizer.engine
        with torch.no_grad():
            if key is None:
                engine.restore()
            else:
                engine.move(key, scales)

    def tell(self, loss, index: int | None = None) -> None:
        """The loss at a pending point (``index`` as in :meth:`move`). A value that is not a
        scalar raises TypeError and changes nothing; a NaN/inf one ends the step as skipped
        (update skipped, parameters restored)."""
        slot = self._slot(index)
        opt = self.optimizer
        value = loss_vector(loss) if opt.per_example else loss_value(loss)
        opt.num_queries += 1
        if not all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            value = next(v for v in (value if isinstance(value, list) else [value]) if not math.isfinite(v))
            self._tell_other_ranks(_NONFINITE)
            self._finish()
            self.loss = value
            try:
                opt._on_nonfinite(value)
            finally:
                opt.steps += 1
            return
        self.told.append((self._first + slot, value))
        self._round_values[slot] = value
        if any(v is None for v in self._round_values):
            return
        sent = list(self._round_values) if self._batch else self._round_values[0]
        try:
            with torch.no_grad():
                yielded = self._gen.send(sent)
        except StopIteration as stop:
            self._gen, self.loss = None, float(stop.value)
            opt._nonfinite_run = 0
            opt.steps += 1
            if opt._run is self:
                opt._run = None
        except SkippedUpdate as skipped:
            self._finish()
            means = [sum(v) / len(v) if isinstance(v, list) else v for v in self.values]
            self.loss = sum(means) / len(means)  # the mean loss of the step's queries, all finite
            try:
                opt._on_nonfinite(skipped.value, what=skipped.what)
            finally:
                opt.steps += 1
        except BaseException:
            self.abandon()
            raise
        else:
            self._first += len(self._round)
            self._start_round(yielded)

    def _tell_other_ranks(self, status: float) -> None:
        """In a direction-parallel run, take part in the step's exchange with this rank's failure."""
        opt = self.optimizer
        if opt._exchange is not None and not opt._exchanged:
            opt._exchange_once([], status)

    def _finish(self) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.close()
        self.optimizer.engine.restore()
        if self.optimizer._run is self:
            self.optimizer._run = None

    def abandon(self, counted: bool = True) -> None:
        """End the step without its update: the parameters go back bit for bit to the iterate the
        step started from (with ``exact_restore``), the step counter advances as after an exception
        in the closure, the evaluations stay counted. No-op on a finished step.

        ``counted=False`` (what ``step`` does on a ``KeyboardInterrupt``, in a single process)
        leaves the optimizer as it was before the step, counters included, so the step is redone
        with the same direction and a checkpoint taken now resumes as if there had been no
        interruption. It is ignored once the update has started (the update is then completed
        and counts) and in a direction-parallel run (every rank must count the step alike)."""
        if self._gen is None:
            return
        opt = self.optimizer
        uncounted = not counted and not self.update_started and opt._exchange is None
        try:
            self._tell_other_ranks(_RAISED)
        finally:
            with torch.no_grad():
                self._finish()
            if uncounted:
                opt.num_queries = self._queries_at_start
            else:
                opt.steps += 1
