r"""Layer support of the forward engine: one handler class per layer kind.

A handler is the forward hook of one module. At a query it adds the direction's effect to the
module's output, ``y(W + rho S, b + rho s_b) - y(W, b)``, without writing the weights:

* :meth:`LayerHandler.query`: the step's one direction, shared by the whole minibatch;
* :meth:`LayerHandler.rows`: a per-example query (:class:`~zoptim.engine.protocol.RowKeys`),
  row i of the minibatch at its own direction.

The update is not the handlers' business: it writes each tensor once, whichever layers use it
(a tied embedding and LM head), in :meth:`zoptim.engine.forward.ForwardPerturbation.update`.

:data:`HANDLERS` is the dispatcher: the first class whose :meth:`~LayerHandler.covers` accepts a
module handles it, so supporting a new layer kind is one class added there. Tensors that no
handler covers move in place (:mod:`zoptim.engine.inplace`).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import sparse
from .noise import counter_bits, mix, normal_table, values_from_bits
from .protocol import RowKeys

#: Leaf modules whose trainable parameters total at most this many elements are recomputed in
#: their hook with perturbed parameters (normalisation layers); larger unknown ones move in place.
MAX_RECOMPUTED_ELEMENTS = 1 << 16


def _add(out: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and out.requires_grad:
        return out + term
    return out.add_(term)


def _pointwise(module: nn.Conv2d) -> bool:
    return module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding in ((0, 0), "valid")


class LayerHandler:
    """The hook of one module of a kind (subclasses: one per kind).

    ``tensors``: ``(attribute, j, matrix)`` for each trainable tensor of the module the hook
    applies (j its index among the optimizer's tensors; ``matrix``: its direction may be low
    rank). ``engine``: the :class:`~zoptim.engine.forward.ForwardPerturbation` whose current
    query the hook applies.
    """

    def __init__(self, engine, tensors: list[tuple[str, int, bool]]):
        self.engine = engine
        self.tensors = tensors
        self.j = {name: j for name, j, _ in tensors}

    @classmethod
    def covers(cls, module: nn.Module) -> bool:
        """Whether this class handles ``module``."""
        raise NotImplementedError

    @classmethod
    def claim(cls, module: nn.Module, index: dict[int, int], params: list) -> list[tuple[str, int, bool]]:
        """The module's trainable tensors the hook applies (``index``: id -> j): its weight (a
        matrix) and bias."""
        out = []
        for name, matrix in (("weight", True), ("bias", False)):
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor) and id(t) in index:
                out.append((name, index[id(t)], matrix))
        return out

    def __call__(self, module, args, kwargs, out):
        e = self.engine
        if e._key is None or e._recomputing:
            return None
        scales = e._scales
        if all(scales[j] == 0.0 for _, j, _ in self.tensors):
            return None
        if isinstance(e._key, RowKeys) and e._row_count(args[0].shape[0], module) > 1:
            return self.rows(module, args, kwargs, out)
        return self.query(module, args, kwargs, out)

    def query(self, module, args, kwargs, out):
        """The output at the current shared direction."""
        raise NotImplementedError

    def rows(self, module, args, kwargs, out):
        """The output with row i of the minibatch at its own direction."""
        raise NotImplementedError


class LinearHandler(LayerHandler):
    """``torch.nn.Linear``, ``y = x W^T + b``: ``x S^T = (x B) A^T / sqrt(r)``, the bias on a column of ones."""

    transposed = False

    @classmethod
    def covers(cls, module):
        return isinstance(module, nn.Linear)

    def _build(self, dtype):
        e, w, b = self.engine, self.j.get("weight"), self.j.get("bias")
        values, sw, sb = e._values(e._key), e._active(w), e._active(b)
        left, right = None, []
        if sw is not None and e.kind[w] == "lowrank":
            A, B = values[w]
            # Linear: W (out x in) = A B^T / sqrt(r), so x S^T = (x B) A^T / sqrt(r).
            # Conv1D: W (in x out), x S = (x A) B^T / sqrt(r).
            left, r_factor = (A, B) if self.transposed else (B, A)
            right.append(r_factor.T * (sw / math.sqrt(e.rank)))
        elif sw is not None:  # rank=None: the full direction, materialised for this query
            S = e._full(w, e._key)
            left = S if self.transposed else S.T
        if sb is not None:
            right.append((values[b] * sb)[None])  # the bias rides on a column of ones
        return (None if left is None else left.to(dtype), torch.cat(right).to(dtype) if right else None,
                sw is not None and e.kind[w] != "lowrank", sw, sb is not None)

    def _build_unit(self, dtype):
        """The factors of a low-rank weight (and the bias) at scale 1, for the direction alone: both
        queries of a step (+eps, -eps) share them, the scale rides on the product (``alpha``)."""
        e, w, b = self.engine, self.j.get("weight"), self.j.get("bias")
        values = e._values(e._key)
        A, B = values[w]
        left, r_factor = (A, B) if self.transposed else (B, A)
        right = r_factor.T if e.rank == 1 else r_factor.T * (1.0 / math.sqrt(e.rank))
        if b is not None:  # the bias rides on a row of ones appended to x B (see query)
            right = torch.cat((right, values[b][None]))
        return left.T.to(dtype), right.to(dtype)

    def query(self, module, args, kwargs, out):
        x = args[0]
        e, w, b = self.engine, self.j.get("weight"), self.j.get("bias")
        sw = e._active(w)
        if sw is not None and e.kind[w] == "lowrank" and (b is None or e._active(b) == sw):
            # the common case: one scale for the layer, the factors shared by the step's queries
            flat = out.view(-1, out.shape[-1]) if out.is_contiguous() else None
            if flat is not None and not (torch.is_grad_enabled() and out.requires_grad):
                left_t, right = e._prepared_for_key(module, out.dtype, lambda: self._build_unit(out.dtype))
                x2 = x.reshape(-1, x.shape[-1])
                if x2.dtype != out.dtype:
                    x2 = x2.to(out.dtype)
                # (x B)^T into the first r rows of a scratch whose last row holds ones (the bias's),
                # so the whole perturbation is one GEMM: out += eps [x B, 1] [A^T / sqrt(r); b]
                xb_t = e._scratch_rows(right.shape[0], x2.shape[0], left_t.shape[0], out.dtype, out.device)
                torch.mm(left_t, x2.T, out=xb_t[: left_t.shape[0]])
                flat.addmm_(xb_t.T, right, alpha=sw)
                return out
        left, right, full, sw, has_bias = e._prepared(module, lambda: self._build(out.dtype))
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

    def rows(self, module, args, kwargs, out):
        e, w, b, x = self.engine, self.j.get("weight"), self.j.get("bias"), args[0]
        sw = e._active(w)
        if (sw is not None and (b is None or e._active(b) == sw) and out.is_contiguous()
                and not (torch.is_grad_enabled() and out.requires_grad)):
            # one scale for the layer: the stacked factors at scale 1, shared by the step's two queries
            def unit():
                A, B = e._row_values()[w]  # (n, m, r), (n, cols, r)
                left, other = (A, B) if self.transposed else (B, A)
                right = [(other if e.rank == 1 else other * (1.0 / math.sqrt(e.rank))).transpose(1, 2)]
                if b is not None:
                    right.append(e._row_values()[b][:, None, :])
                return left.transpose(1, 2).contiguous().to(out.dtype), torch.cat(right, dim=1).to(out.dtype)

            left_t, right = e._prepared_for_key(module, out.dtype, unit)
            n = x.shape[0]
            x3 = x.reshape(n, -1, x.shape[-1])
            xb_t = self._row_products(x3 if x3.dtype == out.dtype else x3.to(out.dtype), left_t, right.shape[1])
            out.view(n, -1, out.shape[-1]).baddbmm_(xb_t.transpose(1, 2), right, alpha=sw)
            return out

        def build():
            left, right = None, []
            if e._active(w) is not None:
                A, B = e._row_values()[w]  # (n, m, r), (n, cols, r)
                c = e._scales[w] / math.sqrt(e.rank)
                # Linear: x S^T = (x B) A^T;  Conv1D (W = in x out): x S = (x A) B^T
                left, other = (A, B) if self.transposed else (B, A)
                left = left.to(out.dtype)
                right.append((other * c).transpose(1, 2).to(out.dtype))
            if e._active(b) is not None:
                right.append(e._row_scaled(b, out.dtype)[:, None, :])
            return left, torch.cat(right, dim=1)

        left, right = e._prepared(module, build)
        n, width = x.shape[0], out.shape[-1]
        x3 = x.reshape(n, -1, x.shape[-1]).to(out.dtype)
        xb = self._row_products(x3, None if left is None else left.transpose(1, 2), right.shape[1]).transpose(1, 2)
        if out.is_contiguous() and not (torch.is_grad_enabled() and out.requires_grad):
            out.view(n, -1, width).baddbmm_(xb, right)
            return out
        return out + torch.bmm(xb, right).view(out.shape)

    def _row_products(self, x3: torch.Tensor, left_t: torch.Tensor | None, rows: int) -> torch.Tensor:
        """``(x_i L_i)^T`` for every row i (``x3``: (n, T, k), ``left_t``: (n, r, k) or None for r = 0),
        as an (n, rows, T) reused scratch whose rows past r hold ones (a bias rides on them through
        the same product). Computed as the wide product ``L_i^T x_i^T``: torch's CPU batched GEMM
        with one output column, ``bmm(x3, L)``, took 5-20x longer on MiniLM's shapes."""
        n, r = x3.shape[0], 0 if left_t is None else left_t.shape[1]
        buf = self.engine._scratch_rows(n * rows, x3.shape[1], r, x3.dtype, x3.device).view(n, rows, x3.shape[1])
        if r:
            torch.bmm(left_t, x3.transpose(1, 2), out=buf[:, :r])
        return buf


