"""Seeded noise: the values of a random direction, regenerated on demand from an integer key.

A direction is never stored. Its values for one chunk of one parameter are a pure function of
``(seed, step, direction index, parameter index, chunk index)`` and, for distributed runs, a rank
word: those words are mixed into a 64-bit key (:func:`mix`, SplitMix64), the key seeds a private
``torch.Generator`` and the chunk is drawn from it. The global RNG (``torch.manual_seed``,
``torch.get_rng_state``) is never touched, so the user's dropout and data shuffling see exactly
the random numbers they would see without zoptim.

Distributions (every one has mean 0 and variance 1 per coordinate, so ``E||s||^2 = d``):

* ``"normal"``: s_i ~ N(0, 1), the Gaussian smoothing of GA / MeZO / SPSA.
* ``"rademacher"``: s_i = +-1 with probability 1/2 each, the distribution of Algorithms 1 and 2 of
  the S2P paper (its ``_sign`` variants).
* ``"uniform"``: s_i ~ U(-sqrt(3), sqrt(3)), unit variance.

Speed (``sampler="fast"``, the default). On a CPU, drawing the noise is what a zeroth-order step
spends its time on (an in-place add over the same values is far cheaper; ``docs/performance.md``
has the measurements and the commands). Random *bits* are cheaper per value than floats, so the
fast sampler spends as few bits per value as the distribution needs:

* normal: 16 random bits per value index a table of the 2**16 quantiles
  ``Phi^-1((k + 1/2) / 2**16)`` of N(0, 1), rescaled to variance exactly 1. This is inverse
  transform sampling of N(0, 1) discretised to 65,536 equiprobable values: symmetric, mean 0,
  variance 1, kurtosis 2.9995 instead of 3, largest value 4.32 (N(0, 1) exceeds it with
  probability 1.5e-5 per coordinate).
* rademacher: the sign bit of one random byte per value.
* uniform: ``torch.rand``, as before.

``sampler="torch"`` keeps the plain ``torch.randn`` / ``torch.rand`` draws, for comparison
(``benchmarks/noise_quality.py`` shows both give the same convergence per query). Both samplers
use the same keys, so they are equally reproducible; their streams differ. The streams also
differ between device types (a CUDA generator is not a CPU one), as with any torch generator.
"""

from __future__ import annotations

import math

import torch

DISTRIBUTIONS = ("normal", "rademacher", "uniform")

#: Elements per chunk. Part of the definition of the noise stream: a chunk is the unit that one
#: key seeds, so changing it changes every direction. It also bounds the scratch memory.
CHUNK_SIZE = 1 << 18

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


def check_distribution(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"distribution must be one of {', '.join(map(repr, DISTRIBUTIONS))}; got {distribution!r}"
        )
    return distribution


SAMPLERS = ("fast", "torch")

_TABLE_BITS = 16


def _normal_table() -> torch.Tensor:
    """The 2**16 equiprobable quantiles of N(0, 1), rescaled to unit variance (float64, CPU)."""
    k = torch.arange(1 << _TABLE_BITS, dtype=torch.float64)
    q = torch.special.ndtri((k + 0.5) / (1 << _TABLE_BITS))
    q = (q - q.flip(0)) / 2  # exactly antisymmetric, so the mean is exactly 0
    return q / q.square().mean().sqrt()


class NoiseSource:
    """Fills float32 buffers with seeded noise of one distribution, one generator per device.

    Args:
        distribution: ``"normal"``, ``"rademacher"`` or ``"uniform"``.
        sampler: ``"fast"`` (default; see the module docstring) or ``"torch"``.
        rank: a stream word for distributed runs: ranks with different ``rank`` draw independent
            noise from the same key; rank 0 is the single-process stream.

    Scratch: at most ``2.5 * n`` bytes for a buffer of n values (the random bits and the table
    indices), kept per device and reused.
    """

    def __init__(self, distribution: str = "normal", sampler: str = "fast", rank: int = 0):
        self.distribution = check_distribution(distribution)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}; got {sampler!r}")
        self.sampler = sampler
        self.rank = int(rank)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        return g

    def _buffer(self, device: torch.device, dtype: torch.dtype, n: int) -> torch.Tensor:
        buf = self._scratch.get((device, dtype))
        if buf is None or buf.numel() < n:
            buf = self._scratch[(device, dtype)] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n]

    def _table(self, device: torch.device) -> torch.Tensor:
        t = self._tables.get(device)
        if t is None:
            t = self._tables[device] = _normal_table().to(device=device, dtype=torch.float32)
        return t

    def _random_bytes(self, g: torch.Generator, device: torch.device, nbytes: int) -> torch.Tensor:
        # Full-range int64 draws: every one of the 64 bits is a fair coin (random_() would leave
        # the top bit 0).
        words = self._buffer(device, torch.int64, (nbytes + 7) // 8)
        torch.randint(-(1 << 63), (1 << 63) - 1, words.shape, generator=g, dtype=torch.int64, out=words)
        return words.view(torch.int8)[:nbytes]

    def fill(self, out: torch.Tensor, key: int) -> torch.Tensor:
        """Overwrite the float32 tensor ``out`` with the noise that ``key`` names, and return it."""
        device = out.device
        g = self._generator(device)
        g.manual_seed((key if self.rank == 0 else mix(key, self.rank)) & _MASK)
        flat = out.view(-1)
        n = flat.numel()
        if self.distribution == "uniform":
            torch.rand(out.shape, generator=g, out=out)
            out.mul_(2.0 * _SQRT3).sub_(_SQRT3)
        elif self.sampler == "torch":
            if self.distribution == "normal":
                torch.randn(out.shape, generator=g, out=out)
            else:
                # u >= 1/2 with u ~ U[0, 1) is a fair coin; map {0, 1} -> {-1, +1}.
                torch.rand(out.shape, generator=g, out=out)
                out.ge_(0.5).mul_(2.0).sub_(1.0)
        elif self.distribution == "normal":
            # Inverse transform sampling: 16 uniform bits index the quantile table.
            bits = self._random_bytes(g, device, 2 * n).view(torch.int16)
            index = self._buffer(device, torch.int32, n)
            index.copy_(bits).add_(1 << 15)  # int16 in [-2**15, 2**15) -> table index in [0, 2**16)
            torch.index_select(self._table(device), 0, index, out=flat)
        else:
            # The sign bit of a random byte: (b >> 7) is -1 or 0, | 1 makes it -1 or +1.
            signs = self._random_bytes(g, device, n)
            signs.bitwise_right_shift_(7).bitwise_or_(1)
            flat.copy_(signs)
        return out
