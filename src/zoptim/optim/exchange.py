"""Direction exchange: a step's directions or examples shared out over processes.

:func:`zoptim.distributed.wrap` calls :meth:`DirectionExchange.shard_directions` (``mode="directions"``:
each process evaluates its own directions, then all exchange their gammas) or
:meth:`DirectionExchange.share_examples` (``mode="batch"`` with ``per_example=True``: each process
holds some of the minibatch's examples, each at its own direction). Either way the step is the
single-process step, bit for bit. In a single process the methods here are the plain two-point
queries of :meth:`DirectionExchange._two_point_directions`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..engine.protocol import RowKeys
from .options import check_options
from .step import _NONFINITE, _OK, _RAISED, Query, SkippedUpdate


class DirectionExchange:
    """The direction-parallel and example-sharing parts of :class:`~zoptim.optim.base.ZerothOrderOptimizer`."""

    #: Direction parallelism (:func:`zoptim.distributed.wrap` with ``mode="directions"``): this
    #: process evaluates directions ``p*k .. p*k + k - 1`` of a step that has ``world_size*k``,
    #: p its process rank; ``_exchange`` all-gathers each process's list of floats (see
    #: :meth:`shard_directions`).
    _directions_process_rank, _directions_world_size = 0, 1
    #: Example sharing (``share_examples``): this process holds examples p, p + w, ... of a minibatch.
    _examples_process_rank, _examples_world_size = 0, 1
    _exchange: Callable[[list[float]], list[list[float]]] | None = None
    _exchanged = False  # whether this step's exchange has happened
    supports_direction_sharding = False

    def shard_directions(self, process_rank: int, world_size: int,
                         exchange: Callable[[list[float]], list[list[float]]]) -> None:
        """Split each step's directions over ``world_size`` processes (what ``mode="directions"`` does).

        This process then evaluates only its own ``num_directions`` directions, global indices
        ``process_rank * num_directions + i`` of the step's ``world_size * num_directions``; after its queries it
        calls ``exchange(values)``, which must return every rank's list in rank order (an
        all-gather), and applies all the directions' updates in rank order. The step is then the
        single-process step with ``num_directions * world`` directions. Only before the first step.
        """
        if not self.supports_direction_sharding:
            raise ValueError(
                f"{type(self).__name__} does not split its directions over processes; mode='directions' "
                "supports ZOSGD and AS2P (use mode='batch' for the others)"
            )
        if self.steps:
            raise ValueError("shard_directions must be called before the first step")
        check_options(self._options(directions_mode=True))
        self._directions_process_rank, self._directions_world_size = int(process_rank), int(world_size)
        self._exchange = exchange

    def share_examples(self, process_rank: int, world_size: int) -> None:
        """Split a per-example step's examples over ``world_size`` processes (what ``wrap(mode="batch")``
        does with ``per_example=True``): this process's row i is example ``process_rank + world_size * i`` of the
        minibatch and takes that example's direction; its closure must then return the losses of all
        the minibatch's examples in order (the wrapper all-gathers and interleaves the ranks'
        vectors). The step is the single-process step on the whole minibatch."""
        if not self.per_example:
            raise ValueError("share_examples is for per_example=True optimizers")
        if self.steps:
            raise ValueError("share_examples must be called before the first step")
        self._examples_process_rank, self._examples_world_size = int(process_rank), int(world_size)

    def _two_point_directions(self, rho: float):
        """Query ``x + rho s_i`` and ``x - rho s_i`` for this process's ``num_directions``
        directions (a sub-generator: ``keys, gammas, f_plus, f_minus = yield from ...``) and return
        every direction's key, gamma = (f+ - f-) / (2 rho) and the two values, all ranks' in rank order."""
        if self.per_example:
            return (yield from self._per_example_directions(rho))
        first = self._directions_process_rank * self.num_directions
        keys = [self.direction_key(first + i) for i in range(self.num_directions)]
        values = yield [q for key in keys for q in (Query(key, rho), Query(key, -rho))]  # one round
        plus, minus = values[0::2], values[1::2]
        gammas = [(f_plus - f_minus) / (2.0 * rho) for f_plus, f_minus in zip(plus, minus)]
        keys, (gammas, plus, minus) = self._gather_directions(keys, [gammas, plus, minus])
        return keys, gammas, plus, minus

    def _per_example_directions(self, rho: float):
        r"""Per-example two-point queries: example i of the minibatch sits at ``x +- rho s_i`` within
        the same two forward passes, so

        .. math:: \delta_i = \frac{\ell_i(x + \rho s_i) - \ell_i(x - \rho s_i)}{2 \rho}, \qquad
                  g = \frac1B \sum_{i=1}^B \delta_i s_i

        is an unbiased estimate of the minibatch gradient (of the smoothed loss) built from B
        directional derivatives: the per-example analogue of the Flipout estimator (Wen et al.,
        ICLR 2018). Returns the B keys, deltas (the methods' gammas) and per-example values."""
        rows = RowKeys(self.seed, self.steps, self._examples_process_rank, self._examples_world_size)
        plus = yield Query(rows, rho)
        minus = yield Query(rows, -rho)
        n = self.engine.query_rows()
        if n is not None:  # the examples of every rank (equal shares: the wrapper checks)
            n *= self._examples_world_size
        if len(plus) != len(minus) or (n is not None and len(plus) != n):
            raise ValueError(
                f"per_example=True: the closure returned {len(plus)} and {len(minus)} losses, but the batch the "
                f"layers saw has {n} examples; return one loss per example (reduction='none')"
            )
        keys = [self.direction_key(i) for i in range(len(plus))]  # example i of the whole minibatch
        gammas = [(p - m) / (2.0 * rho) for p, m in zip(plus, minus)]
        return keys, gammas, list(plus), list(minus)

    def _gather_directions(self, keys: list[int], values: list[list[float]]):
        """All directions of this step: ``(keys, values)`` with every rank's, in rank order.

        ``values`` holds parallel lists (one per quantity, one entry per local direction). In a
        single process they come back unchanged. Every rank then applies the same update terms in
        the same order; since the engine's undo of each rank's own offset is exact, the replicas
        stay bit-identical, and equal to one process running all the directions. Without the
        exact-restore journal the undo is arithmetic, so the parameters are first restored.
        """
        if self._directions_world_size == 1:
            return keys, values
        k = len(keys)
        rows = self._exchange_once([v for column in values for v in column], _OK)
        gathered = [[v for row in rows for v in row[q * k : (q + 1) * k]] for q in range(len(values))]
        if not self.engine.exact:
            self.engine.restore()
        return [self.direction_key(i) for i in range(k * len(rows))], gathered

    def _exchange_once(self, values: list[float], status: float) -> list[list[float]]:
        """The step's one all-gather (direction parallelism), with this rank's status appended.

        Every rank takes part exactly once per step, whatever happens on it: a rank whose loss
        was non-finite, or whose closure raised, sends its status instead of its values (from
        :meth:`StepRun.tell` / :meth:`StepRun.abandon`), so the collectives of different steps
        never pair up across ranks. Seeing another rank's status, every rank skips the step (a
        non-finite loss, :class:`SkippedUpdate`) or abandons it (an exception: ``RuntimeError``),
        so the replicas stay bit-identical and no rank waits for a timeout."""
        self._exchanged = True
        width = 3 * getattr(self, "num_directions", 1)
        row = list(values) if status == _OK else [math.nan] * width
        rows = self._exchange(row + [status])
        statuses = [row[-1] for row in rows]
        failed = [r for r, st in enumerate(statuses) if st == _RAISED]
        if failed and status != _RAISED:
            raise RuntimeError(
                f"rank(s) {failed} raised during step {self.steps} of a direction-parallel run; this rank abandons "
                "the step too (parameters restored), so the replicas stay identical"
            )
        bad = [r for r, row in enumerate(rows) if row[-1] == _NONFINITE or not all(math.isfinite(v) for v in row[:-1])]
        if bad and status == _OK:
            raise SkippedUpdate(math.nan, f"non-finite loss on rank(s) {bad}")
        return [row[:-1] for row in rows]

