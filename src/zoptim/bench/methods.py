"""The compared methods by name, each with the paper's hyper-parameter conventions (Table 3).

A method is a recipe: given the model's parameters, the hyper-parameters, the number of steps K
that the query budget allows and a seed, it builds the zoptim optimizer and (for methods whose
learning rate decays through ``param_groups``) a cosine LR scheduler. Every method decays its
step size with a cosine schedule (Table 3: "LR scheduler: cosine decay" for all), AS2P inside
the optimizer, the others through ``torch.optim.lr_scheduler.CosineAnnealingLR``.

Hyper-parameter keys: ``lr`` (GA's alpha_0), ``eps`` (rho_0), ``stp_lr`` (STP's alpha_0),
``s2p_lr`` (alpha_0 of S2P's stationary rule, alpha = alpha_0 / sqrt(K d)), ``eta_b`` (AS2P),
``hessian_smooth`` (HiZOO's alpha; default :data:`HIZOO_SMOOTH`). HiZOO, the momentum
variants and the guarded ZOSGD take GA's ``lr`` and ``eps``.
AS2P's lr_0 is rho_0 as in the paper (its default, lr = eps); its ablation without the automatic
learning rate uses GA's ``lr``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..lm.models import embedding_block
from ..optim import registry

#: Which hyper-parameter key of a problem's table feeds each constructor argument, per method
#: (the paper's conventions, Table 3). A recipe may add arguments (its ``args``) or fix them (``options``).
ARGS = {
    "zosgd": {"lr": "lr", "eps": "eps"},
    "stp": {"lr": "stp_lr"},
    "s2p": {"lr": "s2p_lr", "rho": "eps"},
    "as2p": {"eps": "eps", "eta_b": "eta_b"},
    "hizoo": {"lr": "lr", "eps": "eps", "hessian_smooth": "hessian_smooth"},
}


@dataclass(frozen=True)
class Method:
    """A named recipe over a registered method (``kind``, see :mod:`zoptim.optim.registry`):
    ``args`` maps constructor arguments to the problem's hyper-parameter keys, ``options`` fixes
    constructor arguments (and ``constant_lr``, a benchmark convention: no cosine scheduler)."""

    name: str
    kind: str
    args: dict
    options: dict = field(default_factory=dict)
    description: str = ""

    @property
    def uses(self) -> tuple:
        """The hyper-parameter keys it reads (recorded per run)."""
        return tuple(dict.fromkeys(self.args.values()))

    @cached_property
    def queries_per_step(self) -> int:
        """Asked of the optimizer itself, built over a one-element probe (once per recipe)."""
        probe = torch.nn.Parameter(torch.zeros(1))
        opt = self._optimizer([probe], {key: 1e-3 for key in self.uses}, total_steps=1, seed=0, module=None, probe=True)
        return opt.queries_per_step

    def _optimizer(self, params, hparams: dict, total_steps: int, seed: int, module, probe: bool = False):
        spec = registry.get(self.kind)
        kwargs = {arg: hparams.get(key, HIZOO_SMOOTH if key == "hessian_smooth" else None)
                  for arg, key in self.args.items()}
        # the options that need the model (the probe, which has none, leaves them out)
        needs_model = ("forward", "rank", "per_example", "orthogonalize", "normalize_by_spread", "sparse_embeddings")
        kwargs.update({k: v for k, v in self.options.items()
                       if k not in ("constant_lr", "freeze_embeddings") and k not in needs_model})
        if "total_steps" in spec.hyperparameters():
            kwargs["total_steps"] = total_steps
        forward = self.options.get("forward", False) or self.options.get("rank") is not None
        if forward and not probe:
            if module is None:
                raise ValueError(f"{self.name} applies its directions in the model's forward: build it with module=model")
            kwargs["module"] = module
            for option in ("rank", "per_example", "orthogonalize", "normalize_by_spread", "sparse_embeddings"):
                if self.options.get(option):
                    kwargs[option] = self.options[option]
        return registry.build(self.kind, params, seed=seed, **kwargs)

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The tensors the method tunes: the model's trainable ones, less its embedding block with the
        option ``freeze_embeddings`` (:func:`zoptim.lm.models.embedding_block`)."""
        frozen = {id(p) for p in embedding_block(model)} if self.options.get("freeze_embeddings") else set()
        if self.options.get("freeze_embeddings") and not frozen:
            raise ValueError(f"{self.name} freezes the embedding block; {type(model).__name__} has no trainable "
                             "parameter named '*embeddings*'")
        return [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]

    def build(self, params, hparams: dict, total_steps: int, seed: int, module=None):
        """(optimizer, scheduler or None) for a run of ``total_steps`` steps. ``module``: the model,
        for the methods whose directions are applied inside its forward (options ``forward``, ``rank``)."""
        opt = self._optimizer(list(params), hparams, total_steps, seed, module)
        scheduler = None
        if self.kind != "as2p" and not self.options.get("constant_lr", False):  # AS2P decays rho_k and lr_k internally
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps), eta_min=0.0)
        return opt, scheduler


