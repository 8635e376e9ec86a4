"""Using any zoptim optimizer with ``transformers.Trainer``, without copying Trainer's loop.

MeZO's public trainer copies Trainer's 500-line inner loop, which pins it to one transformers
release. Here only ``training_step`` (a documented extension point: "Subclass and override to
inject custom behavior") is overridden: it runs the zeroth-order step, whose closure is Trainer's
own ``compute_loss`` on the step's batch. Everything else (data loading, logging, evaluation,
checkpointing, LR schedules, callbacks) stays Trainer's.

Trainer still calls ``optimizer.step()`` after ``training_step``; the optimizer it sees is a
:class:`StepDoneInTrainingStep` view of the zeroth-order optimizer: it shares the same
``param_groups`` (so Trainer's LR scheduler writes the zeroth-order optimizer's ``lr``), its
``state_dict()`` is the zeroth-order optimizer's (seed stream and step counter included, so
Trainer's checkpoints resume it), and its ``step()`` does nothing because the step already
happened. Set ``max_grad_norm=0`` (there are no gradients to clip); :class:`ZOTrainer` does.

Example:
    >>> opt = zoptim.ZOSGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, eps=1e-2)
    >>> trainer = ZOTrainer(model=model, args=TrainingArguments("out", max_steps=100),
    ...                     train_dataset=ds, data_collator=collate, zo_optimizer=opt)
    >>> trainer.train()

AS2P decays its lr with its own cosine only when no torch scheduler drives its groups; under
Trainer (which always attaches one) the Trainer's scheduler is its one decay: pass
``lr_scheduler_type="cosine"`` for the paper's schedule.
"""

from __future__ import annotations

import torch
from transformers import Trainer


class StepDoneInTrainingStep(torch.optim.Optimizer):
    """What Trainer sees as its optimizer: a view of a zeroth-order optimizer whose ``step()`` is
    a no-op (the zeroth-order step ran inside ``training_step``)."""

    def __init__(self, optimizer):
        self.__dict__["zo"] = None
        # Optimizer.__init__ wants parameters; give it the real ones. Afterwards param_groups,
        # state and defaults *are* the zeroth-order optimizer's (properties, not copies: its
        # load_state_dict replaces its lists, and a copy would go stale).
        super().__init__([p for g in optimizer.param_groups for p in g["params"]], {})
        self.__dict__["zo"] = optimizer

    def _shared(name):  # noqa: N805 -- a property factory used in the class body
        def get(self):
            zo = self.__dict__["zo"]
            return self.__dict__["_own_" + name] if zo is None else getattr(zo, name)

        def set(self, value):
            zo = self.__dict__["zo"]
            if zo is None:
                self.__dict__["_own_" + name] = value
            else:
                setattr(zo, name, value)

        return property(get, set)

    param_groups = _shared("param_groups")
    state = _shared("state")
    defaults = _shared("defaults")
    del _shared

    def step(self, closure=None):
        flush = self.__dict__.get("flush")
        if flush is not None:  # micro-batches left over that no training_step closed (see ZOTrainer)
            flush()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self):
        return self.zo.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.zo.load_state_dict(state_dict)


