"""The perturbation engine: seeded random directions applied to parameters in place, undone exactly.

Every zeroth-order method in zoptim is a short sequence of moves of the parameters along one
random direction s (the papers' s_k, MeZO's z): to ``x + rho*s`` and ``x - rho*s`` for the two
function queries, then to ``x - alpha*g*s`` for the update. :class:`SeededPerturbation` performs
such moves in place, chunk by chunk, regenerating s from its key each time (see
:mod:`zoptim.engine.noise`), so no direction and no copy of the parameters is ever held.

Passes over the parameters. A move goes *from* the offset currently applied *to* a new one in a
single pass, generating s once per chunk: MeZO's step (perturb +eps, -2eps, +eps, update) draws
the noise four times; here a two-point step is three passes (``0 -> +rho``, ``+rho -> -rho``,
``-rho -> update``), the restore being fused with the update.

Exact restore. Floating-point addition rounds, so ``(x + d) - d`` is not always ``x``: a few
percent of a network's weights come back one unit in the last place off after MeZO's round trip
(``benchmarks/journal_memory.py`` counts them on the real models: 3.8 % of MiniLM's float32
weights at eps = 1e-3), and over thousands of steps in half precision this drift is what its
users see as a collapsing loss. The map ``x -> fl(x + d)`` loses information wherever the sum
lands in a coarser binade, so no arithmetic alone can invert it. When ``exact=True`` (default) the
engine therefore checks, while it perturbs each chunk, which elements the arithmetic undo
``fl(fl(x + d) - d)`` would not return bit for bit, and keeps their original values in a *journal*
(chunk-local int32 index and value). Undoing a move replays the arithmetic and then writes the
journal back, so the parameters are restored bit for bit in every dtype. The journal is the only
memory exactness costs: ``(4 + itemsize)`` bytes per mismatching element (the index is local to
its chunk), measured in ``docs/performance.md`` on the real models. With ``exact=False`` there is
no journal and the undo is the plain arithmetic one, as in MeZO.

Why the check is exact: a move adds ``delta = fl(scale * s)`` (a float32 product, materialised
once per chunk) with one correctly rounded addition, and the undo subtracts the same ``delta``
with one correctly rounded subtraction, in the parameter's dtype (computed in float32 for half
precision, as the check is). No fused multiply-add is involved, so the check, which runs the
undo's arithmetic on a scratch copy, predicts the undo bit for bit on any device and for any
vectorisation of the kernels.

One pass per chunk. Since element i of a direction is a pure function of (key, i)
(:mod:`zoptim.engine.noise`), a move computes the old and the new noise inside the same loop that undoes
the old offset, applies weight decay, applies the new offset and, for a temporary move, marks the
elements whose undo would not be exact (:func:`zoptim.engine.kernels.fused_move`, compiled by
``torch.compile`` where available, eager otherwise, same bits). The journal's index extraction
(``nonzero``) runs only for chunks with marked elements; journaled elements of the previous move
are then fixed up from their saved values (:func:`zoptim.engine.kernels.gathered_move`, noise recomputed
at their indices). A two-point step is three passes (``0 -> +rho``, ``+rho -> -rho``,
``-rho -> update``), against MeZO's four noise regenerations.

Atomic moves. Each chunk's move is a small transaction: the chunk is copied to a scratch backup,
moved, and its new state (the offset it holds, its journal entry, or the update it has received)
committed with one assignment. Whatever raises in between (an error in a kernel, a
``KeyboardInterrupt`` from Ctrl-C, an exception from code hooked into a kernel call) finds every
chunk either committed or restorable from the backup, so the engine recovers before the exception
propagates: an interrupted query move goes back to the unperturbed point bit for bit, an
interrupted update is completed (an update cannot be undone exactly; see :mod:`zoptim.engine.atomic`,
which also keeps signal handlers from interrupting the recovery). ``is_perturbed`` is then False
and the next step starts from a consistent point. ``tests/test_atomic.py`` injects a failure at
every kernel call of a step.

Scratch memory: besides the journal, per device two chunks of the parameter dtype (the backup,
and the unperturbed values of the chunk under a recorded move) and one int32 chunk (the marks),
that is ``CHUNK_SIZE * (2 * itemsize + 4)`` bytes (12 MiB in float32 at the default 2**20), never
a copy of a whole tensor. Chunking does not change the values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import kernels
from . import packed as packed_kernels
from .atomic import recover
from .noise import CHUNK_SIZE, EAGER_CHUNK_SIZE, NoiseSource, check_distribution, mix, normal_table
from .protocol import ElementWiseEngine, Scales, Weights

#: A chunk's state before any move: the unperturbed point of epoch 0, no offset, no journal entry.
_BASE = (0, None, 0.0, None)
#: The engine's key while a failed move has left chunks at different states (restore() finishes it).
_MIXED = object()


class SeededPerturbation(ElementWiseEngine):
    """Moves a list of tensors along seeded random directions, in place.

    Args:
        params: the tensors to perturb (floating point, contiguous). They are modified in place.
        distribution: ``"normal"``, ``"rademacher"`` or ``"uniform"`` (see :mod:`zoptim.engine.noise`).
        normalize: scale each direction to norm ``sqrt(d)``, d the total number of elements (the
            normalisation trick of the S2P paper, Sec. 3.2, after Lemma 3.1). Costs one extra
            noise pass per direction to measure its norm.
        exact: keep the journal that makes every undo bit-exact (see the module docstring).
        chunk_size: elements per chunk (default: ``CHUNK_SIZE`` on the compiled route,
            ``EAGER_CHUNK_SIZE`` on the eager one, whose integer temporaries are 8 bytes an
            element). Bounds the scratch memory; does not change the values. Fixed for the
            engine's life, so the journal's chunk indices stay valid if the route changes.
        offsets: the global flat index of each tensor's first element (default 0): a process
            holding a shard of a parameter (:mod:`zoptim.engine.shards`) draws the values of the whole
            parameter's direction at its own elements.
        indices: the stream number of each tensor (default 0, 1, ...; see :meth:`tensor_key`).

    The offset currently applied is ``x + scale_j * s(key)`` for each tensor j, where x is the
    unperturbed value; :meth:`move` changes it, :meth:`restore` removes it. Implements
    :class:`zoptim.engine.protocol.Engine`.
    """

    #: HiZOO's element-wise weights and the direction's values chunk by chunk are available.
    element_wise = True
    #: one direction per query: no per-example (:class:`~zoptim.engine.protocol.RowKeys`) queries.
    per_example = False

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        *,
        distribution: str = "normal",
        normalize: bool = False,
        exact: bool = True,
        chunk_size: int | None = None,
        offsets: Sequence[int] | None = None,
        indices: Sequence[int] | None = None,
    ):
        self.params = list(params)
        # The stream number of each tensor (default: its position): an engine over a subset of an
        # optimizer's tensors draws their directions from the same streams as one over all of them.
        self.indices = list(range(len(self.params))) if indices is None else [int(i) for i in indices]
        # Global index of each tensor's first element: 0, except for the local shard of a sharded
        # parameter, which draws the values of the *global* direction at its own elements.
        self.offsets = [0] * len(self.params) if offsets is None else [int(o) for o in offsets]
        if len(self.offsets) != len(self.params):
            raise ValueError(f"offsets must have one value per tensor ({len(self.params)}); got {len(self.offsets)}")
        self.noise = NoiseSource(check_distribution(distribution))
        self.distribution = distribution
        self.normalize = bool(normalize)
        self.exact = bool(exact)
        if chunk_size is None:
            device = self.params[0].device if self.params else torch.device("cpu")
            chunk_size = CHUNK_SIZE if kernels.compile_allowed(device) else EAGER_CHUNK_SIZE
        self.chunk_size = int(chunk_size)
        self.dim = sum(p.numel() for p in self.params)
        self._key: int | None = None
        self._scales: list[float] | None = None
        # Each chunk's committed state: (epoch of its unperturbed point, key, scale, journal entry),
        # the entry a chunk-local (int32 index, value) pair or None; absent means _BASE.
        self._state: dict[tuple[int, int], tuple] = {}
        self._epoch = 0
        self._inflight: tuple | None = None
        self._pack_inflight: list | None = None  # (j, backup, done) of the small tensors being written
        self._pack_cache: tuple | None = None  # (chunk_size, the small tensors moved in one pass)
        self._pack_idx: dict[tuple, np.ndarray] = {}  # the packed elements' indices, per set of tensors
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._norm_cache: tuple[int, float] | None = None
        self._weights: Weights | None = None

    # -- state ------------------------------------------------------------------------------

    def _journal(self):
        return [st[3] for st in self._state.values() if st[3] is not None]

    def journal_elements(self) -> int:
        """Number of elements currently held in the exact-restore journal."""
        return sum(int(i.numel()) for i, _ in self._journal())

    def journal_bytes(self) -> int:
        return sum(i.numel() * i.element_size() + v.numel() * v.element_size() for i, v in self._journal())

    # -- noise --------------------------------------------------------------------------------
    def _buffer(self, device: torch.device, name: str, n: int, dtype=torch.float32) -> torch.Tensor:
        buf = self._scratch.get((device, name, dtype))
        if buf is None or buf.numel() < n:
            buf = self._scratch[(device, name, dtype)] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n]

    def _chunks(self, p: torch.Tensor):
        n = p.numel()
        for c, a in enumerate(range(0, n, self.chunk_size)):
            yield c, a, min(a + self.chunk_size, n)

    def tensor_key(self, key: int, j: int) -> int:
        """The stream of tensor ``j`` in the direction ``key``: element i is ``fill(..., mix(key, j))[i]``."""
        return mix(key, self.indices[j])

    def direction_chunks(self, key: int):
        """The direction ``key`` chunk by chunk: yields ``(j, a, b, s)``, s the float32 values of
        elements a:b of tensor j (a scratch buffer, overwritten by the next chunk)."""
        for j, p in enumerate(self.params):
            for _, a, b in self._chunks(p):
                yield j, a, b, self.noise.fill(
                    self._buffer(p.device, "z", b - a), self.tensor_key(key, j), start=self.offsets[j] + a
                )

    # -- moves --------------------------------------------------------------------------------
    def _words(self, key: int | None, j: int) -> tuple[int, int]:
        if key is None:
            return 0, 0
        return self.noise.words(self.tensor_key(key, j))

    def _move_to(self, target: int | None, new_scales: list[float] | None) -> None:
        """A temporary move (see :meth:`ElementWiseEngine.move`) in one pass: the current offset
        undone and the new one applied chunk by chunk, journaled when ``exact``."""
        try:
            self._transition(target, new_scales, None, None)
        except BaseException as err:
            self._key, self._scales = _MIXED, None  # until the recovery succeeds: restore() still has work

            def back():
                self._transition(None, None, None, None)
                self._key = None  # set inside the recovery: a deferred Ctrl-C replays after it

            recover(back, err, "going back to the unperturbed point")
            raise
        self._key, self._scales = (target, new_scales) if target is not None else (None, None)

    def _transition(self, key: int | None, scales: list[float] | None, decay: Scales | None, epoch: int | None) -> None:
        """Move every chunk from its own committed state to ``key, scales`` (a query point) or, with
        ``epoch``, to the update ``x * (1 - decay) + scales * s(key)`` numbered ``epoch``.

        Chunks already there are skipped, so a transition interrupted part way is finished by
        calling it again. Each chunk is a transaction: backed up, moved, then committed with one
        assignment to ``self._state``; an exception before the commit leaves the backup to
        :meth:`_undo_inflight`.
        """
        self._undo_inflight()
        record_all = epoch is None and self.exact
        packed = self._packed()
        if packed:
            self._pack_transition(packed, key, scales, decay, epoch, record_all)
        words: dict[tuple[int, int], tuple[int, int]] = {}

        def words_of(k, j):
            w = words.get((k, j))
            if w is None:
                w = words[(k, j)] = self._words(k, j)
            return w

        table = None
        for j, p in enumerate(self.params):
            if j in packed:
                continue
            s_new = 0.0 if key is None else scales[j]
            t_key = key if s_new != 0.0 else None
            d_j = 0.0 if decay is None else float(decay[j])
            s_n, keep = float(np.float32(s_new)), float(np.float32(1.0 - d_j))
            flat = p.detach().view(-1)
            device, dtype = p.device, p.dtype
            weights = self._weights
            for c, a, b in self._chunks(p):
                st = self._state.get((j, c), _BASE)
                base_epoch, o_key, s_old, fix = st
                if epoch is None:
                    if o_key == t_key and s_old == s_new:
                        continue
                elif base_epoch >= epoch:
                    continue
                # a query's point is an offset from its chunk's base; an update's result is a new base
                done = (base_epoch, t_key, s_new, None) if epoch is None else (epoch, None, 0.0, None)
                has_old, has_new = o_key is not None, t_key is not None
                if not has_old and not has_new and d_j == 0.0:
                    self._state[(j, c)] = done
                    continue
                if table is None:
                    table = normal_table(device)
                record = record_all and has_new
                n = b - a
                sl = flat[a:b]
                self._buffer(device, "B", n, dtype).copy_(sl)
                self._inflight = (j, c, a, b, done)
                ok0, ok1 = words_of(o_key, j) if has_old else (0, 0)
                nk0, nk1 = words_of(t_key, j) if has_new else (0, 0)
                # float32 scalars: the kernels multiply float32 noise by them, as the journal check assumes
                s_o = float(np.float32(s_old))
                flags = dict(distribution=self.distribution, has_old=has_old, has_new=has_new, record=record)
                if has_old and has_new and o_key == t_key:
                    flags["same_key"] = True  # one noise evaluation serves the undo and the new offset
                W = None
                if weights is not None:
                    flags["weighted"] = True
                    W = weights(j, a, b)
                P = self._buffer(device, "P", n, dtype) if record else None
                M = self._buffer(device, "M", n, torch.int32) if record else None
                offset = self.offsets[j] + a
                count = kernels.run(
                    kernels.fused_move, (sl, offset, ok0, ok1, s_o, nk0, nk1, s_n, keep, table, P, M, W), device, **flags
                )
                if has_old and fix is not None:
                    # Journaled elements: their arithmetic undo was wrong; redo the move from their saved values.
                    delta = kernels.run(
                        kernels.gathered_move,
                        (sl, P, M, fix[0], fix[1], offset, nk0, nk1, s_n, keep, table, W),
                        device,
                        size=fix[0].numel(),
                        distribution=self.distribution,
                        has_new=has_new,
                        record=record,
                        weighted=W is not None,
                    )
                    if record:
                        count = count + delta
                if record and int(count) > 0:
                    idx = M.nonzero().view(-1)
                    done = (base_epoch, t_key, s_new, (idx.to(torch.int32), P[idx]))
                    self._inflight = (j, c, a, b, done)
                self._state[(j, c)] = done  # the commit

    # -- small tensors in one pass ---------------------------------------------------------------
    def _packed(self) -> dict:
        """The tensors moved together by :meth:`_pack_transition` (index -> flat slice start):
        float32/float64 CPU tensors of at most ``packed.PACK_ELEMENTS`` elements, each within one
        chunk, when there are at least two of them or the one is not worth a kernel call."""
        cache = self._pack_cache
        if cache is not None and cache[0] == self.chunk_size:
            return cache[1]
        limit = min(packed_kernels.PACK_ELEMENTS, self.chunk_size)
        members, start = {}, 0
        for j, p in enumerate(self.params):
            if p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) and 0 < p.numel() <= limit:
                members[j] = start
                start += p.numel()
        self._pack_cache = (self.chunk_size, members)
        return members

    def _pack_transition(self, members: dict, key, scales, decay, epoch, record_all: bool) -> None:
        """The transition of the small tensors (see :meth:`_transition`), one NumPy pass per dtype.

        Their values are the chunked route's, bit for bit (:mod:`zoptim.engine.packed`); each is one chunk
        (``(j, 0)``) with the same committed states and journal entries. Atomic as a chunk is: the
        tensors are backed up, written, then each committed; an exception before a tensor's commit
        leaves its backup to :meth:`_undo_inflight`."""
        rows = {}  # dtype -> [(j, o_key, s_old, fix, t_key, s_new, d_j, done)]
        for j in members:
            s_new = 0.0 if key is None else scales[j]
            t_key = key if s_new != 0.0 else None
            d_j = 0.0 if decay is None else float(decay[j])
            base_epoch, o_key, s_old, fix = self._state.get((j, 0), _BASE)
            if epoch is None:
                if o_key == t_key and s_old == s_new:
                    continue
            elif base_epoch >= epoch:
                continue
            done = (base_epoch, t_key, s_new, None) if epoch is None else (epoch, None, 0.0, None)
            if o_key is None and t_key is None and d_j == 0.0:
                self._state[(j, 0)] = done
                continue
            rows.setdefault(self.params[j].dtype, []).append((j, o_key, s_old, fix, t_key, s_new, d_j, done))
        for group in rows.values():
            self._pack_group(group, record_all)

    def _pack_group(self, group: list, record_all: bool) -> None:
        views = [self.params[row[0]].detach().view(-1).numpy() for row in group]
        sizes = [v.size for v in views]
        x = np.concatenate(views) if len(views) > 1 else views[0].copy()
        members = tuple(row[0] for row in group)
        idx = self._pack_idx.get(members)
        if idx is None:
            idx = self._pack_idx[members] = np.concatenate(
                [np.arange(n, dtype=np.int64) + self.offsets[j] for j, n in zip(members, sizes)])
        words = [(self._words(row[1], row[0]), self._words(row[4], row[0])) for row in group]

        def per(values, dtype):
            """One value per element; a 0-d array (broadcast, the same arithmetic) where all are equal."""
            if all(v == values[0] for v in values):
                return np.asarray(values[0], dtype=dtype)
            return np.repeat(np.asarray(values, dtype=dtype), sizes)

        f32 = np.float32
        ok0, ok1 = per([w[0][0] for w in words], np.int64), per([w[0][1] for w in words], np.int64)
        nk0, nk1 = per([w[1][0] for w in words], np.int64), per([w[1][1] for w in words], np.int64)
        s_old = per([row[2] if row[1] is not None else 0.0 for row in group], f32)
        s_new = per([row[5] if row[4] is not None else 0.0 for row in group], f32)
        has_old = per([row[1] is not None for row in group], bool)
        has_new = per([row[4] is not None for row in group], bool)
        keep = per([f32(1.0 - row[6]) for row in group], f32)
        starts = np.cumsum([0] + sizes[:-1])
        fixes = [(start, row[3]) for start, row in zip(starts, group) if row[1] is not None and row[3] is not None]
        fix_at = fix_val = None
        if fixes:
            fix_at = np.concatenate([start + f[0].numpy().astype(np.int64) for start, f in fixes])
            fix_val = np.concatenate([f[1].numpy() for _, f in fixes])
        W = None
        if self._weights is not None:
            # each call may reuse one buffer (HiZOO's): copy before the next
            W = np.concatenate([self._weights(row[0], 0, n).cpu().numpy().copy() for row, n in zip(group, sizes)])
        same_key = all(w[0] == w[1] for w in words)
        record = record_all
        moved, unperturbed, marks = kernels.run(
            packed_kernels.packed_move,
            (x, idx, ok0, ok1, s_old, has_old, nk0, nk1, s_new, has_new, keep, fix_at, fix_val, W),
            torch.device("cpu"), size=0, distribution=self.distribution, record=record, same_key=same_key,
        )
        self._pack_inflight = [(row[0], v.copy(), None) for row, v in zip(group, views)]
        commits = []
        for start, n, row, v in zip(starts, sizes, group, views):
            done = row[7]
            if marks is not None and row[4] is not None:
                m = marks[start : start + n]
                if m.any():
                    at = np.flatnonzero(m)
                    journal = (torch.from_numpy(at.astype(np.int32)), torch.from_numpy(unperturbed[start : start + n][at]))
                    done = (done[0], done[1], done[2], journal)
            commits.append((row[0], v, moved[start : start + n], done))
        for i, (j, v, new, done) in enumerate(commits):
            self._pack_inflight[i] = (j, self._pack_inflight[i][1], done)
            np.copyto(v, new)
            self._state[(j, 0)] = done  # the commit
        self._pack_inflight = None

    def _undo_inflight(self) -> None:
        """Put back the chunk whose move was interrupted before its commit (from its backup)."""
        pack = self._pack_inflight
        if pack is not None:
            for j, backup, done in pack:
                if done is None or self._state.get((j, 0)) is not done:
                    self.params[j].detach().view(-1).numpy()[:] = backup
            self._pack_inflight = None
        inflight = self._inflight
        if inflight is None:
            return
        j, c, a, b, done = inflight
        if self._state.get((j, c)) is not done:
            p = self.params[j]
            p.detach().view(-1)[a:b].copy_(self._buffer(p.device, "B", b - a, p.dtype))
        self._inflight = None

    def update(self, terms: Sequence[tuple[int, float | Scales]], decay: Scales | None = None) -> None:
        """Finish a step: ``x <- x * (1 - decay) + sum_i scales_i * s(key_i)``, terms in order.

        The first term is fused with the undo of the current offset (one pass; one noise
        evaluation when its key is the current offset's, as in a one-direction step); each further
        term costs one more pass. Because the undo is exact, the result does not depend on which
        offset was applied before: every process of a direction-parallel run, each at its own
        direction, lands on the same bits. An exception inside the update (``KeyboardInterrupt``
        included) first lets it complete, then propagates.
        """
        moves = []
        for key, scales in list(terms) or [(None, 0.0)]:
            target, new_scales = self._target(key, scales)
            moves.append((target, new_scales))
        first = self._epoch + 1
        self._epoch += len(moves)

        def run():
            for i, (target, new_scales) in enumerate(moves):
                self._transition(target, new_scales, decay if i == 0 else None, first + i)
            self._key, self._scales = None, None  # inside: a deferred Ctrl-C replays after the recovery

        try:
            run()
        except BaseException as err:
            self._key, self._scales = _MIXED, None  # until the recovery succeeds: restore() still has work
            recover(run, err, "completing the update")
            raise
