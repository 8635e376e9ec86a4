"""What every zeroth-order optimizer shares: its parameters and engine, hyper-parameter checks,
the checked update, and the step.

Subclasses implement :meth:`ZerothOrderOptimizer._queries`, one step written as a generator of
query points (:mod:`zoptim.optim.step`, which drives it), ending with one ``self._update(...)``
(the engine's update, checked). The rest of what every method shares is split by concept:

* :mod:`zoptim.optim.step`: the step driver (:class:`~zoptim.optim.step.Query`,
  :class:`~zoptim.optim.step.StepRun`), the loss checks and the non-finite handling's errors;
* :mod:`zoptim.optim.exchange`: directions and examples shared out over processes;
* :mod:`zoptim.optim.state`: what ``state_dict`` records and ``load_state_dict`` checks;
* :mod:`zoptim.optim.options`: the one check of the options that choose how directions are applied;
* :mod:`zoptim.engine`: the engine that moves the parameters (:func:`zoptim.engine.build_engine`).
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Iterable

import numpy as np
import torch
from torch.optim import Optimizer

from ..engine import build_engine
from ..engine.noise import check_distribution, mix, mix_array
from ..engine.shards import local_part
from .checks import check_int, check_positive
from .exchange import DirectionExchange
from .options import Options, check_options
from .state import CompatibleState
from .step import Closure, DivergedError, NonFiniteLossWarning, SkippedUpdate, StepGenerator, StepRun

__all__ = ["DivergedError", "GroupValue", "NonFiniteLossWarning", "ZerothOrderOptimizer"]


class ZerothOrderOptimizer(DirectionExchange, CompatibleState, Optimizer):
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
        orthogonalize: (ZOSGD; needs ``module`` and ``rank``) each weight matrix steps along the
            polar factor of its estimate, every other tensor along its normalised estimate, with
            root-mean-square step ``lr`` (:mod:`zoptim.engine.polar`).
        sparse_embeddings: (ZOSGD, AS2P; needs ``module`` and ``rank``) each embedding matrix (used by
            ``nn.Embedding`` modules only) is updated only in the rows the step's queries looked up,
            each direction in its own examples' rows: the loss does not depend on the other rows, so
            the estimate stays unbiased and loses their noise (:mod:`zoptim.engine.sparse`). Not with
            momentum or in distributed runs.

    Attributes:
        num_queries: closure evaluations so far (the x-axis of every plot in the S2P paper).
        last_stats: a dict describing the last step (loss, gamma, step size, rho, lr, ...).
    """

    queries_per_step = 2
    #: The step being driven query by query (AskTell between ask and tell), if any.
    _run: StepRun | None = None
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
        orthogonalize: bool = False,
        sparse_embeddings: bool = False,
    ):
        check_distribution(distribution)
        self.per_example = bool(per_example)
        self.orthogonalize = bool(orthogonalize)
        self.sparse_embeddings = bool(sparse_embeddings)
        if module is not None and not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module (the model the closure runs) or None; got {type(module).__name__}")
        self._rank = check_int("rank", rank, allow_none=True)
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
        self._ahead = (0, 0)  # the steps whose directions the engine has drawn ahead (_draw_ahead)
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
        check_options(self._options())
        self._group_of = group_of
        self._global_dim = sum(part.global_numel for part in trainable)
        old = getattr(self, "engine", None)
        if old is not None:
            old.close()
        self.engine = build_engine(
            trainable,
            module=self._module,
            tensors=[p for _, _, p in where],  # the module's own tensors (DTensors when sharded): its hooks find them
            distribution=self._distribution,
            rank=self._rank,
            normalize=self._normalize,
            exact=self._exact,
            per_example=self.per_example,
            orthogonal=self.orthogonalize,
            sparse_embeddings=self.sparse_embeddings,
        )
        # what the engine holds on the model (hooks) goes when the optimizer does; it never holds the optimizer
        self._close_engine = weakref.finalize(self, self.engine.close)

    #: Whether the method needs the direction's every element (HiZOO's preconditioner): it then
    #: refuses forward-applied directions.
    element_wise_directions = False

    def _options(self, **extra) -> Options:
        """How this optimizer applies its directions, for :func:`~zoptim.optim.options.check_options`."""
        return Options(type(self).__name__, module=self._module is not None, rank=self._rank,
                       per_example=self.per_example, orthogonalize=self.orthogonalize, shard=self.sharded,
                       normalize=self._normalize, sparse_embeddings=self.sparse_embeddings,
                       momentum=bool(getattr(self, "_momentum_requested", False)),
                       factored=getattr(self, "factored", False), element_wise=self.element_wise_directions, **extra)

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

    #: directions a step draws, ``direction_key(0 .. n - 1)`` (times the direction-parallel
    #: processes); a method with ``num_directions`` draws that many
    num_directions = 1

    def _drawn_ahead(self, step: int) -> bool:
        return self._ahead[0] <= step < self._ahead[1]

    def _draw_ahead(self) -> None:
        """Have the engine draw the directions of the next steps at once (``engine.draws_ahead``
        keys: the vector engine, and the forward engine on a small CPU model, whose draws cost
        their calls, not their arithmetic). Only a hint: a direction that was not drawn ahead (a
        seed or step changed by ``load_state_dict``) is drawn when it is used, with the same values."""
        n = self.num_directions * self._directions_world_size
        steps = self.engine.draws_ahead // n
        if self.per_example or steps < 2:
            return
        self.engine.prefetch(mix_array(self.seed, np.arange(self.steps, self.steps + steps)[:, None], np.arange(n)))
        self._ahead = (self.steps, self.steps + steps)


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
        # the values last found valid, when all are plain numbers: unchanged, there is nothing to check
        seen = tuple(group.get(name) for group in self.param_groups for name in self._group_checks)
        if seen == getattr(self, "_groups_checked", None):
            return
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
        plain = all(v is None or type(v) in (float, int) for v in seen)
        self._groups_checked = seen if plain else None

    def _multiplier_bound(self) -> float:
        """The largest element-wise multiplier of a direction (HiZOO's preconditioner; 1 otherwise)."""
        return 1.0

    def _update(self, terms: list[tuple[int, float | list[float]]], decay: list[float] | None = None,
                orthogonal: list[float] | None = None) -> None:
        """Write the step's update ``x <- x (1 - decay) + sum_i c_i s(key_i)`` (``engine.update``),
        unless it could write a non-finite value.

        A coefficient that is not finite, or whose sum over the terms times the largest entry a
        direction can hold reaches half the largest value of the parameters' dtype, skips the
        update: the driver restores the parameters, counts the step as non-finite and warns, as for
        a non-finite loss (:class:`SkippedUpdate`). The check is on the coefficients, before
        anything is written.

        ``orthogonal``: each tensor's step size for the orthogonalised update (``orthogonalize=True``;
        the terms then give the estimate, see :func:`zoptim.engine.polar.orthogonal_update`); an
        entry of that update is at most ``lr sqrt(numel)`` in magnitude."""
        if orthogonal is not None:
            limit = min(torch.finfo(p.dtype).max for p in self.engine.params) / 2
            largest = max(abs(v) for v in orthogonal) * math.sqrt(max(p.numel() for p in self.engine.params))
            coefficients = [c for _, scales in terms for c in (scales if isinstance(scales, (list, tuple)) else [scales])]
            if not all(math.isfinite(c) for c in coefficients) or not largest < limit:
                raise SkippedUpdate(math.nan, "non-finite or too large orthogonalised update")
            if self._run is not None:
                self._run.update_started = True
            self.engine.update(terms, decay=decay, orthogonal=orthogonal)
            return
        bound = self.engine.direction_bound() * self._multiplier_bound()
        limit = self._dtype_limit
        if limit is None:
            limit = self._dtype_limit = min(torch.finfo(p.dtype).max for p in self.engine.params) / 2
        total = 0.0
        for key, scales in terms:
            m = max(abs(c) for c in scales) if isinstance(scales, (list, tuple)) else abs(scales)
            if not math.isfinite(m):
                raise SkippedUpdate(m, f"non-finite update coefficient ({m})")
            if m and self._normalize:
                m *= self.engine.direction_scale(key)
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
        if self.engine.draws_ahead and not self._drawn_ahead(self.steps):
            self._draw_ahead()
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

