"""The perturbation engines: what moves the parameters to a query point and writes the update.

Two engines implement one contract (:class:`zoptim.engine.protocol.Engine`), which is all the
optimizers in :mod:`zoptim.optim` use:

* :mod:`.inplace`: :class:`SeededPerturbation` writes each query point into the weights, chunk
  by chunk, and undoes it bit for bit (any tensors);
* :mod:`.forward`: :class:`ForwardPerturbation` applies the direction inside the forward of the
  model's layers (one handler per layer kind, :mod:`.layers`); only the update writes the weights.

Beneath them: the counter-based noise (:mod:`.noise`), the fused move kernels (:mod:`.kernels`),
the atomic writes (:mod:`.atomic`) and the local shards of FSDP2 parameters (:mod:`.shards`).
"""

from .inplace import SeededPerturbation

__all__ = ["SeededPerturbation"]
