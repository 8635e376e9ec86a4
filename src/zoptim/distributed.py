"""Zeroth-order training over ``torch.distributed``: a few scalars per step on the wire.

A zeroth-order step needs from the data only the loss values at its query points, and from the
other processes nothing but those values: every direction is a pure function of its key
(:mod:`zoptim.engine.noise`), so any process can apply any direction's update without receiving it.
:func:`wrap` turns an optimizer into a distributed one in one of three modes (cf. Salimans et al.
2017, evolution strategies; Zelikman et al. 2023, "Just one byte (per gradient)", cited by the S2P
paper):

``"batch"`` (data parallel)
    Every rank draws the same direction and evaluates it on its own share of the minibatch; the
    closure's value is the mean over ranks, one ``all_reduce`` of two float64 per query (the loss
    and a flag saying whether the closure raised on some rank). Every rank
    then applies the same update and the replicas stay bit-identical; with equal shares the run
    equals one process on the whole minibatch (up to the rounding of the mean). With
    ``per_example=True`` rank r of w evaluates examples r, r + w, ... of the minibatch, each at its
    own direction (that example's index in the minibatch), and the ranks all-gather their vectors
    of per-example losses (8 bytes an example, plus 16 per query for the shares' sizes and flags):
    the step is the single-process per-example step on the whole minibatch.
``"directions"`` (direction parallel)
    Every rank evaluates its own direction(s) on the same minibatch (rank r the global direction
    indices ``r*k .. r*k+k-1``); after its queries each rank all-gathers its
    ``(gamma, f(x+eps s), f(x-eps s))`` triples, 24 bytes a direction plus 8 for the rank's
    status (a non-finite loss or an exception there makes every rank skip or abandon the step
    together), and every rank applies all
    directions' updates in rank order. The run is the single-process step with
    ``num_directions = k * world``, bit for bit (k-SPSA for ZOSGD; the ranks bit-identical too). For AS2P every rank's gamma joins the gamma window, in rank order, before sigma
    is taken, so sigma is the spread of all ranks' recent gammas (the window holds
    ceil(window * K * k * world) of them, the same fraction of the run), and each direction gets
    its own clipped, auto-scaled step; the update is their average (see ``AS2P(num_directions)``).
``"sharded"`` (FSDP2)
    The model is sharded with ``torch.distributed.fsdp.fully_shard`` and the optimizer built over
    its parameters (DTensors). Each rank perturbs and updates only its local shard, with the values
    of the *global* direction at those elements (:mod:`zoptim.engine.shards`); data work as in
    ``"batch"``. The run equals one unsharded process on the whole minibatch. After every query the
    wrapper reshards the FSDP modules (``FSDPModule.reshard()``): FSDP2 keeps the root's parameters
    gathered after a forward (for the backward that never comes), which would both hold the full
    parameter set and let the next query see stale values. With ``module=model, rank=r``
    (:mod:`zoptim.engine.forward`) the hooks apply the global direction to the weights FSDP2 gathers,
    inside the forward, so a query writes no shard; the update writes this rank's rows of
    ``A B^T``. ``release_memory`` (on CPU, default) sets glibc's mmap threshold so that FSDP2's
    freed gather buffers go back to the system (:func:`zoptim.engine.shards.release_freed_buffers`);
    :func:`zoptim.lm.models.load_sharded` builds a sharded model without ever holding it whole.
    Measured in docs/performance.md.

Failures are collective in every mode: a non-finite loss on one rank makes every rank skip the
step, and an exception in one rank's closure (``KeyboardInterrupt`` included) makes every rank
abandon it (the others raise ``RuntimeError``), parameters restored and replicas bit-identical;
nobody waits for the process group's timeout. In ``"sharded"`` mode the forward pass itself
all-gathers the shards, so a closure that raises *before* its forward leaves the other ranks in
FSDP's collective; raise after it (or validate the batch before the step).

Usage, on every rank (same seed everywhere)::

    torch.distributed.init_process_group("gloo")            # or zoptim.distributed.init_from_env()
    opt = zoptim.distributed.wrap(zoptim.ZOSGD(model.parameters(), seed=0), mode="directions")
    for batch in loader:                                       # "batch"/"sharded": this rank's share
        opt.step(lambda: loss_fn(model, batch))

:func:`replicas_in_sync` checks the invariant cheaply (a checksum all-reduce).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from .engine.shards import release_freed_buffers
from .optim.base import ZerothOrderOptimizer
from .optim.options import check_options
from .optim.step import loss_value, loss_vector

MODES = ("batch", "directions", "sharded")


def _require_initialized() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) first "
            "(or use the closure directly in a single process)"
        )


def _reduce_device(group) -> str:
    return "cuda" if dist.get_backend(group) == "nccl" else "cpu"


def launched_world_size() -> int:
    """The world size torchrun (or another launcher setting ``WORLD_SIZE``) started this process in; 1 otherwise."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched_rank_and_world() -> tuple[int, int]:
    """(``RANK``, ``WORLD_SIZE``) as the launcher set them, without a process group; (0, 1) outside one."""
    world = launched_world_size()
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and world size in the default process group; (0, 1) without one.
    (Before the group exists, :func:`launched_rank_and_world` says what the launcher asked for.)"""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device | str = "cpu") -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment; return (rank, world size).

    Backend: NCCL for a CUDA device, gloo otherwise. A no-op (returning the current rank and
    size) when a group already exists; (0, 1) outside a launcher.
    """
    if dist.is_available() and dist.is_initialized():
        return rank_and_world()
    if launched_world_size() <= 1:
        return 0, 1
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = launched_rank_and_world()
    # torchrun's store outlives a restart of the workers, and with it the addresses the previous
    # attempt's ranks published: a plain env:// init of a restarted group reads those and fails to
    # connect. Each attempt therefore gets its own key space in the store.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=not agent_store and rank == 0,
        timeout=timedelta(minutes=30),
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", store=dist.PrefixStore(f"zoptim/attempt{attempt}", store),
        rank=rank, world_size=world,
    )
    return dist.get_rank(), dist.get_world_size()


