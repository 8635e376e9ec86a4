"""Seeded noise: the values of a random direction, a pure function of a key and an element index.

A direction is never stored. Element i of the direction named by a 64-bit key is
``values_from_bits(counter_bits(i, key), distribution)``: a counter-based generator, so any element
can be computed on its own, in any order, on any core or device, compiled or not (the idea of
Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011). Chunk size, thread count,
device, sharding and the compiled/eager route do not change a direction (tested). Keys come from
:func:`mix` over ``(seed, step, direction index, parameter index)``. The global RNG (``torch.manual_seed``, ``torch.get_rng_state``) is never touched.

The generator (:func:`counter_bits`), 32 bits per element:

1. a Weyl sequence over the index, ``w = (i_lo * 0x61C88647 + k_lo + i_hi * 0x2545F491) mod 2**32``
   (``0x61C88647`` is the odd 32-bit golden-ratio increment, 2**32 / phi rounded to odd, negated);
2. ``w ^ k_hi``;
3. Wellons' ``lowbias32`` finaliser (``x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15;
   x *= 0x735A2D97; x ^= x >> 15``, from C. Wellons' "Hash Prospector" search for low-bias 32-bit
   integer hashes, 2018-2020), a bijection of 32-bit words with full avalanche.

This is the construction of SplitMix (Steele, Lea & Flood, OOPSLA 2014): a finaliser over a Weyl
sequence, here at 32 bits. Every product is of a value below 2**32 and a constant below 2**31, so
it fits a signed 64-bit integer without overflow: eager PyTorch, inductor's C++ and Triton kernels
compute the same bits (no wrap-around, no undefined behaviour).

Why streams of different keys do not overlap: for a fixed key the map i -> w is a bijection of
2**32 indices (an odd multiplier), and the finaliser is a bijection, so within one stream no two
of the first 2**32 elements share a 32-bit word by construction. Two keys share the finaliser's
input sequence, shifted, only if their high words are equal (probability 2**-32 for keys from
:func:`mix`) *and* their low words differ by a multiple of the Weyl increment that lies within the
parameter's length (probability n / 2**32 for n elements); the chance of any overlap for a tensor
of n elements is therefore about n / 2**64, as for SplitMix64's streams.

Distributions (every one has mean 0 and variance 1 per coordinate, so ``E||s||^2 = d``):

* ``"normal"``: the top 16 bits index a table of the 2**16 quantiles
  ``Phi^-1((k + 1/2) / 2**16)`` of N(0, 1), rescaled to variance exactly 1. This is inverse
  transform sampling of N(0, 1) discretised to 65,536 equiprobable values: symmetric, mean 0,
  variance 1, kurtosis 2.9995 instead of 3, largest value 4.32 (N(0, 1) exceeds it with
  probability 1.5e-5 per coordinate). The GA / MeZO / SPSA direction.
* ``"rademacher"``: the top bit gives -1 or +1, the distribution of Algorithms 1 and 2 of the S2P
  paper (its ``_sign`` variants).
* ``"uniform"``: the top 24 bits give U(-sqrt(3), sqrt(3)) on a 2**-24 grid (unit variance up to
  2**-48).

``sampler="torch"`` draws from a ``torch.Generator`` seeded with the key instead (``torch.randn``,
``torch.rand``), only to compare convergence per query against the standard generator
(``benchmarks/noise_quality.py``); it is not counter-based (its values depend on the start index
of each fill), so the engine never uses it.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

DISTRIBUTIONS = ("normal", "rademacher", "uniform")

#: Version of the noise stream. Optimizer state_dicts record it; loading one saved with another
#: version raises, because its directions would differ (a resumed run would silently diverge).
NOISE_VERSION = 2

#: Elements per chunk of a move: bounds the engine's scratch memory (``CHUNK_SIZE * (2 * itemsize + 4)``
#: bytes, 12 MiB in float32) and sets the number of kernel calls. Not part of the stream.
CHUNK_SIZE = 1 << 20
#: Chunk of the eager route, whose integer temporaries cost 8 bytes an element.
EAGER_CHUNK_SIZE = 1 << 16

_MASK = (1 << 64) - 1
_SQRT3 = math.sqrt(3.0)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix(*words: int) -> int:
    """Hash a sequence of integers into one 64-bit key (SplitMix64 chained over the words).

    Distinct tuples give keys that are, for practical purposes, independent seeds.
    """
    h = 0x6A09E667F3BCC909
    for w in words:
        h = _splitmix64(h ^ (int(w) & _MASK))
    return h


_SPLITMIX = tuple(np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 30, 27, 31))


def mix_array(*words) -> np.ndarray:
    """:func:`mix` of many word sequences at once: each word an int or a NumPy array of them
    (broadcast together), computed in uint64 arithmetic, whose wrapping products are the
    ``& _MASK`` of :func:`_splitmix64`; the same keys, as a uint64 array."""
    add, mul1, mul2, s30, s27, s31 = _SPLITMIX
    h = np.uint64(0x6A09E667F3BCC909)
    with np.errstate(over="ignore"):  # the wrap-around is the arithmetic modulo 2**64
        for w in words:
            w = np.uint64(int(w) & _MASK) if isinstance(w, int) else np.asarray(w, dtype=np.uint64)
            x = (h ^ w) + add
            x = (x ^ (x >> s30)) * mul1
            x = (x ^ (x >> s27)) * mul2
            h = x ^ (x >> s31)
    return np.asarray(h)


def check_distribution(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"distribution must be one of {', '.join(map(repr, DISTRIBUTIONS))}; got {distribution!r}"
        )
    return distribution


SAMPLERS = ("counter", "torch")

_TABLE_BITS = 16
_M32 = 0xFFFFFFFF
_WEYL = 0x61C88647
_HI = 0x2545F491
_C1, _C2 = 0x21F0AAAD, 0x735A2D97


def _normal_table() -> torch.Tensor:
    """The 2**16 equiprobable quantiles of N(0, 1), rescaled to unit variance (float64, CPU)."""
    k = torch.arange(1 << _TABLE_BITS, dtype=torch.float64)
    q = torch.special.ndtri((k + 0.5) / (1 << _TABLE_BITS))
    q = (q - q.flip(0)) / 2  # exactly antisymmetric, so the mean is exactly 0
    return q / q.square().mean().sqrt()


@functools.cache
def max_abs_value(distribution: str) -> float:
    """The largest |s_i| a direction of ``distribution`` can hold (what bounds an update's write)."""
    check_distribution(distribution)
    if distribution == "rademacher":
        return 1.0
    if distribution == "uniform":
        return math.sqrt(3.0)
    return float(_normal_table().abs().max())


_TABLES: dict[torch.device, torch.Tensor] = {}


def normal_table(device: torch.device) -> torch.Tensor:
    """The float32 quantile table on ``device`` (cached)."""
    t = _TABLES.get(device)
    if t is None:
        t = _TABLES[device] = _normal_table().to(device=device, dtype=torch.float32)
    return t


def key_words(key: int) -> tuple[int, int]:
    """The (low, high) 32-bit words of a 64-bit key."""
    key = key & _MASK
    return key & _M32, key >> 32


def counter_bits(idx, k0, k1):
    """32 random bits (in int64) for each element index ``idx`` of the stream (k0, k1).

    ``idx`` is an int64 torch tensor or NumPy array (the same operators, the same values);
    ``k0``, ``k1`` are the key's words (ints or 0-d int64 tensors). No intermediate exceeds 2**63.
    """
    x = ((idx & _M32) * _WEYL & _M32) + k0 + ((idx >> 32) * _HI & _M32)
    x = (x & _M32) ^ k1
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 15)


