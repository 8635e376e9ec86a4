"""The small-model engine: the in-place engine's moves for parameters of a few hundred thousand
numbers, with the step's direction held instead of regenerated.

A zeroth-order step on a small network (the softmax paper's softmax regression, a 784-64-10 MLP)
is a few moves of some 50,000 numbers. The in-place engine (:mod:`zoptim.engine.inplace`) is built
for billions: per move it walks the tensors chunk by chunk, backs each chunk up, calls a compiled
kernel through its guards, keeps a journal, and regenerates the direction from its key, a fixed cost
of about 0.6 ms a move that is several times the model's own forward. :class:`SmallPerturbation`
keeps instead what a small model can afford: the direction's float32 values for the step (drawn
once, for its two queries and its update) and, while an offset is applied, a copy of the
unperturbed parameters (the exact restore, without a journal). Each move is then three foreach
calls over the tensors.

Same values as the in-place engine, bit for bit (``tests/test_small.py``, every registered method,
float32 and float64): a direction's values are those of the counter-based stream of
:mod:`zoptim.engine.noise` (element i of tensor j of direction ``key`` is element i of the stream
``mix(key, j)``); an offset is ``delta = fl32(fl32(s * w) * fl32(scale))`` added with one correctly
rounded addition in the parameter's dtype; weight decay multiplies by ``fl32(1 - decay)``; an
update's terms are added one after the other. With ``exact=False`` the undo is the arithmetic one,
``fl(x - delta)``, as in the in-place engine (and MeZO).

Atomic moves: a move computes every tensor's new values into scratch tensors and commits them with
one ``torch._foreach_copy_`` (one C++ call, which no Python signal handler interrupts), then the
engine's state; an update interrupted before its commit is completed before the exception
propagates (:mod:`zoptim.engine.atomic`).

:func:`zoptim.engine.build_engine` chooses it for in-place directions over at most
:data:`SMALL_ELEMENTS` float32 or float64 numbers that are not shards; setting that threshold to 0
routes every model through the in-place engine.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from .atomic import recover
from .noise import (
    CHUNK_SIZE,
    EAGER_CHUNK_SIZE,
    NoiseSource,
    check_distribution,
    counter_bits_u32,
    mix,
    normal_table,
    values_from_bits_numpy,
    weyl_words,
)
from .protocol import ElementWiseEngine, Scales, Weights, spread_scales

#: The most numbers (all trainable tensors together) the small-model engine takes: above it, the
#: in-place engine's fixed cost per move is a small part of the move. Measured on a ZOSGD step of a
#: Linear(1280, n) on the CPU (2 threads): 82k numbers 1.2 ms against the kernels' 2.5 ms, 256k 1.7
#: against 3.6, 423k 3.5 against 5.7, 769k 8.0 against 8.8. 0: never used.
SMALL_ELEMENTS = 1 << 19
#: The dtypes it takes (half precision goes through the in-place kernels).
SMALL_DTYPES = (torch.float32, torch.float64)
#: Directions kept (float32 numbers, 4 MiB; at least 4 directions): a step's own, and those of a
#: k-direction or momentum update; a direction dropped is drawn again when used.
CACHE_ELEMENTS = 1 << 20
_S16 = np.uint32(16)


def fits(parts) -> bool:
    """Whether the tensors of ``parts`` (:class:`~zoptim.engine.shards.LocalPart`) are small, whole
    and of a dtype the small-model engine moves."""
    total = sum(part.tensor.numel() for part in parts)
    return (0 < total <= SMALL_ELEMENTS
            and all(part.offset == 0 and part.tensor.numel() == part.global_numel for part in parts)
            and all(part.tensor.dtype in SMALL_DTYPES and part.tensor.is_contiguous() for part in parts))


class SmallPerturbation(ElementWiseEngine):
    """Moves a few small tensors along seeded random directions, in place (see the module docstring).

    Args:
        params: the tensors (float32 or float64, contiguous). Modified in place.
        distribution, normalize, exact, chunk_size: as for :class:`zoptim.engine.inplace.SeededPerturbation`
            (``chunk_size`` only sets the chunks :meth:`direction_chunks` yields and the order in
            which the direction's norm is summed, so that both engines give the same float).
    """

    element_wise = True
    per_example = False

    def __init__(self, params: Sequence[torch.Tensor], *, distribution: str = "normal", normalize: bool = False,
                 exact: bool = True, chunk_size: int | None = None):
        self.params = list(params)
        for p in self.params:
            if not isinstance(p, torch.Tensor) or p.dtype not in SMALL_DTYPES or not p.is_contiguous():
                raise TypeError("SmallPerturbation moves contiguous float32 or float64 tensors")
        self._data = [p.detach() for p in self.params]  # what the moves read and write (no autograd)
        self.indices = list(range(len(self.params)))
        self.offsets = [0] * len(self.params)
        self.distribution = check_distribution(distribution)
        self.noise = NoiseSource(self.distribution)
        self.normalize, self.exact = bool(normalize), bool(exact)
        if chunk_size is None:
            from . import kernels

            device = self.params[0].device if self.params else torch.device("cpu")
            chunk_size = CHUNK_SIZE if kernels.compile_allowed(device) else EAGER_CHUNK_SIZE
        self.chunk_size = int(chunk_size)
        self.dim = sum(p.numel() for p in self.params)
        self._cpu = all(p.device.type == "cpu" for p in self.params)
        self._weyl = [weyl_words(np.arange(p.numel(), dtype=np.int64)) for p in self.params] if self._cpu else None
        largest = max((p.numel() for p in self.params), default=0)
        self._bits, self._tmp = np.empty(largest, np.uint32), np.empty(largest, np.uint32)  # a draw's scratch
        self._idx = np.empty(largest, np.intp)
        self._flats: dict[int, np.ndarray] = {}  # each cached key's values, one flat array
        self._free: list[np.ndarray] = []  # those of dropped keys, reused by the next draw
        self._table = normal_table(torch.device("cpu")).numpy() if self.distribution == "normal" else None
        self._key: int | None = None
        self._scales: list[float] | None = None
        self._deltas: list[torch.Tensor] | None = None  # the float32 offsets applied
        self._saved = [torch.empty_like(p) for p in self._data] if self.exact else None  # the unperturbed point
        self._scratch = [torch.empty_like(p) for p in self._data]  # the inexact undo's values
        self._cache: OrderedDict[int, list[torch.Tensor]] = OrderedDict()
        self._cache_size = max(4, CACHE_ELEMENTS // max(1, self.dim))
        self._norm_cache: tuple[int, float] | None = None
        self._weights: Weights | None = None

    # -- the engine contract ----------------------------------------------------------------------
    def journal_elements(self) -> int:
        """0: the engine keeps a copy of the parameters instead of a journal."""
        return 0

    def journal_bytes(self) -> int:
        """Bytes held to restore exactly: the copy of the parameters (allocated once)."""
        return 0 if self._saved is None else sum(t.numel() * t.element_size() for t in self._saved)

    # -- noise ------------------------------------------------------------------------------------
    def tensor_key(self, key: int, j: int) -> int:
        return mix(key, j)

    def direction(self, key: int) -> list[torch.Tensor]:
        """The float32 values of direction ``key``, one tensor per parameter (cached; valid until
        the cache drops the key, whose memory the next draw reuses: do not keep or modify them)."""
        z = self._cache.get(key)
        if z is not None:
            self._cache.move_to_end(key)
            return z
        if not self._cpu:
            z = [self.noise.fill(torch.empty(p.shape, dtype=torch.float32, device=p.device), mix(key, j))
                 for j, p in enumerate(self.params)]
        else:  # one vectorised NumPy draw per tensor (the in-place engine's stream), into reused memory
            flat = self._free.pop() if self._free else np.empty(self.dim, np.float32)
            z, start = [], 0
            for j, p in enumerate(self.params):
                n = p.numel()
                k0, k1 = self.noise.words(mix(key, j))
                bits = counter_bits_u32(self._weyl[j], np.uint32(k0), np.uint32(k1), self._bits[:n], self._tmp[:n])
                if self._table is not None:  # values_from_bits: the table at the top 16 bits (intp: a faster take)
                    np.take(self._table, np.right_shift(bits, _S16, out=self._idx[:n]), out=flat[start : start + n])
                else:
                    flat[start : start + n] = values_from_bits_numpy(bits, self.distribution).numpy()
                z.append(torch.from_numpy(flat[start : start + n]).view(p.shape))
                start += n
            self._flats[key] = flat
        self._cache[key] = z
        if len(self._cache) > self._cache_size:
            dropped, _ = self._cache.popitem(last=False)
            if self._cpu:  # its memory serves the next draw (fresh pages would cost more than the draw)
                self._free.append(self._flats.pop(dropped))
        return z

    def direction_chunks(self, key: int):
        """Yields ``(j, a, b, s)``: the direction ``key`` chunk by chunk (s float32, read-only)."""
        for j, z in enumerate(self.direction(key)):
            flat = z.view(-1)
            for a in range(0, flat.numel(), self.chunk_size):
                b = min(a + self.chunk_size, flat.numel())
                yield j, a, b, flat[a:b]

    def _offsets(self, key: int, scales: list[float]) -> list[torch.Tensor]:
        """``fl32(fl32(s * w) * fl32(scale))`` per tensor: the float32 offsets of a move (the kernels' delta)."""
        z = self.direction(key)
        if self._weights is not None:
            z = [zj * self._weights(j, 0, zj.numel()).view(zj.shape) for j, zj in enumerate(z)]
        return torch._foreach_mul(z, [float(np.float32(s)) for s in scales])

    # -- moves ------------------------------------------------------------------------------------
    def _unperturbed(self) -> list[torch.Tensor]:
        """The parameters without the current offset: the saved copy (exact) or ``fl(x - delta)``."""
        if self._key is None:
            return self._data
        if self.exact:
            return self._saved
        return [torch.sub(p, d, out=s) for p, d, s in zip(self._data, self._deltas, self._scratch)]

    def _commit(self, values: list[torch.Tensor]) -> None:
        if values is not self._data:
            torch._foreach_copy_(self._data, values)  # one C++ call for every tensor

    def _move_to(self, target: int | None, new: list[float] | None) -> None:
        """Go to ``x + scales * s(target)`` (a query point) from whatever offset is applied (see
        :meth:`ElementWiseEngine.move`)."""
        if target == self._key and new == self._scales:
            return
        x0 = self._unperturbed()
        if target is None:
            self._commit(x0)
            self._key, self._scales, self._deltas = None, None, None
            return
        deltas = self._offsets(target, new)
        if self.exact and self._key is None:
            torch._foreach_copy_(self._saved, self._data)
            x0 = self._saved
        self._commit(torch._foreach_add(x0, deltas))
        self._key, self._scales, self._deltas = target, new, deltas

    def update(self, terms: Sequence[tuple[int, float | Scales]], decay: Scales | None = None) -> None:
        """Finish a step: ``x <- x * fl32(1 - decay) + sum_i fl32(scale_i * s(key_i))``, terms in order."""
        moves = [self._target(key, scales) for key, scales in terms]
        keep = None
        if decay is not None:
            keep = [float(np.float32(1.0 - float(d))) for d in spread_scales(decay, len(self.params))]
            keep = None if all(k == 1.0 for k in keep) else keep

        def run():
            x = self._unperturbed()
            if keep is not None:
                x = torch._foreach_mul(x, keep)
            for target, new in moves:
                if target is not None:
                    x = torch._foreach_add(x, self._offsets(target, new))
            self._commit(x)
            self._key, self._scales, self._deltas = None, None, None

        try:
            run()
        except BaseException as err:
            if self._key is not None:  # not committed: finish the update before the exception propagates
                recover(run, err, "completing the update")
            raise
