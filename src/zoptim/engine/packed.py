"""Small tensors in one pass: the in-place engine's move for every small CPU tensor at once.

A model's biases, norms and small matrices are tensors of tens to a few thousand elements; moving
each through its own kernel call (:func:`zoptim.engine.kernels.fused_move`: about ten torch operations,
or a compiled call with its guards) costs a fixed ~50-200 microseconds per tensor and per move,
more than the arithmetic. :func:`packed_move` moves all of them in one pass of NumPy operations
over their concatenated elements: the noise of each element comes from its own tensor's stream
(the counter-based generator of :mod:`zoptim.engine.noise` accepts a key per element), and the
arithmetic is the fused kernel's, element for element (float32 ``delta = fl(scale * fl(s * w))``,
one correctly rounded addition in the parameter's dtype, the undo check on the bit patterns), so
the values, and the journal of elements whose undo would not be exact, are the same bit for bit
(``tests/test_packed.py``).

Only float32 and float64 tensors on the CPU are packed (NumPy has no bfloat16, and a GPU tensor
would have to come to the host); the engine (:class:`zoptim.engine.inplace.SeededPerturbation`)
chooses them, and moves every other tensor chunk by chunk as before.
"""

from __future__ import annotations

import numpy as np
import torch

from .noise import counter_bits, normal_table, values_from_bits_numpy

#: Tensors of at most this many elements (and within one chunk) move together in one pass.
PACK_ELEMENTS = 4096

_INT = {np.dtype(np.float32): np.int32, np.dtype(np.float64): np.int64}
_TABLE: np.ndarray | None = None


def noise(idx: np.ndarray, k0, k1, distribution: str) -> np.ndarray:
    """The float32 values of the streams ``(k0, k1)`` (arrays, one key per element) at ``idx``."""
    global _TABLE
    bits = counter_bits(idx, k0, k1)
    if distribution == "normal":
        if _TABLE is None:
            _TABLE = normal_table(torch.device("cpu")).numpy()
        return _TABLE[bits >> 16]
    return values_from_bits_numpy(bits, distribution).numpy()


def packed_move(x, idx, ok0, ok1, s_old, has_old, nk0, nk1, s_new, has_new, keep, fix_at, fix_val, W,
                *, distribution: str, record: bool, same_key: bool):
    """One pass over the concatenated elements ``x`` (NumPy, float32 or float64): each goes from
    ``x0 + s_old * z_old`` to ``x0 * keep + s_new * z_new``, as :func:`zoptim.engine.kernels.fused_move`
    followed by :func:`zoptim.engine.kernels.gathered_move` computes it for a chunk.

    Per-element arrays: ``idx`` (global index in its tensor), the old and new key words, float32
    scales, ``has_old`` / ``has_new`` masks, float32 ``keep`` (each but ``idx`` may be a 0-d array,
    broadcast, where all elements share its value); ``fix_at`` / ``fix_val``: the
    journaled elements (positions in ``x``) and their saved unperturbed values; ``W``: float32
    direction multipliers or None. Returns ``(moved, unperturbed, marks)``; ``marks`` (bool, or
    None without ``record``) are the elements whose arithmetic undo would not give their bits back.
    """
    xp = x
    z = None
    if has_old.any():
        z = noise(idx, ok0, ok1, distribution)
        z_old = z * W if W is not None else z
        xp = x - z_old * s_old if has_old.ndim == 0 else np.where(has_old, x - z_old * s_old, x)
    if not (keep == 1.0).all():
        xp = xp * keep
    if fix_at is not None:
        xp[fix_at] = fix_val * (keep if keep.ndim == 0 else keep[fix_at])
    if not has_new.any():
        return xp, xp, None
    if not (same_key and z is not None):
        z = noise(idx, nk0, nk1, distribution)
    if W is not None:
        z = z * W
    delta = z * s_new
    moved = xp + delta if has_new.ndim == 0 else np.where(has_new, xp + delta, xp)
    if not record:
        return moved, xp, None
    ints = _INT[x.dtype]
    back = moved - delta
    marks = (back.view(ints) != xp.view(ints)) & has_new
    return moved, xp, marks
