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

For AS2P, whose learning rate follows its own cosine schedule, keep Trainer's scheduler at
``lr_scheduler_type="constant"`` and pass ``lr`` explicitly (a scheduler cannot scale ``None``).
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
    """

    def __init__(self, *args, zo_optimizer=None, **kwargs):
        if zo_optimizer is None or not hasattr(zo_optimizer, "num_queries"):
            raise ValueError("zo_optimizer must be a zoptim optimizer (e.g. zoptim.ZOSGD); got "
                             f"{type(zo_optimizer).__name__}")
        self.zo_optimizer = zo_optimizer
        kwargs["optimizers"] = (StepDoneInTrainingStep(zo_optimizer), kwargs.get("optimizers", (None, None))[1])
        super().__init__(*args, **kwargs)
        self.args.max_grad_norm = 0.0

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.eval()
        inputs = self._prepare_inputs(inputs)

        def closure():
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs)

        loss = self.zo_optimizer.step(closure)
        return torch.tensor(float(loss), device=self.args.device)
