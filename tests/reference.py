"""Slow, obviously-correct reference implementations written straight from the papers' formulas.

They work on one flat float64 vector and draw the directions from the noise stream's definition
(:func:`zoptim.engine.noise.mix` and the counter formula, re-implemented here in Python integers), not from the engine, so a test
that compares them with the optimizers checks the engine's bookkeeping too.
"""

from __future__ import annotations

import math

import torch

from zoptim.engine.noise import _normal_table, mix
from zoptim.schedules import cosine_decay

NORMAL_TABLE = _normal_table().float()


_M32 = 0xFFFFFFFF


def stream_bits(key: int, i: int) -> int:
    """Element i of the counter-based stream ``key``: the zoptim.engine.noise docstring's formula, in Python ints."""
    k_lo, k_hi = key & _M32, key >> 32
    x = (i * 0x61C88647 + k_lo + (i >> 32) * 0x2545F491) & _M32
    x ^= k_hi
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & _M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def stream_value(bits: int, distribution: str) -> float:
    if distribution == "normal":
        return float(NORMAL_TABLE[bits >> 16])
    if distribution == "rademacher":
        return 1.0 - 2.0 * (bits >> 31)
    return ((bits >> 8) + 0.5) / (1 << 24) * 2 * math.sqrt(3.0) - math.sqrt(3.0)


def direction(seed, step, index, shapes, distribution="normal", normalize=False):
    """s for (seed, step, index): element i of tensor j is value(bits(mix(mix(seed, step, index), j), i))."""
    key = mix(seed, step, index)
    s = torch.tensor(
        [stream_value(stream_bits(mix(key, j), i), distribution) for j, n in enumerate(shapes) for i in range(n)],
        dtype=torch.float32,
    ).double()
    if normalize:
        s = s * math.sqrt(s.numel()) / s.norm()
    return s


def guard_scale(losses, tol, beta=0.9, slow=0.98, beta_v=0.99, factor=0.5, z=4.0, warmup=10, cooldown=10):
    """The loss guard's lr multiplier after the step losses ``losses`` (zoptim.optim.guard), from
    its formulas written as explicit sums: fast and slow bias-corrected EMAs
    m_n = sum_j (1-b) b^(n-j) l_j / (1 - b^n); the fast one's noise
    sigma_n^2 = [sum_{j>=2} (1-bv) bv^(n-j) (l_j - m_{j-1})^2 / (1 - bv^(n-1))] (1-b)/(1+b);
    best = running min of the slow EMA from n = warmup; a cut (scale *= factor, best = fast EMA,
    cooldown steps without a cut) when m_n > best + tol |best| + z sigma_n."""

    def ema(b, n):
        return sum((1 - b) * b ** (n - j) * losses[j - 1] for j in range(1, n + 1)) / (1 - b**n)

    def sigma(n):
        if n < 2:
            return 0.0
        v = sum((1 - beta_v) * beta_v ** (n - j) * (losses[j - 1] - ema(beta, j - 1)) ** 2 for j in range(2, n + 1))
        return math.sqrt(v / (1 - beta_v ** (n - 1)) * (1 - beta) / (1 + beta))

    scale, best, last_cut = 1.0, math.inf, -math.inf
    for n in range(warmup, len(losses) + 1):
        best = min(best, ema(slow, n))
        fast = ema(beta, n)
        if n - last_cut >= cooldown and fast > best + tol * abs(best) + z * sigma(n):
            scale, best, last_cut = scale * factor, fast, n
    return scale


