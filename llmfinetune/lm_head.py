"""Causal-LM loss with vocabulary logits only where a token is learned.

A plain causal-LM step multiplies every position's hidden state by the vocabulary matrix, then throws away the
logits of prompt and padding positions (their labels are -100). Here a pre-hook on the output layer keeps only the
positions whose next token is a target, so prompt tokens cost no LM-head work in either direction and the logits
tensor shrinks to (targets x vocabulary). The loss is the same sum over targets divided by the same count Trainer
passes (tested equal to the standard loss).
"""
from __future__ import annotations

import logging

import torch
from transformers import Trainer

IGNORE = -100
logger = logging.getLogger(__name__)


class TargetsOnlyTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        head = _output_layer(self.accelerator.unwrap_model(model))
        labels = inputs.get("labels")
        if head is None or labels is None or getattr(self, "_targets_only_off", False):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        targets = labels[:, 1:]
        # Position t predicts the token at t + 1: keep the positions whose next token is learned.
        learned = torch.nn.functional.pad(targets != IGNORE, (0, 1), value=False)
        handle = head.register_forward_pre_hook(lambda module, args: (args[0][learned], *args[1:]))
        try:
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        finally:
            handle.remove()
        logits = outputs["logits"]
        count = int(learned.sum())
        if logits.dim() != 2 or logits.shape[0] != count:
            # A model that reshapes its logits after the output layer: use the standard loss from now on.
            logger.warning("This model's logits cannot be limited to learned positions; using the full LM head.")
            self._targets_only_off = True
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        chosen = targets[targets != IGNORE]
        if num_items_in_batch is None:
            loss = torch.nn.functional.cross_entropy(logits.float(), chosen) if count else logits.sum() * 0.0
        else:
            loss = torch.nn.functional.cross_entropy(logits.float(), chosen, reduction="sum")
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs:
                # As Trainer.compute_loss: num_items_in_batch counts every process's targets, and DDP averages
                # gradients over processes, so the sum is scaled back up by the process count.
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss


def _output_layer(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    getter = getattr(base, "get_output_embeddings", None)
    layer = getter() if getter else None
    return layer if isinstance(layer, torch.nn.Module) else None
