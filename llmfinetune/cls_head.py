"""Sequence classification whose head reads one position: the last encoder layer computes only that position.

A BERT-family classifier reads the hidden state of the first token ([CLS], RoBERTa's <s>) and nothing else, yet
the last layer runs its attention output projection and its feed-forward block over every position. A pre-hook on
that layer's attention output module keeps the first position before the projection, so the rest of the layer
works on one position per row: ~12% of the encoder's FLOPs in each direction for a 6-layer model (~1/L of them for
L layers). The keys and values still see every position, so the first position's value is the same to the
rounding; tests/test_cls_head.py compares logits and every gradient with and without it for each class below.

Only training and `eval` (the Trainer's forward passes) use it; the saved model is a plain transformers model and
`predict` runs it unchanged. Models not listed keep every position (one info line says so).
"""
from __future__ import annotations

import contextlib
import logging

from transformers import Trainer

from .models import transformers_model

logger = logging.getLogger(__name__)

# Heads that read only position 0 of the last layer, in models whose last layer calls
# attention.output(attention_context, layer_input) and then the feed-forward on its result.
FIRST_POSITION_HEADS = frozenset({
    "BertForSequenceClassification", "RobertaForSequenceClassification", "XLMRobertaForSequenceClassification",
    "CamembertForSequenceClassification", "ElectraForSequenceClassification",
})


def first_position_module(model):
    """The last layer's attention output module when the model's head reads position 0 only, else None."""
    model = transformers_model(model)
    if type(model).__name__ not in FIRST_POSITION_HEADS:
        return None
    encoder = getattr(getattr(model, model.base_model_prefix, None), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not layers:
        return None
    return getattr(getattr(layers[-1], "attention", None), "output", None)


def _keep_first_position(module, args):
    return tuple(arg[:, :1] for arg in args)


class FirstPositionTrainer(Trainer):
    """The sequence-classification Trainer under last_layer_cls_only (default true): every forward pass it makes,
    training and evaluation, runs the last layer on the head's position only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = transformers_model(self.accelerator.unwrap_model(self.model))
        self._first_position = first_position_module(model)
        if self._first_position is None:
            logger.info("last_layer_cls_only steps aside (%s is not one of cls_head.FIRST_POSITION_HEADS): the last "
                        "layer computes every position.", type(model).__name__)

    def compute_loss_context_manager(self):
        stack = contextlib.ExitStack()
        stack.enter_context(super().compute_loss_context_manager())
        if self._first_position is not None:
            stack.callback(self._first_position.register_forward_pre_hook(_keep_first_position).remove)
        return stack