class ZOTrainer(Trainer):
    """``transformers.Trainer`` driven by a zoptim optimizer (``zo_optimizer=``).

    Only :meth:`training_step` differs from Trainer: the model is put in eval mode (the two
    queries of a step must differ only by the perturbation, not by dropout) and the step is
    ``zo_optimizer.step(lambda: self.compute_loss(model, inputs))``.

    Gradient accumulation (``gradient_accumulation_steps = k > 1``): one zeroth-order step per
    optimizer step, as with gradients. ``training_step`` keeps the first k - 1 micro-batches of
    the window (returning a zero loss for them) and at the last one, where Trainer sets
    ``accelerator.sync_gradients``, makes the step whose closure is the loss over all k
    micro-batches, each weighted by its number of examples: the mean loss of the concatenated
    batch. Each query then costs k forward passes (``num_queries`` counts queries, not passes).

    Per-example directions (an optimizer built with ``per_example=True``, e.g. ``ZOSGD(...,
    module=model, rank=4, per_example=True)``, what ``zoptim finetune --lora`` uses; the
    orthogonalised update lost on both LM benchmarks): the closure returns each
    example's loss, :meth:`compute_loss_per_example` (override it for another loss), so that
    example i's two queries give its own directional derivative. One micro-batch per step
    (``gradient_accumulation_steps=1``): the examples of a step share one forward.
    """

    def __init__(self, *args, zo_optimizer=None, **kwargs):
        if zo_optimizer is None or not hasattr(zo_optimizer, "num_queries"):
            raise ValueError("zo_optimizer must be a zoptim optimizer (e.g. zoptim.ZOSGD); got "
                             f"{type(zo_optimizer).__name__}")
        self.zo_optimizer = zo_optimizer
        self._micro_batches = []
        view = StepDoneInTrainingStep(zo_optimizer)
        view.__dict__["flush"] = self._flush
        kwargs["optimizers"] = (view, kwargs.get("optimizers", (None, None))[1])
        super().__init__(*args, **kwargs)
        self.args.max_grad_norm = 0.0
        if getattr(zo_optimizer, "per_example", False) and self.args.gradient_accumulation_steps > 1:
            raise ValueError(
                "a per_example=True optimizer needs gradient_accumulation_steps=1: each example's directions "
                "live in the rows of one forward pass, and micro-batches are separate forwards"
            )

    def _window_closed(self) -> bool:
        """True at the last micro-batch of an optimizer step (Trainer tells accelerate so)."""
        if self.args.gradient_accumulation_steps <= 1:
            return True
        state = getattr(getattr(self, "accelerator", None), "gradient_state", None)
        if state is not None and hasattr(state, "sync_gradients"):
            return bool(state.sync_gradients)
        return len(self._micro_batches) >= self.args.gradient_accumulation_steps

    @staticmethod
    def _num_examples(inputs) -> int:
        labels = inputs.get("labels") if hasattr(inputs, "get") else None
        return int(labels.shape[0]) if isinstance(labels, torch.Tensor) and labels.dim() > 0 else 1

    def _flush(self, model=None):
        """The zeroth-order step over the pending micro-batches; its loss (a float) or None."""
        batches, self._micro_batches = self._micro_batches, []
        if not batches:
            return None
        if model is None:
            model = self.model_wrapped if getattr(self, "model_wrapped", None) is not None else self.model
        weights = [self._num_examples(b) for b in batches]
        total = float(sum(weights))

        def closure():
            with self.compute_loss_context_manager():
                if getattr(self.zo_optimizer, "per_example", False):
                    return self.compute_loss_per_example(model, batches[0])
                if len(batches) == 1:
                    return self.compute_loss(model, batches[0])
                return sum(self.compute_loss(model, b) * (w / total) for b, w in zip(batches, weights))

        return float(self.zo_optimizer.step(closure))

    def compute_loss_per_example(self, model, inputs) -> torch.Tensor:
        """Each example's loss, a 1-D tensor of the batch's size (its mean is Trainer's loss for a
        classifier), from the model's ``logits`` and the batch's ``labels``: cross-entropy per
        example for class logits (batch x classes), and for a causal LM (batch x tokens x vocab)
        the mean of its next-token cross-entropies over the positions whose label is not -100
        (the shift ``transformers``' causal LMs apply to ``labels``). Override it for another loss."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("compute_loss_per_example needs the batch's 'labels' (or override it)")
        logits = model(**inputs)["logits"].float()
        labels = labels.to(logits.device)
        if logits.dim() == 2:
            return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        if logits.dim() != 3:
            raise ValueError(f"compute_loss_per_example: logits of shape {tuple(logits.shape)}; expected "
                             "(batch, classes) or (batch, tokens, vocab) (or override it)")
        labels = labels[:, 1:]
        tokens = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                                   reduction="none")
        counted = (labels != -100).sum(dim=1)
        return tokens.sum(dim=1) / counted.clamp(min=1)

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.eval()
        self._micro_batches.append(self._prepare_inputs(inputs))
        if not self._window_closed():
            return torch.zeros((), device=self.args.device)
        return torch.tensor(self._flush(model), device=self.args.device)
