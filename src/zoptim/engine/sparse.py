r"""Sparse embedding updates (``sparse_embeddings=True``): an embedding matrix moves only in the rows
its queries looked up.

An ``nn.Embedding`` reads its weight only at the ids it is given. With per-example directions
(``per_example=True``), example i's loss :math:`f_i` depends on the rows of its own ids alone, so its
directional derivative :math:`\delta_i` depends on its direction :math:`S_i` only in those rows, and
the part of :math:`\nabla f_i` outside them is zero. Masking the estimate,

.. math:: \hat g = \frac1B \sum_i \delta_i\, (M_i \odot S_i), \qquad M_i = \text{the rows example i looked up},

therefore keeps its expectation, :math:`E[\delta_i (M_i \odot S_i)] = M_i \odot E[\delta_i S_i] =
M_i \odot \nabla f_i = \nabla f_i` (for the Gaussian-smoothed loss as for the loss), and removes the
rest of the estimate, which is pure noise: MiniLM's 30,522 word-embedding rows are half its weights,
and a TREC minibatch of four prompts looks up 51-53 of them. With directions shared
by the minibatch the mask is the batch's rows. The update then writes those rows only
(``index_add_``), not the whole table.

A weight that another layer also uses (an LM head tied to the embedding) reads every row, so it
stays dense (:attr:`zoptim.engine.forward.ForwardPerturbation.sparse_rows` lists the matrices
masked). The rows are recorded by the embedding hooks at the step's queries
(:class:`zoptim.engine.layers.EmbeddingHandler`) and kept until the step's update; a direction
whose queries were not seen keeps every row. The seed momentum, which replays past directions, and
the distributed modes, where a process sees only its own examples' rows, refuse the option
(:mod:`zoptim.optim.options`). The orthogonalised update takes the polar factor of the k x n block
of the looked-up rows (:mod:`zoptim.engine.polar`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from .protocol import RowKeys

#: Directions whose rows are kept at most (the keys of queries no update consumed, e.g. abandoned steps).
MAX_KEYS = 4096


def record(engine, j: int, ids: torch.Tensor) -> None:
    """Record the ids embedding matrix j looked up at the engine's current query: under its key, or,
    at a per-example query (``ids`` of shape (rows, T)), each example's rows under that example's key."""
    seen = engine._seen.setdefault(j, {})
    if len(seen) > MAX_KEYS:
        seen.clear()
    key = engine._key
    if not isinstance(key, RowKeys):
        seen.setdefault(key, []).append(ids.reshape(-1))
        return
    group = engine._group
    for i, k in enumerate(engine._rows_cache[2]):  # the examples' keys, in row order
        seen.setdefault(k, []).append(ids[i * group:(i + 1) * group].reshape(-1))


def factors(engine, j: int, live: list[tuple[int, tuple[torch.Tensor, torch.Tensor], float]]):
    """Matrix j's estimate ``sum_i c_i A_i B_i^T`` (``live``: ``(key, (A_i, B_i), c_i)``) restricted to
    the rows its queries looked up: ``(index, [(A_i[index] * M_i, B_i, c_i), ...])``, ``index`` the
    union of the rows (sorted), ``M_i`` the rows direction i's examples looked up. A direction with
    no record keeps every row."""
    seen = engine._seen.get(j, {})
    device = live[0][1][0].device
    flat = [None if key not in seen else torch.cat(seen[key]).to(device=device, dtype=torch.int64)
            for key, _, _ in live]
    m = engine._matrix_shape(j)[0]
    if any(ids is None for ids in flat):
        index = torch.arange(m, device=device)
        masks = [None if ids is None else torch.zeros(m, 1, device=device).index_fill_(0, ids, 1.0) for ids in flat]
    else:
        index, inverse = torch.unique(torch.cat(flat), return_inverse=True)
        masks, start = [], 0
        for ids in flat:
            part = inverse[start:start + ids.numel()]
            start += ids.numel()
            masks.append(torch.zeros(index.numel(), 1, device=device).index_fill_(0, part, 1.0))
    return index, [(A[index] if mask is None else A[index] * mask, B, c) for (_, (A, B), c), mask in zip(live, masks)]


def update(engine, j: int, terms: list[tuple[int, tuple[torch.Tensor, torch.Tensor], float]],
           decay: float) -> list[Callable[[], object]]:
    """The writes (prepared, none done) of matrix j's plain update: the looked-up rows take
    ``[c_1 A_1 .. c_k A_k][index] [B_1 .. B_k]^T / sqrt(r)``, masked as :func:`factors` says."""
    p = engine.parts[j].tensor
    ops: list[Callable[[], object]] = []
    if decay:
        ops.append(partial(p.mul_, float(np.float32(1.0 - decay))))
    live = [t for t in terms if t[2] != 0.0]
    if not live:
        return ops
    index, found = factors(engine, j, live)
    left = torch.cat([a * float(np.float32(c)) for a, _, c in found], dim=1)
    right = torch.cat([b for _, b, _ in found], dim=1)
    delta = torch.mm(left, right.T).mul_(1.0 / math.sqrt(engine.rank)).to(p.dtype)
    ops.append(partial(p.view(p.shape[0], -1).index_add_, 0, index, delta))
    return ops
