"""base_config -> TrainingArguments: every field passes through, the seed's names work, mistakes name their key."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from llmfinetune import arguments
from llmfinetune.arguments import build_training_arguments, run_dir, translate
from llmfinetune.config import load_job, parse_job
from llmfinetune.errors import UserError
from llmfinetune.tasks.base import Task
from test_config import SEED_EXAMPLE

BASE = "ft_config.train_config.base_config"


def make_job(tmp_path: Path, base: dict | None = None, data: dict | None = None, model_id: str = "org/name",
             task: str = "sequenceclassification"):
    raw = {
        "model_config": {"model_id": model_id},
        "ft_config": {"ft_task": task, "data_config": data or {"data_path": "glue", "subset": "mrpc"},
                      "train_config": {"base_config": base or {}}},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_job(path)


def translate_error(tmp_path, base: dict) -> str:
    with pytest.raises(UserError) as info:
        translate(make_job(tmp_path, base))
    return str(info.value)


# ------------------------------------------------------------------ translate


@pytest.mark.parametrize("key, value", [
    ("gradient_accumulation_steps", 4),
    ("lr_scheduler_type", "cosine"),
    ("max_grad_norm", 0.5),
    ("seed", 7),
    ("optim", "adamw_torch"),
    ("label_smoothing_factor", 0.1),
    ("save_total_limit", 2),
    ("warmup_steps", 10),
    ("logging_first_step", True),
    ("dataloader_num_workers", 2),
    ("eval_steps", 5),
    ("adam_beta2", 0.98),
])
def test_any_training_arguments_field_passes_through(tmp_path, key, value):
    assert translate(make_job(tmp_path, {key: value})) == {key: value}


def test_own_keys_are_not_passed_to_training_arguments(tmp_path):
    base = {"checkpoints_output_dir": "x/", "max_length": 64, "mlm_probability": 0.2, "whole_word_mask": True,
            "max_steps": 3}
    assert translate(make_job(tmp_path, base)) == {"max_steps": 3}


@pytest.mark.parametrize("alias, name, value", [
    ("evaluation_strategy", "eval_strategy", "steps"),
    ("num_warmup_steps", "warmup_steps", 5),
    ("max_train_steps", "max_steps", 50),
])
def test_seed_aliases(tmp_path, alias, name, value):
    assert translate(make_job(tmp_path, {alias: value})) == {name: value}


def test_seed_example_base_config_translates_completely(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(SEED_EXAMPLE, encoding="utf-8")
    kwargs = translate(load_job(path))
    assert kwargs == {
        "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "learning_rate": 2e-05,
        "num_train_epochs": 2, "max_steps": 50, "weight_decay": 0.01, "gradient_accumulation_steps": 1,
        "lr_scheduler_type": "linear", "warmup_steps": 0, "remove_unused_columns": False,
        "logging_strategy": "steps", "eval_strategy": "steps", "save_strategy": "steps", "save_steps": 100,
    }


@pytest.mark.parametrize("first, second", [
    ("eval_strategy", "evaluation_strategy"),
    ("evaluation_strategy", "eval_strategy"),
    ("max_steps", "max_train_steps"),
    ("warmup_steps", "num_warmup_steps"),
])
def test_alias_and_real_name_both_set(tmp_path, first, second):
    message = translate_error(tmp_path, {first: 1, second: 1})
    assert f"{BASE} sets both" in message
    assert f"'{first}'" in message and f"'{second}'" in message
    assert "keep one" in message


@pytest.mark.parametrize("typo, suggestion", [
    ("learning_rat", "learning_rate"),
    ("gradient_accumulation_step", "gradient_accumulation_steps"),
    ("checkpoint_output_dir", "checkpoints_output_dir"),
    ("evaluation_strategie", "evaluation_strategy"),
])
def test_unknown_key_suggests(tmp_path, typo, suggestion):
    message = translate_error(tmp_path, {typo: 1})
    assert f"unknown key '{BASE}.{typo}'." in message
    assert f"Did you mean '{suggestion}'?" in message
    assert str((tmp_path / "job.yaml").resolve()) in message


def test_unknown_key_without_close_match(tmp_path):
    message = translate_error(tmp_path, {"zzzqqq": 1})
    assert f"unknown key '{BASE}.zzzqqq'." in message and "Did you mean" not in message
    assert "evaluation_strategy, num_warmup_steps, max_train_steps, checkpoints_output_dir" in message


def test_yaml_string_numbers_become_numbers(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model_config: {model_id: m}\nft_config:\n  ft_task: maskedlm\n  data_config: {}\n"
                    "  train_config:\n    base_config:\n      learning_rate: 2e-5\n      weight_decay: 1e-2\n"
                    "      max_steps: 1e2\n      fp16: 'true'\n", encoding="utf-8")
    job = load_job(path)
    assert job.base_config["learning_rate"] == "2e-5"  # what PyYAML gives
    kwargs = translate(job)
    assert kwargs["learning_rate"] == 2e-05 and type(kwargs["learning_rate"]) is float
    assert kwargs["weight_decay"] == 0.01
    assert kwargs["max_steps"] == 100 and type(kwargs["max_steps"]) is int
    assert kwargs["fp16"] is True


@pytest.mark.parametrize("key, value, expected", [
    ("learning_rate", "abc", "expected a number, got 'abc'"),
    ("max_steps", "many", "expected a whole number, got 'many'"),
    ("fp16", "maybe", "expected true or false, got 'maybe'"),
])
def test_unconvertible_string(tmp_path, key, value, expected):
    message = translate_error(tmp_path, {key: value})
    assert message == f"{BASE}.{key}: {expected}."


@pytest.mark.parametrize("key, value, rule", [
    ("learning_rate", -0.001, "must be a number of at least 0, got -0.001"),
    ("learning_rate", "-1e-3", "must be a number of at least 0, got -0.001"),
    ("weight_decay", -1, "must be a number of at least 0, got -1"),
    ("num_train_epochs", -2, "must be a number of at least 0, got -2"),
    ("per_device_train_batch_size", 0, "must be a whole number of at least 1, got 0"),
    ("per_device_eval_batch_size", -1, "must be a whole number of at least 1, got -1"),
    ("gradient_accumulation_steps", 0, "must be a whole number of at least 1, got 0"),
    ("per_device_train_batch_size", 2.5, "must be a whole number of at least 1, got 2.5"),
])
def test_out_of_range_values_name_the_key(tmp_path, key, value, rule):
    assert translate_error(tmp_path, {key: value}) == f"{BASE}.{key}: {rule}."


def test_boolean_batch_size_is_rejected(tmp_path):
    message = translate_error(tmp_path, {"per_device_train_batch_size": True})
    assert f"{BASE}.per_device_train_batch_size" in message


# ------------------------------------------------------------------ run_dir


def test_output_dir_is_used_exactly(tmp_path):
    out = tmp_path / "exact" / "place"
    assert run_dir(make_job(tmp_path, {"output_dir": str(out), "checkpoints_output_dir": "ignored"})) == out


def test_relative_output_dir_is_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_dir(make_job(tmp_path, {"output_dir": "runs/a"})) == tmp_path.resolve() / "runs" / "a"


def test_run_dir_hub_model_and_subset(tmp_path):
    job = make_job(tmp_path, {"checkpoints_output_dir": str(tmp_path / "ckpt") + "/"}, model_id="org/name")
    assert run_dir(job) == tmp_path / "ckpt" / "name-finetuned-sequenceclassification-glue-mrpc"


def test_run_dir_local_model_and_local_data(tmp_path):
    job = make_job(tmp_path, {"checkpoints_output_dir": str(tmp_path / "ckpt")},
                   data={"local_path": "some/folder/reviews/"}, model_id=str(tmp_path / "models" / "tiny-bert") + "/",
                   task="maskedlm")
    assert run_dir(job) == tmp_path / "ckpt" / "tiny-bert-finetuned-maskedlm-reviews"


def test_run_dir_local_data_with_subset(tmp_path):
    job = make_job(tmp_path, {"checkpoints_output_dir": str(tmp_path)},
                   data={"local_path": "datasets/glue", "subset": "mrpc"}, model_id="bert-base-uncased")
    assert run_dir(job) == tmp_path / "bert-base-uncased-finetuned-sequenceclassification-glue-mrpc"


def test_run_dir_from_train_file(tmp_path):
    job = make_job(tmp_path, {"checkpoints_output_dir": str(tmp_path)}, data={"train_file": "x/my data.jsonl"},
                   model_id="m", task="text-generation")
    assert run_dir(job) == tmp_path / "m-finetuned-text-generation-my-data"


def test_run_dir_default_parent_is_finetune_models_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_dir(make_job(tmp_path)) == tmp_path.resolve() / "finetune_models" / (
        "name-finetuned-sequenceclassification-glue-mrpc")


# ------------------------------------------------------------------ build_training_arguments (imports transformers)


class _StubTask(Task):  # the TrainingArguments hook of every task (Task.training_arguments), no task behaviour
    loss_only_eval = False


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("bf16_cpu", [False, True])
def test_fp16_on_cpu_becomes_bf16_or_fp32(tmp_path, monkeypatch, no_cuda, bf16_cpu):
    monkeypatch.setattr(arguments, "cpu_supports_bf16", lambda: bf16_cpu)
    job = make_job(tmp_path, {"fp16": True, "learning_rate": "2e-5", "evaluation_strategy": "steps",
                              "max_train_steps": 3, "gradient_accumulation_steps": 2, "max_length": 32})
    args = build_training_arguments(job, _StubTask(), tmp_path / "out")
    assert args.use_cpu is True
    assert args.fp16 is False
    assert args.bf16 is bf16_cpu
    assert args.output_dir == str(tmp_path / "out")
    assert args.learning_rate == 2e-05
    assert args.max_steps == 3 and args.gradient_accumulation_steps == 2
    assert str(args.eval_strategy.value) == "steps"
    assert args.report_to == [] and args.logging_steps == 10  # our defaults


@pytest.mark.parametrize("bf16_cpu", [False, True])
def test_accelerate_fp16_on_cpu_becomes_bf16_or_fp32_with_a_warning(tmp_path, monkeypatch, no_cuda, bf16_cpu, caplog):
    """`accelerate launch --mixed_precision fp16` reaches the Trainer as ACCELERATE_MIXED_PRECISION, not as fp16."""
    monkeypatch.setattr(arguments, "cpu_supports_bf16", lambda: bf16_cpu)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with caplog.at_level("WARNING"):
        args = build_training_arguments(make_job(tmp_path, {"max_steps": 1}), _StubTask(), tmp_path / "out")
    assert args.fp16 is False and args.bf16 is bf16_cpu
    assert args.mixed_precision == ("bf16" if bf16_cpu else "no")
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == ("bf16" if bf16_cpu else "no")  # what accelerate reads next
    assert f"training in {'bf16' if bf16_cpu else 'fp32'} instead" in caplog.text


@pytest.mark.parametrize("written", [{"gradient_checkpointing": True},
                                     {"gradient_checkpointing": True,
                                      "gradient_checkpointing_kwargs": {"use_reentrant": False}}])
def test_gradient_checkpointing_takes_effect_without_transformers_deprecation_warning(tmp_path, no_cuda, written):
    """transformers 5 calls it activation_checkpointing and warns on the old name every run; base_config keeps the
    old name (the seed's and LLaMA-Factory's)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = build_training_arguments(make_job(tmp_path, written), _StubTask(), tmp_path / "out")
    assert not [w for w in caught if "checkpointing" in str(w.message)]
    assert args.gradient_checkpointing is True  # what the Trainer and lm_head read
    assert args.gradient_checkpointing_kwargs == written.get("gradient_checkpointing_kwargs")


