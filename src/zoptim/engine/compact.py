"""The compact values of a forward-applied direction: what :class:`zoptim.engine.forward.ForwardPerturbation`
draws for a key.

A low-rank matrix direction is ``S = A B^T / sqrt(r)`` with A (m x r) and B (n x r), so a direction
of a hooked model is held as the values of A and B for each low-rank matrix and all the values of
each small hooked tensor (a bias, a norm's weight): its *compact values*, ``r (m + n)`` numbers per
matrix. They are drawn from the counter-based stream of :mod:`zoptim.engine.noise` (tensor j of
direction ``key`` draws the stream ``mix(key, j)``: A's values first, then B's) over one flat index
space per device, in one vectorised pass; a small model on the CPU draws the next steps' keys at
once (:meth:`CompactDraws.prefetch`), whose cost there is the calls', not the arithmetic's.
"""

from __future__ import annotations

import numpy as np
import torch

from .noise import (
    counter_bits,
    counter_bits_u32,
    mix,
    mix_array,
    normal_table,
    values_from_bits,
    values_from_bits_numpy,
    weyl_words,
)

#: :meth:`CompactDraws.prefetch`: the keys drawn at once, for a model on the CPU whose compact
#: directions hold at most PREFETCH_ELEMENTS values (a 784-64-10 MLP at rank 1: about 1,000)
PREFETCH_KEYS, PREFETCH_ELEMENTS = 128, 1 << 14


