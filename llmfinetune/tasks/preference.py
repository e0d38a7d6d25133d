"""Preference tuning of a causal LM on TRL's trainers: DPO and its loss family, KTO, ORPO, CPO and SimPO.

`train_config.preference_config` picks the algorithm and holds the fields of TRL's config class for it (DPOConfig,
KTOConfig, ORPOConfig, CPOConfig), checked by name and type like lora_config against LoraConfig. TRL computes every
loss; this file only decides what TRL is given:
- data tokenized here (preference_data.py: the SFT renderer, rows named in errors, the tokenization cache), so TRL's
  own dataset preparation is skipped;
- the reference model: LoRA -> the model with its adapter disabled (no second copy; TRL's extra "ref" adapter is
  dropped, since it would copy a *trained* adapter when `eval` reloads a run); full -> a frozen copy of the start,
  loaded from the same model_config as the policy (TRL would reload `config._name_or_path` with its own defaults);
  `ref_model: PATH` -> that model, loaded the same way. ORPO, CPO and SimPO use no reference model.
- TrainingArguments: base_config under the rules of every task (arguments.build_training_arguments), TRL's config
  class with the fields of preference_config.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .base import Prepared, Task, max_length, tokenize_split
from .preference_data import (PreferenceEncoder, detect_layout, log_cut, paired_example, unpaired_example)

if TYPE_CHECKING:
    from ..config import Job

logger = logging.getLogger(__name__)

KEY = "ft_config.train_config.preference_config"
# algorithm -> (module, config class, trainer class, fixed settings, uses a reference model)
ALGORITHMS = {
    "dpo": ("trl", "DPOConfig", "DPOTrainer", {}, True),
    "kto": ("trl", "KTOConfig", "KTOTrainer", {}, True),
    "orpo": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer", {}, False),
    "cpo": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer", {}, False),
    # SimPO is TRL's CPO trainer with the simpo loss and no behaviour-cloning term (TRL's documented recipe).
    "simpo": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer", {"loss_type": "simpo", "cpo_alpha": 0.0}, False),
}
# TrainingArguments values an algorithm needs unless base_config says otherwise: TRL's KTO pairs each row with its
# neighbour in the batch for its KL estimate, which only holds when batches are read in order.
TRAINING_DEFAULTS = {"kto": {"train_sampling_strategy": "sequential"}}
OWN_KEYS = {"algorithm": "dpo | kto | orpo | cpo | simpo (default dpo)",
            "ref_model": "null: the start model (LoRA: adapter disabled; full: a frozen copy); or a model folder"}
# Fields of TRL's config classes that the job file sets elsewhere, so two spellings can never disagree.
SET_ELSEWHERE = {"max_length": "base_config.max_length", "model_init_kwargs": "model_config.initialization",
                 "trust_remote_code": "model_config.initialization.initializer.from_pretrained_kwargs",
                 "pad_token": "model_config.add_special_tokens.pad_token",
                 "padding_value": "model_config.add_special_tokens.pad_token",
                 "is_encoder_decoder": "the model (preference tuning takes decoder-only causal LMs)",
                 "dataset_num_proc": "tokenizing here (TRL's own dataset preparation is not used)",
                 "max_completion_length": "base_config.max_length", "max_prompt_length": "base_config.max_length"}


def settings(job: "Job") -> dict[str, Any]:
    return dict(job.ft_config.train_config.preference_config or {})


def algorithm(job: "Job") -> str:
    name = settings(job).get("algorithm", "dpo")
    if name not in ALGORITHMS:
        close = difflib.get_close_matches(str(name), list(ALGORITHMS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{KEY}.algorithm: unknown algorithm {name!r}; choose one of: {', '.join(ALGORITHMS)}.{hint}")
    return name


def _trl(job: "Job", which: int):
    import importlib
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO/CPO live in trl.experimental in TRL 1.x
    entry = ALGORITHMS[algorithm(job)]
    return getattr(importlib.import_module(entry[0]), entry[which])


@lru_cache(maxsize=None)
def config_fields(config_class) -> dict[str, Any]:
    """The preference_config keys of TRL's config class: its own fields, not TrainingArguments' (base_config's)."""
    import typing

    from transformers import TrainingArguments

    plain = {f.name for f in dataclasses.fields(TrainingArguments)}
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)
            if f.init and f.name not in plain and f.name not in SET_ELSEWHERE}