def test_checkpointing_is_read_under_either_name():
    """What QLoRA's preparation and the out-of-memory advice read: the new name wins, as in transformers."""
    from llmfinetune.arguments import checkpointing

    assert checkpointing({}) == (False, None)
    assert checkpointing({"gradient_checkpointing": True}) == (True, None)
    written = {"activation_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    assert checkpointing(written) == (True, {"use_reentrant": False})
    assert checkpointing({"gradient_checkpointing": True, "activation_checkpointing": False}) == (False, None)


def test_training_arguments_without_eval_split_and_loss_only(tmp_path, no_cuda):
    class LossOnly(Task):
        loss_only_eval = True

    args = build_training_arguments(make_job(tmp_path, {"eval_strategy": "steps", "report_to": "none"}), LossOnly(),
                                    tmp_path / "out", has_eval=False)
    assert str(args.eval_strategy.value) == "no"
    assert args.prediction_loss_only is True


def test_training_arguments_error_is_a_user_error(tmp_path, no_cuda):
    job = make_job(tmp_path, {"load_best_model_at_end": True, "eval_strategy": "steps", "save_strategy": "no"})
    with pytest.raises(UserError) as info:
        build_training_arguments(job, _StubTask(), tmp_path / "out")
    assert str(info.value).startswith(f"{job.source}: {BASE}: ")
    assert "load_best_model_at_end" in str(info.value)


def test_unknown_enum_value_names_the_key_and_the_choices(tmp_path, no_cuda):
    job = make_job(tmp_path, {"lr_scheduler_type": "not-a-scheduler"})
    with pytest.raises(UserError) as info:
        build_training_arguments(job, _StubTask(), tmp_path / "out")
    assert str(info.value).startswith(f"{BASE}.lr_scheduler_type: expected one of: linear, cosine")
    assert str(info.value).endswith("got 'not-a-scheduler'.")


def test_parse_job_without_source_still_translates():
    raw = {"model_config": {"model_id": "m"},
           "ft_config": {"ft_task": "maskedlm", "data_config": {}, "train_config": {"base_config": {"seed": 3}}}}
    assert translate(parse_job(copy.deepcopy(raw))) == {"seed": 3}


@pytest.mark.parametrize("key", ["save_strategy", "eval_strategy", "logging_strategy"])
def test_unquoted_no_is_the_string_no(tmp_path, key):
    from llmfinetune.arguments import translate

    job = make_job(tmp_path, {key: False})  # what YAML makes of `save_strategy: no`
    assert translate(job)[key] == "no"


def test_on_a_gpu_batches_go_to_the_device_without_waiting_unless_the_job_says_otherwise(tmp_path, no_cuda):
    """A blocking copy to the GPU waits for every kernel queued before it (the previous step): non_blocking is the
    default there (from pinned memory, which Trainer's data loader gives on a GPU), a fresh dict every time (Trainer
    pops it); a job's own accelerator_config replaces it. On the CPU it stays off (transformers would warn about the
    unpinned memory)."""
    from llmfinetune.arguments import our_defaults

    first = our_defaults(on_gpu=True)
    assert first["accelerator_config"] == {"non_blocking": True}
    first["accelerator_config"].pop("non_blocking")
    assert our_defaults(on_gpu=True)["accelerator_config"] == {"non_blocking": True}
    assert "accelerator_config" not in our_defaults(on_gpu=False)
    args = build_training_arguments(make_job(tmp_path, {"max_steps": 1}), _StubTask(), tmp_path / "out")
    assert args.accelerator_config.non_blocking is False
    own = build_training_arguments(make_job(tmp_path, {"accelerator_config": {"split_batches": True}}), _StubTask(),
                                   tmp_path / "own")
    assert own.accelerator_config.split_batches is True