class CompactDraws:
    """Draws the compact values of directions for the hooked tensors of a forward engine.

    Args:
        params: the engine's tensors (tensor j draws ``mix(key, j)``).
        lowrank: the indices of the low-rank matrices (A and B of rank ``rank``); ``small``: those of
            the hooked tensors drawn whole.
        distribution, noise: the direction's distribution and the engine's
            :class:`~zoptim.engine.noise.NoiseSource`.
    """

    def __init__(self, params, lowrank: list[int], small: list[int], rank: int | None, distribution: str, noise):
        self.params, self.lowrank, self.rank = params, set(lowrank), rank
        self.distribution, self.noise = distribution, noise
        # one flat index space per device: A and B of each low-rank matrix, each small tensor whole
        self.segments: dict[torch.device, list[tuple[int, int]]] = {}
        for j in list(lowrank) + list(small):
            m, n = self.matrix_shape(j)
            length = rank * (m + n) if j in self.lowrank else params[j].numel()
            self.segments.setdefault(params[j].device, []).append((j, length))
        self.streams = {}
        for device, segs in self.segments.items():
            lengths = [length for _, length in segs]
            idx = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
            seg = np.repeat(np.arange(len(segs)), lengths)
            if device.type != "cpu":
                idx_t, seg_t = torch.from_numpy(idx).to(device), torch.from_numpy(seg).to(device)
            else:
                idx_t, seg_t = idx, seg
            self.streams[device] = (idx_t, seg_t, np.cumsum([0] + lengths))
        total = sum(length for segs in self.segments.values() for _, length in segs)
        small_cpu = list(self.segments) == [torch.device("cpu")] and total <= PREFETCH_ELEMENTS
        #: the keys :meth:`prefetch` draws at once (0: each key is drawn when used)
        self.draws_ahead = PREFETCH_KEYS if small_cpu else 0
        self._ahead: dict[int, torch.Tensor] = {}  # the coming keys' flat values, split when used
        self._weyl: np.ndarray | None = None

    def matrix_shape(self, j: int) -> tuple[int, int]:
        p = self.params[j]
        return (p.shape[0], p.numel() // p.shape[0]) if p.dim() else (1, 1)

    def draw(self, key: int) -> dict[int, object]:
        """The compact direction ``key``: ``{j: (A, B)}`` for low-rank matrices, ``{j: z}`` for the
        tensors drawn whole, float32 on each tensor's device (drawn ahead, or now)."""
        out: dict[int, object] = {}
        ahead = self._ahead.pop(key, None)
        if ahead is not None:
            self._split(torch.device("cpu"), ahead, out)
            return out
        for device, segs in self.segments.items():
            if device.type == "cpu":
                flat = self._draw_flat(np.array([key], dtype=np.uint64))[0]
            else:
                idx, seg, _ = self.streams[device]
                words = [self.noise.words(mix(key, j)) for j, _ in segs]
                k0 = torch.tensor([w[0] for w in words], dtype=torch.int64, device=device)[seg]
                k1 = torch.tensor([w[1] for w in words], dtype=torch.int64, device=device)[seg]
                flat = values_from_bits(counter_bits(idx, k0, k1), self.distribution, normal_table(device))
            self._split(device, flat, out)
        return out

    def _split(self, device: torch.device, flat: torch.Tensor, out: dict[int, object]) -> None:
        """Views of one device's flat values (the last dimension; leading ones, one per key, are
        kept), per tensor: ``(A, B)`` of a low-rank matrix, else ``z``."""
        lead, starts = flat.shape[:-1], self.streams[device][2]
        for i, (j, length) in enumerate(self.segments[device]):
            z = flat[..., starts[i] : starts[i] + length]
            if j in self.lowrank:
                m, n = self.matrix_shape(j)
                out[j] = (z[..., : m * self.rank].view(*lead, m, self.rank),
                          z[..., m * self.rank :].view(*lead, n, self.rank))
            else:
                out[j] = z.view(*lead, *self.params[j].shape)

    def prefetch(self, keys: np.ndarray) -> None:
        """Draw the compact directions of ``keys`` (uint64, the coming steps') in one vectorised pass
        over a (keys x values) array (see ``Engine.draws_ahead``). Replaces the keys drawn ahead before."""
        keys = np.asarray(keys, dtype=np.uint64).ravel()[: self.draws_ahead]
        self._ahead = dict(zip(keys.tolist(), self._draw_flat(keys)))

    def draw_stacked(self, keys: list[int]) -> dict[int, object]:
        """The compact directions of ``keys`` stacked on a new first dimension (one per key): ``{j:
        (A, B)}`` with A (n, m, r) and B (n, cols, r), ``{j: z}`` with z (n, *shape); the same values
        as :meth:`draw` of each key. On the CPU they are drawn in one pass over a (keys x values)
        array and returned as views of it (a per-example query's directions, one key per example)."""
        if list(self.segments) != [torch.device("cpu")]:
            rows = [self.draw(key) for key in keys]
            return {j: (torch.stack([r[j][0] for r in rows]), torch.stack([r[j][1] for r in rows]))
                    if isinstance(first, tuple) else torch.stack([r[j] for r in rows]) for j, first in rows[0].items()}
        out: dict[int, object] = {}
        self._split(torch.device("cpu"), self._draw_flat(np.asarray(keys, dtype=np.uint64)), out)
        return out

    def _draw_flat(self, keys: np.ndarray) -> torch.Tensor:
        """The CPU values of ``keys`` (uint64), one row per key, in uint32 arithmetic."""
        segs = self.segments[torch.device("cpu")]
        idx, seg, _ = self.streams[torch.device("cpu")]
        if self._weyl is None:  # the key-independent part of each index's word (see counter_bits_u32)
            self._weyl = weyl_words(idx)
        stream = mix_array(keys[:, None], np.array([j for j, _ in segs], dtype=np.uint64)[None, :])
        k0 = (stream & np.uint64(0xFFFFFFFF)).astype(np.uint32)[:, seg]
        k1 = (stream >> np.uint64(32)).astype(np.uint32)[:, seg]
        bits = counter_bits_u32(self._weyl, k0, k1, np.empty(k0.shape, dtype=np.uint32))
        return values_from_bits_numpy(bits, self.distribution)

    def drawn_ahead(self) -> list[int]:
        """The keys drawn ahead and not used yet."""
        return list(self._ahead)
