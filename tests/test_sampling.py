"""group_by_length: transformers' length-grouped batches, in random order instead of long-to-short sweeps."""
from __future__ import annotations

import pytest
import torch

from llmfinetune.sampling import ShuffledBatches, with_shuffled_length_groups


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[start:start + size] for start in range(0, len(order), size)]


@pytest.mark.parametrize("rows, size", [(1003, 8), (1000, 8), (237, 4), (16, 8), (9, 8)])
def test_the_same_batches_come_in_another_order(rows, size):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = torch.randint(5, 100, (rows,), generator=torch.Generator().manual_seed(0)).tolist()
    grouped = LengthGroupedSampler(size, lengths=lengths)
    torch.manual_seed(1)
    theirs = _batches(list(grouped), size)
    torch.manual_seed(1)
    ours = _batches(list(ShuffledBatches(grouped)), size)
    assert len(ShuffledBatches(grouped)) == rows
    assert sorted(map(sorted, ours)) == sorted(map(sorted, theirs))  # same batches, so the same padding
    assert ours[0] == theirs[0]  # the longest first: out of memory shows at step 1
    assert ours[-1] == theirs[-1]  # a short last batch stays last, where the data loader expects it
    if len(theirs) >= 24:
        assert ours != theirs
        # theirs sweeps from long to short within each 50-batch mega-batch; ours does not
        longest = [max(lengths[i] for i in batch) for batch in ours[1:21]]
        assert longest != sorted(longest, reverse=True)


def test_the_order_follows_the_seed():
    from transformers.trainer_pt_utils import LengthGroupedSampler

    grouped = LengthGroupedSampler(4, lengths=list(range(5, 405)))
    orders = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        orders.append(list(ShuffledBatches(grouped)))
    assert orders[0] == orders[1] != orders[2]


@pytest.mark.parametrize("strategy, sampler", [("group_by_length", "ShuffledBatches"),
                                               ("random", "RandomSampler"), ("sequential", "SequentialSampler")])
def test_the_trainer_shuffles_length_groups_only(strategy, sampler, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    rows = Dataset.from_dict({"input_ids": [[1] * n for n in range(2, 42)], "labels": [0, 1] * 20})
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                             train_sampling_strategy=strategy)
    trainer = with_shuffled_length_groups(Trainer)(model=torch.nn.Linear(1, 1), args=args, train_dataset=rows)
    assert type(trainer).__name__ == "Trainer"
    assert type(trainer._get_train_sampler()).__name__ == sampler


def test_a_run_trains_on_shuffled_length_groups(tiny_models, tmp_path, monkeypatch):
    from conftest import job_dict, make_dataset
    from llmfinetune import sampling
    from llmfinetune.config import parse_job
    from llmfinetune.workflow import run

    epochs = []
    iterate = sampling.ShuffledBatches.__iter__
    monkeypatch.setattr(sampling.ShuffledBatches, "__iter__", lambda self: (epochs.append(1), iterate(self))[1])
    data = make_dataset(tmp_path / "data", "sequenceclassification")
    run(parse_job(job_dict("sequenceclassification", "lora", tiny_models["bert"], data, tmp_path / "run",
                           train_sampling_strategy="group_by_length")))
    assert epochs
