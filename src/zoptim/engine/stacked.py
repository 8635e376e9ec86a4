r"""A per-example step's update from its examples' stacked directions.

A per-example query draws the B examples' compact directions at once, stacked on a first dimension
(:meth:`zoptim.engine.compact.CompactDraws.draw_stacked`: A (B, m, r), B (B, n, r) per low-rank matrix,
z (B, ...) per small tensor). The step's update ``sum_i c_i s(key_i)`` over those same keys is then
one expression per tensor on the stacks,

.. math:: L = [c_1 A_1 \dots c_B A_B] \in \mathbb R^{m \times B r}, \quad R = [B_1 \dots B_B], \qquad
          g = \sum_i c_i z_i,

instead of B slices, B products and a concatenation per tensor (on MiniLM about 3,000 small
operations a step): the same columns in the same order, so the update's GEMM is unchanged but for
terms whose coefficient is zero, which add zero columns. Used by the plain update
(:meth:`zoptim.engine.forward.ForwardPerturbation.update`) and the orthogonalised one
(:func:`zoptim.engine.polar.orthogonal_update`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from . import sparse


def examples_of(engine, terms) -> tuple[dict, torch.Tensor] | None:
    """``(stacked directions, coefficients)`` when ``terms`` (``[(key, per-tensor scales), ...]``) are
    the current per-example query's examples, in order (the step's update): the stacks ``{j: (A, B)}``
    / ``{j: z}`` and a float32 (B x tensors) matrix of the scales. None otherwise (shared directions,
    a momentum's window, one example)."""
    cache = engine._rows_cache
    if cache is None or len(terms) < 2:
        return None
    index = cache[2]
    if len(index) != len(terms) or any(index.get(key) != i for i, (key, _) in enumerate(terms)):
        return None
    return cache[3], torch.tensor([scales for _, scales in terms], dtype=torch.float64).float()


def lowrank_factors(A: torch.Tensor, B: torch.Tensor, c: torch.Tensor, rows: slice = slice(None)):
    """``(L, R)``: ``[c_1 A_1 .. c_n A_n]`` (rows of A, x n r) and ``[B_1 .. B_n]`` (cols x n r) from
    the stacks A (n, m, r) and B (n, cols, r) and the coefficients c (n,)."""
    n, _, r = A.shape
    left = (A[:, rows] * c.to(A.device).view(n, 1, 1)).permute(1, 0, 2).reshape(-1, n * r)
    return left, B.permute(1, 0, 2).reshape(B.shape[1], n * r)


def small_sum(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``sum_i c_i z_i`` over the stack z (n, ...)."""
    return (z * c.to(z.device).view(-1, *[1] * (z.dim() - 1))).sum(0)


def per_key(stacks: dict, j: int, terms, c: torch.Tensor) -> list:
    """Tensor j's ``(key, (A_i, B_i), c_i)`` per example (what :mod:`zoptim.engine.sparse` takes)."""
    A, B = stacks[j]
    return [(key, (A[i], B[i]), float(c[i])) for i, (key, _) in enumerate(terms)]


def update_ops(engine, stacks: dict, coefficients: torch.Tensor, terms, decay: list[float]) -> list[Callable[[], object]]:
    """The writes (prepared, none done) of a per-example step's plain update on a forward engine:
    each low-rank matrix one ``addmm_`` of :func:`lowrank_factors` (this process's rows when it is
    sharded), each small tensor one ``add_`` of :func:`small_sum`, a sparse embedding its looked-up
    rows (:func:`zoptim.engine.sparse.update`)."""
    ops: list[Callable[[], object]] = []
    for j in engine._lowrank + engine._small:
        tensor, c = engine.parts[j].tensor, coefficients[:, j]
        if decay[j]:
            ops.append(partial(tensor.mul_, float(np.float32(1.0 - decay[j]))))
        if not bool(c.any()):
            continue
        if j in engine.sparse_rows:
            ops.extend(sparse.update(engine, j, per_key(stacks, j, terms, c), 0.0))
        elif j in engine._small:
            ops.append(partial(tensor.add_, engine._local_values(j, small_sum(stacks[j], c)).to(tensor.dtype)))
        else:
            p, first, rows = engine._local_rows(j)
            left, right = lowrank_factors(*stacks[j], c, slice(first, first + rows))
            ops.append(partial(p.view(rows, -1).addmm_, left.to(p.dtype), right.to(p.dtype).T,
                               alpha=1.0 / math.sqrt(engine.rank)))
    return ops
