"""The perturbation engine: seeded random directions applied to parameters in place, undone exactly.

Every zeroth-order method in zoptim is a short sequence of moves of the parameters along one
random direction s (the papers' s_k, MeZO's z): to ``x + rho*s`` and ``x - rho*s`` for the two
function queries, then to ``x - alpha*g*s`` for the update. :class:`SeededPerturbation` performs
such moves in place, chunk by chunk, regenerating s from its key each time (see
:mod:`zoptim.noise`), so no direction and no copy of the parameters is ever held.

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

Cost per chunk: one noise draw per pass (three per two-point step); with ``exact=True`` a
temporary move also runs four cheap elementwise ops (add, sub, compare, nonzero) to find the
journal entries; a non-temporary move or ``exact=False`` is a single in-place add.
On a CPU with a core that torch's intra-op threads leave free, a large move draws its noise up to
two chunks ahead in a helper thread (:meth:`SeededPerturbation._noise_stream`), so the draw of
chunk c+1 overlaps the arithmetic on chunk c; the values are the same as inline.

Scratch memory: besides the journal, the engine holds per device at most two float32 buffers,
two buffers of the parameter dtype and one bool buffer of ``CHUNK_SIZE`` elements, plus the noise
source's 2.5 bytes per element (about 5.1 MiB at the default 2**18), and on a CPU with a spare
core the helper thread's three float32 chunk buffers and its own noise scratch (about 3.6 MiB
more), never a copy of a whole tensor.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .noise import CHUNK_SIZE, NoiseSource, check_distribution, mix

#: Moves smaller than this draw their noise inline (a helper thread's hand-off costs ~20 us a chunk).
PREFETCH_MIN_ELEMENTS = 1 << 20

_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}

Scales = Sequence[float]

_POOL: ThreadPoolExecutor | None = None


def _noise_pool() -> ThreadPoolExecutor:
    """The one helper thread that draws noise ahead, shared by every engine in the process."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zoptim-noise")
    return _POOL


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.element_size()])