_S15, _S16, _U1, _U2 = np.uint32(15), np.uint32(16), np.uint32(_C1), np.uint32(_C2)


def counter_bits_u32(weyl: np.ndarray, k0, k1, out: np.ndarray, tmp: np.ndarray | None = None) -> np.ndarray:
    """:func:`zoptim.engine.noise.counter_bits` computed in uint32 arithmetic (every step of the
    formula is modulo 2**32, so wrapping products give the same words), in place in ``out``:
    ``weyl`` is the key-independent part of each index's word, ``k0``, ``k1`` the key's words
    (uint32 scalars, or columns of one key per row of ``out``)."""
    tmp = np.empty_like(out) if tmp is None else tmp
    x, rs, xor, mul = out, np.right_shift, np.bitwise_xor, np.multiply
    np.add(weyl, k0, out=x)
    xor(x, k1, out=x)
    xor(x, rs(x, _S16, out=tmp), out=x)
    mul(x, _U1, out=x)
    xor(x, rs(x, _S15, out=tmp), out=x)
    mul(x, _U2, out=x)
    xor(x, rs(x, _S15, out=tmp), out=x)
    return x


def weyl_words(idx: np.ndarray) -> np.ndarray:
    """The key-independent part of :func:`counter_bits`' first word for int64 indices ``idx``,
    ``(i_lo * WEYL + i_hi * HI) mod 2**32``, as uint32 (what :func:`counter_bits_u32` adds the key to)."""
    return (((idx & _M32) * _WEYL + ((idx >> 32) * _HI & _M32)) & _M32).astype(np.uint32)


