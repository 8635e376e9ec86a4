"""State compatibility: what ``state_dict`` records, and the checks before ``load_state_dict``.

A run resumed from a state continues bit for bit only if it draws the same directions with the
same settings, so every setting that shapes the run is recorded and compared first; a
difference is a ``ValueError`` naming the field and both values.
"""

from __future__ import annotations

from ..engine.noise import NOISE_VERSION


class CompatibleState:
    """The ``state_dict`` / ``load_state_dict`` of :class:`~zoptim.optim.base.ZerothOrderOptimizer`."""

    #: Attributes set by a subclass's constructor that shape a run (its directions, schedules and
    #: windows): recorded by ``state_dict`` and compared by ``load_state_dict``.
    _settings: tuple[str, ...] = ()

    def _run_settings(self) -> dict:
        """Every constructor setting that shapes the run, as plain values (see :meth:`load_state_dict`)."""
        settings = {
            "distribution": self._distribution,
            "normalize": self._normalize,
            "exact_restore": self._exact,
            "group_shapes": [[list(p.shape) for p in g["params"]] for g in self.param_groups],
        }
        for name in self._settings:
            settings[name] = getattr(self, name)
        return settings

    def _extra_state(self) -> dict:
        return {
            "settings": self._run_settings(),
            "class": type(self).__name__,
            "noise_version": NOISE_VERSION,
            "dim": self.dim,
            "seed": self.seed,
            "steps": self.steps,
            "num_queries": self.num_queries,
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_run": self._nonfinite_run,
            "rank": self._rank,
            "forward": self._module is not None,
            "per_example": self.per_example,
            "orthogonalize": self.orthogonalize,
            "sparse_embeddings": self.sparse_embeddings,
            **({"momentum": self.momentum.state()} if self.momentum is not None else {}),
            **({"guard": self.guard.state()} if self.guard is not None else {}),
        }

    def _load_extra_state(self, extra: dict) -> None:
        self.seed = int(extra["seed"])
        self.steps = int(extra["steps"])
        self.num_queries = int(extra["num_queries"])
        self.nonfinite_steps = int(extra["nonfinite_steps"])
        self._nonfinite_run = int(extra["nonfinite_run"])
        if self.momentum is not None:
            self.momentum.load(extra["momentum"])
        if self.guard is not None:
            self.guard.load(extra["guard"])

    def _check_compatible(self, extra: dict) -> None:
        """Refuse a state_dict from another class, another noise stream or another model."""
        cls = extra.get("class", type(self).__name__)
        if cls != type(self).__name__:
            raise ValueError(f"state_dict was saved by {cls}; it cannot be loaded into {type(self).__name__}")
        version = extra.get("noise_version", 1)
        if version != NOISE_VERSION:
            raise ValueError(
                f"state_dict was saved with noise_version {version}, this zoptim draws noise_version "
                f"{NOISE_VERSION}: its directions would differ, so the run could not resume as it was. "
                "Start a new run, or resume with the zoptim version that saved it."
            )
        dim = extra.get("dim", self.dim)
        if int(dim) != self.dim:
            raise ValueError(
                f"state_dict was saved for {dim} trainable scalars; this optimizer has {self.dim} "
                "(another model, or other parameters frozen)"
            )
        for field, mine_value in (("forward", self._module is not None), ("rank", self._rank),
                                  ("per_example", self.per_example), ("orthogonalize", self.orthogonalize),
                                  ("sparse_embeddings", self.sparse_embeddings)):
            saved_value = extra.get(field, None if field == "rank" else False)
            if saved_value != mine_value:
                raise ValueError(
                    f"state_dict was saved with {field}={saved_value!r}; this optimizer has {field}={mine_value!r} "
                    "(the directions would differ, so the run could not resume as it was)"
                )
        saved, mine = extra.get("momentum"), self.momentum
        if (saved is None) != (mine is None):
            have = "no momentum" if mine is None else f"momentum={mine.beta}"
            was = "without momentum" if saved is None else f"with momentum={saved['beta']}"
            raise ValueError(f"state_dict was saved {was}; this optimizer has {have}")
        if mine is not None and int(saved["window"]) != mine.window:  # beta comes with the state's groups
            raise ValueError(
                f"state_dict was saved with momentum_window={saved['window']}; this optimizer has "
                f"momentum_window={mine.window}"
            )
        saved_settings, mine_settings = extra.get("settings"), self._run_settings()
        if saved_settings is not None:  # a state without recorded settings is compared on the fields above
            # hyper-parameters held in param_groups come with the state's groups, as lr does in torch
            for field in sorted((set(saved_settings) | set(mine_settings)) - set(self.defaults)):
                was, have = saved_settings.get(field), mine_settings.get(field)
                if was != have:
                    raise ValueError(f"state_dict was saved with {field}={was!r}; this optimizer has {field}={have!r}")
        saved_guard = extra.get("guard")
        if (saved_guard is None) != (self.guard is None):  # its tol comes with the state's groups
            was = "without a guard" if saved_guard is None else f"with guard={saved_guard['tol']}"
            have = "none" if self.guard is None else f"guard={self.guard.tol}"
            raise ValueError(f"state_dict was saved {was}; this optimizer has {have}")

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["zoptim"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict()`` of an optimizer built with the same settings.

        Every recorded setting (the distribution, the directions, eps, schedules and windows, where
        directions are applied, the groups' shapes, ...) is compared first; a difference raises
        ``ValueError`` naming the field and both values. Loading is all or nothing: if anything
        fails part way, the optimizer is put back as it was before the exception propagates."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("zoptim", None)
        if extra is None:
            raise ValueError("state_dict has no 'zoptim' entry: it was not saved by a zoptim optimizer")
        self._check_compatible(extra)
        before = self.state_dict()
        try:
            super().load_state_dict(state_dict)
            saved_settings = extra.get("settings") or {}
            for group in self.param_groups:  # a group without an entry takes the recorded setting or the default
                for name, default in self.defaults.items():
                    group.setdefault(name, saved_settings.get(name, default))
            self._load_extra_state(extra)
        except BaseException:
            before_extra = before.pop("zoptim")
            super().load_state_dict(before)
            self._load_extra_state(before_extra)
            raise

