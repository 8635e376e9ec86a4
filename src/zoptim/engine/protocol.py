"""The contract between the optimizers and a perturbation engine.

A method's step (:mod:`zoptim.optim`) is a sequence of moves of the parameters along seeded
random directions s(key): to the query points ``x + scale * s(key)``, back to x, and the update
``x <- x (1 - decay) + sum_i c_i s(key_i)``. An engine performs those moves; the optimizers use
nothing else of it. Two engines implement the contract: :class:`zoptim.engine.inplace.SeededPerturbation`
(the points written into the weights) and :class:`zoptim.engine.forward.ForwardPerturbation` (the
points applied inside the model's forward).

What an engine offers beyond the moves is asked, never guessed from its class:
``element_wise`` (HiZOO's element-wise direction weights and the direction's values chunk by
chunk) and ``per_example`` (one direction per example of the minibatch, :class:`RowKeys`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from .noise import max_abs_value, mix

#: ``scales``: one number for every tensor, or one per tensor (the per-group step sizes).
Scales = float | Sequence[float]
#: ``weights(j, a, b)``: float32 multipliers of elements a:b of tensor j (HiZOO's Sigma^(1/2)).
Weights = Callable[[int, int, int], torch.Tensor]


class RowKeys(NamedTuple):
    """The directions of a per-example query: row i of the minibatch (dim 0 of every hooked layer's
    input) sits at ``x + rho * s(key(i))``, ``key(i) = mix(seed, step, first + stride * i)``: the
    key of direction ``first + stride * i`` of the step, as :meth:`ZerothOrderOptimizer.direction_key`
    names it. In one process ``first = 0, stride = 1``; with ``wrap(mode="batch")`` process p of w
    holds examples p, p + w, p + 2w, ... of the minibatch (``first = p, stride = w``)."""

    seed: int
    step: int
    first: int = 0
    stride: int = 1

    def key(self, i: int) -> int:
        return mix(self.seed, self.step, self.first + self.stride * i)


@runtime_checkable
class Engine(Protocol):
    """What every perturbation engine provides (see the module docstring).

    Attributes:
        params: the tensors the engine moves, in the optimizer's order (a sharded parameter's
            local part); tensor j of the direction ``key`` draws the stream ``mix(key, j)``.
        dim: the number of elements of ``params``.
        exact: whether undoing a query point is bit-exact (the in-place journal; always true of
            the points a forward engine applies in its hooks).
        normalize: whether each direction is scaled to norm sqrt(d) (S2P paper, Sec. 3.2).
        element_wise: whether ``weights`` and ``direction_chunks`` are available (the direction
            is written into the weights element by element).
        per_example: whether the engine takes :class:`RowKeys` queries.
        draws_ahead: how many directions the engine would draw in one call (0: each is drawn
            when it is used); when positive, ``prefetch(keys)`` draws the directions of a uint64
            array of keys, those of the coming steps (the vector engine on a short vector and the
            forward engine on a small CPU model, whose draws cost their calls, not their arithmetic).

    An ``element_wise`` engine also has ``weights`` (settable on the unperturbed point) and
    ``direction_chunks(key)``, the direction's float32 values chunk by chunk.
    """

    params: list[torch.Tensor]
    dim: int
    exact: bool
    normalize: bool
    element_wise: bool
    per_example: bool
    draws_ahead: int

    @property
    def is_perturbed(self) -> bool:
        """Whether a query point is applied (the parameters are not at the iterate)."""

    def move(self, key, scales: Scales = 0.0, *, decay: Sequence[float] | None = None, temporary: bool = True) -> None:
        """Go to the query point ``x + scales * s(key)`` (``key`` an int, a :class:`RowKeys`, or
        None for x itself); ``temporary=False`` makes the point the new iterate (an update)."""

    def restore(self) -> None:
        """Back to the iterate x (bit for bit when ``exact``)."""

    def update(self, terms: Sequence[tuple[int, Scales]], decay: Sequence[float] | None = None) -> None:
        """``x <- x (1 - decay) + sum_i scales_i s(key_i)``, completed even if interrupted."""

    def close(self) -> None:
        """Restore and release what the engine holds on the model (a forward engine's hooks)."""

    def direction_bound(self) -> float:
        """The largest |s_i| of a direction before its normalisation and element-wise weights."""

    def direction_scale(self, key: int) -> float:
        """The factor the engine applies to direction ``key``: sqrt(d) / ||s(key)|| with
        ``normalize``, else 1 (the optimizers' bound on an update uses it)."""

    def query_rows(self) -> int | None:
        """The examples the model saw at the current per-example query, or None."""

    def journal_elements(self) -> int:
        """Elements held to make the undo of the current point exact (0 for hooked tensors)."""

    def journal_bytes(self) -> int:
        """Memory of that journal, in bytes."""


def spread_scales(scales: float | Scales, n: int) -> list[float]:
    """One scale per tensor: a number for all n tensors, or a sequence of n."""
    if isinstance(scales, (int, float)):
        return [float(scales)] * n
    scales = [float(s) for s in scales]
    if len(scales) != n:
        raise ValueError(f"scales must have one value per tensor ({n}); got {len(scales)}")
    return scales


def normalization_factor(engine, key: int) -> float:
    """sqrt(d) / ||s(key)|| when the engine normalises its directions (S2P paper, Sec. 3.2), else 1."""
    if not engine.normalize:
        return 1.0
    norm = engine.direction_norm(key)
    return math.sqrt(engine.dim) / norm if norm > 0 else 0.0


class ElementWiseEngine:
    """What the engines that write every element of a direction share (the in-place, small-model and
    vector engines): the query state, a move's checks and target, the bound of a direction's entries
    and the rule for HiZOO's element-wise weights. Expects ``params``, ``_key`` (the applied
    direction or None), ``distribution``, ``normalize``, ``_weights``, ``update`` and
    ``_move_to(target, scales)``, the engine's own way to a query point."""

    #: directions drawn one at a time, when used (see ``Engine.draws_ahead``)
    draws_ahead = 0

    @property
    def is_perturbed(self) -> bool:
        return self._key is not None

    @property
    def weights(self) -> Weights | None:
        """An element-wise multiplier of every direction, or None (plain directions).

        ``weights(j, a, b)`` returns the float32 multipliers of elements ``a:b`` of tensor ``j``
        (on its device); a move then adds ``fl(scale * fl(s * w))`` instead of
        ``fl(scale * s)``, checked and journaled the same way. HiZOO's ``Sigma^(1/2) u`` is such a
        direction. The multipliers must not change while an offset is applied (the undo recomputes
        them), so they can be set only on the unperturbed point.
        """
        return self._weights

    @weights.setter
    def weights(self, fn: Weights | None) -> None:
        self._set_weights(fn)

    def query_rows(self) -> int | None:
        return None  # no per-example queries: every element moves with one direction

    def close(self) -> None:
        """Back to the unperturbed point (the engine holds nothing else)."""
        self.restore()

    def restore(self) -> None:
        """Undo the current offset (bit for bit when ``exact``)."""
        if self._key is not None:
            self.move(None)

    def move(self, key, scales: Scales = 0.0, *, decay: Sequence[float] | None = None, temporary: bool = True) -> None:
        """Go from the current offset to ``x <- x * (1 - decay_j) + scales_j * s(key)``.

        The current offset is first undone (bit for bit when ``exact``). A ``temporary`` move is
        the point of a function query: it is remembered and undone by the next move. A final move
        (``temporary=False``) is an optimizer update: its result is the new unperturbed point. A
        zero scale (or ``key=None``) applies nothing, so a zero update is a pure restore.

        Atomic: if anything raises inside the move (``KeyboardInterrupt`` included), a temporary
        move goes back to the unperturbed point, bit for bit, and an update is completed, before
        the exception propagates (see :mod:`zoptim.engine.atomic`).
        """
        if not temporary:
            self.update([] if key is None else [(key, scales)], decay=decay)
            return
        if decay is not None and any(float(d) != 0.0 for d in decay):
            raise ValueError("weight decay belongs to an update (temporary=False), not to a query's move")
        self._move_to(*self._target(key, scales))

    def _target(self, key, scales) -> tuple[int | None, list[float] | None]:
        """``(key, one scale per tensor)`` of a move, the normalisation factor applied, or ``(None,
        None)`` where it applies nothing."""
        if key is None:
            return None, None
        f = self.direction_scale(key)
        new_scales = [s * f for s in spread_scales(scales, len(self.params))]
        if all(s == 0.0 for s in new_scales):
            return None, None
        return key, new_scales

    def direction_bound(self) -> float:
        """The largest |s_i| of a direction before its normalisation and element-wise weights."""
        return max_abs_value(self.distribution)

    def direction_norm(self, key: int) -> float:
        """||s(key)||_2 over the direction's chunks (``direction_chunks``), summed chunk by chunk in
        the in-place engine's order, so both engines give the same float; cached for the last key."""
        if self._norm_cache is not None and self._norm_cache[0] == key:
            return self._norm_cache[1]
        total = sum(float(torch.dot(z, z)) for _, _, _, z in self.direction_chunks(key))
        norm = math.sqrt(total)
        self._norm_cache = (key, norm)
        return norm

    def direction_scale(self, key: int) -> float:
        """sqrt(d) / ||s(key)|| with ``normalize``, else 1: the factor every move applies."""
        return normalization_factor(self, key)

    def _set_weights(self, fn) -> None:
        """Set the element-wise multipliers; only on the unperturbed point, never with ``normalize``."""
        if self.is_perturbed:
            raise RuntimeError("the direction weights can change only on the unperturbed point; call restore() first")
        if fn is not None and self.normalize:
            raise ValueError("weighted directions cannot be normalized (normalize=True)")
        self._weights = fn