@functools.cache
def _conv1d_type():
    try:  # transformers' GPT-2 style layer (y = x W + b, W of shape in x out); optional dependency
        from transformers.pytorch_utils import Conv1D
    except Exception:  # noqa: BLE001 - transformers absent or broken: no such layers to cover
        return None
    return Conv1D


class Conv1DHandler(LinearHandler):
    """transformers' ``Conv1D`` (GPT-2), ``y = x W + b`` with W of shape in x out: ``x S = (x A) B^T / sqrt(r)``."""

    transposed = True

    @classmethod
    def covers(cls, module):
        conv1d = _conv1d_type()
        return conv1d is not None and isinstance(module, conv1d)


class EmbeddingHandler(LayerHandler):
    """``torch.nn.Embedding``: the rows of A gathered with the ids (low rank), or only the
    looked-up rows of the full direction drawn."""

    @classmethod
    def covers(cls, module):
        return isinstance(module, nn.Embedding)

    @classmethod
    def claim(cls, module, index, params):
        return [t for t in super().claim(module, index, params) if t[0] == "weight"]

    def query(self, module, args, kwargs, out):
        e, w = self.engine, self.j["weight"]
        sw = e._active(w)
        ids = args[0].reshape(-1)
        width = out.shape[-1]
        if e.kind[w] == "lowrank":
            A, B = e._values(e._key)[w]
            term = (A[ids] @ B.T).mul_(sw / math.sqrt(e.rank))
            if w in e.sparse_rows:
                sparse.record(e, w, ids)
        else:  # full rank: only the looked-up rows of the direction are drawn
            rows = ids.to(torch.int64)[:, None] * width + torch.arange(width, device=ids.device)
            k0, k1 = e.noise.words(mix(e._key, w))
            bits = counter_bits(rows, k0, k1)
            term = values_from_bits(bits, e.distribution, normal_table(ids.device)).mul_(sw)
        return _add(out, term.to(out.dtype).view(out.shape))

    def __call__(self, module, args, kwargs, out):
        e = self.engine
        if (isinstance(e._key, RowKeys) and args[0].shape[0] == 1 and (e.rows or 1) > 1
                and e._active(self.j["weight"]) is not None):
            # ids shared by the whole batch (BERT's position ids, 1 x T): each row takes its own direction
            ids = args[0].expand(e.rows, *args[0].shape[1:])
            return out + self._term(ids).to(out.dtype).view(e.rows, *out.shape[1:])
        return super().__call__(module, args, kwargs, out)

    def _term(self, ids):
        """Row i's offset: rows ``ids[i]`` of ``A_i B_i^T`` times the scale, (n, T, dim)."""
        e, w = self.engine, self.j["weight"]
        n = ids.shape[0]
        A, B = e._row_values()[w]
        if w in e.sparse_rows:
            sparse.record(e, w, ids.reshape(n, -1))
        rows = A[torch.arange(n, device=ids.device)[:, None], ids.reshape(n, -1)]  # (n, T, r)
        return torch.bmm(rows, B.transpose(1, 2)).mul_(e._active(w) / math.sqrt(e.rank))

    def rows(self, module, args, kwargs, out):
        return _add(out, self._term(args[0]).to(out.dtype).view(out.shape))


