"""Which elements of a parameter this process holds: the whole tensor, or its shard of a DTensor.

A zeroth-order step touches parameters only through in-place moves along a seeded direction whose
element i is a pure function of (key, i) (:mod:`zoptim.noise`), i the element's index in the
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
