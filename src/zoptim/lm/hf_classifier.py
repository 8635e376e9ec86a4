r"""A sentence encoder with the head zoptim trains it with, as a transformers sequence classifier.

zoptim fine-tunes an encoder (all-MiniLM-L6-v2) as a classifier without a new head
(:mod:`zoptim.lm.prompts`): the class logits are the cosine similarities between the text's
mean-pooled, L2-normalised embedding e(x) and those of one label sentence per class, d_c,

.. math:: z_c = \cos(e(x), e(d_c)) / T, \qquad T = 0.05.

Once training ends the label embeddings e(d_c) are constants, so the classifier is the encoder
plus a (C, H) matrix. :class:`CosineSimilarityClassifier` is that model as a
``PreTrainedModel``: exported with ``save_pretrained`` it carries this file (transformers'
custom-code mechanism, ``auto_map`` in ``config.json``), so

    AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)

loads it with transformers alone, no zoptim installed, and returns the logits zoptim computes.
This module imports only torch and transformers: it is copied next to the weights as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class CosineSimilarityClassifier(BertPreTrainedModel):
    """A BERT-family encoder with a cosine-similarity head (mean pooling, L2 normalisation, fixed
    class embeddings, temperature ``config.cosine_temperature``)."""

    config_class = BertConfig

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        #: e(d_c), one L2-normalised row per class (constant: not trained further)
        self.label_embeddings = torch.nn.Parameter(torch.zeros(config.num_labels, config.hidden_size),
                                                   requires_grad=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        logits = F.normalize(pooled.float(), dim=-1) @ self.label_embeddings.float().T / self.config.cosine_temperature
        loss = None if labels is None else F.cross_entropy(logits, labels.to(logits.device))
        return SequenceClassifierOutput(loss=loss, logits=logits)
