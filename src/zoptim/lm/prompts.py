r"""Prompt-based classification losses: a model becomes a classifier without a new head.

Decoder (causal LM), MeZO's formulation (Malladi et al. 2023, Sec. 3 and Table 13): the input is
a template around the text, e.g. ``"Review: <text>\nSentiment:"``; each class c has a label word w_c
(`` terrible`` / `` great``); the class logits are the next-token logits of the label words at the
last position, and

.. math::

    \ell(x, y) = -\log \frac{\exp z_{w_y}}{\sum_c \exp z_{w_c}}, \qquad z = \mathrm{LM}(\text{template}(x))_{-1}

(cross-entropy restricted to the label words). A pretrained decoder is already a usable zero-shot
classifier this way, which is what gives zeroth-order fine-tuning a signal to improve.

Encoder (all-MiniLM-L6-v2 and other models without an LM head): MiniLM ships no MLM head, so
MeZO's masked-LM prompt is impossible, and a fresh linear head starts at chance and is a poor
target for random-direction search (its gradient is dense in every head weight). Instead the
*label words become label sentences*, embedded by the same encoder: with e(.) the mean-pooled,
L2-normalised sentence embedding,

.. math::

    z_c = \cos(e(x), e(d_c)) / T, \qquad T = 0.05,

and the same cross-entropy over c. This is the sentence-transformers zero-shot recipe (the model
was trained for cosine similarity with scale 1/T = 20), so it starts above chance, and tuning
moves text and label embeddings together. The label sentences are re-embedded in every forward
pass, so the loss is a function of the encoder's weights only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import Example


@dataclass(frozen=True)
class Prompt:
    """Template (with ``{text}``), one label word per class (decoder), one label sentence (encoder),
    and the class names (what :meth:`PromptClassifier.classify` returns)."""

    template: str
    label_words: tuple[str, ...]
    label_sentences: tuple[str, ...]
    classes: tuple[str, ...] = ()

    def __post_init__(self):
        if "{text}" not in self.template:
            raise ValueError(f"the prompt template must contain {{text}}; got {self.template!r}")
        if len(self.label_words) != len(self.label_sentences):
            raise ValueError("one label word and one label sentence per class")
        if self.classes and len(self.classes) != len(self.label_words):
            raise ValueError(f"{len(self.classes)} class names for {len(self.label_words)} label words")


def prompt_for_labels(labels, template: str = "{text}\nLabel:") -> Prompt:
    """The prompt for a task of one's own: label word = `` <label>`` (decoder), label sentence =
    the label itself (encoder)."""
    labels = tuple(str(x) for x in labels)
    return Prompt(template, tuple(" " + x.strip() for x in labels), labels, labels)


PROMPTS = {
    # MeZO's SST-2 template "<text> It was terrible/great" scored 54% zero-shot with SmolLM2-135M
    # on 128 validation sentences; this one scored 82% (docs/finetune.md).
    "rt-sentiment": Prompt(
        "Review: {text}\nSentiment:",
        (" negative", " positive"),
        ("It was terrible.", "It was great."),
        ("negative", "positive"),
    ),
    "trec": Prompt(
        "{text} The answer is a",
        (" abbreviation", " description", " thing", " person", " place", " number"),
        (
            "The question asks for an abbreviation.",
            "The question asks for a description or a reason.",
            "The question asks for a thing.",
            "The question asks for a person.",
            "The question asks for a place.",
            "The question asks for a number or a date.",
        ),
        ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
    ),
}

ENCODER_TEMPERATURE = 0.05


def get_prompt(task: str) -> Prompt:
    if task not in PROMPTS:
        raise ValueError(f"task must be one of {tuple(PROMPTS)}; got {task!r}")
    return PROMPTS[task]


class PromptClassifier(torch.nn.Module):
    """A language model seen as a classifier through a prompt (see the module docstring).

    ``forward(input_ids, attention_mask, labels=None)`` returns ``{"logits": (B, C), "loss"}``,
    the shape ``transformers.Trainer`` expects; :meth:`batch` turns examples into those inputs.
    Its parameters are the wrapped model's, so any optimizer (zeroth-order or AdamW) and any PEFT
    wrapping applies unchanged.

    Args:
        model: a causal LM (``kind="causal"``) or a bare encoder (``kind="encoder"``), possibly
            wrapped by ``peft``.
        tokenizer: its tokenizer.
        prompt: a :class:`Prompt`.
        kind: ``"causal"`` or ``"encoder"``.
        max_length: longest input in tokens; longer texts lose their *beginning* (the template's
            end, which the label word follows, must survive).
    """

    def __init__(self, model, tokenizer, prompt: Prompt, kind: str = "causal", max_length: int = 64):
        super().__init__()
        if kind not in ("causal", "encoder"):
            raise ValueError(f"kind must be 'causal' or 'encoder'; got {kind!r}")
        self.model, self.tokenizer, self.prompt, self.kind = model, tokenizer, prompt, kind
        self.max_length = int(max_length)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if kind == "causal":
            ids = [tokenizer.encode(w, add_special_tokens=False) for w in prompt.label_words]
            if any(len(i) == 0 for i in ids):
                raise ValueError(f"a label word encodes to no token: {prompt.label_words}")
            first = [i[0] for i in ids]  # multi-token words are scored by their first token, as in MeZO
            if len(set(first)) != len(first):
                raise ValueError(f"label words {prompt.label_words} share a first token; choose distinct words")
            self.register_buffer("label_ids", torch.tensor(first), persistent=False)
        self._logits_to_keep = True

    @property
    def num_classes(self) -> int:
        return len(self.prompt.label_words)

    # -- inputs -------------------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids padded to the longest text: on the left for a decoder (so that position -1 is
        every row's last real token), on the right for an encoder."""
        rows = self.tokenizer(list(texts), add_special_tokens=self.kind == "encoder")["input_ids"]
        if self.kind == "causal":
            rows = [r[-self.max_length :] for r in rows]
        else:
            rows = [r[: self.max_length] for r in rows]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if self.kind == "causal":
                ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
            else:
                ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask}

    def texts(self, examples) -> list[str]:
        """What the model reads: the filled template (decoder) or the bare text (encoder)."""
        return [self.prompt.template.replace("{text}", e.text) if self.kind == "causal" else e.text for e in examples]

    def count_truncated(self, examples) -> int:
        """How many of ``examples`` are longer than ``max_length`` tokens (and so get truncated:
        the beginning is dropped for a decoder, the end for an encoder)."""
        if not examples:
            return 0
        rows = self.tokenizer(self.texts(examples), add_special_tokens=self.kind == "encoder")["input_ids"]
        return sum(len(r) > self.max_length for r in rows)

    def batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Model inputs plus ``labels`` for a list of examples (a data collator for Trainer)."""
        inputs = self.encode(self.texts(examples))
        inputs["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
        return inputs

    # -- the class logits -----------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, labels=None, **unused):
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        logits = self.causal_logits(input_ids, attention_mask) if self.kind == "causal" else self.encoder_logits(
            input_ids, attention_mask
        )
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels.to(device))
        return out

    def causal_logits(self, input_ids, attention_mask):
        # Left padding shifts the real tokens; explicit positions keep them at 0, 1, 2, ...
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if self._logits_to_keep:
            try:  # only the last position's logits: saves a (B, T, vocab) tensor
                out = self.model(**kwargs, logits_to_keep=1)
            except TypeError:
                self._logits_to_keep = False
        if not self._logits_to_keep:
            out = self.model(**kwargs)
        return out.logits[:, -1, :].index_select(-1, self.label_ids.to(out.logits.device))

    def embed(self, input_ids, attention_mask):
        """Mean-pooled, L2-normalised sentence embedding e(.)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(pooled.float(), dim=-1)

    @property
    def rows_per_example(self) -> int:
        """Rows one example takes in :meth:`losses`' forward: 1 for a decoder; 1 + C for an encoder,
        which scores each example against its own copy of the C label sentences (rows ``i (1 + C)``
        to ``(i + 1)(1 + C) - 1``: the text, then the label sentences). Everything example i's loss
        depends on then sits at example i's direction when zoptim applies one direction per example
        (``per_example=True`` reads this attribute), which keeps the per-example estimate unbiased;
        the price is C extra sentences per example in each forward."""
        return 1 if self.kind == "causal" else 1 + len(self.prompt.label_sentences)

    def grouped_encoder_logits(self, examples: list[Example]) -> torch.Tensor:
        """Class logits of an encoder with each example's own label-sentence embeddings (see
        :attr:`rows_per_example`); equal to :meth:`encoder_logits` at the unperturbed weights."""
        labels = list(self.prompt.label_sentences)
        rows = [row for text in self.texts(examples) for row in (text, *labels)]
        inputs = self.encode(rows)
        device = next(self.model.parameters()).device
        e = self.embed(inputs["input_ids"].to(device), inputs["attention_mask"].to(device))
        e = e.view(len(examples), 1 + len(labels), -1)
        return torch.einsum("bd,bcd->bc", e[:, 0], e[:, 1:]) / ENCODER_TEMPERATURE

    def encoder_logits(self, input_ids, attention_mask):
        labels = self.encode(list(self.prompt.label_sentences))
        device = input_ids.device
        e_label = self.embed(labels["input_ids"].to(device), labels["attention_mask"].to(device))
        return self.embed(input_ids, attention_mask) @ e_label.T / ENCODER_TEMPERATURE

    # -- evaluation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, examples: list[Example], batch_size: int = 32) -> torch.Tensor:
        preds = []
        for i in range(0, len(examples), batch_size):
            inputs = self.batch(examples[i : i + batch_size])
            inputs.pop("labels")
            preds.append(self(**inputs)["logits"].argmax(-1).cpu())
        return torch.cat(preds)

    def accuracy(self, examples: list[Example], batch_size: int = 32) -> float:
        """Fraction of ``examples`` whose argmax class logit is the label."""
        labels = torch.tensor([e.label for e in examples])
        return float((self.predict(examples, batch_size) == labels).float().mean())

    def classify(self, texts, batch_size: int = 32) -> list[str]:
        """Class names (or indices, if the prompt has no names) predicted for raw ``texts``."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        preds = self.predict([Example(t, 0) for t in texts], batch_size).tolist()
        names = self.prompt.classes
        return [names[i] for i in preds] if names else preds

    def loss(self, examples: list[Example]) -> torch.Tensor:
        """The prompt cross-entropy on ``examples`` (a 0-dim tensor)."""
        return self(**self.batch(examples))["loss"]

    def losses(self, examples: list[Example]) -> torch.Tensor:
        """The prompt cross-entropy of each example (a 1-D tensor; its mean is :meth:`loss`). An
        encoder embeds the label sentences once per example (:attr:`rows_per_example`)."""
        if self.kind != "causal":
            labels = torch.tensor([e.label for e in examples], dtype=torch.long)
            logits = self.grouped_encoder_logits(examples)
            return F.cross_entropy(logits.float(), labels.to(logits.device), reduction="none")
        inputs = self.batch(examples)
        labels = inputs.pop("labels")
        logits = self(**inputs)["logits"]
        return F.cross_entropy(logits.float(), labels.to(logits.device), reduction="none")

    @torch.no_grad()
    def minus_accuracy(self, examples: list[Example]) -> float:
        """The non-differentiable objective: minus the argmax accuracy on ``examples``."""
        inputs = self.batch(examples)
        labels = inputs.pop("labels")
        preds = self(**inputs)["logits"].argmax(-1).cpu()
        return -float((preds == labels).float().mean())
