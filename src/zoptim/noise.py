"""Seeded noise: the values of a random direction, regenerated on demand from an integer key.

A direction is never stored. Its values for one chunk of one parameter are a pure function of
``(seed, step, direction index, parameter index, chunk index)``: those words are mixed into a
64-bit key (:func:`mix`, SplitMix64), the key seeds a private ``torch.Generator`` and the chunk is
drawn from it. The global RNG (``torch.manual_seed``, ``torch.get_rng_state``) is never touched,
so the user's dropout and data shuffling see exactly the random numbers they would see without
zoptim.

Distributions (every one has mean 0 and variance 1 per coordinate, so ``E||s||^2 = d``):

* ``"normal"``: s_i ~ N(0, 1), the Gaussian smoothing of GA / MeZO / SPSA.
* ``"rademacher"``: s_i = +-1 with probability 1/2 each, the distribution of Algorithms 1 and 2 of
  the S2P paper (its ``_sign`` variants).
* ``"uniform"``: s_i ~ U(-sqrt(3), sqrt(3)), unit variance.
"""

from __future__ import annotations

import math

import torch

DISTRIBUTIONS = ("normal", "rademacher", "uniform")

#: Elements per chunk. Part of the definition of the noise stream: a chunk is the unit that one
#: key seeds, so changing it changes every direction. It also bounds the scratch memory.
CHUNK_SIZE = 1 << 20

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


class NoiseSource:
    """Fills float32 buffers with seeded noise of one distribution, one generator per device."""

    def __init__(self, distribution: str = "normal"):
        self.distribution = check_distribution(distribution)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
        return g

    def fill(self, out: torch.Tensor, key: int) -> torch.Tensor:
        """Overwrite the float32 tensor ``out`` with the noise that ``key`` names, and return it."""
        g = self._generator(out.device)
        g.manual_seed(key & _MASK)
        if self.distribution == "normal":
            torch.randn(out.shape, generator=g, out=out)
        elif self.distribution == "rademacher":
            # u >= 1/2 with u ~ U[0, 1) is a fair coin; map {0, 1} -> {-1, +1}.
            torch.rand(out.shape, generator=g, out=out)
            out.ge_(0.5).mul_(2.0).sub_(1.0)
        else:
            torch.rand(out.shape, generator=g, out=out)
            out.mul_(2.0 * _SQRT3).sub_(_SQRT3)
        return out