class Conv2dHandler(LayerHandler):
    """``torch.nn.Conv2d``: ``conv(x, A B^T) = A conv(x, B^T as r filters)``, r thin channels then a
    1x1 mix (a grouped convolution materialises S, which is small there)."""

    @classmethod
    def covers(cls, module):
        return isinstance(module, nn.Conv2d)

    def _build(self, module, dtype):
        e, w, b = self.engine, self.j.get("weight"), self.j.get("bias")
        values, sw, sb = e._values(e._key), e._active(w), e._active(b)
        weight = None
        if sw is not None and e.kind[w] == "lowrank":
            A, B = values[w]
            weight = ((A * (sw / math.sqrt(e.rank))).to(dtype), B.to(dtype))
            if module.groups != 1:  # grouped (depthwise) kernels are small: materialise S
                weight = (weight[0] @ weight[1].T).view(module.weight.shape)
        elif sw is not None:
            weight = (e._full(w, e._key) * sw).to(dtype)
        bias = None if sb is None else (values[b] * sb).to(dtype)
        return weight, bias

    def query(self, module, args, kwargs, out):
        x = args[0]
        weight, bias = self.engine._prepared(module, lambda: self._build(module, out.dtype))
        n, channels = out.shape[:2]
        term = None
        if isinstance(weight, tuple):
            A, B = weight
            if _pointwise(module) and x.dim() == 4:
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
        return _add(out, term)

    def rows(self, module, args, kwargs, out):
        e, w, b, x = self.engine, self.j.get("weight"), self.j.get("bias"), args[0]
        n, channels = out.shape[:2]
        term = None
        if e._active(w) is not None:
            if module.padding_mode != "zeros":
                raise ValueError(f"per_example=True supports Conv2d with padding_mode='zeros'; got {module.padding_mode!r}")
            A, B = e._row_scaled(w, out.dtype)  # (n, O, r), (n, C/g * kh * kw, r)
            weight = module.weight
            if module.groups == 1 and _pointwise(module):
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
        if e._active(b) is not None:
            zb = e._row_scaled(b, out.dtype).view(n, channels, *([1] * (out.dim() - 2)))
            term = zb.expand_as(out) if term is None else term.add_(zb)
        return _add(out, term)


