"""The perturbation engines: what moves the parameters to a query point and writes the update.

Two engines implement one contract (:class:`zoptim.engine.protocol.Engine`), which is all the
optimizers in :mod:`zoptim.optim` use:

* :mod:`.inplace`: :class:`SeededPerturbation` writes each query point into the weights, chunk
  by chunk, and undoes it bit for bit (any tensors);
* :mod:`.forward`: :class:`ForwardPerturbation` applies the direction inside the forward of the
  model's layers (one handler per layer kind, :mod:`.layers`); only the update writes the weights,
  plainly or orthogonalised (:mod:`.polar`), an embedding in its looked-up rows only (:mod:`.sparse`);
* :mod:`.small`: :class:`~zoptim.engine.small.SmallPerturbation`, the in-place engine's moves on a
  small model (at most ``SMALL_ELEMENTS`` numbers), with the step's direction and the unperturbed
  point held instead of regenerated and journaled;
* :mod:`.vector`: :class:`VectorPerturbation`, the in-place engine's arithmetic on one flat NumPy
  vector (``minimize`` and ``AskTell`` over a function of a vector).

Beneath them: the counter-based noise (:mod:`.noise`), the fused move kernels (:mod:`.kernels`),
the small tensors moved in one pass (:mod:`.packed`), the atomic writes (:mod:`.atomic`) and the
local shards of FSDP2 parameters (:mod:`.shards`).
"""

from . import small
from .forward import ForwardPerturbation
from .inplace import SeededPerturbation
from .protocol import Engine, RowKeys

__all__ = ["Engine", "ForwardPerturbation", "RowKeys", "SeededPerturbation", "build_engine"]


def build_engine(parts, *, module=None, tensors=None, distribution: str = "normal", rank: int | None = None,
                 normalize: bool = False, exact: bool = True, per_example: bool = False,
                 orthogonal: bool = False, sparse_embeddings: bool = False) -> Engine:
    """The engine over ``parts`` (:class:`~zoptim.engine.shards.LocalPart` of each trainable tensor).

    With ``module`` (the model the closure runs) the directions are applied inside its forward
    (:class:`ForwardPerturbation`; ``tensors``: the module's own tensors in the same order, which
    its hooks find), rank-``rank`` for matrices (``orthogonal``: the optimizer writes the orthogonalised
    update, :mod:`.polar`; ``sparse_embeddings``: embeddings updated in their looked-up rows); without, they are written in place
    (:class:`SeededPerturbation`; :class:`~zoptim.engine.small.SmallPerturbation` for a small model,
    see :data:`~zoptim.engine.small.SMALL_ELEMENTS`). The combinations of these options are checked before, once
    (:mod:`zoptim.optim.options`)."""
    if module is not None:
        return ForwardPerturbation(module, tensors, parts=parts, distribution=distribution, rank=rank,
                                   normalize=normalize, exact=exact, per_example=per_example, orthogonal=orthogonal,
                                   sparse_embeddings=sparse_embeddings)
    if small.fits(parts):
        return small.SmallPerturbation([part.tensor for part in parts], distribution=distribution,
                                       normalize=normalize, exact=exact)
    return SeededPerturbation([part.tensor for part in parts], distribution=distribution, normalize=normalize,
                              exact=exact, offsets=[part.offset for part in parts])
