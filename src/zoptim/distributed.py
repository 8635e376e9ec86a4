"""Data-parallel zeroth-order training over ``torch.distributed``: one scalar per query on the wire.

A zeroth-order step needs, from the data, only the loss values at its query points. With the same
seed on every rank, every rank draws the same direction (the noise stream has no rank word unless
asked for one), so if every rank also sees the same loss, every rank applies the same update and
the replicas stay identical without ever exchanging parameters or gradients. :func:`data_parallel`
makes that so: it wraps a rank's closure (the loss on its own shard of the minibatch) into one
that returns the mean over ranks, an ``all_reduce`` of a single float per query, against the
full-gradient all-reduce of first-order data parallelism (cf. Zelikman et al. 2023, "Just one byte
(per gradient)", cited by the S2P paper).

Usage, on every rank::

    opt = zoptim.AS2P(model.parameters(), total_steps=K, seed=0)    # same seed everywhere
    for batch in shard_of_the_loader:
        opt.step(zoptim.distributed.data_parallel(lambda: loss_fn(model, batch)))

:func:`replicas_in_sync` checks the invariant cheaply (a checksum all-reduce).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from .optim.base import loss_value


def _require_initialized() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) first "
            "(or use the closure directly in a single process)"
        )


def data_parallel(closure: Callable[[], object], group=None, device: torch.device | str | None = None):
    """Wrap ``closure`` (this rank's shard loss) into one returning the mean loss over all ranks.

    Args:
        closure: returns this rank's loss (a float or one-element tensor), no backward.
        group: the process group (default: the world).
        device: where the scalar is reduced (default: CPU for gloo, the current CUDA device for nccl).

    Every rank must call the wrapped closure the same number of times, in the same order, which
    the optimizers do when they are built with the same seed and hyper-parameters.
    """
    _require_initialized()
    if device is None:
        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"

    def reduced():
        value = torch.tensor([loss_value(closure())], dtype=torch.float64, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        return float(value.item()) / dist.get_world_size(group)

    return reduced


@torch.no_grad()
def replicas_in_sync(params, group=None) -> bool:
    """True when every rank holds bit-identical parameters (compares a checksum of their bits)."""
    _require_initialized()
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    checksum = 0.0
    for p in params:
        bits = p.detach().reshape(-1).view(torch.uint8).to(dtype=torch.float64)
        checksum += float((bits * torch.arange(1, bits.numel() + 1, dtype=torch.float64)).sum())
    # every rank equal <=> max == min: one MAX reduction of (c, -c)
    both = torch.tensor([checksum, -checksum], dtype=torch.float64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return bool(both[0] == -both[1])