@lru_cache(maxsize=1)
def dpo_loss_types() -> list[str]:
    """TRL's list of DPO loss types, read from DPOConfig's own help text so it follows the installed TRL."""
    from trl import DPOConfig

    field = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type")
    text = field.metadata["help"].split("If multiple")[0]
    return re.findall(r"'([a-z_]+)'", text)


def trl_settings(job: "Job") -> dict[str, Any]:
    """preference_config as keyword arguments of TRL's config class, checked key by key."""
    from .. import validate

    name = algorithm(job)
    fixed = ALGORITHMS[name][3]
    given = {k: v for k, v in settings(job).items() if k not in OWN_KEYS}
    kwargs = checked_settings(job, _trl(job, 1), given, f"algorithm {name}", OWN_KEYS, fixed)
    if name == "dpo":
        valid = dpo_loss_types()
        for loss in kwargs.get("loss_type", []):
            if loss not in valid:
                close = difflib.get_close_matches(loss, valid, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise UserError(f"{KEY}.loss_type: unknown DPO loss type {loss!r}.{hint} TRL's loss types: "
                                f"{', '.join(valid)}.")
        weights = kwargs.get("loss_weights")
        if weights is not None and len(weights) != len(kwargs.get("loss_type", ["sigmoid"])):
            losses = len(kwargs.get("loss_type", ["sigmoid"]))
            raise UserError(f"{KEY}.loss_weights: {len(weights)} weight(s) for {losses} loss type(s); give one weight "
                            "per loss_type.")
    if "beta" in kwargs:
        validate.check_range(f"{KEY}.beta", kwargs["beta"], validate.at_least(0, strict=True))
    return {**kwargs, **fixed}


def checked_settings(job: "Job", config_class, given: dict[str, Any], what: str, own: dict[str, str],
                     fixed: dict[str, Any]) -> dict[str, Any]:
    """`given` checked against the fields of TRL's `config_class` (names, then types), for `what` (in messages)."""
    from .. import validate
    from ..config import as_number

    fields = config_fields(config_class)
    kwargs = {}
    for key, value in given.items():
        if key in SET_ELSEWHERE:
            raise UserError(f"{KEY}.{key}: set by {SET_ELSEWHERE[key]}; remove it here.")
        if key not in fields:
            from transformers import TrainingArguments

            where = (" It is a TrainingArguments field: put it in ft_config.train_config.base_config."
                     if key in {f.name for f in dataclasses.fields(TrainingArguments)} else "")
            close = difflib.get_close_matches(key, [*fields, *own], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{job.source}: unknown key '{KEY}.{key}' for {what}.{hint}{where} Valid keys: "
                            f"{', '.join([*own, *sorted(fields)])}.")
        if key in fixed and value != fixed[key]:
            raise UserError(f"{KEY}.{key}: {what} means {key} {fixed[key]!r}; got {value!r}. Use algorithm cpo for "
                            "other values.")
        if isinstance(value, str) and not validate.accepts(fields[key], value):
            value = as_number(value)  # YAML reads 1e-3 as a string
        if isinstance(value, str) and validate.accepts(fields[key], [value]):
            value = [value]  # DPO's loss_type: one name or a list
        if isinstance(value, list):
            value = [as_number(v) if isinstance(v, str) and not validate.accepts(fields[key], [v]) else v
                     for v in value]
        validate.check_type(f"{KEY}.{key}", value, fields[key])
        kwargs[key] = value
    return kwargs


class Preference(Task):
    name = "preference"
    model_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    half_precision_base = True
    loss_only_eval = True

    # The layout is told from the columns (prompt/chosen/rejected, prompt/completion/label), not input_columns.
    input_columns_read = 0
    input_columns_hint = "Preference data is read from its prompt, chosen and rejected (or completion and label) columns."

    def check(self, job):
        refuse_packing(job)
        super().check(job)
        trl_settings(job)
        ref = settings(job).get("ref_model")
        if ref is not None and not isinstance(ref, str):
            raise UserError(f"{KEY}.ref_model: null (the start model) or a model folder, got {ref!r}.")
        if ref is not None and not ALGORITHMS[algorithm(job)][4]:
            raise UserError(f"{KEY}.ref_model: algorithm {algorithm(job)} uses no reference model; remove ref_model.")

    def training_arguments(self, job):
        # max_length None: the data is cut to base_config.max_length when tokenized here; TRL must not cut again.
        return _trl(job, 1), {**TRAINING_DEFAULTS.get(algorithm(job), {}), **trl_settings(job), "max_length": None}

    def trainer_class(self, job):
        return _trainer(algorithm(job), _trl(job, 2))

    def prepare(self, splits, eval_split, tokenizer, job):
        if tokenizer.eos_token_id is None:
            raise UserError(f"preference: the tokenizer of {job.model.model_id} has no EOS token; set "
                            "model_config.add_special_tokens.eos_token.")
        name = algorithm(job)
        limit = max_length(job, tokenizer)
        used = {"train": splits["train"], eval_split: splits[eval_split]}
        tokenized = {}
        for split_name, split in used.items():
            layout = detect_layout(split.column_names, split_name)
            if layout == "unpaired" and name != "kto":
                raise UserError(f"split '{split_name}': prompt/completion/label rows are unpaired, which only "
                                f"algorithm kto learns from; {name} needs chosen and rejected answers per prompt.")
            encoder = PreferenceEncoder(tokenizer, job, limit)
            function = _encode_unpaired if name == "kto" else _encode_paired
            tokenized[split_name] = tokenize_split(split, function, split_name, with_indices=True,
                                                   fn_kwargs={"encoder": encoder, "job": job, "layout": layout,
                                                              "split_name": split_name})
            log_cut(encoder.cut, split_name, limit)
            if name == "kto":  # TRL's KTO reads batches in order (its KL term pairs neighbours): mix the labels
                tokenized[split_name] = tokenized[split_name].shuffle(seed=int(job.base_config.get("seed", 42)))
        return Prepared(tokenized["train"], tokenized[eval_split], {})

    def record_run_files(self, run_dir, splits, tokenizer, job, resuming, write):
        """`predict` generates as for text-generation: from a prompt rendered with the template training used."""
        from .chat import TrainedFormat, record_trained_format, template_name

        answer = "chosen" if "chosen" in splits["train"].column_names else "completion"
        trained = TrainedFormat("prompt_response", prompt="prompt", response=answer,
                                template=template_name(tokenizer, job), system_prompt=job.data.system_prompt)
        record_trained_format(run_dir, trained, resuming, write)

    def trainer_hooks(self, tokenizer, job, model_kwargs):
        hooks: dict[str, Any] = {}
        if ALGORITHMS[algorithm(job)][4]:
            hooks["ref_model"] = reference_model(job, tokenizer)
        return hooks

    def collator(self, tokenizer, job):
        return None  # TRL's own preference collators read the token ids made here


def refuse_packing(job: "Job") -> None:
    if job.base_config.get("packing"):
        raise UserError(f"ft_config.train_config.base_config.packing: not with ft_task {job.task}. Each chosen and "
                        "rejected answer is scored as one sequence against its own prompt, and the loss compares "
                        "the pair; TRL's trainers batch pairs, not packed rows. Remove packing.")


def _encode_paired(batch, indices, encoder, job, layout, split_name):
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    wheres = [f"split '{split_name}', row {i}" for i in indices]
    examples = [paired_example(row, job, where) for row, where in zip(rows, wheres)]
    encoded = encoder.encode(examples, wheres)
    return {"prompt_ids": [p for p, _ in encoded], "chosen_ids": [a[0] for _, a in encoded],
            "rejected_ids": [a[1] for _, a in encoded]}


def _encode_unpaired(batch, indices, encoder, job, layout, split_name):
    """KTO rows; paired rows give two: the chosen answer desirable, the rejected one not."""
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    wheres = [f"split '{split_name}', row {i}" for i in indices]
    if layout == "paired":
        examples = [paired_example(row, job, where) for row, where in zip(rows, wheres)]
        labels = [[True, False] for _ in examples]
    else:
        pairs = [unpaired_example(row, job, where) for row, where in zip(rows, wheres)]
        examples, labels = [e for e, _ in pairs], [[label] for _, label in pairs]
    out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "label": []}
    for (prompt_ids, answers), answer_labels in zip(encoder.encode(examples, wheres), labels):
        for ids, label in zip(answers, answer_labels):
            out["prompt_ids"].append(prompt_ids)
            out["completion_ids"].append(ids)
            out["label"].append(label)
    return out


