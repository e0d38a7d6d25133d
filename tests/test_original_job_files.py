"""Every job file of the original loads: its own files (written out below in its layout, with every field its schema
declared) pass `check` against a local tiny model and data; each original key is mapped to its meaning here or
accepted with one warning saying it has no effect."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml

from conftest import make_dataset, set_at, write_jsonl
from llmfinetune import config as config_module
from llmfinetune.config import NO_EFFECT, RAY_ONLY, load_job, original_key_warnings, parse_job
from llmfinetune.errors import UserError

# The original's models/*.yaml, as it shipped them (its comments dropped), with MODEL and DATA standing for a local
# tiny model and data, batch sizes cut to the tiny data, and num_workers 1 (the original's maskedlm file says 7).
ORIGINAL_FILES = {
    "ft--sequenceclassification--bert-base-uncased.yaml": """
model_config:
  warmup: True
  model_task: fill-mask
  model_id: MODEL
  initialization:
    initializer:
      type: Finetune
      dtype: float32
      from_pretrained_kwargs:
        trust_remote_code: true
ft_config:
  ft_task: "sequenceclassification"
  data_config:
    data_path: glue
    subset: mrpc
    local_path: DATA
    num_row: 30
    input_columns:
      - "text"
    validation_column: validation
  train_config:
    base_config:
      checkpoints_output_dir: OUT
      per_device_train_batch_size: 8
      learning_rate: 2e-5
      num_train_epochs: 2
      weight_decay: 0.01
      logging_strategy: steps
      evaluation_strategy: steps
      save_strategy: steps
      save_steps: 100
""",
    "ft--sequenceclassification--bert-base-uncased-lora.yaml": """
model_config:
  warmup: True
  model_task: fill-mask
  model_id: MODEL
  initialization:
    initializer:
      type: Finetune
      dtype: float32
      from_pretrained_kwargs:
        trust_remote_code: true
ft_config:
  ft_method: "lora"
  ft_task: "sequenceclassification"
  data_config:
    data_path: glue
    subset: mrpc
    local_path: DATA
    num_row: 30
    input_columns:
      - "text"
    validation_column: validation
  train_config:
    lora_config:
      r: 1
      task_type: SEQ_CLS
      lora_alpha: 1
      lora_dropout: 0.1
    base_config:
      checkpoints_output_dir: OUT
      per_device_train_batch_size: 8
      learning_rate: 2e-5
      num_train_epochs: 2
      weight_decay: 0.01
      logging_strategy: steps
      evaluation_strategy: steps
      save_strategy: steps
      save_steps: 100
""",
    "ft--maskedlm--distilbert-base-uncased.yaml": """
model_config:
  warmup: True
  model_task: fill-mask
  model_id: MODEL
  max_input_words: 800
  initialization:
    runtime_env:
      pip:
        - deepspeed==0.9.2
        - accelerate
    s3_mirror_config:
      bucket_uri: /tmp/hub/models/distilbert-base-uncased/
    initializer:
      type: Finetune
      dtype: float32
      from_pretrained_kwargs:
        trust_remote_code: true
ft_config:
  ft_task: maskedlm
  data_config:
    data_path: imdb
    subset:
    local_path: DATA
    num_row: 30
    input_columns:
      - "text"
    validation_column: validation
  train_config:
    base_config:
      checkpoints_output_dir: OUT
      per_device_train_batch_size: 1
      learning_rate: 2e-5
      num_train_epochs: 2
      weight_decay: 0.01
      remove_unused_columns: false
      logging_strategy: steps
      evaluation_strategy: steps
      save_strategy: steps
      save_steps: 100
scaling_config:
  num_workers: 1
  num_gpus_per_worker: 0
  num_cpus_per_worker: 1
  ray_actor_options:
    num_cpus: 0.1
""",
    "ft--text-generation--Qwen-Qwen-7B-Chat.yaml": """
