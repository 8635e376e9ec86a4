"""The methods by name: the one map from a method's name to its optimizer class.

Everything that picks a method by name reads this module: :func:`zoptim.minimize` and
``AskTell(method, x0)``, ``zoptim bench`` (whose recipes in :mod:`zoptim.bench.methods` name a
registered method and add the benchmark's conventions), :func:`zoptim.lm.train.make_optimizer`
and ``zoptim finetune``, and the tests that check every method. Adding a method is one class and
one :func:`register` line below; the others pick it up.

Each entry knows its class, the options it offers beyond plain SGD-like steps (the seed
momentum, the loss guard, several directions a step, directions applied inside the forward, one
direction per example) and a line saying what it is. Its hyper-parameters and their defaults
are its constructor's (:func:`hyperparameters`), so they are written once, in the class.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from .as2p import AS2P
from .base import ZerothOrderOptimizer
from .hizoo import HiZOO
from .s2p import S2P
from .stp import STP
from .zosgd import ZOSGD

#: Options a method may offer, each with the constructor arguments that use it.
OPTION_ARGUMENTS = {
    "momentum": ("momentum", "momentum_window"),
    "guard": ("guard",),
    "directions": ("num_directions",),
    "forward": ("module", "rank"),
    "per_example": ("per_example",),
    "orthogonalize": ("orthogonalize",),
    "spread": ("normalize_by_spread",),
    "sparse_embeddings": ("sparse_embeddings",),
}


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, class, the options it offers and what it is."""

    name: str
    cls: type[ZerothOrderOptimizer]
    options: frozenset
    summary: str

    def hyperparameters(self) -> dict:
        """The constructor's arguments after ``params``, with their defaults."""
        return {n: p.default for n, p in inspect.signature(self.cls.__init__).parameters.items()
                if n not in ("self", "params")}


REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, cls: type[ZerothOrderOptimizer], summary: str, options=()) -> None:
    unknown = set(options) - set(OPTION_ARGUMENTS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)} for {name!r}; known: {', '.join(OPTION_ARGUMENTS)}")
    REGISTRY[name] = MethodSpec(name, cls, frozenset(options), summary)


register("zosgd", ZOSGD, "GA = MeZO = SPSA (k-SPSA with num_directions=k): two-point estimate, SGD step",
         options=("momentum", "guard", "directions", "forward", "per_example", "orthogonalize", "spread",
                  "sparse_embeddings"))
register("as2p", AS2P, "Accelerated S2P (S2P paper, Algorithm 2): gamma-clipping and an automatic learning rate",
         options=("momentum", "directions", "forward", "per_example", "sparse_embeddings"))
register("stp", STP, "Stochastic Three Points (Bergou et al. 2020)", options=("forward",))
register("s2p", S2P, "Stochastic Two-Point search (S2P paper, Algorithm 1, four step rules)", options=("forward",))
register("hizoo", HiZOO, "HiZOO (Zhao et al. 2025): diagonal-Hessian-preconditioned MeZO", options=("guard",))


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name) -> MethodSpec:
    """The method called ``name`` (case-insensitive), or a ValueError listing the known ones."""
    if isinstance(name, type) and issubclass(name, ZerothOrderOptimizer):
        for spec in REGISTRY.values():
            if spec.cls is name:
                return spec
    if isinstance(name, str) and name.lower() in REGISTRY:
        return REGISTRY[name.lower()]
    raise ValueError(f"method must be one of {', '.join(map(repr, REGISTRY))}; got {name!r}")


def check(name, hyperparameters: dict, extra_names=()) -> MethodSpec:
    """The method's entry, once ``hyperparameters`` are known to be its constructor's arguments
    and to use only options it offers (ValueError naming the argument otherwise). ``extra_names``:
    names a caller handles itself (e.g. minimize's run options), listed in the message."""
    spec = get(name)
    known = spec.hyperparameters()
    missing = unsupported(spec.name, hyperparameters)
    if missing:
        key, with_it = missing
        raise ValueError(f"{key} is an option of {and_list(with_it)}; got method {spec.name!r}")
    for key in hyperparameters:
        if key not in known:
            raise ValueError(
                f"unknown option {key!r} for method {spec.name!r}; its hyper-parameters are {', '.join(known)}"
                + (f", and the run's options are {', '.join(extra_names)}" if extra_names else "")
            )
    return spec


def offering(option: str) -> list[str]:
    """The methods that offer ``option`` (a key of :data:`OPTION_ARGUMENTS`)."""
    return [n for n, spec in REGISTRY.items() if option in spec.options]


def unsupported(name, hyperparameters: dict) -> tuple[str, list[str]] | None:
    """The first argument of ``hyperparameters`` that asks for an option the method does not
    offer, with the methods that do; None when there is none."""
    spec = get(name)
    for key, value in hyperparameters.items():
        option = next((opt for opt, args in OPTION_ARGUMENTS.items() if key in args), None)
        if option is not None and option not in spec.options and _active(key, value):
            return key, offering(option)
    return None


def and_list(items) -> str:
    """'a', 'a and b', 'a, b and c': a list in a message."""
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _active(key: str, value) -> bool:
    """Whether an option argument asks for the option (its 'off' values are accepted everywhere)."""
    if key == "num_directions":
        return value != 1
    if key == "momentum_window":  # only read with momentum
        return False
    return value not in (None, 0, 0.0, False)


def build(name, params, **hyperparameters) -> ZerothOrderOptimizer:
    """``cls(params, **hyperparameters)`` for the method called ``name``, after :func:`check`."""
    spec = check(name, hyperparameters)
    return spec.cls(params, **hyperparameters)