def reference_model(job: "Job", tokenizer):
    """None where TRL needs no second model: LoRA (adapter disabled is the start), precomputed reference log-probs.
    Otherwise the start model (or ref_model), loaded through models.load_model exactly as the policy was, frozen."""
    from .. import models

    ref = settings(job).get("ref_model")
    if ref is None and (job.method == "lora" or settings(job).get("precompute_ref_log_probs")):
        return None
    if ref is None:
        path = models.resolve_model(job)
    else:
        folder = job.resolve_input_path(ref, f"{KEY}.ref_model")
        if not (folder / "config.json").is_file():
            raise UserError(f"{KEY}.ref_model: {folder} has no config.json; expected a full model folder.")
        path = str(folder)
    model, _ = models.load_model(path, job, "AutoModelForCausalLM", {}, tokenizer)
    model.eval()
    model.requires_grad_(False)
    return model


_TRAINERS: dict[str, type] = {}


def _trainer(name: str, trl_trainer: type) -> type:
    """TRL's trainer, given the data tokenized here instead of preparing it again; built once per algorithm."""
    if name in _TRAINERS:
        return _TRAINERS[name]
    from peft import PeftModel

    class Trainer(trl_trainer):
        def __init__(self, *args, train_dataset=None, eval_dataset=None, **kwargs):
            # `llmfinetune eval` has no train split; TRL insists on one, and only reads it to train.
            super().__init__(*args, train_dataset=eval_dataset if train_dataset is None else train_dataset,
                             eval_dataset=eval_dataset, **kwargs)
            if isinstance(self.model, PeftModel) and "ref" in self.model.peft_config:
                # TRL copies the adapter as "ref"; the start is the model with the adapter disabled (a fresh adapter
                # is zero) and a copy of a reloaded, trained adapter would be the wrong reference for `eval`.
                self.model.delete_adapter("ref")

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if getattr(self, "calculate_KL", False):
                # KTO's KL estimate pairs each prompt with the previous row's completion within a batch, as TRL does.
                def mismatched(batch):
                    return {"KL_completion_ids": [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]}

                dataset = dataset.map(mismatched, batched=True, batch_size=args.per_device_train_batch_size)
            return dataset

        def tokenize_row(self, feature, model=None):
            """ORPO/CPO's row layout from the ids made here: prompt, and prompt + answer with the prompt unlearned."""
            prompt = list(feature["prompt_ids"])
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                ids = prompt + list(feature[f"{side}_ids"])
                row.update({f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                            f"{side}_labels": [-100] * len(prompt) + list(feature[f"{side}_ids"])})
            return row

    Trainer.__name__ = Trainer.__qualname__ = trl_trainer.__name__
    _TRAINERS[name] = Trainer
    return Trainer