model_config:
  warmup: True
  model_task: text-generation
  model_id: MODEL
  max_input_words: 800
  initialization:
    initializer:
      type: Finetune
      dtype: float32
      from_pretrained_kwargs:
        trust_remote_code: true
ft_config:
  ft_task: "text-generation"
  data_config:
    data_path: AdvertiseGen
    local_path: DATA
    num_row: 30
    input_columns:
      - "content"
    validation_column: summary
  train_config:
    base_config:
      max_length: 64
      checkpoints_output_dir: OUT
      per_device_train_batch_size: 1
      per_device_eval_batch_size: 1
      learning_rate: 2e-5
      num_train_epochs: 2
      weight_decay: 0.01
      remove_unused_columns: true
      logging_strategy: steps
      evaluation_strategy: steps
      save_strategy: steps
      save_steps: 25
      max_steps: 50
""",
    # The original shipped no token-classification file; this one is in the same layout.
    "ft--tokenclassification--bert-base-cased.yaml": """
model_config:
  warmup: True
  model_task: token-classification
  model_id: MODEL
  initialization:
    initializer:
      type: Finetune
      dtype: float32
      from_pretrained_kwargs: {}
ft_config:
  ft_task: tokenclassification
  data_config:
    data_path: conll2003
    local_path: DATA
    num_row: 30
    input_columns: ["tokens"]
    validation_column: validation
  train_config:
    base_config:
      checkpoints_output_dir: OUT
      per_device_train_batch_size: 8
      learning_rate: 2e-5
      num_train_epochs: 1
      logging_strategy: steps
      evaluation_strategy: steps
      save_strategy: steps
      save_steps: 100