class CommStats:
    """What a rank contributed to the wire: payload bytes handed to collectives (for benchmarks)."""

    def __init__(self):
        self.bytes_sent = 0

    def add(self, tensor: torch.Tensor) -> None:
        self.bytes_sent += tensor.numel() * tensor.element_size()


def fsdp_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The ``fully_shard``-ed modules in ``module`` (FSDP2's ``FSDPModule``s)."""
    return [m for m in module.modules() if hasattr(m, "reshard") and hasattr(m, "unshard")]


def reshard(module: torch.nn.Module) -> None:
    """Free the parameters FSDP2 gathered in ``module``'s last forward. FSDP2 may keep the root's
    gathered after a forward (for a backward); an evaluation between steps reshards, so that the
    next query's forward gathers the shards as the optimizer moved them, never a stale copy."""
    for m in fsdp_modules(module):
        m.reshard()


def _gather_rows(values, group, device, stats: CommStats | None) -> torch.Tensor:
    """Every rank's float64 vector ``values`` (the same length everywhere), stacked in rank order."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    if stats is not None:
        stats.add(mine)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    return torch.stack(rows)


def _abandoned(failed: int) -> RuntimeError:
    return RuntimeError(
        f"{failed} other rank(s) raised in the closure at this query; this rank abandons the step too "
        "(parameters restored), so the replicas stay identical"
    )


def data_parallel(
    closure: Callable[[], object], group=None, device: torch.device | str | None = None, stats: CommStats | None = None,
    per_example: bool = False,
):
    """Wrap ``closure`` (this rank's shard loss) into one returning the mean loss over all ranks.

    Args:
        closure: returns this rank's loss (a float or one-element tensor), no backward.
        group: the process group (default: the world).
        device: where the scalar is reduced (default: CPU for gloo, the current CUDA device for nccl).
        stats: a :class:`CommStats` that counts the bytes this rank sends.
        per_example: the closure returns one loss per example of this rank's share (rank r of w
            holds examples r, r + w, ... of the minibatch); the wrapped closure returns every
            example's loss, in the minibatch's order (two all-gathers: the shares' sizes and
            failure flags, then the losses, float64). Every rank must hold as many examples.

    Every rank must call the wrapped closure the same number of times, in the same order, which
    the optimizers do when they are built with the same seed and hyper-parameters.

    Failures are collective: a NaN or inf on one rank makes the mean non-finite on every rank (all
    skip the step), and a rank whose closure raises (``KeyboardInterrupt`` included) still takes
    part in the reduction, with a flag, before re-raising; every other rank then raises
    ``RuntimeError`` at the same query, so no rank is left waiting in a collective.
    """
    _require_initialized()
    if device is None:
        device = _reduce_device(group)
    world = dist.get_world_size(group)

    def gathered():
        error, mine = None, []
        try:
            mine = loss_vector(closure())
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = err
        heads = _gather_rows([len(mine), 0.0 if error is None else 1.0], group, device, stats)
        if error is not None:
            raise error
        failed = int(heads[:, 1].sum().item())
        if failed:
            raise _abandoned(failed)
        sizes = [int(n) for n in heads[:, 0].tolist()]
        if len(set(sizes)) != 1:
            raise ValueError(
                f"per_example=True with mode='batch': every rank must evaluate as many examples (rank r of w "
                f"holds examples r, r + w, ... of the minibatch); the ranks returned {sizes} losses"
            )
        losses = _gather_rows(mine, group, device, stats)  # (world, n)
        return losses.T.reshape(-1).tolist()  # example j * world + r is row j of rank r

    if per_example:
        return gathered

    def reduced():
        error = None
        try:
            mine = loss_value(closure())
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the other ranks know
            mine, error = 0.0, err
        value = torch.tensor([mine, 0.0 if error is None else 1.0], dtype=torch.float64, device=device)
        if stats is not None:
            stats.add(value)
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        if error is not None:
            raise error
        failed = int(value[1].item())
        if failed:
            raise _abandoned(failed)
        return float(value[0].item()) / world

    return reduced


class DistributedOptimizer:
    """A zoptim optimizer run by every rank of a process group; built by :func:`wrap`.

    ``step(closure)``, ``state_dict()`` and ``load_state_dict()`` are the optimizer's; every other
    attribute (``param_groups``, ``num_queries``, ``last_stats``, ...) is read from it. ``stats``
    counts the payload bytes this rank has sent.
    """

    def __init__(self, optimizer: ZerothOrderOptimizer, mode: str, group=None, module: torch.nn.Module | None = None,
                 release_memory: bool = True):
        if not isinstance(optimizer, ZerothOrderOptimizer):
            raise TypeError(f"wrap needs a zoptim optimizer; got {type(optimizer).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
        _require_initialized()
        check_options(optimizer._options(distributed=True))
        self.optimizer, self.mode, self.group, self.module = optimizer, mode, group, module
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.stats = CommStats()
        self._device = _reduce_device(group)
        if mode == "sharded":
            if module is None:
                raise ValueError(
                    "mode='sharded' needs module=<the fully_shard-ed model>: after each query the wrapper "
                    "reshards it (FSDP2 leaves the root's parameters gathered after a forward)"
                )
            if not getattr(optimizer, "sharded", False) and self.world_size > 1:
                raise ValueError(
                    "mode='sharded' expects an optimizer built over sharded parameters (call "
                    "torch.distributed.fsdp.fully_shard on the model before building the optimizer); these "
                    "parameters are whole on every rank: use mode='batch'"
                )
            self._fsdp_modules = fsdp_modules(module)
            on_cpu = all(p.device.type == "cpu" for p in module.parameters())
            self.released_memory = bool(release_memory and on_cpu and release_freed_buffers())
        if mode == "directions":
            optimizer.shard_directions(self.rank, self.world_size, self._all_gather)
        elif optimizer.per_example:  # batch mode (sharded mode refuses per_example when it builds its hooks)
            optimizer.share_examples(self.rank, self.world_size)

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    # -- collectives ------------------------------------------------------------------------------
    def _all_gather(self, values: list[float]) -> list[list[float]]:
        return _gather_rows(values, self.group, self._device, self.stats).tolist()

    def _resharding(self, closure):
        def query():
            try:
                return closure()
            finally:
                for m in self._fsdp_modules:
                    m.reshard()

        return query

    # -- the optimizer's interface -----------------------------------------------------------------
    def step(self, closure) -> float:
        """One step on every rank (see the module docstring for what each mode evaluates)."""
        if closure is None or not callable(closure):
            raise TypeError("zeroth-order optimizers need step(closure): a callable returning the loss")
        if self.mode == "directions":
            return self.optimizer.step(closure)
        if self.mode == "sharded":
            closure = self._resharding(closure)
        return self.optimizer.step(data_parallel(closure, self.group, self._device, self.stats,
                                                 per_example=self.optimizer.per_example))

    def state_dict(self) -> dict:
        sd = self.optimizer.state_dict()
        sd["zoptim"]["distributed"] = {"mode": self.mode, "world_size": self.world_size}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("zoptim", {}).get("distributed")
        if saved is not None and self.mode == "directions" and (
            saved["mode"] != "directions" or saved["world_size"] != self.world_size
        ):
            raise ValueError(
                f"state_dict was saved in mode {saved['mode']!r} with {saved['world_size']} processes; a "
                f"direction-parallel run of {self.world_size} processes draws other directions per step"
            )
        self.optimizer.load_state_dict(state_dict)


def wrap(optimizer: ZerothOrderOptimizer, mode: str = "batch", group=None, module: torch.nn.Module | None = None,
         release_memory: bool = True):
    """Run ``optimizer`` on every rank of ``group`` (default: the world) in ``mode``.

    Args:
        optimizer: a zoptim optimizer, built with the same seed and hyper-parameters on every rank.
        mode: ``"batch"``, ``"directions"`` or ``"sharded"`` (see the module docstring).
        group: the process group (default: the world).
        module: the ``fully_shard``-ed model (``mode="sharded"`` only).
        release_memory: ``mode="sharded"`` on CPU: fix glibc's mmap threshold so that the buffers
            FSDP2 gathers for each forward go back to the system when freed
            (:func:`zoptim.engine.shards.release_freed_buffers`; process-wide). Without it a rank's
            resident memory grows by up to the whole model's size over a step.

    Returns:
        a :class:`DistributedOptimizer`.
    """
    return DistributedOptimizer(optimizer, mode, group=group, module=module, release_memory=release_memory)


@torch.no_grad()
def replicas_in_sync(params, group=None) -> bool:
    """True when every rank holds bit-identical parameters (compares a checksum of their bits)."""
    _require_initialized()
    device = _reduce_device(group)
    checksum = 0.0
    for p in params:
        bits = p.detach().reshape(-1).view(torch.uint8).to(dtype=torch.float64)
        checksum += float((bits * torch.arange(1, bits.numel() + 1, dtype=torch.float64)).sum())
    # every rank equal <=> max == min: one MAX reduction of (c, -c)
    both = torch.tensor([checksum, -checksum], dtype=torch.float64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return bool(both[0] == -both[1])
