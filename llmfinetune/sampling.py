"""Length-grouped batches in random order (train_sampling_strategy: group_by_length).

transformers' LengthGroupedSampler cuts a shuffled epoch into mega-batches of 50 batches, sorts each by length,
longest first, and keeps that order: training sweeps from the longest examples to the shortest every 50 steps. Where
length and label go together, the class mix drifts with each sweep (MRPC: 73% paraphrases among the longest fifth of
pairs, 61% among the shortest). On MRPC this order cost the default recipe ~0.02 accuracy on held-out rows, and at
batch 4 it kept 2 of 3 seeds on the majority class through the first epoch (bench/README.md, MRPC session 12).
Here the same batches, with the same padding, come in random order. The longest batch stays first, so running out
of memory still shows at step 1.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ShuffledBatches(Sampler):
    def __init__(self, grouped):
        self.grouped = grouped  # a transformers LengthGroupedSampler; its batch_size spans gradient accumulation

    def __len__(self):
        return len(self.grouped)

    def __iter__(self):
        indices = list(self.grouped)
        size = self.grouped.batch_size
        # Mega-batches hold whole batches, so cutting the flat order every `size` indices gives back exactly the
        # sampler's batches. The last may be short: it stays last, or the data loader would merge it with the next.
        batches = [indices[start:start + size] for start in range(0, len(indices), size)]
        if len(batches) < 3:
            return iter(indices)
        middle = torch.randperm(len(batches) - 2, generator=self.grouped.generator).add_(1).tolist()
        return iter([index for position in [0, *middle, len(batches) - 1] for index in batches[position]])


class ShuffledLengthGroups:
    """Trainer mixin: the length-grouped sampler's batches in random order."""

    def _get_train_sampler(self, *args, **kwargs):
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = super()._get_train_sampler(*args, **kwargs)
        return ShuffledBatches(sampler) if isinstance(sampler, LengthGroupedSampler) else sampler


def with_shuffled_length_groups(trainer_class):
    return type(trainer_class.__name__, (ShuffledLengthGroups, trainer_class), {})
