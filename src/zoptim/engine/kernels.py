"""Fused moves: one pass per chunk that undoes the old offset, decays, applies the new offset and
checks exactness, with the noise computed inside the same loop from the counter-based stream.

Every function here is plain PyTorch. :func:`fused_move` and :func:`gathered_move` are the
reference (eager) implementations; :func:`run` calls them through ``torch.compile`` (inductor:
C++/OpenMP on a CPU, Triton on a GPU) when compilation is available and allowed, and eagerly
otherwise. Both routes give the same bits (tested): the arithmetic is integer hashing, exact
float32 products and correctly rounded additions, written so that no step depends on evaluation
order or on fused multiply-adds (``delta = fl(scale * s)`` is a separate rounding, as the
exactness check requires).

Routing:

* ``ZOPTIM_COMPILE=0`` forces the eager route everywhere.
* CPU: compiled when inductor can build a kernel; if compilation fails (no C++ compiler, an
  unsupported platform), a one-time :class:`CompileFallbackWarning` says why and the eager route
  is used from then on, with the same values.
* CUDA: the compiled route only where ``ZOPTIM_COMPILE_CUDA=1`` (default off until the
  ``test_kernels`` eager = compiled test has passed on the GPU in use; see README). Otherwise the
  eager counter-based route, which is exact and device-independent.

Keys and scales are passed as 0-d tensors and chunk lengths are dynamic, so a kernel is compiled
once per (variant, dtype, device), never per step, key or chunk. Each variant is its own code
object (:func:`_variant`), so the variants do not share Dynamo's per-function recompile limit.
"""

from __future__ import annotations

import os
import threading
import types
import warnings

import torch

from .noise import counter_bits, values_from_bits


class CompileFallbackWarning(RuntimeWarning):
    """torch.compile was unavailable; zoptim uses its eager kernels (same values, slower)."""


def _noise(idx, k0, k1, table, distribution: str):
    if idx.device.type == "cpu" and not torch.compiler.is_compiling():
        # Eager on a CPU: the same integer formula through NumPy, whose per-operation overhead is
        # a fraction of torch's (this is what keeps small moves and the test suite fast).
        bits = torch.from_numpy(counter_bits(idx.numpy(), int(k0), int(k1)))
    else:
        bits = counter_bits(idx, k0, k1)
    return values_from_bits(bits, distribution, table)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """The arithmetic type of a move: float64 for float64 parameters, float32 otherwise (half
    precision is computed in float32 and rounded once, as torch's own in-place add does)."""
    return x if x.dtype == torch.float64 else x.float()


_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The bit pattern of ``x`` as integers of its width (a reinterpretation, not a conversion)."""
    return x.view(_BITS[x.dtype])


def _apply_new(xp, idx, nk0, nk1, s_new, table, distribution: str, record: bool, z=None, W=None):
    """``moved = fl(xp + fl(s_new * z))`` and, if ``record``, where ``fl(moved - delta) != xp``.

    ``W`` (float32, optional): a per-element multiplier of the direction, ``z <- fl(z * W)``."""
    if z is None:
        z = _noise(idx, nk0, nk1, table, distribution)
    if W is not None:
        z = z * W
    delta = z * s_new
    moved = (_wide(xp) + delta).to(xp.dtype)
    if not record:
        return moved, None
    back = (_wide(moved) - delta).to(xp.dtype)
    # Bitwise inequality: exactly the elements whose arithmetic undo would not give back their bits
    # (this also tells -0.0 from +0.0, which compare equal as floats).
    bad = _bits(back) != _bits(xp)
    return moved, bad


def fused_move(
    x, base, ok0, ok1, s_old, nk0, nk1, s_new, keep, table, P, M, W=None, *, distribution, has_old,
    has_new, record, same_key=False, weighted=False,
):
    """One chunk ``x`` (a contiguous 1-d view of a parameter; its first element has global index
    ``base``) goes from ``x0 + s_old * z_old`` to ``x0 * keep + s_new * z_new``, in place.

    The old offset is undone arithmetically, ``x0' = fl(x - fl(s_old * z_old))``; elements the
    journal holds are wrong after this pass and are fixed by :func:`gathered_move`. With
    ``record``, ``P`` receives the unperturbed point ``x0 * keep`` and ``M`` (int32) marks the
    elements whose undo would not be bit-exact; the count of marks is returned. ``same_key``: the
    old and new directions are the same (the second query of a two-point step, and the update
    fused with the restore), so the noise is computed once. ``weighted``: both directions are
    multiplied element-wise by the float32 chunk ``W`` (a preconditioned direction, HiZOO's
    ``Sigma^(1/2) u``), ``fl(z * W)``, before the scale.
    """
    n = x.shape[0]
    idx = base + torch.arange(n, device=x.device, dtype=torch.int64)
    xp, z = x, None
    if has_old:
        z = _noise(idx, ok0, ok1, table, distribution)
        z_old = z * W if weighted else z
        xp = (_wide(x) - z_old * s_old).to(x.dtype)
    if not (isinstance(keep, float) and keep == 1.0):  # eager calls skip a no-op decay (x * 1.0 == x)
        xp = (_wide(xp) * keep).to(x.dtype)
    if not has_new:
        x.copy_(xp)
        return None
    moved, bad = _apply_new(
        xp, idx, nk0, nk1, s_new, table, distribution, record, z if same_key else None, W if weighted else None
    )
    if record:
        P.copy_(xp)
        M.copy_(bad.to(torch.int32))
    x.copy_(moved)
    if record:
        return bad.to(torch.int32).sum()
    return None


def gathered_move(
    x, P, M, lidx, xj, base, nk0, nk1, s_new, keep, table, W=None, *, distribution, has_new, record, weighted=False
):
    """Finish :func:`fused_move` for the chunk's journaled elements: local indices ``lidx``
    (int32), whose unperturbed values ``xj`` were saved because their arithmetic undo is wrong.

    Redoes the move from ``xj`` (noise recomputed at global indices ``base + lidx``) and writes the
    results into ``x`` and, with ``record``, into ``P`` and ``M``. Returns the change in the
    chunk's count of marks (``record``), else None.
    """
    i = lidx.long()
    xp = xj if isinstance(keep, float) and keep == 1.0 else (_wide(xj) * keep).to(xj.dtype)
    if not has_new:
        x[i] = xp
        return None
    moved, bad = _apply_new(xp, base + i, nk0, nk1, s_new, table, distribution, record, W=W[i] if weighted else None)
    x[i] = moved
    if not record:
        return None
    delta = bad.to(torch.int32).sum() - M[i].sum()
    P[i] = xp
    M[i] = bad.to(torch.int32)
    return delta


# -- routing ---------------------------------------------------------------------------------------
_compiled: dict[tuple, object] = {}
_compile_failed: str | None = None
_FLAGS = ("distribution", "has_old", "has_new", "record")


class _NoDuckShapes:
    """Turn off Dynamo's duck sizing around a call (two attribute writes; ``config.patch`` builds a
    class per call)."""

    def __enter__(self):
        from torch.fx.experimental import _config

        self._config, self._saved = _config, _config.use_duck_shape
        _config.use_duck_shape = False

    def __exit__(self, *exc):
        self._config.use_duck_shape = self._saved


_no_duck_shapes = _NoDuckShapes()


def compile_allowed(device: torch.device) -> bool:
    """Whether moves on ``device`` go through torch.compile (see the module docstring)."""
    if os.environ.get("ZOPTIM_COMPILE", "1") == "0" or _compile_failed is not None:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return os.environ.get("ZOPTIM_COMPILE_CUDA", "0") == "1"
    return False


def _variant(fn, name: str, **flags):
    """A copy of ``fn`` with its own code object and the flags bound as constants, compiled."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{name}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), **flags}
    # emulate_precision_casts: round half-precision intermediates where the eager code does (the
    # exactness check relies on each rounding); inductor would otherwise keep them in float32.
    return torch.compile(copy, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})


