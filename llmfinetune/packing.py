"""Packing for causal-LM training: several examples share one row of at most max_length tokens, and still each
example sees only itself.

Positions restart at 0 for every example, and no attention mask is passed: transformers then reads the example
boundaries from the position ids and builds a block-diagonal causal mask (its padding-free path), so attention
never crosses an example. The first label of every example is ignored, as it is when the example is alone: there
it would be predicted from the end of the previous example.
"""
from __future__ import annotations

import bisect
from typing import Any

IGNORE = -100


def pack_lengths(lengths: list[int], limit: int) -> list[list[int]]:
    """Best-fit decreasing: indices of the examples that go in each row. Few rows, little padding, O(n log n)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    # Rows that still have room, as (room left, row number), kept sorted for a binary search of the best fit.
    open_rows: list[tuple[int, int]] = []
    for index in order:
        size = min(lengths[index], limit)
        at = bisect.bisect_left(open_rows, (size, -1))
        if at < len(open_rows):
            room, row = open_rows.pop(at)
            rows[row].append(index)
            room -= size
        else:
            rows.append([index])
            row, room = len(rows) - 1, limit - size
        if room > 0:
            bisect.insort(open_rows, (room, row))
    # Within a row keep the data's own order, so a packed run reads examples in a familiar sequence.
    return sorted((sorted(row) for row in rows), key=lambda row: row[0])


def pack_dataset(dataset, limit: int, seed: int = 0):
    """A tokenized dataset (input_ids, labels) as packed rows with per-example position_ids."""
    from datasets import Dataset

    ids_column, labels_column = dataset["input_ids"], dataset["labels"]
    rows = pack_lengths([len(ids) for ids in ids_column], limit)
    packed: dict[str, list[Any]] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        ids, labels, positions = [], [], []
        for index in row:
            example_ids = ids_column[index][:limit]
            example_labels = list(labels_column[index][:limit])
            example_labels[0] = IGNORE
            ids += example_ids
            labels += example_labels
            positions += range(len(example_ids))
        packed["input_ids"].append(ids)
        packed["labels"].append(labels)
        packed["position_ids"].append(positions)
    return Dataset.from_dict(packed)


class PackedCollator:
    """Pads packed rows to the longest in the batch. The padding is one more 'example' (positions from 0, labels
    ignored) that nothing attends to, so no attention mask is needed."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        multiple = self.pad_to_multiple_of
        width = -(-longest // multiple) * multiple if multiple else longest
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for feature in features:
            missing = width - len(feature["input_ids"])
            batch["input_ids"].append(list(feature["input_ids"]) + [self.pad_token_id] * missing)
            batch["labels"].append(list(feature["labels"]) + [IGNORE] * missing)
            batch["position_ids"].append(list(feature["position_ids"]) + list(range(missing)))
        tensors: dict[str, Any] = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
        # With a KV cache the models skip reading example boundaries from the position ids (that path is meant for
        # generation), and every example would attend to the ones before it.
        tensors["use_cache"] = False
        return tensors