class SeededPerturbation:
    """Moves a list of tensors along seeded random directions, in place.

    Args:
        params: the tensors to perturb (floating point, contiguous). They are modified in place.
        distribution: ``"normal"``, ``"rademacher"`` or ``"uniform"`` (see :mod:`zoptim.noise`).
        normalize: scale each direction to norm ``sqrt(d)``, d the total number of elements (the
            normalisation trick of the S2P paper, Sec. 3.2, after Lemma 3.1). Costs one extra
            noise pass per direction to measure its norm.
        exact: keep the journal that makes every undo bit-exact (see the module docstring).
        chunk_size: elements per chunk. Part of the noise stream's definition.

    The offset currently applied is ``x + scale_j * s(key)`` for each tensor j, where x is the
    unperturbed value; :meth:`move` changes it, :meth:`restore` removes it.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        *,
        distribution: str = "normal",
        normalize: bool = False,
        exact: bool = True,
        chunk_size: int = CHUNK_SIZE,
    ):
        self.params = list(params)
        self.noise = NoiseSource(check_distribution(distribution))
        self.normalize = bool(normalize)
        self.exact = bool(exact)
        self.chunk_size = int(chunk_size)
        self.dim = sum(p.numel() for p in self.params)
        self._key: int | None = None
        self._scales: list[float] | None = None
        self._journal: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._norm_cache: tuple[int, float] | None = None
        # Noise for CPU moves is drawn one chunk ahead in a helper thread (torch releases the GIL),
        # overlapping the draw with the arithmetic on the previous chunk. Same keys, same values.
        self._ahead_noise = NoiseSource(distribution)

    # -- state ------------------------------------------------------------------------------
    @property
    def is_perturbed(self) -> bool:
        return self._key is not None

    def journal_elements(self) -> int:
        """Number of elements currently held in the exact-restore journal."""
        return sum(int(i.numel()) for i, _ in self._journal.values())

    def journal_bytes(self) -> int:
        return sum(i.numel() * i.element_size() + v.numel() * v.element_size() for i, v in self._journal.values())

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

    def chunk_noise(self, key: int, j: int, c: int, out: torch.Tensor) -> torch.Tensor:
        """The direction ``key``'s values for chunk ``c`` of tensor ``j``, written into ``out``."""
        return self.noise.fill(out, mix(key, j, c))

    def direction_norm(self, key: int) -> float:
        """||s(key)||_2 over all tensors (one noise pass; cached for the last key)."""
        if self._norm_cache is not None and self._norm_cache[0] == key:
            return self._norm_cache[1]
        total = 0.0
        for j, p in enumerate(self.params):
            for c, a, b in self._chunks(p):
                z = self.chunk_noise(key, j, c, self._buffer(p.device, "z", b - a))
                total += float(torch.dot(z, z))
        norm = math.sqrt(total)
        self._norm_cache = (key, norm)
        return norm

    def _factor(self, key: int) -> float:
        if not self.normalize:
            return 1.0
        norm = self.direction_norm(key)
        return math.sqrt(self.dim) / norm if norm > 0 else 0.0

    def _noise_stream(self, tasks: list[tuple[int, int, int, int, torch.device]]):
        """Yield the noise of each ``(key, j, c, n, device)`` task in order.

        Large CPU moves draw up to two chunks ahead in a helper thread, into a ring of three
        buffers (the one the caller holds, and two being filled), when torch's intra-op threads
        leave a core free; small, accelerator or all-cores moves draw inline. Each chunk is
        seeded by its own key, so the values do not depend on the route.
        """
        total = sum(t[3] for t in tasks)
        # The helper thread needs a core of its own: with torch's intra-op pool already on every
        # core it only adds contention (measured: slower at 2 threads on 2 cores, ~1/3 faster at 1).
        spare_core = torch.get_num_threads() < (os.cpu_count() or 1)
        if total < PREFETCH_MIN_ELEMENTS or not spare_core or any(t[4].type != "cpu" for t in tasks):
            for key, j, c, n, device in tasks:
                yield self.chunk_noise(key, j, c, self._buffer(device, "z", n))
            return
        pool = _noise_pool()
        ring = [self._buffer(torch.device("cpu"), f"z{i}", self.chunk_size) for i in range(3)]

        def draw(i):
            key, j, c, n, _ = tasks[i]
            return self._ahead_noise.fill(ring[i % 3][:n], mix(key, j, c))

        pending = deque(pool.submit(draw, i) for i in range(min(2, len(tasks))))
        try:
            for i in range(len(tasks)):
                z = pending.popleft().result()
                if i + 2 < len(tasks):
                    pending.append(pool.submit(draw, i + 2))
                yield z
        finally:
            for f in pending:  # an abandoned stream must not leave draws writing into the ring
                f.result()

    # -- moves --------------------------------------------------------------------------------
    def _as_scales(self, scales: float | Scales) -> list[float]:
        if isinstance(scales, (int, float)):
            return [float(scales)] * len(self.params)
        scales = [float(s) for s in scales]
        if len(scales) != len(self.params):
            raise ValueError(f"scales must have one value per tensor ({len(self.params)}); got {len(scales)}")
        return scales

    def move(
        self,
        key: int | None,
        scales: float | Scales = 0.0,
        *,
        decay: Scales | None = None,
        temporary: bool = True,
    ) -> None:
        """Go from the current offset to ``x <- x * (1 - decay_j) + scales_j * s(key)`` in one pass.

        The current offset is first undone (bit for bit when ``exact``). A ``temporary`` move is
        the point of a function query: it is remembered, journaled when ``exact``, and undone by
        the next move. A final move (``temporary=False``) is an optimizer update: its result is
        the new unperturbed point. A zero scale (or ``key=None``) applies nothing, so a zero
        update is a pure restore.
        """
        new_scales = self._as_scales(scales) if key is not None else [0.0] * len(self.params)
        if key is not None:
            f = self._factor(key)
            new_scales = [s * f for s in new_scales]
        old_key, old_scales = self._key, self._scales
        old_journal, self._journal = self._journal, {}
        record = temporary and self.exact
        plan, tasks = [], []
        for j, p in enumerate(self.params):
            s_old = old_scales[j] if old_key is not None else 0.0
            s_new = new_scales[j]
            d_j = 0.0 if decay is None else float(decay[j])
            if s_old == 0.0 and s_new == 0.0 and d_j == 0.0:
                continue
            same_noise = key == old_key and s_old != 0.0
            plan.append((j, p, s_old, s_new, d_j, same_noise))
            for c, a, b in self._chunks(p):
                if s_old != 0.0:
                    tasks.append((old_key, j, c, b - a, p.device))
                if s_new != 0.0 and not same_noise:
                    tasks.append((key, j, c, b - a, p.device))
        noise = self._noise_stream(tasks)
        for j, p, s_old, s_new, d_j, same_noise in plan:
            flat = p.detach().view(-1)
            for c, a, b in self._chunks(p):
                n = b - a
                sl = flat[a:b]
                z = None
                if s_old != 0.0:
                    z = next(noise)
                    if not self.exact and d_j == 0.0 and (same_noise or s_new == 0.0):
                        # MeZO's arithmetic: undo and redo in one add (not bit-exact).
                        sl.add_(z, alpha=s_new - s_old)
                        continue
                    # Undo: the very subtraction that _perturb checked.
                    sl.sub_(torch.mul(z, s_old, out=self._buffer(p.device, "delta", n)))
                    fix = old_journal.get((j, c))
                    if fix is not None:
                        sl[fix[0]] = fix[1]
                if d_j != 0.0:
                    sl.mul_(1.0 - d_j)
                if s_new != 0.0:
                    if not same_noise:
                        z = next(noise)
                    if record:
                        self._perturb(j, c, sl, z, s_new)
                    else:
                        sl.add_(z, alpha=s_new)
        noise.close()
        if temporary and key is not None and any(s != 0.0 for s in new_scales):
            self._key, self._scales = key, new_scales
        else:
            self._key, self._scales = None, None

    def _perturb(self, j: int, c: int, sl: torch.Tensor, z: torch.Tensor, scale: float) -> None:
        """``sl += fl(scale * z)``, journaling the elements whose undo would miss their bits."""
        n, device = sl.numel(), sl.device
        delta = torch.mul(z, scale, out=self._buffer(device, "delta", n))
        moved = torch.add(sl, delta, out=self._buffer(device, "moved", n, sl.dtype))
        back = torch.sub(moved, delta, out=self._buffer(device, "back", n, sl.dtype))
        bad = torch.ne(_bits(back), _bits(sl), out=self._buffer(device, "bad", n, torch.bool))
        idx = bad.nonzero().view(-1)
        if idx.numel():
            self._journal[(j, c)] = (idx.to(torch.int32), sl[idx])
        sl.copy_(moved)

    def restore(self) -> None:
        """Undo the current offset (bit for bit when ``exact``)."""
        if self._key is not None:
            self.move(None)

    def update(self, terms: Sequence[tuple[int, float | Scales]], decay: Scales | None = None) -> None:
        """Finish a step: restore, then ``x <- x * (1 - decay) + sum_i scales_i * s(key_i)``.

        The term whose key is the current offset's is fused with the restore (one noise pass);
        each other term costs one more pass.
        """
        terms = list(terms)
        fused = next((i for i, (k, _) in enumerate(terms) if k == self._key), None)
        if fused is None:
            self.restore()
            first_key, first_scales = (terms[0] if terms else (None, 0.0))
            rest = terms[1:]
        else:
            first_key, first_scales = terms[fused]
            rest = terms[:fused] + terms[fused + 1 :]
        self.move(first_key, first_scales, decay=decay, temporary=False)
        for k, s in rest:
            self.move(k, s, temporary=False)