#: Below this many elements a move runs eagerly: compiling buys nothing there, and size-1 tensors
#: would make Dynamo specialise the kernels (values are identical on both routes).
MIN_COMPILED_ELEMENTS = 64


def run(fn, args: tuple, device: torch.device, size: int | None = None, **flags):
    """Call ``fn(*args, **flags)`` compiled when allowed, else eagerly; same values either way.

    ``args[0]`` is the chunk the move runs over; ``size`` the number of elements it touches
    (default: the chunk's; the journal's length for :func:`gathered_move`). Python
    ints (key words, offsets) and floats (scales, already rounded to float32) are passed as they
    are to the eager route, and as 0-d int64 / float32 tensors to the compiled one, so that a new
    key or scale never triggers a recompilation.
    """
    global _compile_failed
    x = args[0]
    if (x.numel() if size is None else size) >= MIN_COMPILED_ELEMENTS and compile_allowed(device):
        args = tuple(_as_tensor(a, device, i) for i, a in enumerate(args))
        # One compiled variant per flag set, dtype, device and aligned/unaligned start, so each
        # code object is compiled about once (Dynamo specialises on dtype and on offset 0).
        key = (fn.__name__, device.type, x.dtype, x.storage_offset() == 0, tuple(sorted(flags.items())))
        compiled = _compiled.get(key)
        if compiled is None:
            name = "_".join(str(v) for _, v in sorted(flags.items()))
            compiled = _compiled[key] = _variant(fn, name, **flags)
        try:
            # No duck sizing: a chunk whose length equals its offset or a scratch buffer's size
            # must not get a kernel specialised to that coincidence (and a recompile per chunk).
            with _no_duck_shapes:
                return compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the same values
            _compile_failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(
                f"zoptim: torch.compile could not build the fused noise kernels ({_compile_failed}); "
                "using the eager kernels from now on (same values, slower). Set ZOPTIM_COMPILE=0 to "
                "skip the attempt.",
                CompileFallbackWarning,
                stacklevel=3,
            )
    return fn(*args, **flags)


_scalars = threading.local()  # per thread: argument position -> a reused 0-d CPU tensor


def _as_tensor(a, device, position: int = -1):
    """A Python int or float as a 0-d int64 / float32 tensor on ``device`` (other arguments as they are).

    On a CPU the tensor of each argument position is reused, refilled (``fill_`` costs a fraction
    of building a tensor, and a compiled call takes about eight of them); the kernels only read
    their arguments, and one thread makes one call at a time."""
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        return a
    dtype = torch.int64 if isinstance(a, int) else torch.float32
    if device.type != "cpu" or position < 0:
        return torch.tensor(a, dtype=dtype, device=device)
    pool = getattr(_scalars, "pool", None)
    if pool is None:
        pool = _scalars.pool = {}
    t = pool.get((position, dtype))
    if t is None:
        t = pool[(position, dtype)] = torch.zeros((), dtype=dtype)
    return t.fill_(a)


def reset_routing() -> None:
    """Forget a compile failure and the compiled kernels (for tests)."""
    global _compile_failed
    _compile_failed = None
    _compiled.clear()