""",
}

# Every field the original's schema declared that the files above leave out, with a value of the original's kind.
ORIGINAL_FIELDS = {
    "scaling_config.placement_strategy": "PACK",
    "scaling_config.resources_per_worker": {"accelerator_type_cpu": 0.01},
    "scaling_config.pg_timeout_s": 600,
    "scaling_config.ray_actor_options": {"num_cpus": 0.1},
    "model_config.generation": {"prompt_format": "{instruction}", "max_batch_size": 1, "batch_wait_timeout_s": 1,
                                "generate_kwargs": {"max_new_tokens": 24, "do_sample": True, "top_p": 0.92,
                                                    "top_k": 0},
                                "stopping_sequences": ["###"]},
    "model_config.model_url": "https://huggingface.co/bert-base-uncased",
    "model_config.model_description": "BERT base model (uncased).",
    "model_config.initialization.hf_model_id": "bert-base-uncased",
    "model_config.initialization.pipeline": "default",
    "model_config.initialization.initializer.use_bettertransformer": True,
    "model_config.initialization.initializer.torch_compile": {"backend": "inductor", "mode": "default",
                                                              "fullgraph": False, "dynamic": False,
                                                              "options": {"triton.cudagraphs": False}},
    "ft_config.data_config.max_length": 48,
    "ft_config.data_config.truncation": True,
    "ft_config.data_config.stride": 50,
    "ft_config.data_config.return_overflowing_tokens": True,
    "ft_config.train_config.base_config.pad_to_max_length": False,
    "ft_config.ft_stage": "sft",
    "model_config.initialization.s3_mirror_config.endpoint_url": None,
    "model_config.initialization.s3_mirror_config.s3_sync_args": ["--no-sign-request"],
}


def _data(tmp_path: Path, task: str) -> Path:
    folder = tmp_path / "data"
    if task == "text-generation":  # AdvertiseGen's layout: `content` in, `summary` out
        rows = [{"content": f"type#dress*colour#{c}", "summary": f"a lovely {c} dress"} for c in
                ["red", "blue", "green", "black", "white", "pink", "grey", "gold"] * 4]
        write_jsonl(folder / "train.jsonl", rows)
        write_jsonl(folder / "validation.jsonl", rows[:8])
        return folder
    return make_dataset(folder, task)


def _write(tmp_path: Path, name: str, text: str, tiny_models, extra: dict | None = None) -> Path:
    raw = yaml.safe_load(text)
    task = raw["ft_config"]["ft_task"]
    raw["model_config"]["model_id"] = str(tiny_models["qwen2" if task == "text-generation" else "bert"])
    raw["ft_config"]["data_config"]["local_path"] = str(_data(tmp_path, task))
    raw["ft_config"]["train_config"]["base_config"]["checkpoints_output_dir"] = str(tmp_path / "out")
    for key, value in (extra or {}).items():
        if key == "ft_config.data_config.max_length":  # both spellings in one file must agree
            value = raw["ft_config"]["train_config"]["base_config"].get("max_length", value)
        set_at(raw, key, value)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _check(path: Path, caplog) -> tuple[dict, list[str]]:
    from llmfinetune.workflow import check_job

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        summary = check_job(load_job(path))
    return summary, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    # ray-ft sets these for its workers; torch_compile's fullgraph/dynamic land in accelerate's variables.
    for name in (config_module.LAUNCHER_ENV, config_module.WARNED_ENV, "ACCELERATE_DYNAMO_USE_FULLGRAPH",
                 "ACCELERATE_DYNAMO_USE_DYNAMIC", "RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("name", sorted(ORIGINAL_FILES))
def test_the_original_job_files_pass_check_as_they_are(tmp_path, tiny_models, caplog, name):
    summary, warnings = _check(_write(tmp_path, name, ORIGINAL_FILES[name], tiny_models), caplog)
    assert summary["splits"]["train"] > 0
    if "maskedlm" in name:  # its scaling_config.ray_actor_options: one warning naming it
        assert [w for w in warnings if "scaling_config.ray_actor_options" in w] == [
            f"scaling_config.ray_actor_options: accepted, no effect here: {NO_EFFECT['scaling_config.ray_actor_options']}."]


@pytest.mark.parametrize("name", sorted(ORIGINAL_FILES))
def test_every_field_of_the_original_schema_loads_with_one_warning_or_its_meaning(tmp_path, tiny_models, caplog,
                                                                                   name):
    path = _write(tmp_path, name, ORIGINAL_FILES[name], tiny_models, ORIGINAL_FIELDS)
    summary, warnings = _check(path, caplog)
    job = load_job(path)
    task = job.task
    # Mapped: data_config.max_length is base_config.max_length, torch_compile is Trainer's torch.compile.
    assert job.base_config["max_length"] == job.data.max_length in (48, 64)
    assert job.base_config["torch_compile"] is True and job.base_config["torch_compile_backend"] == "inductor"
    assert job.base_config["torch_compile_mode"] == "default"
    assert os.environ["ACCELERATE_DYNAMO_USE_FULLGRAPH"] == "False"
    assert os.environ["ACCELERATE_DYNAMO_USE_DYNAMIC"] == "False"
    # model_id is a local folder: it is loaded, hf_model_id says where it came from.
    assert summary["model"] == job.model.model_id
    # One warning per key with no effect, each naming its full key; nothing else is warned twice.
    expected_keys = [key for key in NO_EFFECT if key != "model_config.initialization.initializer.torch_compile.options"]
    expected_keys += ["model_config.initialization.initializer.torch_compile.options", *RAY_ONLY,
                      "model_config.initialization.hf_model_id",
                      "model_config.initialization.s3_mirror_config.s3_sync_args"]
    if job.model.initialization.s3_mirror_config.bucket_uri:  # the maskedlm file's; model_id is the folder read
        expected_keys.append("model_config.initialization.s3_mirror_config.bucket_uri")
    if task == "text-generation":
        expected_keys.append("model_config.generation.generate_kwargs.top_k")
    else:
        expected_keys = [k for k in expected_keys if not k.startswith("model_config.generation.")]
        expected_keys.append("model_config.generation.generate_kwargs")
    for key in expected_keys:
        naming = [w for w in warnings if w.startswith(f"{key}:")]
        assert len(naming) == 1, (key, warnings)
    assert len(warnings) == len(set(warnings))


def test_a_second_check_of_the_same_job_does_not_repeat_the_warnings(tmp_path, tiny_models, caplog):
    from llmfinetune.workflow import check_job

    path = _write(tmp_path, "job.yaml", ORIGINAL_FILES["ft--maskedlm--distilbert-base-uncased.yaml"], tiny_models,
                  {"ft_config.ft_stage": "sft"})
    job = load_job(path)
    with caplog.at_level(logging.WARNING):
        check_job(job, load_data=False)
        check_job(job, load_data=False)
    assert [r.getMessage() for r in caplog.records].count(
        f"ft_config.ft_stage: accepted, no effect here: {NO_EFFECT['ft_config.ft_stage']}.") == 1


def _minimal(**keys) -> dict:
    raw = {"model_config": {"model_id": "bert-base-uncased"},
           "ft_config": {"ft_task": "sequenceclassification", "data_config": {"local_path": "data"}}}
    for key, value in keys.items():
        set_at(raw, key.replace("__", "."), value)
    return raw


def test_data_config_max_length_is_base_config_max_length_and_a_conflict_names_both_keys():
    job = parse_job(_minimal(**{"ft_config.data_config.max_length": 96}))
    assert job.base_config["max_length"] == 96
    again = parse_job(_minimal(**{"ft_config.data_config.max_length": 96,
                                  "ft_config.train_config.base_config.max_length": 96}))
    assert again.base_config["max_length"] == 96
    with pytest.raises(UserError) as error:
        parse_job(_minimal(**{"ft_config.data_config.max_length": 96,
                              "ft_config.train_config.base_config.max_length": 128}))
    assert "ft_config.data_config.max_length" in str(error.value)
    assert "ft_config.train_config.base_config.max_length" in str(error.value)


def test_torch_compile_reaches_training_arguments_and_a_conflict_names_both_keys(tiny_models, tmp_path):
    from llmfinetune.arguments import build_training_arguments
    from llmfinetune.registry import TASKS

    job = parse_job(_minimal(**{"model_config.initialization.initializer.torch_compile":
                                {"backend": "aot_eager", "mode": "reduce-overhead"}}))
    args = build_training_arguments(job, TASKS.get(job.task), tmp_path / "run")
    assert (args.torch_compile, args.torch_compile_backend, args.torch_compile_mode) == (
        True, "aot_eager", "reduce-overhead")
    # Only what the file sets: the original's default backend is also Trainer's, so an explicit base_config one wins.
    job = parse_job(_minimal(**{"model_config.initialization.initializer.torch_compile": {"fullgraph": True},
                                "ft_config.train_config.base_config.torch_compile_backend": "eager"}))
    assert job.base_config["torch_compile_backend"] == "eager"
    with pytest.raises(UserError) as error:
        parse_job(_minimal(**{"model_config.initialization.initializer.torch_compile": {"backend": "inductor"},
                              "ft_config.train_config.base_config.torch_compile_backend": "eager"}))
    assert "model_config.initialization.initializer.torch_compile.backend" in str(error.value)
    assert "ft_config.train_config.base_config.torch_compile_backend" in str(error.value)


def test_torch_compile_fullgraph_and_dynamic_reach_accelerates_compile_plugin(monkeypatch):
    from accelerate.utils import TorchDynamoPlugin

    from llmfinetune.config import apply_original_keys

    job = parse_job(_minimal(**{"model_config.initialization.initializer.torch_compile":
                                {"fullgraph": True, "dynamic": True}}))
    apply_original_keys(job)
    # What Trainer builds (backend and mode from TrainingArguments; fullgraph and dynamic from the environment).
    plugin = TorchDynamoPlugin(backend="inductor", mode="default", dynamic=None)
    assert plugin.fullgraph is True and plugin.dynamic is True


def test_ray_placement_keys_warn_on_run_ft_but_not_under_ray_ft():
    job = parse_job(_minimal(**{"scaling_config.placement_strategy": "SPREAD",
                                "scaling_config.pg_timeout_s": 30}))
    plain = original_key_warnings(job, launcher="")
    assert any(w.startswith("scaling_config.placement_strategy: used by `llmfinetune ray-ft` only") for w in plain)
    assert any(w.startswith("scaling_config.pg_timeout_s:") for w in plain)
    assert not original_key_warnings(job, launcher="ray-ft")


def test_ray_placement_keys_become_ray_trains_scaling_config():
    from llmfinetune.ray_launch import cluster_resources, resources, scaling_arguments

    job = parse_job(_minimal(**{"scaling_config.num_workers": 2, "scaling_config.placement_strategy": "SPREAD",
                                "scaling_config.resources_per_worker": {"CPU": 2, "accelerator_type_cpu": 0.01},
                                "scaling_config.pg_timeout_s": 30}))
    wanted = resources(job)
    assert scaling_arguments(wanted) == {"num_workers": 2, "use_gpu": False, "placement_strategy": "SPREAD",
                                         "resources_per_worker": {"CPU": 2.0, "accelerator_type_cpu": 0.01}}
    # The local one-node cluster offers what the workers ask for, custom resources included.
    # (whole amounts: Ray refuses fractions of a node's resource)
    assert cluster_resources(wanted, 0) == {"num_cpus": 4, "num_gpus": 0, "resources": {"accelerator_type_cpu": 1}}
    assert wanted["pg_timeout_s"] == 30
    from ray.train import ScalingConfig

    ScalingConfig(**scaling_arguments(wanted))  # Ray Train takes them as they are


@pytest.mark.parametrize("keys, message", [
    ({"scaling_config.num_cpus_per_worker": 1, "scaling_config.resources_per_worker": {"CPU": 2}},
     "scaling_config.resources_per_worker.CPU (2) and scaling_config.num_cpus_per_worker (1) disagree"),
    ({"scaling_config.num_workers": 2, "scaling_config.placement_strategy": "STRICT_SPREAD"},
     "scaling_config.placement_strategy: STRICT_SPREAD"),
])
def test_ray_placement_requests_that_cannot_run_locally_are_refused(keys, message):
    from llmfinetune.ray_launch import resources

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resources(parse_job(_minimal(**keys)))


def test_generation_generate_kwargs_are_predicts_defaults_and_flags_win():
    import argparse

    from llmfinetune.inference import _options

    raw = _minimal(**{"ft_config.ft_task": "text-generation",
                      "model_config.generation": {"generate_kwargs": {"max_new_tokens": 7, "do_sample": True,
                                                                      "temperature": 0.5, "top_p": 0.8}}})
    job = parse_job(raw)
    flags = dict(batch_size=None, top_k=None, max_new_tokens=None, temperature=None, top_p=None, do_sample=False)
    options = _options(argparse.Namespace(**flags), job)
    assert (options.max_new_tokens, options.do_sample, options.temperature, options.top_p) == (7, True, 0.5, 0.8)
    options = _options(argparse.Namespace(**{**flags, "max_new_tokens": 3, "temperature": 0.9}), job)
    assert (options.max_new_tokens, options.temperature) == (3, 0.9)
    plain = _options(argparse.Namespace(**flags), parse_job(_minimal(**{"ft_config.ft_task": "text-generation"})))
    assert (plain.max_new_tokens, plain.do_sample, plain.temperature) == (64, False, None)


def test_a_bad_generation_default_is_refused_at_load_naming_its_key():
    with pytest.raises(UserError, match=r"model_config\.generation\.generate_kwargs\.max_new_tokens: expected a "
                                        "whole number"):
        parse_job(_minimal(**{"model_config.generation": {"generate_kwargs": {"max_new_tokens": 0}}}))


def test_hf_model_id_is_the_hub_id_loaded_when_model_id_is_not_a_folder(tiny_models, tmp_path, monkeypatch):
    from llmfinetune import models

    seen = []
    monkeypatch.setattr(models, "_check_hub_model", lambda model_id, tried, job: seen.append(model_id))
    job = parse_job(_minimal(**{"model_config.model_id": "My display name",
                                "model_config.initialization.hf_model_id": "org/real-model"}))
    assert models.resolve_model(job) == "org/real-model" and seen == ["org/real-model"]


@pytest.mark.slow
def test_ray_ft_gives_up_after_pg_timeout_s_with_what_was_asked(tmp_path, tiny_models):
    """pg_timeout_s bounds how long Ray may take to place the workers (Ray Train retries forever otherwise)."""
    pytest.importorskip("ray.train")
    import signal
    import subprocess
    import sys

    path = _write(tmp_path, "job.yaml", ORIGINAL_FILES["ft--maskedlm--distilbert-base-uncased.yaml"], tiny_models,
                  {"scaling_config.resources_per_worker": {"memory": 10**15}, "scaling_config.pg_timeout_s": 3,
                   "ft_config.data_config.cache_tokenized": False,
                   "model_config.initialization.runtime_env": {}})  # its pip list would need the network
    process = subprocess.Popen([sys.executable, "-m", "llmfinetune", "ray-ft", f"--ft={path}"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               cwd=Path(__file__).resolve().parent.parent)
    try:
        output = process.communicate(timeout=180)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # Ray's raylet and workers too
        raise
    assert process.returncode == 2, output[-3000:]
    assert ("error: scaling_config.pg_timeout_s: Ray could not place 1 worker(s) asking for (CPU 1, memory 1e+15) "
            "each within 3 s on this machine (1 CPU(s), 0 GPU(s))") in output
    # Ray's own words, carried by the error (its controller's log lines can be lost at shutdown): it waited that long
    assert "(Ray: worker group startup timed out after 3.0 seconds waiting for 1 workers.)" in output


def test_a_run_directorys_job_yaml_warns_only_for_what_the_user_set(tmp_path):
    """job.yaml lists every key (unset ones as null): reproducing a run from it must not warn about those."""
    from llmfinetune.config import dump_job

    job = parse_job(_minimal(**{"ft_config.ft_stage": "sft"}))
    dump_job(job, tmp_path / "job.yaml")
    assert original_key_warnings(load_job(tmp_path / "job.yaml"), launcher="") == [
        f"ft_config.ft_stage: accepted, no effect here: {NO_EFFECT['ft_config.ft_stage']}."]


@pytest.mark.parametrize("name, value, expected", [
    ("max_new_tokens", 2.5, "a whole number of at least 1"), ("do_sample", "yes", "true or false"),
    ("temperature", 0, "a number above 0"), ("top_p", 1.5, r"a number in \(0, 1\]"),
    ("top_p", True, r"a number in \(0, 1\]"),
])
def test_each_bad_generation_default_names_its_key(name, value, expected):
    with pytest.raises(UserError, match=rf"model_config\.generation\.generate_kwargs\.{name}: expected {expected}"):
        parse_job(_minimal(**{"model_config.generation": {"generate_kwargs": {name: value}}}))


def test_torch_compile_true_in_base_config_agrees_with_the_original_section():
    job = parse_job(_minimal(**{"model_config.initialization.initializer.torch_compile": {},
                                "ft_config.train_config.base_config.torch_compile": True}))
    assert job.base_config["torch_compile"] is True
    with pytest.raises(UserError, match=r"initializer\.torch_compile and ft_config\.train_config\.base_config\."
                                        r"torch_compile disagree"):
        parse_job(_minimal(**{"model_config.initialization.initializer.torch_compile": {},
                              "ft_config.train_config.base_config.torch_compile": False}))
