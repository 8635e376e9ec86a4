"""Statistical quality of the seeded noise (zoptim.engine.noise): moments, independence, reproducibility.

Every tolerance is a number of standard errors for the sample size used, so each test fails if
the property is broken and passes with overwhelming probability (here: deterministically, the
keys are fixed) when it holds.
"""

import math

import numpy as np
import pytest
import torch

from zoptim.engine.inplace import SeededPerturbation
from zoptim.engine.noise import CHUNK_SIZE, NoiseSource, _normal_table, mix

N = 1 << 20  # values per sample
SE = 1 / math.sqrt(N)  # standard error of a mean of N unit-variance values
Z = 6  # tolerance in standard errors


def draw(distribution, key, n=N, sampler="counter"):
    return NoiseSource(distribution, sampler).fill(torch.empty(n), key).double()


@pytest.mark.parametrize("distribution, kurtosis", [("normal", 3.0), ("rademacher", 1.0), ("uniform", 1.8)])
def test_moments(distribution, kurtosis):
    x = draw(distribution, mix(1, 2, 3))
    assert abs(x.mean()) < Z * SE
    # var(x^2) = kurtosis - 1, so the SE of the mean of x^2 is sqrt(kurtosis - 1) / sqrt(N)
    assert abs(x.square().mean() - 1) <= Z * math.sqrt(kurtosis - 1) * SE
    assert abs(x.pow(3).mean()) < Z * math.sqrt(15) * SE  # E x^6 = 15 for N(0, 1)
    # SE of the mean of x^4 is sqrt(E x^8 - (E x^4)^2) / sqrt(N) = sqrt(105 - 9) / sqrt(N) for N(0, 1)
    assert abs(x.pow(4).mean() - kurtosis) < Z * math.sqrt(96) * SE + 0.002


def test_normal_table_is_an_exact_unit_variance_discretisation_of_n01():
    t = _normal_table()
    assert t.numel() == 1 << 16
    assert abs(float(t.mean())) < 1e-15 and abs(float(t.square().mean()) - 1) < 1e-12
    assert abs(float(t.pow(4).mean()) - 3) < 1e-3  # kurtosis 2.9992: tails beyond 4.32 sigma cut
    # it is the quantile function: sorted, and the empirical CDF matches Phi at +-1 and +-2 sigma
    assert bool((t[1:] > t[:-1]).all())
    for q in (-2.0, -1.0, 1.0, 2.0):
        phi = 0.5 * (1 + math.erf(q / math.sqrt(2)))
        assert abs(float((t <= q).double().mean()) - phi) < 2 / (1 << 16)


def test_fast_normal_matches_the_gaussian_cdf():
    x = draw("normal", mix(9))
    for q in (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0):
        phi = 0.5 * (1 + math.erf(q / math.sqrt(2)))
        assert abs(float((x <= q).double().mean()) - phi) < Z * math.sqrt(phi * (1 - phi)) * SE + 1e-5


def _corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).mean() / (a.std() * b.std()))


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_independent_across_steps_directions_parameters_offsets_and_seeds(distribution):
    n = 1 << 18
    base = draw(distribution, mix(mix(0, 5, 0), 0), n)
    others = {
        "step": draw(distribution, mix(mix(0, 6, 0), 0), n),
        "direction": draw(distribution, mix(mix(0, 5, 1), 0), n),
        "parameter": draw(distribution, mix(mix(0, 5, 0), 1), n),
        "further along the stream": NoiseSource(distribution).fill(torch.empty(n), mix(mix(0, 5, 0), 0), start=n)
        .double(),
        "seed": draw(distribution, mix(mix(1, 5, 0), 0), n),
    }
    for name, other in others.items():
        assert abs(_corr(base, other)) < Z / math.sqrt(n), name
        if distribution == "normal":  # Rademacher squares are all 1
            assert abs(_corr(base.square(), other.square())) < Z / math.sqrt(n), name


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_neighbouring_values_are_uncorrelated(distribution):
    x = draw(distribution, mix(4))
    for lag in (1, 2, 3, 4, 7, 8, 16):
        assert abs(_corr(x[:-lag], x[lag:])) < Z * SE, lag


def test_sign_bits_and_table_indices_are_balanced():
    # every one of the 16 index bits and every sign is a fair coin
    x = draw("normal", mix(11))
    idx = torch.searchsorted(_normal_table().float(), x.float())
    for bit in range(16):
        frac = float(((idx >> bit) & 1).double().mean())
        assert abs(frac - 0.5) < Z * 0.5 * SE, bit
    r = draw("rademacher", mix(12))
    assert set(r.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("sampler", ["counter", "torch"])
@pytest.mark.parametrize("distribution", ["normal", "rademacher", "uniform"])
def test_reproducible_from_the_key_and_global_rng_untouched(distribution, sampler):
    state = torch.get_rng_state()
    a = draw(distribution, 1234, 5000, sampler)
    b = draw(distribution, 1234, 5000, sampler)
    c = draw(distribution, 1235, 5000, sampler)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.get_rng_state())


def test_unknown_sampler_is_rejected():
    with pytest.raises(ValueError, match="sampler"):
        NoiseSource("normal", "mersenne")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_engine_moves_by_the_stream_and_restores_bit_for_bit(dtype, distribution):
    # two tensors, the first spanning several chunks, weights of LM scale and some exact zeros
    gen = torch.Generator().manual_seed(0)
    x = [(torch.randn(2 * CHUNK_SIZE + 123, generator=gen) * 0.02).to(dtype), torch.zeros(77, dtype=dtype)]
    x[0][:1000] = 0
    orig = [t.clone() for t in x]
    engine = SeededPerturbation(x, distribution=distribution)
    engine.move(42, 1e-3)
    s = NoiseSource(distribution).fill(torch.empty(CHUNK_SIZE), mix(42, 0), start=CHUNK_SIZE)
    moved = x[0][CHUNK_SIZE: 2 * CHUNK_SIZE].float()
    expected = (orig[0][CHUNK_SIZE: 2 * CHUNK_SIZE].float() + s * 1e-3).to(dtype).float()
    assert torch.equal(moved, expected)
    assert engine.journal_elements() > 0
    engine.move(42, -1e-3)
    engine.update([(42, 0.0)])
    for t, o in zip(x, orig):
        bits = torch.int16 if t.element_size() == 2 else torch.int32
        assert torch.equal(t.view(bits), o.view(bits))
    assert engine.journal_bytes() == 0


@pytest.mark.parametrize("distribution", ["normal", "rademacher", "uniform"])
def test_numpy_values_equal_torch_values(distribution):
    """The NumPy mapping of words to values (small directions on the CPU) gives the same float32s."""
    from zoptim.engine.noise import counter_bits, values_from_bits, values_from_bits_numpy

    bits = counter_bits(np.arange(5000, dtype=np.int64), 123, 456)
    want = values_from_bits(torch.from_numpy(bits), distribution)
    assert torch.equal(values_from_bits_numpy(bits, distribution), want)
