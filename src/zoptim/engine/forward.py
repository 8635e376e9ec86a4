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
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .atomic import RecoveryError, deferred_signals, recover
from .noise import (
    NoiseSource,
    check_distribution,
    counter_bits,
    max_abs_value,
    mix,
    normal_table,
    values_from_bits,
    values_from_bits_numpy,
)
from .inplace import SeededPerturbation, normalization_factor, spread_scales
from .shards import LocalPart

#: Leaf modules whose trainable parameters total at most this many elements are recomputed in
#: their hook with perturbed parameters (normalisation layers); larger unknown ones move in place.
MAX_RECOMPUTED_ELEMENTS = 1 << 16

#: module -> weakref to the engine whose hooks it carries (a model is driven by one optimizer at a time)
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _conv1d_type():
    try:  # transformers' GPT-2 style layer (y = x W + b, W of shape in x out); optional dependency
        from transformers.pytorch_utils import Conv1D
    except Exception:  # noqa: BLE001 - transformers absent or broken: no such layers to cover
        return None
    return Conv1D


def _in_multihead_attention(module: nn.Module) -> set[int]:
    """ids of submodules of ``nn.MultiheadAttention``: it reads their weights without calling them."""
    inside = set()
    for m in module.modules():
        if isinstance(m, nn.MultiheadAttention):
            inside.update(id(c) for c in m.modules() if c is not m)
    return inside


class RowKeys(NamedTuple):
    """The directions of a per-example query: row i of the minibatch (dim 0 of every hooked layer's
    input) sits at ``x + rho * s(key(i))``, ``key(i) = mix(seed, step, first + stride * i)``: the
    key of direction ``first + stride * i`` of the step, as :meth:`ZerothOrderOptimizer.direction_key`
    names it. In one process ``first = 0, stride = 1``; with ``wrap(mode="batch")`` rank r of w holds
    examples r, r + w, r + 2w, ... of the minibatch (``first = r, stride = w``)."""

    seed: int
    step: int
    first: int = 0
    stride: int = 1

    def key(self, i: int) -> int:
        return mix(self.seed, self.step, self.first + self.stride * i)


def _norm_forward(module: nn.Module, x: torch.Tensor, perturbed: dict):
    """torch's normalisation layers at perturbed affine parameters, by their functional form (the
    same computation as the module's forward), or None for any other module."""
    w, b = perturbed.get("weight", getattr(module, "weight", None)), perturbed.get("bias", getattr(module, "bias", None))
    kind = type(module)
    if kind is nn.LayerNorm:
        return F.layer_norm(x, module.normalized_shape, w, b, module.eps)
    if kind is nn.GroupNorm:
        return F.group_norm(x, module.num_groups, w, b, module.eps)
    if kind is nn.RMSNorm:
        return F.rms_norm(x, module.normalized_shape, w, module.eps)
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and not module.training and module.track_running_stats:
        return F.batch_norm(x, module.running_mean, module.running_var, w, b, False, 0.0, module.eps)
    return None


def _write_all(ops: list[Callable[[], object]], completes_itself: int) -> None:
    """Run the write operations ``ops`` in order, as one atomic update.

    Signal handlers are deferred meanwhile, so a Ctrl-C lands after the last write. The first
    ``completes_itself`` operations are engine updates that finish their own writes before an
    exception leaves them; any other operation is one tensor write, which raises before writing.
    After a failure the remaining operations are run (with retries, :func:`zoptim.engine.atomic.recover`)
    and the exception re-raised."""
    done = 0
    with deferred_signals():
        try:
            for op in ops:
                op()
                done += 1
        except RecoveryError:
            raise  # an engine could not complete its own update: nothing more can be done here
        except BaseException as err:
            # an engine completes its update before an exception leaves it; a tensor write raises before writing
            state = {"next": done + 1 if done < completes_itself else done}

            def rest():
                while state["next"] < len(ops):
                    ops[state["next"]]()
                    state["next"] += 1

            recover(rest, err, "completing the update")
            raise