def zosgd(f, x, steps, lr, eps, k=1, wd=0.0, seed=0, distribution="normal", beta=0.0, m=1, guard=None):
    """GA / k-SPSA: x <- x - lr (v + wd x), with v = (1/k) sum_i g_i s_i, g_i = (f(x+eps s_i) - f(x-eps s_i)) / 2eps;
    with momentum, v = sum_j beta^j v_{t-j} / sum_j beta^j over the last min(t+1, m) steps; with a
    loss guard of tol ``guard``, lr_t = lr * guard_scale(the mean of each earlier step's 2k values)."""
    xs, past, losses = [x.clone()], [], []
    for t in range(steps):
        g_hat, values = torch.zeros_like(x), []
        for i in range(k):
            s = direction(seed, t, i, [x.numel()], distribution)
            plus, minus = f(x + eps * s), f(x - eps * s)
            g_hat += (plus - minus) / (2 * eps) * s / k
            values += [plus, minus]
        past = [g_hat] + past[: m - 1]
        w = [beta**j for j in range(len(past))]
        lr_t = lr * (guard_scale(losses, guard) if guard else 1.0)
        x = x - lr_t * (sum(wj * v for wj, v in zip(w, past)) / sum(w) + wd * x)
        losses.append(sum(values) / len(values))
        xs.append(x.clone())
    return xs


def stp(f, x, steps, lr, seed=0):
    """x <- argmin{f(x + a s), f(x - a s), f(x)} (ties keep x; + wins a tie between the moves)."""
    xs = [x.clone()]
    for t in range(steps):
        s = direction(seed, t, 0, [x.numel()])
        here, plus, minus = f(x), f(x + lr * s), f(x - lr * s)
        if min(plus, minus) < here:
            x = x + lr * s if plus <= minus else x - lr * s
        xs.append(x.clone())
    return xs


def s2p(f, x, steps, rule, seed=0, lr=None, K=None, L=None, L0=None, L1=None, rho=1e-3, A=1.01, B=1.01):
    """Algorithm 1 of the S2P paper with Options 1-4."""
    d, xs = x.numel(), [x.clone()]
    for t in range(steps):
        s = direction(seed, t, 0, [d])
        gamma = abs(f(x + rho * s) - f(x - rho * s)) / (2 * rho)
        if rule == "stationary":
            alpha = lr / math.sqrt(K * d)
        elif rule == "dynamic":
            alpha = gamma / (L * d)
        elif rule == "relaxed_stationary":
            alpha = math.sqrt(2) / (B * L1 * math.sqrt(d * K))
        else:
            alpha = gamma / ((A * L0 + math.sqrt(2) * B * L1 * gamma) * d)
        x = x + alpha * s if f(x + alpha * s) <= f(x - alpha * s) else x - alpha * s
        xs.append(x.clone())
    return xs


def as2p(f, x, steps, eps, K, eta_a=5.0, eta_b=5.0, window=0.1, full=False, seed=0, lr=None,
         auto_lr=True, clipping=True, beta=0.0, m=1):
    """Algorithm 2 of the S2P paper, stepping towards the lower evaluation: x <- x + lr_k v, with
    v = -sign(gamma) gamma' / (eta_b sigma) s (gamma' without auto_lr); with momentum,
    v = sum_j beta^j v_{t-j} / sum_j beta^j over the last min(t+1, m) steps."""
    gammas, xs, past = [], [x.clone()], []
    size = max(2, math.ceil(window * K))
    for k in range(steps):
        s = direction(seed, k, 0, [x.numel()])
        rho = eps if full else cosine_decay(eps, eps / 10, k, K)
        f_plus, f_minus = f(x + rho * s), f(x - rho * s)
        gamma = (f_plus - f_minus) / (2 * rho)
        gammas.append(gamma)
        recent = torch.tensor(gammas[-size:], dtype=torch.float64)
        sigma = float(recent.std(unbiased=False)) if len(recent) > 1 else abs(gamma)
        tau_a = cosine_decay(2 * eta_a, eta_a, k, K) * sigma
        g_clip = 1 / (1 / abs(gamma) + 1 / tau_a) if clipping else abs(gamma)
        base = eps if lr is None else lr
        lr_k = (rho if lr is None else lr) if full else cosine_decay(base, 0.0, k, K)
        unit = g_clip / (eta_b * sigma) if auto_lr else g_clip
        past = [-math.copysign(unit, f_plus - f_minus) * s] + past[: m - 1]
        w = [beta**j for j in range(len(past))]
        x = x + lr_k * sum(wj * v for wj, v in zip(w, past)) / sum(w)
        xs.append(x.clone())
    return xs