def _table() -> dict[str, Method]:
    m = {}

    def add(name, kind, description, args=None, **options):
        m[name] = Method(name, kind, dict(ARGS[kind] if args is None else args), options, description)

    add("ZOSGD", "zosgd", "GA / MeZO: two-point Gaussian estimate, SGD step (S2P paper's GA)")
    add("ZOSGD-rademacher", "zosgd", "GA_sign: ZOSGD with Rademacher directions", distribution="rademacher")
    add("ZOSGD-uniform", "zosgd", "ZOSGD with unit-variance uniform directions", distribution="uniform")
    for k in (2, 4, 8):
        add(f"ZOSGD-k{k}", "zosgd", f"k-SPSA: average of {k} two-point estimates", num_directions=k)
    for k in (1, 2, 4, 8):
        add(f"kSPSA-k{k}", "zosgd", f"ZO-SGD with k-SPSA, k = {k}, constant lr (softmax paper)",
            num_directions=k, constant_lr=True)
    add("STP", "stp", "Stochastic Three Points (Bergou et al. 2020)")
    add("S2P", "s2p", "S2P, stationary step rule (Option 1)")
    add("AS2P", "as2p", "Accelerated S2P, Algorithm 2")
    add("AS2P-rademacher", "as2p", "AS2P_sign", distribution="rademacher")
    add("AS2P-uniform", "as2p", "AS2P with uniform directions", distribution="uniform")
    add("AS2P-no-auto-lr", "as2p", "AS2P without the automatic learning rate (GA's lr)",
        args=dict(ARGS["as2p"], lr="lr"), auto_lr=False)
    add("AS2P-no-clipping", "as2p", "AS2P without progressive gamma-clipping", clipping=False)
    add("ZOSGD-momentum", "zosgd", "ZOSGD with memory-free seed momentum, beta 0.9 over 8 steps",
        momentum=0.9, momentum_window=8)
    add("AS2P-momentum", "as2p", "AS2P with memory-free seed momentum, beta 0.9 over 8 steps",
        momentum=0.9, momentum_window=8)
    add("ZOSGD-guard", "zosgd", "ZOSGD with the loss guard (tol 0.02): lr halves when the loss rises",
        guard=GUARD_TOL)
    add("ZOSGD-momentum-guard", "zosgd", "ZOSGD-momentum with the loss guard (tol 0.02)",
        momentum=0.9, momentum_window=8, guard=GUARD_TOL)
    add("HiZOO", "hizoo", "HiZOO (Zhao et al. 2025): diagonal-Hessian-preconditioned MeZO")
    add("HiZOO-factored", "hizoo", "HiZOO with the rank-one factored Hessian estimate",
        factored=True)
    add("ZOSGD-forward", "zosgd", "ZOSGD with full-rank directions applied in the forward (module=model)",
        forward=True)
    for rank in (1, 4, 16):
        suffix = "" if rank == 1 else f"-r{rank}"
        add(f"ZOSGD-lowrank{suffix}", "zosgd",
            f"ZOSGD with rank-{rank} matrix directions applied in the forward (module=model, rank={rank})", rank=rank)
    add("ZOSGD-frozenemb", "zosgd", "ZOSGD (GA) with the embedding block frozen: the control of ZOSGD-lowrank-r4-frozenemb",
        freeze_embeddings=True)
    add("ZOSGD-lowrank-r4-frozenemb", "zosgd",
        "ZOSGD-lowrank-r4 with the embedding block frozen (its tensors not tuned): a low-rank direction shifts "
        "every looked-up row along the same r columns", rank=4, freeze_embeddings=True)
    add("AS2P-lowrank", "as2p", "AS2P with rank-1 matrix directions applied in the forward", rank=1)
    add("ZOSGD-perexample", "zosgd",
        "ZOSGD with one rank-1 direction per example of the minibatch (per_example=True): B deltas per step",
        rank=1, per_example=True)
    for rank in (4, 8, 16):
        add(f"ZOSGD-perexample-r{rank}", "zosgd",
            f"ZOSGD with one rank-{rank} direction per example (per_example=True, rank={rank}): B deltas per step "
            "along directions whose entries are closer to Gaussian than rank 1's products", rank=rank, per_example=True)
    add("ZOSGD-perexample-r8-guard", "zosgd",
        "ZOSGD-perexample-r8 with the loss guard (tol 0.02): rank 8 fell fastest and then ran away at its "
        "search's lr on Fashion-MNIST, the failure the guard cuts", rank=8, per_example=True, guard=GUARD_TOL)
    add("AS2P-perexample", "as2p",
        "AS2P with one rank-1 direction per example, each delta a gamma", rank=1, per_example=True)
    add("ZOSGD-perexample-orth", "zosgd",
        "ZOSGD with one rank-1 direction per example and the orthogonalised update (orthogonalize=True): each "
        "matrix steps along the polar factor of its rank-B estimate, lr = the step's RMS", rank=1, per_example=True,
        orthogonalize=True)
    add("ZOSGD-perexample-orth-momentum", "zosgd",
        "ZOSGD-perexample-orth with the seed momentum (beta 0.9 over 8 steps) under the polar factor",
        rank=1, per_example=True, orthogonalize=True, momentum=0.9, momentum_window=8)
    add("ZOSGD-perexample-spread", "zosgd",
        "ZOSGD-perexample with the step divided by the standard deviation of the B deltas (FZOO's normalised step)",
        rank=1, per_example=True, normalize_by_spread=True)
    add("ZOSGD-perexample-r4-spread", "zosgd",
        "ZOSGD-perexample-r4 with the step divided by the standard deviation of the B deltas (FZOO's normalised "
        "step, which FZOO measured on language models)", rank=4, per_example=True, normalize_by_spread=True)
    for base in ("ZOSGD-perexample-r4", "ZOSGD-perexample-orth"):
        add(f"{base}-sparse", "zosgd",
            f"{base} with sparse_embeddings=True: an embedding matrix moves only in the rows each direction's "
            "examples looked up (the rest of its estimate is noise)", **{**m[base].options, "sparse_embeddings": True})
    for k in (4, 16):
        add(f"ZOSGD-k{k}-orth", "zosgd",
            f"ZOSGD with {k} shared rank-1 directions a step and the orthogonalised update of their rank-{k} estimate",
            num_directions=k, rank=1, orthogonalize=True)
    for eta_b in (1, 3, 5, 10, 50):
        add(f"AS2P-etab{eta_b}", "as2p", f"AS2P with eta_b = {eta_b}", args={"eps": "eps"}, eta_b=float(eta_b))
    return m


