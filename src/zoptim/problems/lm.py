"""A language-model fine-tuning task as a benchmark problem (``lm-smollm2-rt``, ``lm-minilm-rt``).

Kept cheap for a benchmark: LoRA adapters only (rank 8), minibatches of 4 prompts of at most 32
tokens, and a "full" loss on a fixed subset of 32 training examples.
"""

from __future__ import annotations

import torch

from ..lm.data import load_task
from ..lm.models import apply_lora, load_model, resolve
from ..lm.prompts import PromptClassifier, get_prompt
from ..runloop import minibatch
from .base import Problem


class LMProblem(Problem):
    """Prompt-based classification (see :mod:`zoptim.lm.prompts`) of ``task`` with ``model``."""

    #: The search grid around GA's default lr 1e-3 for LoRA (``--suite methods-lm-search``).
    lr_grid = (5e-3, 2e-3, 1e-3, 5e-4)
    eps_grid = (1e-3,)
    #: The orthogonalised update's grid (the RMS of each tensor's step) with LoRA.
    orth_lr_grid = (1e-3, 3e-4, 1e-4, 3e-5)

    def __init__(
        self,
        model: str = "smollm2",
        task: str = "rt-sentiment",
        lora: bool = True,
        batch_size: int = 4,
        max_length: int = 32,
        num_train: int = 1000,
        full_loss_examples: int = 32,
        test_examples: int = 500,
        dtype=torch.float32,
        seed: int = 0,
        lr_grid: tuple[float, ...] | None = None,
        orth_lr_grid: tuple[float, ...] | None = None,
    ):
        if batch_size < 1 or full_loss_examples < 1:
            raise ValueError(f"batch_size and full_loss_examples must be >= 1; got {batch_size}, {full_loss_examples}")
        self.model_name, self.lora, self.dtype = model, lora, dtype
        self.batch_size, self.max_length = batch_size, max_length
        self.task = load_task(task, seed=seed, num_train=num_train, num_val=0, num_test=0)
        self.prompt = get_prompt(task)
        self.full_examples = self.task.train[:full_loss_examples]
        self.test_examples, self.seed, self._test = test_examples, seed, None
        self.name = f"lm-{model}-{task}" + ("-lora" if lora else "")
        if not lora:  # all weights: around GA's lr 1e-5 (benchmarks/lm_minilm.sh), a step of RMS 1e-5 as AdamW's;
            # the top values added when GA's and the orthogonalised step's searches picked the old grids' tops
            self.lr_grid, self.orth_lr_grid = (1e-4, 3e-5, 1e-5, 3e-6), (3e-4, 1e-4, 3e-5, 1e-5)
        if lr_grid is not None:  # GA's search grid for this instance
            self.lr_grid = tuple(float(lr) for lr in lr_grid)
        if orth_lr_grid is not None:  # the orthogonalised and spread-normalised steps' grid for this instance
            self.orth_lr_grid = tuple(float(lr) for lr in orth_lr_grid)

    def make_model(self, seed: int = 0) -> PromptClassifier:
        model, tokenizer = load_model(self.model_name, dtype=self.dtype)
        _, kind = resolve(self.model_name)
        if self.lora:
            model = apply_lora(model, seed=seed)
        return PromptClassifier(model, tokenizer, self.prompt, kind=kind, max_length=self.max_length).eval()

    @torch.no_grad()
    def test_accuracy(self, model: PromptClassifier) -> float | None:
        """Accuracy on ``test_examples`` examples of the task's test split (MeZO's 1000/500/1000
        sampling at the problem's seed: disjoint from the training examples, which it leaves as
        they are); None with ``test_examples=0``."""
        if not self.test_examples:
            return None
        if self._test is None:
            self._test = load_task(self.task.name, seed=self.seed, num_train=len(self.task.train), num_val=500,
                                   num_test=self.test_examples).test
        return float(model.accuracy(self._test))

    def sample_batch(self, generator: torch.Generator):
        idx = minibatch(len(self.task.train), self.batch_size, generator, replace=True)
        return [self.task.train[i] for i in idx.tolist()]

    def loss(self, model: PromptClassifier, batch) -> torch.Tensor:
        return model.loss(self.full_examples if batch is None else batch)

    def losses(self, model: PromptClassifier, batch) -> torch.Tensor:
        return model.losses(self.full_examples if batch is None else batch)


def make_lm_problem(model: str = "smollm2", task: str = "rt-sentiment", **kwargs) -> LMProblem:
    """The benchmark's LM problem: ``model`` in {"smollm2", "minilm", PATH}, ``task`` in
    {"rt-sentiment", "trec"}; other keyword arguments go to :class:`LMProblem`."""
    return LMProblem(model=model, task=task, **kwargs)
