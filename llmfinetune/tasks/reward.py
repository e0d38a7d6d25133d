"""Reward modelling (Bradley-Terry) on TRL's RewardTrainer: a sequence classifier with one output learns to score
the chosen answer of each pair above the rejected one, by an optional `margin` column's amount.

Data: the paired layouts of preference_data.py (prompt/chosen/rejected, conversations, implicit prompt), tokenized
here, so RewardTrainer skips its own preparation (which appends an EOS that encoders such as MiniLM do not have and
fails with `endswith first arg must be str`). Decoders read the score at the answer's EOS; encoders get their own
[CLS] ... [SEP] tokens. The score head is new to the checkpoint, so LoRA trains it in full (modules_to_save).
`train_config.preference_config` takes RewardConfig's own fields (e.g. center_rewards_coefficient).
"""
from __future__ import annotations

from typing import Any

from ..errors import UserError
from .base import Prepared, Task, max_length, tokenize_split
from .preference import KEY, checked_settings, refuse_packing
from .preference_data import SequenceEncoder, detect_layout, log_cut, paired_example

MARGIN = "margin"


def _config_class():
    from trl import RewardConfig

    return RewardConfig


class RewardModeling(Task):
    name = "rewardmodeling"
    model_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    loss_only_eval = True  # RewardTrainer reports accuracy and margin itself
    model_init_kwargs = {"num_labels": 1}

    input_columns_read = 0
    input_columns_hint = "Pairs are read from their prompt, chosen and rejected columns."

    def check(self, job):
        refuse_packing(job)
        super().check(job)
        self.settings(job)

    def settings(self, job) -> dict[str, Any]:
        given = dict(job.ft_config.train_config.preference_config or {})
        for own in ("algorithm", "ref_model"):
            if own in given:
                raise UserError(f"{KEY}.{own}: for ft_task preference; a reward model has no {own.replace('_', ' ')}."
                                " Remove it.")
        return checked_settings(job, _config_class(), given, "ft_task rewardmodeling", {}, {})

    def training_arguments(self, job):
        # max_length None: pairs are cut to base_config.max_length here; TRL would drop longer ones instead.
        return _config_class(), {**self.settings(job), "max_length": None}

    def trainer_class(self, job):
        return _trainer()

    def prepare(self, splits, eval_split, tokenizer, job):
        limit = max_length(job, tokenizer)
        used = {"train": splits["train"], eval_split: splits[eval_split]}
        tokenized = {}
        for split_name, split in used.items():
            if detect_layout(split.column_names, split_name) != "paired":
                raise UserError(f"split '{split_name}': a reward model learns from pairs: 'chosen' and 'rejected' "
                                f"columns (optional 'prompt', '{MARGIN}'); columns found: "
                                f"{', '.join(split.column_names)}.")
            encoder = SequenceEncoder(tokenizer, job, limit)
            tokenized[split_name] = tokenize_split(split, _encode, split_name, with_indices=True,
                                                   fn_kwargs={"encoder": encoder, "job": job,
                                                              "split_name": split_name,
                                                              "margins": MARGIN in split.column_names})
            log_cut(encoder.cut, split_name, limit)
        return Prepared(tokenized["train"], tokenized[eval_split], dict(self.model_init_kwargs))

    def trainer_hooks(self, tokenizer, job, model_kwargs):
        return {}

    def collator(self, tokenizer, job):
        return None  # TRL's reward collator pads chosen and rejected into one batch


def _encode(batch, indices, encoder, job, split_name, margins):
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    wheres = [f"split '{split_name}', row {i}" for i in indices]
    encoded = encoder.encode([paired_example(row, job, where) for row, where in zip(rows, wheres)], wheres)
    out = {"chosen_ids": [pair[0] for pair in encoded], "rejected_ids": [pair[1] for pair in encoded]}
    if margins:
        out[MARGIN] = [_margin(row.get(MARGIN), where) for row, where in zip(rows, wheres)]
    return out


def _margin(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: column '{MARGIN}' must be a number (how much better chosen is), got {value!r}.")
    return float(value)


_TRAINER: list[type] = []


def _trainer() -> type:
    if _TRAINER:
        return _TRAINER[0]
    from trl import RewardTrainer

    class Trainer(RewardTrainer):
        def __init__(self, *args, train_dataset=None, eval_dataset=None, **kwargs):
            # `llmfinetune eval` has no train split; TRL insists on one, and only reads it to train.
            super().__init__(*args, train_dataset=eval_dataset if train_dataset is None else train_dataset,
                             eval_dataset=eval_dataset, **kwargs)

    Trainer.__name__ = Trainer.__qualname__ = "RewardTrainer"
    _TRAINER.append(Trainer)
    return Trainer