#: The loss guard's tol in the benchmark's guarded methods (:class:`zoptim.optim.guard.LossGuard`).
GUARD_TOL = 0.02
#: HiZOO's alpha when a problem names none: the largest of the paper's grid {1e-6, 1e-7, 1e-8}.
HIZOO_SMOOTH = 1e-6
RECIPES: dict[str, Method] = _table()
#: Every hyper-parameter key some method reads (what ``zoptim bench --set KEY=VALUE`` accepts).
HPARAM_KEYS: tuple[str, ...] = tuple(sorted({key for method in RECIPES.values() for key in method.uses}))
#: The paper's baseline for the training cost ratio (GA, i.e. MeZO).
BASELINE = "ZOSGD"


def get_method(name: str) -> Method:
    """The recipe called ``name`` (case-insensitive). A method of the registry without a recipe
    of its own runs as itself, reading the keys its constructor shares with GA's table (``lr``,
    ``eps``). ValueError listing the known names otherwise."""
    for key, method in RECIPES.items():
        if key.lower() == name.lower():
            return method
    if name.lower() in registry.names():
        known = registry.get(name).hyperparameters()
        return Method(name.lower(), name.lower(), {k: k for k in ("lr", "eps") if k in known}, {},
                      registry.get(name).summary)
    raise ValueError(f"unknown method {name!r}; known methods: {', '.join(RECIPES)} (and the registry's "
                     f"{', '.join(registry.names())})")