def hizoo(f, x, steps, lr, eps, alpha, wd=0.0, seed=0, shape=None, guard=None):
    """HiZOO, Algorithm 1 of Zhao et al. (2025): H starts at 1;
    l = f(x), l+- = f(x +- eps u / sqrt(H)), H <- (1-a) H + a |l+ + l- - 2l| / (2 eps^2) H u^2,
    x <- x - lr ((l+ - l-) / (2 eps) u / sqrt(H) + wd x).
    ``shape`` (rows, cols): the factored variant, H ~ r c^T / sum(r) with EMAs of the row and
    column sums of the estimate. ``guard``: the loss guard's tol, on the values f(x)."""
    d, xs, losses = x.numel(), [x.clone()], []
    if shape is None:
        h = torch.ones(d, dtype=torch.float64)
    else:
        rows, cols = shape
        r = torch.full((rows,), float(cols), dtype=torch.float64)
        c = torch.full((cols,), float(rows), dtype=torch.float64)
        h = (torch.outer(r, c) / r.sum()).reshape(-1)
    for t in range(steps):
        u = direction(seed, t, 0, [d])
        here = f(x)
        plus, minus = f(x + eps * u / h.sqrt()), f(x - eps * u / h.sqrt())
        estimate = abs(plus + minus - 2 * here) / (2 * eps**2) * h * u**2
        if shape is None:
            h = (1 - alpha) * h + alpha * estimate
        else:
            e = estimate.reshape(rows, cols)
            r, c = (1 - alpha) * r + alpha * e.sum(1), (1 - alpha) * c + alpha * e.sum(0)
            h = (torch.outer(r, c) / r.sum()).reshape(-1)
        lr_t = lr * (guard_scale(losses, guard) if guard else 1.0)
        x = x - lr_t * ((plus - minus) / (2 * eps) * u / h.sqrt() + wd * x)
        losses.append(here)
        xs.append(x.clone())
    return xs


def lowrank_direction(key: int, j: int, shape, rank: int, distribution: str = "normal") -> torch.Tensor:
    """Tensor j of the forward-applied direction ``key`` (zoptim.engine.forward's docstring), materialised.

    A matrix (viewed ``shape[0] x rest``) is ``A B^T / sqrt(r)``, A (row-major) from elements
    0 .. m r - 1 of the stream ``mix(key, j)`` and B from the next n r; any other tensor takes the
    stream's first elements, as the in-place engine does.
    """
    stream = mix(key, j)
    numel = math.prod(shape)
    if len(shape) < 2 or rank is None:
        values = [stream_value(stream_bits(stream, i), distribution) for i in range(numel)]
        return torch.tensor(values, dtype=torch.float32).view(shape)
    m, n = shape[0], numel // shape[0]
    values = [stream_value(stream_bits(stream, i), distribution) for i in range(rank * (m + n))]
    a = torch.tensor(values[: m * rank], dtype=torch.float64).view(m, rank)
    b = torch.tensor(values[m * rank :], dtype=torch.float64).view(n, rank)
    return (a @ b.T / math.sqrt(rank)).float().view(shape)


def zosgd_materialised(loss_at, params, seed, steps, lr, eps, rank, distribution="normal"):
    """ZOSGD (GA) written plainly: each query point ``x +- eps s`` is built as explicit tensors
    (``loss_at(list_of_tensors)``), s from :func:`lowrank_direction`; returns the iterates."""
    x = [p.detach().clone().double() for p in params]
    for k in range(steps):
        key = mix(seed, k, 0)
        s = [lowrank_direction(key, j, tuple(p.shape), rank, distribution).double() for j, p in enumerate(x)]
        f_plus = loss_at([(p + eps * d).float() for p, d in zip(x, s)])
        f_minus = loss_at([(p - eps * d).float() for p, d in zip(x, s)])
        g = (f_plus - f_minus) / (2 * eps)
        x = [p - lr * g * d for p, d in zip(x, s)]
    return [p.float() for p in x]
