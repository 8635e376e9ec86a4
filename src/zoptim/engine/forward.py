r"""Forward-applied directions: a query point exists only inside the forward computation.

A zeroth-order query evaluates the loss at ``x + rho * s``. :class:`zoptim.engine.inplace.SeededPerturbation`
writes that point into the weights and undoes it afterwards (three passes over every weight per
step, plus the exact-restore journal). Where the model's layers are known, the point need not be
written at all: a forward hook adds the direction's effect to the layer's output. For a linear
layer ``y = x W^T + b`` at ``W + rho S``, ``b + rho s_b``:

.. math:: y' = x W^T + b + \rho\, x S^T + \rho\, s_b .

With a low-rank matrix direction (``rank=r``)

.. math:: S = \frac{1}{\sqrt r} A B^T, \qquad A \in \mathbb R^{m \times r},\ B \in \mathbb R^{n \times r},

entries of A and B independent with mean 0 and variance 1, the extra term is
``rho/sqrt(r) * (x B) A^T``: two thin matrix products, ``r (m + n)`` random numbers instead of
``m n``. Since :math:`E[\mathrm{vec}(S)\mathrm{vec}(S)^T] = I`, the two-point estimate
``(f(x + rho S) - f(x - rho S)) / (2 rho) * S`` is, like the full-rank one, an unbiased estimate of
the gradient of the Gaussian-smoothed loss in the sense the papers use (S2P paper Sec. 3; the
softmax paper's Definition 2.21). Low-rank perturbations: LOZO (Chen et al., ICLR 2025), EGGROLL
(Sarkar et al., 2025).

Queries never touch these weights, so every restore is exact by construction, with no journal and
no scratch copy; only the update writes them, one rank-r ``addmm_`` per matrix (all of a step's
terms concatenated into one product), at the memory floor.

What is applied where (``ForwardPerturbation.layout()`` lists it per tensor):

* ``torch.nn.Linear``, transformers' ``Conv1D`` (``y = x W + b``), ``torch.nn.Embedding`` (rows of
  A gathered with the ids), ``torch.nn.Conv2d`` (the B factors as r filters, then A mixes the r
  channels; a grouped convolution materialises S, which is small there), and peft's LoRA layers
  through their ``lora_A`` / ``lora_B`` Linear modules. A weight shared by two modules (a tied
  embedding and LM head) has one direction, applied in both.
* Biases of those layers: ``y + rho * s_b``, full rank, in the same hook.
* Leaf modules with small parameters only (LayerNorm, RMSNorm, GroupNorm, ...): recomputed in
  their hook with the perturbed parameters (``torch.func.functional_call``), one small extra pass.
* Every other trainable tensor (a parameter a parent module uses directly, or a module of unknown
  type with large parameters) moves in place through the seeded engine, journaled as before, so
  any model works.
* ``sparse_embeddings=True``: a matrix only ``nn.Embedding`` modules use is updated only in the rows
  each direction's queries looked up (:mod:`zoptim.engine.sparse`).
* ``rank=None`` keeps full-rank directions: a covered matrix's direction is materialised into one
  scratch buffer inside its layer's forward (no journal, one layer of scratch, but as costly as a
  second matmul).

Directions stay named by keys. Tensor j of the direction ``key`` draws from the counter-based
stream ``mix(key, j)`` (:mod:`zoptim.engine.noise`): a full-rank tensor takes its elements 0..n-1 (the
same values the in-place engine writes), a low-rank matrix viewed as ``shape[0] x rest`` takes A
(row-major) from elements ``0 .. m r - 1`` and B from the next ``n r``. Momentum replay, resume and
direction-parallel training therefore work unchanged.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
from torch import nn

from . import polar, sparse, stacked
from .atomic import write_all
from .compact import CompactDraws
from .inplace import SeededPerturbation
from .layers import MAX_RECOMPUTED_ELEMENTS, EmbeddingHandler, handler_for
from .noise import (
    NoiseSource,
    check_distribution,
    max_abs_value,
    mix,
)
from .protocol import RowKeys, normalization_factor, spread_scales
from .shards import LocalPart

#: module -> weakref to the engine whose hooks it carries (a model is driven by one optimizer at a time)
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _in_multihead_attention(module: nn.Module) -> set[int]:
    """ids of submodules of ``nn.MultiheadAttention``: it reads their weights without calling them."""
    inside = set()
    for m in module.modules():
        if isinstance(m, nn.MultiheadAttention):
            inside.update(id(c) for c in m.modules() if c is not m)
    return inside


class ForwardPerturbation:
    """Applies seeded directions inside ``module``'s forward; only updates write the weights.

    Implements :class:`zoptim.engine.protocol.Engine`, as :class:`zoptim.engine.inplace.SeededPerturbation`
    does, so every optimizer's step generator runs on either. Which layer kinds are covered, and
    how, is :mod:`zoptim.engine.layers`.

    Args:
        module: the model whose forward the closure calls.
        params: the trainable tensors, in the optimizer's order (tensor j draws ``mix(key, j)``).
        distribution: of the direction's entries (and of the factors A, B).
        rank: r of the low-rank matrix directions, or None for full-rank ones.
        normalize: scale each direction to norm sqrt(d) (S2P paper, Sec. 3.2).
        exact: journal the in-place moves of uncovered tensors (covered ones need none).
        per_example: allow per-example queries (:class:`RowKeys`); then every trainable tensor
            must be covered by a hook, matrices must be low rank, and no module may mix the examples
            of a batch (BatchNorm in training mode): each is a ValueError naming the module.
        parts: what this process holds of each tensor (:func:`zoptim.engine.shards.local_part`), when
            ``params`` are FSDP2-sharded DTensors. The hooks then apply the *global* direction to
            the gathered weights FSDP2 puts on each module during its forward, and the update
            writes only this rank's rows: row block ``[first, first + rows)`` of a matrix takes
            ``A[first:first + rows] B^T``, a small tensor its range of elements (``zoptim.engine.shards``'
            contiguity argument). Queries write no shard at all.
        sparse_embeddings: embeddings updated in their looked-up rows only (:attr:`sparse_rows`).
    """

    def __init__(
        self,
        module: nn.Module,
        params: Sequence[torch.Tensor],
        *,
        distribution: str = "normal",
        rank: int | None = 1,
        normalize: bool = False,
        exact: bool = True,
        per_example: bool = False,
        orthogonal: bool = False,
        sparse_embeddings: bool = False,
        parts: Sequence[LocalPart] | None = None,
    ):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module (the model the closure runs); got {type(module).__name__}")
        owner = _OWNERS.get(module)
        if owner is not None and owner() is not None and not owner().closed:
            raise ValueError(
                f"module {type(module).__name__} already applies the directions of another zoptim optimizer; "
                "one model cannot be driven by two at once (call close() on the other optimizer, or delete it)"
            )
        self.module = module
        self.params = list(params)
        self.parts = [LocalPart(p, 0, p.numel()) for p in self.params] if parts is None else list(parts)
        if len(self.parts) != len(self.params):
            raise ValueError(f"parts must have one entry per tensor ({len(self.params)}); got {len(self.parts)}")
        self.sharded = any(part.tensor.numel() != part.global_numel for part in self.parts)
        self.distribution = check_distribution(distribution)
        self.noise = NoiseSource(distribution)
        self.rank = rank
        self.normalize = bool(normalize)
        self.exact = bool(exact)
        self.dim = sum(p.numel() for p in self.params)
        self.closed = False
        self._key: int | None = None
        self._scales: list[float] | None = None
        self._recomputing = False
        self._prep: dict[int, object] = {}
        self._unit_key, self._unit_prep = None, {}  # _prepared_for_key's direction and its builds
        self._scratch: dict[tuple, torch.Tensor] = {}  # _scratch_rows' buffers
        self._cache: dict[int, dict[int, object]] = {}
        # Directions kept: a step's own (its two queries and the update share it); an update of more
        # terms (k directions, the seed momentum's window) grows it to hold them all.
        self._cache_keys = 2
        self._norm_cache: tuple[int, float] | None = None
        self._handles: list = []
        index = {id(p): j for j, p in enumerate(self.params)}
        self.kind: dict[int, str] = {}  # j -> "lowrank" | "full" (hooked) ; absent: in place
        hooked = self._register_hooks(index)
        in_place = [j for j in range(len(self.params)) if j not in hooked]
        self._in_place_index = in_place
        self.in_place = SeededPerturbation(
            [self.parts[j].tensor for j in in_place], distribution=distribution, exact=exact, indices=in_place,
            offsets=[self.parts[j].offset for j in in_place],
        ) if in_place else None
        # full-rank matrices under rank=None: updated by the fused kernels (a final move has no journal)
        big_full = [j for j, k in self.kind.items() if k == "full" and self.params[j].numel() > MAX_RECOMPUTED_ELEMENTS]
        self._big_full = big_full
        self.writer = SeededPerturbation(
            [self.parts[j].tensor for j in big_full], distribution=distribution, exact=False, indices=big_full,
            offsets=[self.parts[j].offset for j in big_full],
        ) if big_full else None
        self._small = [j for j, k in self.kind.items() if k == "full" and j not in set(big_full)]
        self._lowrank = [j for j, k in self.kind.items() if k == "lowrank"]
        #: The low-rank matrices updated only in the rows their queries looked up (``sparse_embeddings``):
        #: those that only ``nn.Embedding`` modules use (a weight tied to an output layer uses every row).
        self.sparse_rows = frozenset(j for j in self._lowrank if sparse_embeddings
                                     and self._handlers[j] == {EmbeddingHandler}) if not self.sharded else frozenset()
        self._seen: dict[int, dict[int, list[torch.Tensor]]] = {}  # j -> direction key -> ids it looked up
        self._draws = CompactDraws(self.params, self._lowrank, self._small, rank, distribution, self.noise)
        self.per_example = bool(per_example)
        self.rows: int | None = None  # the batch size the hooks saw at the current per-example query
        self._group = 1  # rows per example at the current per-example query (the module's rows_per_example)
        self._rows_cache: tuple | None = None
        if self.per_example:
            self._check_per_example()
        if orthogonal:
            polar.check_coverage(self)
        _OWNERS[module] = weakref.ref(self)

    # -- which tensor is applied where ------------------------------------------------------------------
    def _register_hooks(self, index: dict[int, int]) -> set[int]:
        """One hook per module a handler of :data:`zoptim.engine.layers.HANDLERS` covers; returns the
        indices of the tensors the hooks apply."""
        skip = _in_multihead_attention(self.module)
        hooked: set[int] = set()
        uses: dict[int, list[str]] = {}
        self._handlers: dict[int, set[type]] = {}
        for name, m in self.module.named_modules():
            if id(m) in skip:
                continue
            handler = handler_for(m)
            tensors = [] if handler is None else handler.claim(m, index, self.params)
            if not tensors:
                continue
            for _, j, is_matrix in tensors:
                matrix = is_matrix and self.params[j].dim() >= 2 and self.rank is not None
                self.kind[j] = "lowrank" if matrix else "full"
                hooked.add(j)
                uses.setdefault(j, []).append(name)
                self._handlers.setdefault(j, set()).add(handler)
            self._handles.append(m.register_forward_hook(handler(self, tensors), with_kwargs=True))
        self.uses = uses
        return hooked

    def layout(self) -> dict[int, str]:
        """How each trainable tensor's direction is applied: ``"lowrank"``, ``"full"`` (in a hook) or
        ``"in place"``."""
        return {j: self.kind.get(j, "in place") for j in range(len(self.params))}

    # -- the direction's compact values ---------------------------------------------------------------------
    def _matrix_shape(self, j: int) -> tuple[int, int]:
        return self._draws.matrix_shape(j)

    def _values(self, key: int, cache: bool = True) -> dict[int, object]:
        """The compact direction ``key``: ``{j: (A, B)}`` for low-rank matrices, ``{j: z}`` for small
        tensors, float32 on each tensor's device (cached for the last few keys)."""
        got = self._cache.get(key)
        if got is None and self._rows_cache is not None:
            got = self._from_rows(key)
        if got is not None:
            return got
        out = self._draws.draw(key)
        if cache:
            if len(self._cache) >= self._cache_keys:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = out
        return out

    @property
    def draws_ahead(self) -> int:
        return self._draws.draws_ahead

    def prefetch(self, keys: np.ndarray) -> None:
        """Draw the coming steps' compact directions at once (:meth:`CompactDraws.prefetch`)."""
        self._draws.prefetch(keys)

    def _full(self, j: int, key: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The full-rank direction of tensor j (float32, materialised; rank=None matrices)."""
        p = self.params[j]
        buf = out if out is not None else torch.empty(p.shape, dtype=torch.float32, device=p.device)
        return self.noise.fill(buf, mix(key, j))

    def direction(self, key: int) -> list[torch.Tensor]:
        """The direction ``key`` materialised, one float32 tensor per trainable tensor (for tests
        and analysis: S = A B^T / sqrt(r) for low-rank matrices; before normalisation)."""
        values = self._values(key)
        out = []
        for j, p in enumerate(self.params):
            kind = self.kind.get(j)
            if kind == "lowrank":
                A, B = values[j]
                out.append((A @ B.T).div_(math.sqrt(self.rank)).view(p.shape))
            elif j in values:
                out.append(values[j].clone())
            else:
                out.append(self._full(j, key))
        return out

    def direction_norm(self, key: int) -> float:
        """||s(key)||_2 over all tensors, without materialising a low-rank matrix:
        ||A B^T||_F^2 = sum((A^T A) * (B^T B))."""
        if self._norm_cache is not None and self._norm_cache[0] == key:
            return self._norm_cache[1]
        total = 0.0
        values = self._values(key)
        for j in self._lowrank:
            A, B = values[j]
            total += float(((A.T @ A) * (B.T @ B)).sum()) / self.rank
        for j in self._small:
            total += float(values[j].square().sum())
        for j in self._big_full:
            total += float(self._full(j, key).square().sum())
        if self.in_place is not None:
            total += self.in_place.direction_norm(key) ** 2
        norm = math.sqrt(total)
        self._norm_cache = (key, norm)
        return norm

    def direction_scale(self, key: int) -> float:
        """sqrt(d) / ||s(key)|| with ``normalize``, else 1: the factor every query and update applies."""
        return normalization_factor(self, key)

    # -- per-example queries -----------------------------------------------------------------------------------
    def _check_per_example(self) -> None:
        names = {j: ", ".join(u) for j, u in self.uses.items()}
        if self.in_place is not None:
            raise ValueError(
                "per_example=True needs every trainable tensor applied in a hook; these move in place (no hook "
                f"covers their module): {[j for j in self._in_place_index]} (tensor indices of the optimizer's parameters)"
            )
        for m in self.module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                raise ValueError(
                    f"per_example=True: {type(m).__name__} in training mode normalises over the batch, so one "
                    "example's loss depends on the others' directions; call model.eval() (or freeze the statistics)"
                )
        self._names = names

    def _row_count(self, n: int, module) -> int:
        """Record the batch size a hook sees; every hooked layer must see the same (the examples on dim 0).
        With one row the query is the plain one along key(0): the same arithmetic as a shared direction."""
        if self.rows is None:
            self.rows = n
            if n % self._group:
                raise ValueError(
                    f"per_example=True: {type(module).__name__} got {n} rows, not a multiple of the model's "
                    f"rows_per_example = {self._group}"
                )
            if n == self._group:  # one example: the plain query along its direction
                self._key = self._key.key(0)
        elif n != self.rows:
            raise ValueError(
                f"per_example=True: {type(module).__name__} got an input with {n} rows on dim 0 where another layer "
                f"got {self.rows}; every hooked layer must see the minibatch's examples on dim 0"
            )
        return n

    def _row_values(self) -> dict[int, object]:
        """The current per-example query's directions, stacked: ``{j: (A, B)}`` with A (n, m, r) and
        B (n, cols, r), ``{j: z}`` with z (n, *shape); generated once per (step, n)."""
        key, n, group = self._key, self.rows, self._group
        if self._rows_cache is not None and self._rows_cache[0] == (key, n, group):
            return self._rows_cache[1]
        stacked = self._draws.draw_stacked([key.key(i) for i in range(n // group)])
        per_row = stacked
        if group > 1:  # each example's direction on its rows_per_example consecutive rows
            per_row = {j: tuple(t.repeat_interleave(group, 0) for t in v) if isinstance(v, tuple)
                       else v.repeat_interleave(group, 0) for j, v in stacked.items()}
        self._rows_cache = ((key, n, group), per_row, {key.key(i): i for i in range(n // group)}, stacked)
        return per_row

    def _from_rows(self, key: int):
        """Direction ``key`` sliced out of the per-example stack, if it is one of its rows (the update)."""
        if self._rows_cache is None:
            return None
        i = self._rows_cache[2].get(key)
        if i is None:
            return None
        return {j: (v[0][i], v[1][i]) if isinstance(v, tuple) else v[i] for j, v in self._rows_cache[3].items()}

    # -- what the layer handlers (zoptim.engine.layers) read at a query --------------------------------------
    def _active(self, j: int | None):
        """The scale of tensor j at the current query, or None where nothing is applied."""
        if j is None or self._key is None or self._recomputing:
            return None
        scale = self._scales[j]
        if scale == 0.0:
            return None
        return scale

    def _prepared(self, module, build):
        """What a hook needs at the current query, built once per query and module (the factors
        scaled and cast, the bias folded in) so that the hook itself is one or two kernels."""
        got = self._prep.get(id(module))
        if got is None:
            got = self._prep[id(module)] = build()
        return got

    def _prepared_for_key(self, module, dtype, build):
        """What a hook needs for the current direction at any scale (its factors at scale 1), built
        once per direction, module and dtype: the step's two queries and their hooks share it."""
        if self._unit_key != self._key:
            self._unit_key, self._unit_prep = self._key, {}
        got = self._unit_prep.get((id(module), dtype))
        if got is None:
            got = self._unit_prep[(id(module), dtype)] = build()
        return got

    def _scratch_rows(self, rows: int, n: int, filled: int, dtype, device) -> torch.Tensor:
        """A reused (rows x n) scratch whose rows from ``filled`` on hold ones (a hook writes the
        first ``filled``; the ones carry a bias through the same GEMM). Valid until the next call."""
        key = (rows, n, filled, dtype, device)
        buf = self._scratch.get(key)
        if buf is None:
            if len(self._scratch) >= 8:  # shapes come and go (sequence lengths): keep the last few
                self._scratch.clear()
            buf = self._scratch[key] = torch.ones((rows, n), dtype=dtype, device=device)
        return buf

    def _row_scaled(self, j: int, dtype):
        """Tensor j's stacked per-row direction times its scale: (A * s / sqrt(r), B) or z * s."""
        v = self._row_values()[j]
        s = self._scales[j]
        if isinstance(v, tuple):
            return (v[0] * (s / math.sqrt(self.rank))).to(dtype), v[1].to(dtype)
        return (v * s).to(dtype)

    # -- the engine interface (zoptim.engine.protocol.Engine) ---------------------------------------------------
    #: HiZOO's element-wise weights need the direction written element by element: not offered here.
    element_wise = False

    def query_rows(self) -> int | None:
        """The examples the hooked layers saw at the current per-example query (None before its forward):
        their rows over the model's ``rows_per_example``."""
        return None if self.rows is None else self.rows // self._group

    @property
    def is_perturbed(self) -> bool:
        return self._key is not None or (self.in_place is not None and self.in_place.is_perturbed)

    @property
    def weights(self):
        return None

    @weights.setter
    def weights(self, fn) -> None:
        if fn is not None:
            raise ValueError(
                "element-wise direction weights (HiZOO's preconditioner) need every element of the direction "
                "written into the weights; forward-applied directions (module=...) do not support them"
            )

    def direction_bound(self) -> float:
        """The largest |s_i| of a direction before its normalisation: an entry of ``A B^T / sqrt(r)``
        is at most ``sqrt(r) * m^2`` for factors bounded by m."""
        m = max_abs_value(self.distribution)
        return m if self.rank is None else m * max(1.0, math.sqrt(self.rank) * m)

    def journal_elements(self) -> int:
        return 0 if self.in_place is None else self.in_place.journal_elements()

    def journal_bytes(self) -> int:
        return 0 if self.in_place is None else self.in_place.journal_bytes()

    def _as_scales(self, scales) -> list[float]:
        return spread_scales(scales, len(self.params))

    def _sub(self, values: list[float], js: list[int]) -> list[float]:
        return [values[j] for j in js]

    def move(self, key: int | None, scales=0.0, *, decay=None, temporary: bool = True) -> None:
        """Go to the query point ``x + scales * s(key)`` (``temporary``: only the hooks and the
        uncovered tensors see it) or, with ``temporary=False``, make it the new iterate."""
        if not temporary:
            self.update([] if key is None else [(key, scales)], decay=decay)
            return
        new = self._as_scales(scales) if key is not None else [0.0] * len(self.params)
        if isinstance(key, RowKeys):
            if not self.per_example:
                raise ValueError("per-example queries need an engine built with per_example=True")
            self.rows = None
            # a model that lays each example out over several rows (an encoder scoring it against its own
            # copy of the label sentences) says how many; every other model has one row per example
            self._group = int(getattr(self.module, "rows_per_example", 1))
        elif key is not None:
            f = self.direction_scale(key)
            new = [s * f for s in new]
        if self.in_place is not None:
            self.in_place.move(key, self._sub(new, self._in_place_index), decay=None, temporary=True)
        if key is not None and any(s != 0.0 for s in new):
            self._key, self._scales = key, new
            self._prep = {}
        else:
            self._key, self._scales = None, None

    def restore(self) -> None:
        self._key, self._scales = None, None
        if self.in_place is not None:
            self.in_place.restore()

    def update(self, terms, decay=None, orthogonal: list[float] | None = None) -> None:
        """``x <- x (1 - decay) + sum_i scales_i s(key_i)``: the only write to covered weights.

        Low-rank matrices take one ``addmm_`` over all terms, ``W += [c_1 A_1 .. c_k A_k]
        [B_1 .. B_k]^T / sqrt(r)``; small tensors one foreach pass per term; uncovered tensors
        their fused in-place move (which also undoes their query offset).

        Atomic: everything the update writes is prepared first, then written as a list of
        operations with signal handlers deferred (:func:`zoptim.engine.atomic.deferred_signals`); an
        operation that raises is retried and the rest completed before the exception propagates,
        so a failure never leaves some tensors updated and others not.

        ``orthogonal`` (one step size per tensor): the orthogonalised update instead
        (:func:`zoptim.engine.polar.orthogonal_update`)."""
        if torch.is_grad_enabled():  # the weights are written outside autograd
            with torch.no_grad():
                return self._update(terms, decay, orthogonal)
        return self._update(terms, decay, orthogonal)

    def _update(self, terms, decay, orthogonal) -> None:
        self._key, self._scales = None, None
        try:
            self._write_update(terms, decay, orthogonal)
        finally:
            self._seen.clear()  # the step's looked-up rows: used by this update only

    def _write_update(self, terms, decay, orthogonal) -> None:
        if orthogonal is not None:
            write_all(polar.orthogonal_update(self, terms, orthogonal, decay), completes_itself=0)
            return
        self._cache_keys = max(self._cache_keys, len(terms) + 1)
        terms = [(key, self._as_scales(scales)) for key, scales in terms]
        terms = [(key, [s * self.direction_scale(key) for s in scales]) for key, scales in terms]
        n = len(self.params)
        decay = [0.0] * n if decay is None else [float(d) for d in decay]
        ops: list[Callable[[], object]] = []  # each one write; the engines' updates complete themselves
        if self.in_place is not None:
            sub = self._in_place_index
            ops.append(partial(self.in_place.update, [(key, self._sub(s, sub)) for key, s in terms],
                               decay=self._sub(decay, sub) if any(decay) else None))
        if self.writer is not None:
            sub = self._big_full
            ops.append(partial(self.writer.update, [(key, self._sub(s, sub)) for key, s in terms],
                               decay=self._sub(decay, sub) if any(decay) else None))
        found = stacked.examples_of(self, terms)
        if found is not None:  # a per-example step: the examples' stacked directions, one expression a tensor
            ops.extend(stacked.update_ops(self, *found, terms, decay))
            return write_all(ops, completes_itself=int(self.in_place is not None) + int(self.writer is not None))
        values = [self._values(key) for key, _ in terms]
        for j in self._lowrank:
            if j in self.sparse_rows:
                ops.extend(sparse.update(self, j, [(key, v[j], s[j]) for v, (key, s) in zip(values, terms)], decay[j]))
            else:
                ops.extend(self._lowrank_update(j, [(v[j], s[j]) for v, (_, s) in zip(values, terms)], decay[j]))
        small = self._small
        if small:
            tensors = [self.parts[j].tensor for j in small]
            keep = [float(np.float32(1.0 - decay[j])) for j in small]
            if any(k != 1.0 for k in keep):
                ops.append(partial(torch._foreach_mul_, tensors, keep))
            for v, (_, s) in zip(values, terms):
                live = [i for i, j in enumerate(small) if s[j] != 0.0]
                if not live:
                    continue
                deltas = torch._foreach_mul([self._local_values(small[i], v[small[i]]) for i in live],
                                            [float(np.float32(s[small[i]])) for i in live])
                ops.append(partial(torch._foreach_add_, [tensors[i] for i in live], deltas))
        write_all(ops, completes_itself=int(self.in_place is not None) + int(self.writer is not None))

    def _lowrank_update(self, j: int, terms: list[tuple[tuple[torch.Tensor, torch.Tensor], float]],
                        decay: float) -> list[Callable[[], object]]:
        """The writes of low-rank matrix j's update, prepared (nothing written yet):
        ``W <- W (1 - decay) + [c_1 A_1 .. c_k A_k] [B_1 .. B_k]^T / sqrt(r)``, one ``addmm_`` over
        the terms ``((A_i, B_i), c_i)`` (this process's rows of W when it is sharded)."""
        p, first, rows = self._local_rows(j)
        ops: list[Callable[[], object]] = []
        if decay:
            ops.append(partial(p.mul_, float(np.float32(1.0 - decay))))
        live = [(factors, c) for factors, c in terms if c != 0.0]
        if not live or rows == 0:
            return ops
        if len(live) == 1:  # one direction: no concatenation, the scale rides on alpha
            (left, right), c = live[0]
            left = left[first : first + rows]
            alpha = float(np.float32(c)) / math.sqrt(self.rank)
        else:
            left = torch.cat([A[first : first + rows] * float(np.float32(c)) for (A, _), c in live], dim=1)
            right = torch.cat([B for (_, B), _ in live], dim=1)
            alpha = 1.0 / math.sqrt(self.rank)
        if left.dtype != p.dtype:
            left, right = left.to(p.dtype), right.to(p.dtype)
        ops.append(partial(p.view(rows, -1).addmm_, left, right.T, alpha=alpha))
        return ops

    def _local_rows(self, j: int) -> tuple[torch.Tensor, int, int]:
        """Matrix j's rows this process holds: (its local tensor, the first row's global index, the
        row count); the whole matrix when it is not sharded."""
        part = self.parts[j]
        _, cols = self._matrix_shape(j)
        return part.tensor, part.offset // cols, part.tensor.numel() // cols

    def _local_values(self, j: int, z: torch.Tensor) -> torch.Tensor:
        """This process's elements of small tensor j's direction values ``z`` (shaped like its part)."""
        part = self.parts[j]
        if part.tensor.numel() == z.numel():
            return z
        return z.reshape(-1)[part.offset : part.offset + part.tensor.numel()].view(part.tensor.shape)

    # -- life cycle -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the hooks from the module (the optimizer's ``close()`` and its finalizer call this)."""
        if self.closed:
            return
        self.restore()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.closed = True
        owner = _OWNERS.get(self.module)
        if owner is not None and owner() is self:
            del _OWNERS[self.module]
