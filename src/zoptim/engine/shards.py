"""Which elements of a parameter this process holds: the whole tensor, or its shard of a DTensor.

A zeroth-order step touches parameters only through in-place moves along a seeded direction whose
element i is a pure function of (key, i) (:mod:`zoptim.engine.noise`), i the element's index in the
*flattened global* parameter. A process that holds a contiguous range of a parameter's elements
can therefore perturb and update that range alone, with exactly the values an unsharded process
would apply there: it needs only the range's first global index.

FSDP2 (``torch.distributed.fsdp.fully_shard``) stores each parameter as a DTensor sharded on
dim 0 (``Shard(0)`` on a 1-d mesh): rank r holds rows ``[r*c, min((r+1)*c, n0))`` with
``c = ceil(n0 / world)``, as ``torch.chunk`` splits them, and its local tensor is a view of the
storage that FSDP all-gathers from before each forward. A block of whole rows is a contiguous
range of the flattened tensor, starting at ``first_row * prod(shape[1:])``. Replicated DTensors
are held whole (offset 0). Other layouts (sharding on another dim, a 2-d mesh) would make a
rank's elements non-contiguous and are refused.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LocalPart(NamedTuple):
    """The tensor a process moves in place, its first element's global index, the global size."""

    tensor: torch.Tensor
    offset: int
    global_numel: int


def is_dtensor(p) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(p, DTensor)


def local_part(p: torch.Tensor) -> LocalPart:
    """This process's part of parameter ``p`` (see the module docstring)."""
    if not is_dtensor(p):
        return LocalPart(p, 0, p.numel())
    from torch.distributed.tensor import Replicate, Shard

    with torch.no_grad():
        local = p.to_local().detach()  # a view of the shard's storage: moves on it are moves of p
    placements = tuple(p.placements)
    if len(placements) != 1:
        raise ValueError(
            f"sharded parameters must live on a 1-d device mesh (FSDP2's fully_shard); got placements {placements}"
        )
    (placement,) = placements
    if isinstance(placement, Replicate):
        return LocalPart(local, 0, p.numel())
    if not isinstance(placement, Shard) or placement.dim != 0:
        raise ValueError(
            f"sharded parameters must be sharded on dim 0 (FSDP2's default, Shard(0)); got {placement}"
        )
    mesh = p.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    rows = p.shape[0]
    per_rank = -(-rows // world)  # torch.chunk's split: ceil(rows / world) rows per rank
    first_row = min(rank * per_rank, rows)
    expected = max(0, min(per_rank, rows - first_row))
    if local.shape[0] != expected:
        raise ValueError(
            f"rank {rank} holds {local.shape[0]} rows of a parameter of shape {tuple(p.shape)}; zoptim expects "
            f"torch.chunk's split ({expected} rows), as FSDP2 makes"
        )
    row_numel = p.numel() // rows if rows else 0
    return LocalPart(local, first_row * row_numel, p.numel())


#: glibc's ``mallopt`` parameter for the size above which an allocation is its own ``mmap``.
M_MMAP_THRESHOLD = -3


def release_freed_buffers(threshold_bytes: int = 1 << 17) -> bool:
    """Make the C allocator return freed large buffers to the operating system at once (glibc).

    A sharded forward all-gathers each FSDP2 module's parameters into a fresh buffer and frees it
    at the reshard. glibc serves buffers above its mmap threshold (128 KiB at start) with their own
    ``mmap`` and unmaps them on free, but after the first such free it raises the threshold to
    that buffer's size (up to 32 MiB), so every later gather of that size comes from the heap,
    whose freed pages stay resident. A sharded process then grows by hundreds of MiB across a
    step (SmolLM2-135M, 2 ranks: a worst-rank peak 1.24-1.68x one unsharded process; measured in
    docs/performance.md). Setting the threshold explicitly switches that adjustment off, so every
    gather buffer is mapped for its use and returned when freed: the peak is what is live.

    Returns True when the setting was applied (Linux with glibc), False elsewhere (nothing done).
    Process-wide; :func:`zoptim.distributed.wrap` calls it for ``mode="sharded"`` on CPU.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)) == 1
