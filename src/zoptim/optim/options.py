"""How the directions are applied: the one check of the options that choose it.

The options: ``module`` (the directions applied inside that model's forward,
:mod:`zoptim.engine.forward`; without it they are written in place), ``rank`` (rank-r matrix
directions, else full rank), ``per_example`` (one direction per example of the minibatch),
``orthogonalize`` (the polar-factor update of :mod:`zoptim.engine.polar`), ``sparse_embeddings`` (an
embedding matrix updated in its looked-up rows only), ``shard`` (the parameters
are FSDP2 shards), ``normalize``, HiZOO's ``factored``, and the
direction-parallel mode of :func:`zoptim.distributed.wrap`. Every combination that is refused is
one rule of :data:`RULES`, with one message, whoever asks: the optimizers' constructors,
``wrap``, ``zoptim finetune`` and ``zoptim bench`` all call :func:`check_options`. Which options a
method offers at all is the registry's business (:mod:`zoptim.optim.registry`).

Checks that need the model itself (a tensor no layer hook covers, BatchNorm in training mode
under ``per_example``) are the forward engine's, at construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: How a message names each option for the library's users (a command renders its own flags).
API_NAMES = {
    "module": "module=<the model>",
    "rank": "rank=r",
    "per_example": "per_example=True",
    "orthogonalize": "orthogonalize=True",
    "shard": "sharding (FSDP2 parameters)",
    "normalize": "normalize=True",
    "factored": "factored=True",
    "directions_mode": "wrap(mode='directions')",
    "sparse_embeddings": "sparse_embeddings=True",
    "distributed": "zoptim.distributed.wrap",
    "momentum": "momentum > 0",
}


class OptionError(ValueError):
    """A refused combination of options: ``field`` the option refused, ``detail`` the rest of the
    message, naming other options as ``{name}`` (``refs``: name -> value shown beside a flag, or
    None), so that it renders with the library's argument names or with a command's flags."""

    def __init__(self, field: str, detail: str, **refs):
        self.field, self.detail, self.refs = field, detail, refs
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] | None = None) -> str:
        if name is None:
            return f"{API_NAMES.get(self.field, self.field)} {self.detail.format(**{k: API_NAMES.get(k, k) for k in self.refs})}"
        refs = {k: name(k) if v is None else f"{name(k)} {v}" for k, v in self.refs.items()}
        return f"{name(self.field)} {self.detail.format(**refs)}"


@dataclass(frozen=True)
class Options:
    """One optimizer's choice of how its directions are applied (see the module docstring).
    ``element_wise``: the method needs the direction's every element (HiZOO's preconditioner)."""

    method: str = "ZOSGD"
    module: bool = False
    rank: int | None = None
    per_example: bool = False
    orthogonalize: bool = False
    shard: bool = False
    normalize: bool = False
    factored: bool = False
    directions_mode: bool = False
    element_wise: bool = False
    sparse_embeddings: bool = False
    distributed: bool = False
    momentum: bool = False


#: (refused option, when, the rest of the message, the options it names with their flag values).
RULES: list[tuple[str, Callable[[Options], bool], str, dict]] = [
    ("module", lambda o: o.element_wise and (o.module or o.rank is not None),
     "is refused by {method}: its preconditioner multiplies every element of the direction, so the direction must "
     "be written into the weights element by element; leave {module} and {rank} unset", dict(module=None, rank=None)),
    ("rank", lambda o: o.rank is not None and not o.module,
     "needs {module}: low-rank directions are applied inside the forward of the model's layers; pass {module} "
     "(or leave {rank} unset for full-rank directions in place)", dict(module=None, rank=None)),
    ("per_example", lambda o: o.per_example and o.rank is None,
     "needs {rank}: each example's direction is applied inside the forward of the model's layers, as a rank-r "
     "product (a full-rank direction per example would materialise one weight-sized tensor per example)",
     dict(rank="R")),
    ("orthogonalize", lambda o: o.orthogonalize and o.rank is None,
     "needs {rank}: each matrix steps along the polar factor of its low-rank estimate, computed from the factors "
     "A, B of the directions applied in the forward (zoptim.engine.polar)", dict(rank="R")),
    ("shard", lambda o: o.shard and o.per_example,
     "does not combine with {per_example}: each example's direction is applied to whole layers; use per-example "
     "directions with data parallelism (wrap(mode='batch')), or sharding without them", dict(per_example=None)),
    ("directions_mode", lambda o: o.directions_mode and o.per_example,
     "does not combine with {per_example}, which already gives each example its own direction (use "
     "wrap(mode='batch'))", dict(per_example=None)),
    ("normalize", lambda o: o.normalize and o.shard,
     "needs the norm of the whole direction, which a process holding a shard does not see; leave it off with "
     "{shard}", dict(shard=None)),
    ("sparse_embeddings", lambda o: o.sparse_embeddings and o.rank is None,
     "needs {rank}: an embedding's update is restricted to the rows the step looked up through the low-rank "
     "factors A of the directions applied in the forward (zoptim.engine.forward)", dict(rank="R")),
    ("sparse_embeddings", lambda o: o.sparse_embeddings and o.momentum,
     "does not combine with {momentum}: the momentum replays past steps' directions, whose looked-up rows are "
     "not kept", dict(momentum=None)),
    ("sparse_embeddings", lambda o: o.sparse_embeddings and (o.shard or o.distributed or o.directions_mode),
     "does not combine with {distributed}: each process records only the rows its own queries looked up, so "
     "the processes' updates would differ; leave it off in distributed runs", dict(distributed=None)),
    ("factored", lambda o: o.factored and o.shard,
     "needs each matrix's whole rows and columns, which a process holding a shard does not see; use the dense "
     "estimate (factored=False, element-wise) with {shard}", dict(shard=None)),
]


def check_options(options: Options) -> None:
    """Raise :class:`OptionError` for the first refused combination of ``options`` (see :data:`RULES`)."""
    for field, refused, detail, refs in RULES:
        if refused(options):
            raise OptionError(field, detail.replace("{method}", options.method), **refs)