class ForwardPerturbation:
    """Applies seeded directions inside ``module``'s forward; only updates write the weights.

    The same interface as :class:`zoptim.engine.inplace.SeededPerturbation` (``move``, ``update``,
    ``restore``, ``is_perturbed``, ``params``), so every optimizer's step generator runs on either.

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
        self._layout_streams()
        self.per_example = bool(per_example)
        self.rows: int | None = None  # the batch size the hooks saw at the current per-example query
        self._rows_cache: tuple | None = None
        if self.per_example:
            self._check_per_example()
        _OWNERS[module] = weakref.ref(self)

    # -- which tensor is applied where ------------------------------------------------------------------
    def _register_hooks(self, index: dict[int, int]) -> set[int]:
        conv1d = _conv1d_type()
        skip = _in_multihead_attention(self.module)
        hooked: set[int] = set()
        uses: dict[int, list[str]] = {}

        def trainable(t):
            return None if t is None else index.get(id(t))

        for name, m in self.module.named_modules():
            if id(m) in skip:
                continue
            w = trainable(getattr(m, "weight", None)) if isinstance(getattr(m, "weight", None), torch.Tensor) else None
            b = trainable(getattr(m, "bias", None)) if isinstance(getattr(m, "bias", None), torch.Tensor) else None
            hook = None
            if isinstance(m, nn.Linear):
                hook = self._linear_hook(w, b, transposed=False)
            elif conv1d is not None and isinstance(m, conv1d):
                hook = self._linear_hook(w, b, transposed=True)
            elif isinstance(m, nn.Embedding):
                hook, b = self._embedding_hook(w), None
            elif isinstance(m, nn.Conv2d):
                hook = self._conv2d_hook(w, b)
            elif next(m.children(), None) is None:
                direct = [(n, index[id(p)]) for n, p in m.named_parameters(recurse=False) if id(p) in index]
                if direct and sum(self.params[j].numel() for _, j in direct) <= MAX_RECOMPUTED_ELEMENTS:
                    for _, j in direct:
                        self.kind[j] = "full"
                        hooked.add(j)
                        uses.setdefault(j, []).append(name)
                    self._handles.append(m.register_forward_hook(self._recompute_hook(direct), with_kwargs=True))
                continue
            if hook is None or (w is None and b is None):
                continue
            for j, is_matrix in ((w, True), (b, False)):
                if j is None:
                    continue
                matrix = is_matrix and self.params[j].dim() >= 2 and self.rank is not None
                self.kind[j] = "lowrank" if matrix else "full"
                hooked.add(j)
                uses.setdefault(j, []).append(name)
            self._handles.append(m.register_forward_hook(hook))
        self.uses = uses
        return hooked

    def layout(self) -> dict[int, str]:
        """How each trainable tensor's direction is applied: ``"lowrank"``, ``"full"`` (in a hook) or
        ``"in place"``."""
        return {j: self.kind.get(j, "in place") for j in range(len(self.params))}

    # -- the direction's compact values ---------------------------------------------------------------------
    def _matrix_shape(self, j: int) -> tuple[int, int]:
        p = self.params[j]
        return p.shape[0], p.numel() // p.shape[0]

    def _layout_streams(self) -> None:
        """One flat index space per device over the compact values of every hooked tensor but the
        rank=None matrices: A and B of each low-rank matrix, all elements of each small tensor."""
        self._segments: dict[torch.device, list[tuple[int, int, int]]] = {}
        for j in self._lowrank + self._small:
            p = self.params[j]
            if j in self._lowrank:
                m, n = self._matrix_shape(j)
                length = self.rank * (m + n)
            else:
                length = p.numel()
            self._segments.setdefault(p.device, []).append((j, length, 0))
        self._streams = {}
        for device, segs in self._segments.items():
            lengths = [length for _, length, _ in segs]
            idx = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
            seg = np.repeat(np.arange(len(segs)), lengths)
            if device.type != "cpu":
                idx_t, seg_t = torch.from_numpy(idx).to(device), torch.from_numpy(seg).to(device)
            else:
                idx_t, seg_t = idx, seg
            self._streams[device] = (idx_t, seg_t, np.cumsum([0] + lengths))

    def _values(self, key: int, cache: bool = True) -> dict[int, object]:
        """The compact direction ``key``: ``{j: (A, B)}`` for low-rank matrices, ``{j: z}`` for small
        tensors, float32 on each tensor's device (cached for the last few keys)."""
        got = self._cache.get(key)
        if got is None and self._rows_cache is not None:
            got = self._from_rows(key)
        if got is not None:
            return got
        out: dict[int, object] = {}
        for device, segs in self._segments.items():
            idx, seg, starts = self._streams[device]
            words = [self.noise.words(mix(key, j)) for j, _, _ in segs]
            k0 = np.array([w[0] for w in words], dtype=np.int64)
            k1 = np.array([w[1] for w in words], dtype=np.int64)
            if device.type == "cpu":
                flat = values_from_bits_numpy(counter_bits(idx, k0[seg], k1[seg]), self.distribution)
            else:
                bits = counter_bits(idx, torch.from_numpy(k0).to(device)[seg], torch.from_numpy(k1).to(device)[seg])
                flat = values_from_bits(bits, self.distribution, normal_table(device))
            for i, (j, length, _) in enumerate(segs):
                z = flat[starts[i] : starts[i] + length]
                if j in self.kind and self.kind[j] == "lowrank":
                    m, n = self._matrix_shape(j)
                    out[j] = (z[: m * self.rank].view(m, self.rank), z[m * self.rank :].view(n, self.rank))
                else:
                    out[j] = z.view(self.params[j].shape)
        if cache:
            if len(self._cache) >= self._cache_keys:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = out
        return out

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

    def _factor(self, key: int) -> float:
        return normalization_factor(self, key)

    # -- per-example queries -----------------------------------------------------------------------------------
    def _check_per_example(self) -> None:
        names = {j: ", ".join(u) for j, u in self.uses.items()}
        if self.in_place is not None:
            raise ValueError(
                "per_example=True needs every trainable tensor applied in a hook; these move in place (no hook "
                f"covers their module): {[j for j in self._in_place_index]} (tensor indices of the optimizer's parameters)"
            )
        if self.sharded:
            raise ValueError("per_example=True is not supported with sharded (FSDP2) parameters; use "
                             "wrap(mode='sharded') without per_example, or per_example with wrap(mode='batch')")
        if self.rank is None:
            raise ValueError("per_example=True needs low-rank matrix directions (rank=r): a full-rank direction per "
                             "example would materialise one weight-sized tensor per example")
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
            if n == 1:
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
        key, n = self._key, self.rows
        if self._rows_cache is not None and self._rows_cache[0] == (key, n):
            return self._rows_cache[1]
        rows = [self._values(key.key(i), cache=False) for i in range(n)]
        stacked = {}
        for j, first in rows[0].items():
            if isinstance(first, tuple):
                stacked[j] = (torch.stack([r[j][0] for r in rows]), torch.stack([r[j][1] for r in rows]))
            else:
                stacked[j] = torch.stack([r[j] for r in rows])
        self._rows_cache = ((key, n), stacked, {key.key(i): i for i in range(n)})
        return stacked

    def _from_rows(self, key: int):
        """Direction ``key`` sliced out of the per-example stack, if it is one of its rows (the update)."""
        if self._rows_cache is None:
            return None
        i = self._rows_cache[2].get(key)
        if i is None:
            return None
        return {j: (v[0][i], v[1][i]) if isinstance(v, tuple) else v[i] for j, v in self._rows_cache[1].items()}

    # -- hooks: the query point inside the forward -------------------------------------------------------------
    def _active(self, j: int | None):
        """The scale of tensor j at the current query, or None where nothing is applied."""
        if j is None or self._key is None or self._recomputing:
            return None
        scale = self._scales[j]
        if scale == 0.0:
            return None
        return scale

    @staticmethod
    def _add(out: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and out.requires_grad:
            return out + term
        return out.add_(term)

    def _prepared(self, module, build):
        """What a hook needs at the current query, built once per query and module (the factors
        scaled and cast, the bias folded in) so that the hook itself is one or two kernels."""
        got = self._prep.get(id(module))
        if got is None:
            got = self._prep[id(module)] = build()
        return got

    def _linear_hook(self, w: int | None, b: int | None, *, transposed: bool):
        def build(dtype):
            values, sw, sb = self._values(self._key), self._active(w), self._active(b)
            left, right = None, []
            if sw is not None and self.kind[w] == "lowrank":
                A, B = values[w]
                # Linear: W (out x in) = A B^T / sqrt(r), so x S^T = (x B) A^T / sqrt(r).
                # Conv1D: W (in x out), x S = (x A) B^T / sqrt(r).
                left, r_factor = (A, B) if transposed else (B, A)
                right.append(r_factor.T * (sw / math.sqrt(self.rank)))
            elif sw is not None:  # rank=None: the full direction, materialised for this query
                S = self._full(w, self._key)
                left = S if transposed else S.T
            if sb is not None:
                right.append((values[b] * sb)[None])  # the bias rides on a column of ones
            return (None if left is None else left.to(dtype), torch.cat(right).to(dtype) if right else None,
                    sw is not None and self.kind[w] != "lowrank", sw, sb is not None)

        def hook(module, args, out):
            if self._key is None or self._recomputing or (self._active(w) is None and self._active(b) is None):
                return None
            x = args[0]
            if isinstance(self._key, RowKeys) and self._row_count(x.shape[0], module) > 1:
                return self._linear_rows(module, x, out, w, b, transposed)
            left, right, full, sw, has_bias = self._prepared(module, lambda: build(out.dtype))
            width = out.shape[-1]
            flat = out.view(-1, width) if out.is_contiguous() else None
            x2 = x.reshape(-1, x.shape[-1]).to(out.dtype)
            if full:  # x S^T for the materialised full-rank direction, then the bias if any
                term = (x2 @ left).mul_(sw)
                if has_bias:
                    term.add_(right[0])
            else:
                xb = x2 @ left if left is not None else x2.new_empty((x2.shape[0], 0))
                if has_bias:
                    xb = torch.cat((xb, xb.new_ones((xb.shape[0], 1))), dim=1)
                if flat is not None and not (torch.is_grad_enabled() and out.requires_grad):
                    flat.addmm_(xb, right)
                    return out
                term = xb @ right
            if flat is not None and not (torch.is_grad_enabled() and out.requires_grad):
                flat.add_(term)
                return out
            return out + term.view(out.shape)

        return hook

    def _embedding_hook(self, w: int | None):
        def hook(module, args, out):
            sw = self._active(w)
            if sw is None:
                return None
            if isinstance(self._key, RowKeys) and self._row_count(args[0].shape[0], module) > 1:
                return self._embedding_rows(args[0], out, w, sw)
            ids = args[0].reshape(-1)
            width = out.shape[-1]
            if self.kind[w] == "lowrank":
                A, B = self._values(self._key)[w]
                term = (A[ids] @ B.T).mul_(sw / math.sqrt(self.rank))
            else:  # full rank: only the looked-up rows of the direction are drawn
                rows = ids.to(torch.int64)[:, None] * width + torch.arange(width, device=ids.device)
                k0, k1 = self.noise.words(mix(self._key, w))
                bits = counter_bits(rows, k0, k1)
                term = values_from_bits(bits, self.distribution, normal_table(ids.device)).mul_(sw)
            return self._add(out, term.to(out.dtype).view(out.shape))

        return hook

    def _conv2d_hook(self, w: int | None, b: int | None):
        def build(module, dtype):
            values, sw, sb = self._values(self._key), self._active(w), self._active(b)
            weight = None
            if sw is not None and self.kind[w] == "lowrank":
                A, B = values[w]
                weight = ((A * (sw / math.sqrt(self.rank))).to(dtype), B.to(dtype))
                if module.groups != 1:  # grouped (depthwise) kernels are small: materialise S
                    weight = (weight[0] @ weight[1].T).view(module.weight.shape)
            elif sw is not None:
                weight = (self._full(w, self._key) * sw).to(dtype)
            bias = None if sb is None else (values[b] * sb).to(dtype)
            return weight, bias

        def hook(module, args, out):
            if self._key is None or self._recomputing or (self._active(w) is None and self._active(b) is None):
                return None
            x = args[0]
            if isinstance(self._key, RowKeys) and self._row_count(x.shape[0], module) > 1:
                return self._conv2d_rows(module, x, out, w, b)
            weight, bias = self._prepared(module, lambda: build(module, out.dtype))
            n, channels = out.shape[:2]
            term = None
            if isinstance(weight, tuple):
                A, B = weight
                pointwise = module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding in ((0, 0), "valid")
                if pointwise and x.dim() == 4:
                    # a 1x1 convolution is a linear map of the channels, (A B^T) x = A (B^T x): two plain
                    # matrix products over the pixels (batched products of thin factors are slow)
                    pixels = x.reshape(n, x.shape[1], -1).transpose(1, 2).reshape(-1, x.shape[1])
                    t = pixels @ B
                    if out[0, 0].numel() == 1 and out.is_contiguous() and not torch.is_grad_enabled():
                        flat = out.view(n, channels)
                        flat.addmm_(t, A.T)
                        if bias is not None:
                            flat.add_(bias)
                        return out
                    term = (t @ A.T).view(n, -1, channels).transpose(1, 2).reshape(out.shape)
                else:  # conv(x, A B^T) = A conv(x, B^T as r filters): r thin channels, then a 1x1 mix
                    t = module._conv_forward(x, B.T.reshape((B.shape[1],) + tuple(module.weight.shape[1:])), None)
                    term = torch.matmul(A, t.flatten(2)).view(out.shape)
            elif weight is not None:
                term = module._conv_forward(x, weight, None)
            if bias is not None:
                zb = bias.view(1, -1, *([1] * (out.dim() - 2)))
                term = zb.expand_as(out) if term is None else term.add_(zb)
            return self._add(out, term)

        return hook

    def _recompute_hook(self, direct: list[tuple[str, int]]):
        def build(module):
            values = self._values(self._key)
            perturbed = {}
            for name, j in direct:
                p = getattr(module, name)  # under FSDP2: the gathered tensor of this forward
                wide = p if p.dtype == torch.float64 else p.float()
                # the in-place engine's arithmetic, fl(x + fl(s * z)): both routes see one point
                delta = values[j] * float(np.float32(self._scales[j]))
                perturbed[name] = (wide + delta).to(p.dtype)
            return perturbed

        def hook(module, args, kwargs, out):
            if self._key is None or self._recomputing or all(self._scales[j] == 0.0 for _, j in direct):
                return None
            if isinstance(self._key, RowKeys) and self._row_count(args[0].shape[0], module) > 1:
                return self._recompute_rows(module, direct, args, kwargs)
            perturbed = self._prepared(module, lambda: build(module))
            fast = None if kwargs else _norm_forward(module, args[0], perturbed)
            if fast is not None:  # torch's own normalisation layers, without functional_call's overhead
                return fast
            self._recomputing = True
            try:
                return torch.func.functional_call(module, perturbed, args, kwargs, strict=False)
            finally:
                self._recomputing = False

        return hook

    # -- per-example hooks: row i of the batch at x + rho s(key(i)) ----------------------------------------------
    def _row_scaled(self, j: int, dtype):
        """Tensor j's stacked per-row direction times its scale: (A * s / sqrt(r), B) or z * s."""
        v = self._row_values()[j]
        s = self._scales[j]
        if isinstance(v, tuple):
            return (v[0] * (s / math.sqrt(self.rank))).to(dtype), v[1].to(dtype)
        return (v * s).to(dtype)

    def _linear_rows(self, module, x, out, w, b, transposed):
        def build():
            left, right = None, []
            if self._active(w) is not None:
                A, B = self._row_values()[w]  # (n, m, r), (n, cols, r)
                c = self._scales[w] / math.sqrt(self.rank)
                # Linear: x S^T = (x B) A^T;  Conv1D (W = in x out): x S = (x A) B^T
                left, other = (A, B) if transposed else (B, A)
                left = left.to(out.dtype)
                right.append((other * c).transpose(1, 2).to(out.dtype))
            if self._active(b) is not None:
                right.append(self._row_scaled(b, out.dtype)[:, None, :])
            return left, torch.cat(right, dim=1)

        left, right = self._prepared(module, build)
        n, width = x.shape[0], out.shape[-1]
        x3 = x.reshape(n, -1, x.shape[-1]).to(out.dtype)
        xb = torch.bmm(x3, left) if left is not None else x3.new_empty((n, x3.shape[1], 0))
        if right.shape[1] > xb.shape[2]:  # the bias rides on a column of ones
            xb = torch.cat((xb, xb.new_ones((n, xb.shape[1], 1))), dim=2)
        if out.is_contiguous() and not (torch.is_grad_enabled() and out.requires_grad):
            out.view(n, -1, width).baddbmm_(xb, right)
            return out
        return out + torch.bmm(xb, right).view(out.shape)

    def _embedding_rows(self, ids, out, w, sw):
        n = ids.shape[0]
        A, B = self._row_values()[w]
        flat_ids = ids.reshape(n, -1)
        rows = A[torch.arange(n, device=ids.device)[:, None], flat_ids]  # (n, T, r)
        term = torch.bmm(rows, B.transpose(1, 2)).mul_(sw / math.sqrt(self.rank))
        return self._add(out, term.to(out.dtype).view(out.shape))

    def _conv2d_rows(self, module, x, out, w, b):
        n, channels = out.shape[:2]
        term = None
        if self._active(w) is not None:
            if module.padding_mode != "zeros":
                raise ValueError(f"per_example=True supports Conv2d with padding_mode='zeros'; got {module.padding_mode!r}")
            A, B = self._row_scaled(w, out.dtype)  # (n, O, r), (n, C/g * kh * kw, r)
            weight = module.weight
            pointwise = module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding in ((0, 0), "valid")
            if module.groups == 1 and pointwise:
                t = torch.bmm(B.transpose(1, 2), x.reshape(n, x.shape[1], -1))  # (n, r, pixels)
                term = torch.bmm(A, t).view(out.shape)
            elif module.groups == 1:  # r thin filters per example as one grouped convolution, then A mixes
                r = B.shape[2]
                filters = B.transpose(1, 2).reshape((n * r,) + tuple(weight.shape[1:]))
                t = F.conv2d(x.reshape(1, -1, *x.shape[2:]), filters, None, module.stride, module.padding,
                             module.dilation, n)
                term = torch.bmm(A, t.view(n, r, -1)).view(out.shape)
            else:  # grouped kernels are small: each example's S materialised, one grouped convolution
                S = torch.bmm(A, B.transpose(1, 2)).reshape((n * weight.shape[0],) + tuple(weight.shape[1:]))
                t = F.conv2d(x.reshape(1, -1, *x.shape[2:]), S, None, module.stride, module.padding, module.dilation,
                             n * module.groups)
                term = t.view(out.shape)
        if self._active(b) is not None:
            zb = self._row_scaled(b, out.dtype).view(n, channels, *([1] * (out.dim() - 2)))
            term = zb.expand_as(out) if term is None else term.add_(zb)
        return self._add(out, term)

    def _recompute_rows(self, module, direct, args, kwargs):
        def build():
            values = self._row_values()
            out = {}
            for name, j in direct:
                p = getattr(module, name)  # under FSDP2: the gathered tensor of this forward
                wide = p if p.dtype == torch.float64 else p.float()
                out[name] = (wide + values[j] * float(np.float32(self._scales[j]))).to(p.dtype)  # (n, *shape)
            return out

        perturbed = self._prepared(module, build)
        x = args[0]
        n = x.shape[0]
        kind = type(module)

        def per_row(t, lead):  # (n, *shape) -> broadcastable against x: n, then ``lead`` ones
            return t.view(n, *([1] * lead), *t.shape[1:])

        w, b = perturbed.get("weight"), perturbed.get("bias")
        if not kwargs and kind is nn.LayerNorm:
            y = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
            lead = x.dim() - 1 - len(module.normalized_shape)
        elif not kwargs and kind is nn.RMSNorm:
            y = F.rms_norm(x, module.normalized_shape, None, module.eps)
            lead = x.dim() - 1 - len(module.normalized_shape)
        elif not kwargs and (kind is nn.GroupNorm or isinstance(module, nn.modules.batchnorm._BatchNorm)):
            if kind is nn.GroupNorm:
                y = F.group_norm(x, module.num_groups, None, None, module.eps)
            else:
                y = F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
            # channels on dim 1: (n, C) -> (n, C, 1, ...)
            w = None if w is None else w.view(n, -1, *([1] * (x.dim() - 2)))
            b = None if b is None else b.view(n, -1, *([1] * (x.dim() - 2)))
            lead = None
        else:  # any other small module: its own forward, one example at a time, under vmap
            def one(params, row):
                return torch.func.functional_call(module, params, (row[None],), kwargs, strict=False)[0]

            self._recomputing = True
            try:
                return torch.func.vmap(one)(perturbed, x)
            finally:
                self._recomputing = False
        if lead is not None:
            w = None if w is None else per_row(w, lead)
            b = None if b is None else per_row(b, lead)
        w = module.weight if w is None and getattr(module, "weight", None) is not None else w
        b = module.bias if b is None and getattr(module, "bias", None) is not None else b
        if w is not None:
            y = y * w
        if b is not None:
            y = y + b
        return y

    # -- the engine interface -----------------------------------------------------------------------------------
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
        elif key is not None:
            f = self._factor(key)
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

    @torch.no_grad()
    def update(self, terms, decay=None) -> None:
        """``x <- x (1 - decay) + sum_i scales_i s(key_i)``: the only write to covered weights.

        Low-rank matrices take one ``addmm_`` over all terms, ``W += [c_1 A_1 .. c_k A_k]
        [B_1 .. B_k]^T / sqrt(r)``; small tensors one foreach pass per term; uncovered tensors
        their fused in-place move (which also undoes their query offset).

        Atomic: everything the update writes is prepared first, then written as a list of
        operations with signal handlers deferred (:func:`zoptim.engine.atomic.deferred_signals`); an
        operation that raises is retried and the rest completed before the exception propagates,
        so a failure never leaves some tensors updated and others not."""
        self._key, self._scales = None, None
        self._cache_keys = max(self._cache_keys, len(terms) + 1)
        terms = [(key, self._as_scales(scales)) for key, scales in terms]
        terms = [(key, [s * self._factor(key) for s in scales]) for key, scales in terms]
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
        values = [self._values(key) for key, _ in terms]
        for j in self._lowrank:
            p, first, rows = self._local_rows(j)
            if decay[j]:
                ops.append(partial(p.mul_, float(np.float32(1.0 - decay[j]))))
            live = [(v[j], s[j]) for v, (_, s) in zip(values, terms) if s[j] != 0.0]
            if not live or rows == 0:
                continue
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
        _write_all(ops, completes_itself=int(self.in_place is not None) + int(self.writer is not None))

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
