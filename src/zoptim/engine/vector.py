"""The vector engine: the perturbation engine for a function of one NumPy vector.

The softmax paper's object is zeroth-order SGD on a function of a vector: the SPSA estimate
``(f(x + eps s) - f(x - eps s)) / (2 eps) * s`` (its Definition 2.21; k-SPSA, Remark 2.22) on
softmax regression; the S2P paper's methods (S2P, AS2P, Algorithms 1-2) are the same kind of
step, with other step sizes. Each such step is a few moves of x along a seeded direction s.

:func:`zoptim.minimize` and ``zoptim.AskTell(method, x0)`` optimise a function of a flat float64
vector, often of ten or a thousand numbers. The in-place engine (:mod:`zoptim.engine.inplace`) is
built for tensors of millions of elements: per move it walks the tensors chunk by chunk, backs
each chunk up, calls a fused kernel of about ten torch operations and keeps a journal, a fixed
cost of hundreds of microseconds that dwarfs the arithmetic on ten numbers.
:class:`VectorPerturbation` has the same interface (``move``, ``restore``, ``update``,
``is_perturbed``, ``direction_bound``, ``direction_norm``, ``direction_chunks``, ``weights``,
``params``, ``exact``) over the NumPy view of a single flat float64 CPU tensor, so the methods'
one implementation of their step (each optimizer's ``_queries`` generator) drives it unchanged.

Same values as the in-place engine, bit for bit (``tests/test_vector.py``, every registered
method). A direction's values are those of the counter-based stream of :mod:`zoptim.engine.noise`
(:func:`~zoptim.engine.noise.counter_bits` over all the indices at once, then
:func:`~zoptim.engine.noise.values_from_bits_numpy`), drawn in one vectorised NumPy call and kept for
the last few keys (a two-point step's two queries and its update share one draw). The arithmetic
is the in-place engine's: the offset is ``delta = fl32(fl32(s * w) * scale)`` (``scale`` rounded to
float32 first), added to the float64 iterate with one correctly rounded float64 addition; weight
decay multiplies by ``fl32(1 - decay)``; an update's terms are added one after the other.

Exact restore without a journal: the vector is small, so the engine keeps a copy of the
unperturbed iterate while an offset is applied and a restore writes it back (bit for bit, by
construction). The in-place engine's journal gives the same unperturbed point, so the query
points and iterates agree. With ``exact=False`` the undo is the arithmetic one, ``fl(x - delta)``,
as in the in-place engine (and MeZO).

Atomic moves: each move computes its result into a scratch array and commits it with one NumPy
copy (one C call, which no Python signal handler interrupts) followed by the engine's state, so an
exception (``KeyboardInterrupt`` included) leaves the vector either before or after the move; an
update interrupted before its commit is completed before the exception propagates, as in the
in-place engine (:mod:`zoptim.engine.atomic`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from .atomic import recover
from .noise import (
    _M32,
    CHUNK_SIZE,
    EAGER_CHUNK_SIZE,
    NoiseSource,
    check_distribution,
    counter_bits_u32,
    mix,
    mix_array,
    normal_table,
    values_from_bits_numpy,
    weyl_words,
)
from .protocol import ElementWiseEngine, Scales, Weights, spread_scales

#: Elements of cached directions the engine keeps at most (float32: 16 MiB); at least two keys.
CACHE_ELEMENTS = 1 << 22
#: :meth:`VectorPerturbation.prefetch`: at most this many keys per call, for vectors of at most
#: PREFETCH_DIM elements
PREFETCH_KEYS, PREFETCH_DIM = 256, 1 << 14

_S16 = np.uint32(16)


class VectorPerturbation(ElementWiseEngine):
    """Moves one flat float64 CPU tensor along seeded random directions, through its NumPy view.

    Args:
        x: the vector (a 1-D, contiguous float64 CPU tensor, e.g. ``torch.from_numpy(array)``
            wrapped in a Parameter). Modified in place.
        distribution, normalize, exact: as for :class:`zoptim.engine.inplace.SeededPerturbation`.
        chunk_size: the chunks over which :meth:`direction_norm` sums (the in-place engine's, so
            that a normalised direction has the same factor) and :meth:`direction_chunks` yields.

    The directions are those of a ``SeededPerturbation([x])`` with the same settings: element i
    of direction ``key`` is element i of the stream ``mix(key, 0)``.
    """

    def __init__(
        self,
        x: torch.Tensor,
        *,
        distribution: str = "normal",
        normalize: bool = False,
        exact: bool = True,
        chunk_size: int | None = None,
    ):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float64 or x.dim() != 1 or x.device.type != "cpu":
            raise TypeError("VectorPerturbation needs a 1-D float64 CPU tensor (the vector being optimised)")
        if not x.is_contiguous():
            raise ValueError("VectorPerturbation needs a contiguous tensor")
        self.params = [x]
        self.indices, self.offsets = [0], [0]
        self._x = x.detach().numpy()  # shares x's memory
        self.noise = NoiseSource(check_distribution(distribution))
        self.distribution = distribution
        self.normalize = bool(normalize)
        self.exact = bool(exact)
        if chunk_size is None:
            from . import kernels

            chunk_size = CHUNK_SIZE if kernels.compile_allowed(x.device) else EAGER_CHUNK_SIZE
        self.chunk_size = int(chunk_size)
        self.dim = int(x.numel())
        # the key-independent part of the stream's Weyl sequence, (i_lo * WEYL + i_hi * HI) mod 2**32
        idx = np.arange(self.dim, dtype=np.int64)
        self._weyl = weyl_words(idx)
        self._work = np.empty(self.dim, dtype=np.uint32)
        self._tmp = np.empty(self.dim, dtype=np.uint32)
        self._table = normal_table(torch.device("cpu")).numpy() if distribution == "normal" else None
        self._key: int | None = None
        self._scale = 0.0  # the unrounded scale of the offset applied (after the normalisation factor)
        self._delta: np.ndarray | None = None  # the float32 offset applied
        self._base: np.ndarray | None = None  # the unperturbed iterate while an offset is applied (exact)
        self._saved = np.empty(self.dim, dtype=np.float64)  # the buffer _base points to
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = max(2, CACHE_ELEMENTS // max(1, self.dim))
        self._norm_cache: tuple[int, float] | None = None
        self._weights: Weights | None = None

    # -- state ------------------------------------------------------------------------------------

    def journal_elements(self) -> int:
        """0: the vector engine keeps a copy of the iterate instead of a journal."""
        return 0

    def journal_bytes(self) -> int:
        """Bytes held to restore exactly: the copy of the iterate while an offset is applied."""
        return 0 if self._base is None else int(self._base.nbytes)

    # -- noise ------------------------------------------------------------------------------------
    def tensor_key(self, key: int, j: int = 0) -> int:
        return mix(key, self.indices[j])

    def direction(self, key: int) -> np.ndarray:
        """The float32 values of direction ``key`` (one vectorised draw; cached, do not modify)."""
        z = self._cache.get(key)
        if z is not None:
            self._cache.move_to_end(key)
            return z
        z = self._values(self._bits(key))
        self._cache[key] = z
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return z

    def _bits(self, key: int) -> np.ndarray:
        """:func:`zoptim.engine.noise.counter_bits` of every index for the stream of ``key``, in one
        scratch array (see :func:`~zoptim.engine.noise.counter_bits_u32`)."""
        k0, k1 = self.noise.words(mix(key, 0))
        return counter_bits_u32(self._weyl, np.uint32(k0), np.uint32(k1), self._work, self._tmp)

    #: the most keys :meth:`prefetch` draws in one call (0 for a long vector, whose draws cost
    #: their arithmetic, not the calls' fixed cost)
    @property
    def draws_ahead(self) -> int:
        return 0 if self.dim > PREFETCH_DIM else min(PREFETCH_KEYS, self._cache_size // 2)

    def prefetch(self, keys: np.ndarray) -> None:
        """Draw the directions of ``keys`` (a uint64 array, e.g. the next steps' keys) in one
        vectorised pass over a (keys x d) array and cache them: a short vector's draw costs the
        fixed cost of its dozen NumPy calls, which this pays once for all the keys."""
        keys = [k for k in np.asarray(keys, dtype=np.uint64).ravel().tolist()[: self.draws_ahead] if k not in self._cache]
        if not keys:
            return
        stream = mix_array(np.asarray(keys, dtype=np.uint64), 0)[:, None]
        k0 = (stream & np.uint64(_M32)).astype(np.uint32)
        k1 = (stream >> np.uint64(32)).astype(np.uint32)
        bits = counter_bits_u32(self._weyl, k0, k1, np.empty((len(keys), self.dim), np.uint32))
        rows = self._values(bits)
        for key, z in zip(keys, rows):
            self._cache[key] = z
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _values(self, bits: np.ndarray) -> np.ndarray:
        """The float32 values of the distribution for 32-bit words (``bits`` is overwritten)."""
        if self.distribution == "normal":  # values_from_bits: the table at the top 16 bits
            return np.take(self._table, np.right_shift(bits, _S16, out=bits))
        return values_from_bits_numpy(bits.astype(np.int64), self.distribution).numpy()

    def direction_chunks(self, key: int):
        """Yields ``(0, a, b, s)``: the direction ``key`` in chunks, s a float32 tensor (read-only)."""
        z = torch.from_numpy(self.direction(key))
        for a in range(0, self.dim, self.chunk_size):
            b = min(a + self.chunk_size, self.dim)
            yield 0, a, b, z[a:b]

    #: the engine contract (:class:`zoptim.engine.protocol.Engine`): element-wise weights (HiZOO) are
    #: offered, per-example queries are not (a function of a vector has no examples)
    element_wise = True
    per_example = False

    def _offset(self, key: int, scale: float) -> np.ndarray:
        """``fl32(fl32(s * w) * fl32(scale))``: the float32 offset of a move (the kernels' delta)."""
        z = self.direction(key)
        if self._weights is not None:
            z = z * self._weights(0, 0, self.dim).numpy()
        return z * np.float32(scale)

    # -- moves ------------------------------------------------------------------------------------
    def _target(self, key, scales) -> tuple[int | None, float]:
        """The move's one scale (the vector is one tensor), or ``(None, 0.0)``."""
        if key is None:
            return None, 0.0
        scale = scales if type(scales) is float else spread_scales(scales, 1)[0]
        if self.normalize:
            scale *= self.direction_scale(key)
        if scale == 0.0:
            return None, 0.0
        return key, scale

    def _unperturbed(self) -> np.ndarray:
        """The iterate without the current offset: the saved copy (exact) or ``fl(x - delta)``."""
        if self._key is None:
            return self._x
        if self.exact:
            return self._base
        return self._x - self._delta

    def _move_to(self, target: int | None, scale: float) -> None:
        """Go to ``x + scale * s(target)`` (a query point) from whatever offset is applied (see
        :meth:`ElementWiseEngine.move`)."""
        if target == self._key and scale == self._scale:
            return
        x0 = self._unperturbed()
        if target is None:
            np.copyto(self._x, x0)
            self._key, self._scale, self._delta, self._base = None, 0.0, None, None
            return
        delta = self._offset(target, scale)
        if self.exact and self._base is None:
            np.copyto(self._saved, self._x)
            x0 = self._base = self._saved
        np.add(x0, delta, out=self._x)  # the commit: one C call (x0 is the saved copy or a fresh array)
        self._key, self._scale, self._delta = target, scale, delta

    def update(self, terms: Sequence[tuple[int, float | Scales]], decay: Scales | None = None) -> None:
        """Finish a step: ``x <- x * fl32(1 - decay) + sum_i fl32(scale_i * s(key_i))``, terms in order
        (each a float64 addition, as the in-place engine's passes)."""
        moves = [self._target(key, scales) for key, scales in terms]
        keep = 1.0 if decay is None else float(np.float32(1.0 - float(spread_scales(decay, 1)[0])))

        def run():
            x = self._unperturbed()
            if keep != 1.0:
                x = x * keep
            for target, scale in moves:
                if target is not None:
                    x = x + self._offset(target, scale)
            if x is not self._x:
                np.copyto(self._x, x)  # the commit
            self._key, self._scale, self._delta, self._base = None, 0.0, None, None

        try:
            run()
        except BaseException as err:
            if self._key is not None:  # not committed: finish the update before the exception propagates
                recover(run, err, "completing the update")
            raise


def attach(optimizer) -> VectorPerturbation:
    """Give ``optimizer`` (built over one 1-D float64 CPU tensor, directions in place) the vector
    engine in place of its in-place one, with the same settings (and HiZOO's weights); same values."""
    old = optimizer.engine
    if type(old) is VectorPerturbation:
        return old
    if old.is_perturbed:
        raise RuntimeError("attach the vector engine on the unperturbed point")
    engine = VectorPerturbation(old.params[0], distribution=old.distribution, normalize=old.normalize,
                                exact=old.exact, chunk_size=old.chunk_size)
    engine.weights = old.weights
    optimizer.engine = engine
    return engine