def _norm_forward(module: nn.Module, x: torch.Tensor, w, b):
    """torch's normalisation layers by their functional form (the computation of the module's
    forward) with affine parameters ``w``, ``b`` (None: none), and where those broadcast against
    the output (``"trailing"``: over ``normalized_shape``; ``"channels"``: dim 1); None for any
    other module."""
    kind = type(module)
    if kind is nn.LayerNorm:
        return F.layer_norm(x, module.normalized_shape, w, b, module.eps), "trailing"
    if kind is nn.RMSNorm:
        return F.rms_norm(x, module.normalized_shape, w, module.eps), "trailing"
    if kind is nn.GroupNorm:
        return F.group_norm(x, module.num_groups, w, b, module.eps), "channels"
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and not module.training and module.track_running_stats:
        return F.batch_norm(x, module.running_mean, module.running_var, w, b, False, 0.0, module.eps), "channels"
    return None


class RecomputedHandler(LayerHandler):
    """A leaf module with small parameters only (LayerNorm, RMSNorm, GroupNorm, ...): recomputed in
    its hook at the perturbed parameters, torch's normalisation layers by their functional form,
    any other through ``torch.func.functional_call`` (one small extra pass)."""

    @classmethod
    def covers(cls, module):
        return next(module.children(), None) is None

    @classmethod
    def claim(cls, module, index, params):
        direct = [(n, index[id(p)], False) for n, p in module.named_parameters(recurse=False) if id(p) in index]
        if sum(params[j].numel() for _, j, _ in direct) > MAX_RECOMPUTED_ELEMENTS:
            return []
        return direct

    def _perturbed(self, module, values, scale):
        out = {}
        for name, j, _ in self.tensors:
            p = getattr(module, name)  # under FSDP2: the gathered tensor of this forward
            wide = p if p.dtype == torch.float64 else p.float()
            # the in-place engine's arithmetic, fl(x + fl(s * z)): both routes see one point
            out[name] = (wide + scale(values[j], j)).to(p.dtype)
        return out

    def _functional(self, fn):
        e = self.engine
        e._recomputing = True
        try:
            return fn()
        finally:
            e._recomputing = False

    def query(self, module, args, kwargs, out):
        e = self.engine
        perturbed = e._prepared(module, lambda: self._perturbed(
            module, e._values(e._key), lambda z, j: z * float(np.float32(e._scales[j]))))
        if not kwargs:  # torch's own normalisation layers, without functional_call's overhead
            fast = _norm_forward(module, args[0], perturbed.get("weight", getattr(module, "weight", None)),
                                 perturbed.get("bias", getattr(module, "bias", None)))
            if fast is not None:
                return fast[0]
        return self._functional(lambda: torch.func.functional_call(module, perturbed, args, kwargs, strict=False))

    def rows(self, module, args, kwargs, out):
        e, x = self.engine, args[0]
        # (n, *shape): row i at its own direction
        perturbed = e._prepared(module, lambda: self._perturbed(
            module, e._row_values(), lambda z, j: z * float(np.float32(e._scales[j]))))
        n = x.shape[0]
        plain = None if kwargs else _norm_forward(module, x, None, None)
        if plain is None:  # any other small module: its own forward, one example at a time, under vmap
            def one(params, row):
                return torch.func.functional_call(module, params, (row[None],), kwargs, strict=False)[0]

            return self._functional(lambda: torch.func.vmap(one)(perturbed, x))
        y, where = plain
        w, b = perturbed.get("weight"), perturbed.get("bias")
        if where == "trailing":  # (n, *shape) -> n, then ones up to the normalised dims
            lead = x.dim() - 1 - len(module.normalized_shape)
            w = None if w is None else w.view(n, *([1] * lead), *w.shape[1:])
            b = None if b is None else b.view(n, *([1] * lead), *b.shape[1:])
        else:  # channels on dim 1: (n, C) -> (n, C, 1, ...)
            w = None if w is None else w.view(n, -1, *([1] * (x.dim() - 2)))
            b = None if b is None else b.view(n, -1, *([1] * (x.dim() - 2)))
        w = module.weight if w is None and getattr(module, "weight", None) is not None else w
        b = module.bias if b is None and getattr(module, "bias", None) is not None else b
        if w is not None and b is not None:
            return torch.addcmul(b, y, w)  # b + y * w in one pass (the same two roundings)
        if w is not None:
            return y * w
        return y + b if b is not None else y


#: The dispatcher: the first class that covers a module handles it (order matters: the typed
#: layers before the catch-all for small leaf modules).
HANDLERS: list[type[LayerHandler]] = [LinearHandler, Conv1DHandler, EmbeddingHandler, Conv2dHandler, RecomputedHandler]


def handler_for(module: nn.Module) -> type[LayerHandler] | None:
    return next((h for h in HANDLERS if h.covers(module)), None)
