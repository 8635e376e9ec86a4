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
AS2P's step size is tied to rho_k as in the paper (lr=None); its ablation without the automatic
learning rate uses GA's ``lr``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import zoptim


@dataclass(frozen=True)
class Method:
    """A named optimizer recipe. ``uses``: the hyper-parameter keys it reads (recorded per run)."""

    name: str
    kind: str  # "zosgd" | "stp" | "s2p" | "as2p" | "hizoo"
    queries_per_step: int
    uses: tuple
    options: dict = field(default_factory=dict)
    description: str = ""

    def build(self, params, hparams: dict, total_steps: int, seed: int, module=None):
        """(optimizer, scheduler or None) for a run of ``total_steps`` steps. ``module``: the model,
        for the methods whose directions are applied inside its forward (option ``rank``)."""
        params = list(params)
        o = self.options
        forward = {}
        if o.get("rank") is not None:
            if module is None:
                raise ValueError(f"{self.name} applies its directions in the model's forward: build it with module=model")
            forward = dict(module=module, rank=o["rank"])
            if o.get("per_example"):
                forward["per_example"] = True
        if self.kind == "zosgd":
            opt = zoptim.ZOSGD(params, lr=hparams["lr"], eps=hparams["eps"], num_directions=o.get("num_directions", 1),
                               distribution=o.get("distribution", "normal"), seed=seed,
                               momentum=o.get("momentum", 0.0), momentum_window=o.get("momentum_window", 8),
                               guard=o.get("guard", 0.0), **forward)
        elif self.kind == "stp":
            opt = zoptim.STP(params, lr=hparams["stp_lr"], distribution=o.get("distribution", "normal"), seed=seed)
        elif self.kind == "s2p":
            opt = zoptim.S2P(params, step_rule="stationary", lr=hparams["s2p_lr"], total_steps=total_steps,
                             rho=hparams["eps"], distribution=o.get("distribution", "normal"), seed=seed)
        elif self.kind == "as2p":
            auto_lr = o.get("auto_lr", True)
            opt = zoptim.AS2P(params, eps=hparams["eps"], eta_b=o.get("eta_b", hparams["eta_b"]), total_steps=total_steps,
                              batch_mode=o.get("batch_mode", "minibatch"), lr=None if auto_lr else hparams["lr"],
                              distribution=o.get("distribution", "normal"), seed=seed, auto_lr=auto_lr,
                              clipping=o.get("clipping", True), momentum=o.get("momentum", 0.0),
                              momentum_window=o.get("momentum_window", 8), **forward)
        elif self.kind == "hizoo":
            opt = zoptim.HiZOO(params, lr=hparams["lr"], eps=hparams["eps"],
                               hessian_smooth=hparams.get("hessian_smooth", HIZOO_SMOOTH), factored=o.get("factored", False),
                               guard=o.get("guard", 0.0), seed=seed)
        else:  # pragma: no cover - the table below is the only source of methods
            raise ValueError(f"unknown method kind {self.kind!r}")
        if opt.queries_per_step != self.queries_per_step:
            raise RuntimeError(f"{self.name}: optimizer spends {opt.queries_per_step} queries a step, expected {self.queries_per_step}")
        scheduler = None
        if self.kind != "as2p" and not o.get("constant_lr", False):  # AS2P decays rho_k and lr_k internally
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps), eta_min=0.0)
        return opt, scheduler