def values_from_bits(bits: torch.Tensor, distribution: str, table: torch.Tensor | None = None) -> torch.Tensor:
    """Map 32-bit words to float32 values of ``distribution`` (see the module docstring)."""
    if distribution == "normal":
        if table is None:
            table = normal_table(bits.device)
        return table[bits >> 16]
    if distribution == "rademacher":
        return 1.0 - 2.0 * (bits >> 31).to(torch.float32)
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # exact: 24-bit integers
    return (u * 2.0 - 1.0) * _SQRT3


_NUMPY_TABLE: np.ndarray | None = None


def values_from_bits_numpy(bits: np.ndarray, distribution: str) -> torch.Tensor:
    """:func:`values_from_bits` for NumPy words on the CPU, with NumPy's lower per-call overhead
    (small directions drawn every step); the same float32 values (tested)."""
    global _NUMPY_TABLE
    if distribution == "normal":
        if _NUMPY_TABLE is None:
            _NUMPY_TABLE = normal_table(torch.device("cpu")).numpy()
        return torch.from_numpy(_NUMPY_TABLE[bits >> 16])
    if bits.dtype != np.int64:  # unsigned words: the arithmetic below needs signed room
        bits = bits.astype(np.int64)
    if distribution == "rademacher":
        return torch.from_numpy((1 - 2 * (bits >> 31)).astype(np.float32))
    return values_from_bits(torch.from_numpy(bits), distribution)


class NoiseSource:
    """Writes the values of seeded directions into float32 tensors.

    Args:
        distribution: ``"normal"``, ``"rademacher"`` or ``"uniform"``.
        sampler: ``"counter"`` (default; the stream the engine uses) or ``"torch"`` (comparison only).
    """

    def __init__(self, distribution: str = "normal", sampler: str = "counter"):
        self.distribution = check_distribution(distribution)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}; got {sampler!r}")
        self.sampler = sampler
        self._generators: dict[torch.device, torch.Generator] = {}

    def words(self, key: int) -> tuple[int, int]:
        return key_words(key)

    def fill(self, out: torch.Tensor, key: int, start: int = 0) -> torch.Tensor:
        """Overwrite the float32 tensor ``out`` with elements ``start, start + 1, ...`` of the
        direction that ``key`` names, and return it."""
        device, n = out.device, out.numel()
        if self.sampler == "torch":
            g = self._generators.get(device) or self._generators.setdefault(device, torch.Generator(device=device))
            g.manual_seed(mix(*self.words(key), start))
            if self.distribution == "normal":
                return torch.randn(out.shape, generator=g, out=out)
            torch.rand(out.shape, generator=g, out=out)
            if self.distribution == "rademacher":
                return out.ge_(0.5).mul_(2.0).sub_(1.0)
            return out.mul_(2.0 * _SQRT3).sub_(_SQRT3)
        k0, k1 = self.words(key)
        if device.type == "cpu":  # the same formula through NumPy: far less overhead per operation
            bits = torch.from_numpy(counter_bits(np.arange(start, start + n, dtype=np.int64), k0, k1))
        else:
            bits = counter_bits(torch.arange(start, start + n, device=device, dtype=torch.int64), k0, k1)
        out.view(-1).copy_(values_from_bits(bits, self.distribution, normal_table(device)))
        return out