def _table() -> dict[str, Method]:
    m = {}

    def add(name, kind, qps, uses, description, **options):
        m[name] = Method(name, kind, qps, tuple(uses), options, description)

    add("ZOSGD", "zosgd", 2, ("lr", "eps"), "GA / MeZO: two-point Gaussian estimate, SGD step (S2P paper's GA)")
    add("ZOSGD-rademacher", "zosgd", 2, ("lr", "eps"), "GA_sign: ZOSGD with Rademacher directions", distribution="rademacher")
    add("ZOSGD-uniform", "zosgd", 2, ("lr", "eps"), "ZOSGD with unit-variance uniform directions", distribution="uniform")
    for k in (2, 4, 8):
        add(f"ZOSGD-k{k}", "zosgd", 2 * k, ("lr", "eps"), f"k-SPSA: average of {k} two-point estimates", num_directions=k)
    for k in (1, 2, 4, 8):
        add(f"kSPSA-k{k}", "zosgd", 2 * k, ("lr", "eps"), f"ZO-SGD with k-SPSA, k = {k}, constant lr (softmax paper)",
            num_directions=k, constant_lr=True)
    add("STP", "stp", 3, ("stp_lr",), "Stochastic Three Points (Bergou et al. 2020)")
    add("S2P", "s2p", 2, ("s2p_lr", "eps"), "S2P, stationary step rule (Option 1)")
    add("AS2P", "as2p", 2, ("eps", "eta_b"), "Accelerated S2P, Algorithm 2")
    add("AS2P-rademacher", "as2p", 2, ("eps", "eta_b"), "AS2P_sign", distribution="rademacher")
    add("AS2P-uniform", "as2p", 2, ("eps", "eta_b"), "AS2P with uniform directions", distribution="uniform")
    add("AS2P-no-auto-lr", "as2p", 2, ("eps", "eta_b", "lr"), "AS2P without the automatic learning rate (GA's lr)", auto_lr=False)
    add("AS2P-no-clipping", "as2p", 2, ("eps", "eta_b"), "AS2P without progressive gamma-clipping", clipping=False)
    add("ZOSGD-momentum", "zosgd", 2, ("lr", "eps"), "ZOSGD with memory-free seed momentum, beta 0.9 over 8 steps",
        momentum=0.9, momentum_window=8)
    add("AS2P-momentum", "as2p", 2, ("eps", "eta_b"), "AS2P with memory-free seed momentum, beta 0.9 over 8 steps",
        momentum=0.9, momentum_window=8)
    add("ZOSGD-guard", "zosgd", 2, ("lr", "eps"), "ZOSGD with the loss guard (tol 0.02): lr halves when the loss rises",
        guard=GUARD_TOL)
    add("ZOSGD-momentum-guard", "zosgd", 2, ("lr", "eps"), "ZOSGD-momentum with the loss guard (tol 0.02)",
        momentum=0.9, momentum_window=8, guard=GUARD_TOL)
    add("HiZOO", "hizoo", 3, ("lr", "eps", "hessian_smooth"), "HiZOO (Zhao et al. 2025): diagonal-Hessian-preconditioned MeZO")
    add("HiZOO-factored", "hizoo", 3, ("lr", "eps", "hessian_smooth"), "HiZOO with the rank-one factored Hessian estimate",
        factored=True)
    for rank in (1, 4, 16):
        suffix = "" if rank == 1 else f"-r{rank}"
        add(f"ZOSGD-lowrank{suffix}", "zosgd", 2, ("lr", "eps"),
            f"ZOSGD with rank-{rank} matrix directions applied in the forward (module=model, rank={rank})", rank=rank)
    add("AS2P-lowrank", "as2p", 2, ("eps", "eta_b"), "AS2P with rank-1 matrix directions applied in the forward", rank=1)
    add("ZOSGD-perexample", "zosgd", 2, ("lr", "eps"),
        "ZOSGD with one rank-1 direction per example of the minibatch (per_example=True): B deltas per step",
        rank=1, per_example=True)
    add("AS2P-perexample", "as2p", 2, ("eps", "eta_b"),
        "AS2P with one rank-1 direction per example, each delta a gamma", rank=1, per_example=True)
    for eta_b in (1, 3, 5, 10, 50):
        add(f"AS2P-etab{eta_b}", "as2p", 2, ("eps",), f"AS2P with eta_b = {eta_b}", eta_b=float(eta_b))
    return m


#: The loss guard's tol in the benchmark's guarded methods (:class:`zoptim.optim.guard.LossGuard`).
GUARD_TOL = 0.02
#: HiZOO's alpha when a problem names none: the largest of the paper's grid {1e-6, 1e-7, 1e-8}.
HIZOO_SMOOTH = 1e-6
METHODS: dict[str, Method] = _table()
#: Every hyper-parameter key some method reads (what ``zoptim bench --set KEY=VALUE`` accepts).
HPARAM_KEYS: tuple[str, ...] = tuple(sorted({key for method in METHODS.values() for key in method.uses}))
#: The paper's baseline for the training cost ratio (GA, i.e. MeZO).
BASELINE = "ZOSGD"


def get_method(name: str) -> Method:
    """The method called ``name`` (case-insensitive); ValueError listing the known names otherwise."""
    for key, method in METHODS.items():
        if key.lower() == name.lower():
            return method
    raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
