"""The job file: the seed format loads, overrides apply as YAML, and every mistake names its key and file."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import set_at
from llmfinetune.config import Job, apply_override, dump_job, load_job, parse_job, redact
from llmfinetune.errors import UserError

# The example of /work/shared/seed-format.md, every key of it, as users have it (comments dropped).
SEED_EXAMPLE = """\
model_config:
  warmup: True
  model_task: fill-mask
  model_id: bert-base-uncased
  max_input_words: 800
  quantization_bit: 4
  add_special_tokens:
    pad_token: "<pad>"
  initialization:
    s3_mirror_config:
      endpoint_url: null
      bucket_uri: /data/models/distilbert-base-uncased/
      s3_sync_args: ["--no-sign-request"]
    runtime_env: {}
    initializer:
      type: Finetune
      dtype: float32
      from_pretrained_kwargs:
        trust_remote_code: true
ft_config:
  ft_task: sequenceclassification
  ft_method: lora
  data_config:
    data_path: glue
    subset: mrpc
    local_path: dataset/glue/mrpc/1.0.0
    train_file: null
    validation_file: null
    num_row: 30
    input_columns: ["sentence"]
    validation_column: validation
  train_config:
    lora_config:
      r: 8
      lora_alpha: 16
      lora_dropout: 0.1
      task_type: SEQ_CLS
    base_config:
      checkpoints_output_dir: finetune_models/
      per_device_train_batch_size: 8
      per_device_eval_batch_size: 8
      learning_rate: 2e-5
      num_train_epochs: 2
      max_steps: 50
      weight_decay: 0.01
      gradient_accumulation_steps: 1
      lr_scheduler_type: linear
      num_warmup_steps: 0
      max_length: 128
      remove_unused_columns: false
      logging_strategy: steps
      evaluation_strategy: steps
      save_strategy: steps
      save_steps: 100
scaling_config:
  num_workers: 2
  num_gpus_per_worker: 0
  num_cpus_per_worker: 1
"""

MINIMAL = {
    "model_config": {"model_id": "bert-base-uncased"},
    "ft_config": {"ft_task": "sequenceclassification", "data_config": {"local_path": "data"}},
}


def write_job(folder: Path, content, name: str = "job.yaml") -> Path:
    path = folder / name
    text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path, overrides=None) -> str:
    with pytest.raises(UserError) as info:
        load_job(path, overrides)
    return str(info.value)


# ------------------------------------------------------------------ the seed example


def test_seed_example_loads_every_key(tmp_path):
    job = load_job(write_job(tmp_path, SEED_EXAMPLE))
    model = job.model
    assert model.model_id == "bert-base-uncased"
    assert model.warmup is True
    assert model.model_task == "fill-mask"
    assert model.max_input_words == 800
    assert model.quantization_bit == 4
    assert model.add_special_tokens == {"pad_token": "<pad>"}
    assert model.initialization.s3_mirror_config.bucket_uri == "/data/models/distilbert-base-uncased/"
    assert model.initialization.s3_mirror_config.endpoint_url is None
    assert model.initialization.s3_mirror_config.s3_sync_args == ["--no-sign-request"]
    assert model.initialization.runtime_env == {}
    assert model.initialization.initializer.type == "Finetune"
    assert model.initialization.initializer.dtype == "float32"
    assert model.initialization.initializer.from_pretrained_kwargs == {"trust_remote_code": True}

    assert job.task == "sequenceclassification"
    assert job.method == "lora"
    data = job.data
    assert (data.data_path, data.subset, data.local_path) == ("glue", "mrpc", "dataset/glue/mrpc/1.0.0")
    assert data.train_file is None and data.validation_file is None
    assert data.num_row == 30
    assert data.input_columns == ["sentence"]
    assert data.validation_column == "validation"
    assert job.ft_config.train_config.lora_config == {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                                                      "task_type": "SEQ_CLS"}
    base = job.base_config
    assert base["learning_rate"] == "2e-5"  # PyYAML reads it as a string; arguments.translate converts it
    assert base["evaluation_strategy"] == "steps" and base["num_warmup_steps"] == 0
    assert list(base) == [
        "checkpoints_output_dir", "per_device_train_batch_size", "per_device_eval_batch_size", "learning_rate",
        "num_train_epochs", "max_steps", "weight_decay", "gradient_accumulation_steps", "lr_scheduler_type",
        "num_warmup_steps", "max_length", "remove_unused_columns", "logging_strategy", "evaluation_strategy",
        "save_strategy", "save_steps",
    ]
    scaling = job.scaling_config
    assert (scaling.num_workers, scaling.num_gpus_per_worker, scaling.num_cpus_per_worker) == (2, 0, 1)
    assert job.source == (tmp_path / "job.yaml").resolve()


# Every field the original's schema declared beyond the seed example, with a value of its kind.
ORIGINAL_SCHEMA_FIELDS = {
    "scaling_config.ray_actor_options": {"num_cpus": 0.1},
    "scaling_config.placement_strategy": "SPREAD",
    "scaling_config.resources_per_worker": {"accelerator_type_cpu": 0.01},
    "scaling_config.pg_timeout_s": 600,
    "model_config.generation": {"prompt_format": "{instruction}", "max_batch_size": 2, "batch_wait_timeout_s": 1,
                                "generate_kwargs": {"max_new_tokens": 16, "do_sample": False},
                                "stopping_sequences": ["###", 2]},
    "model_config.model_url": "https://huggingface.co/bert-base-uncased",
    "model_config.model_description": "BERT.",
    "model_config.initialization.hf_model_id": "bert-base-uncased",
    "model_config.initialization.pipeline": "default",
    "model_config.initialization.initializer.use_bettertransformer": False,
    "model_config.initialization.initializer.torch_compile": {"backend": "inductor", "mode": "max-autotune",
                                                              "fullgraph": True, "dynamic": False, "options": {}},
    "ft_config.data_config.max_length": 128,
    "ft_config.data_config.truncation": True,
    "ft_config.data_config.stride": 50,
    "ft_config.data_config.return_overflowing_tokens": True,
    "ft_config.train_config.base_config.pad_to_max_length": True,
    "ft_config.ft_stage": "sft",
    "model_config.initialization.s3_mirror_config.endpoint_url": "http://127.0.0.1:9000",
    "model_config.initialization.s3_mirror_config.s3_sync_args": ["--no-sign-request"],
}


@pytest.mark.parametrize("dotted", sorted(ORIGINAL_SCHEMA_FIELDS))
def test_every_field_of_the_original_schema_is_accepted(tmp_path, dotted):
    raw = yaml.safe_load(SEED_EXAMPLE)
    job = load_job(write_job(tmp_path, set_at(raw, dotted, ORIGINAL_SCHEMA_FIELDS[dotted])))
    assert job.to_dict()  # and nothing is dropped from what the run directory's job.yaml records
    node = job.to_dict()
    for part in dotted.split("."):
        node = node[part]
    assert node == ORIGINAL_SCHEMA_FIELDS[dotted]


def test_a_job_with_every_original_field_round_trips_through_its_dumped_job_yaml(tmp_path):
    raw = yaml.safe_load(SEED_EXAMPLE)
    for dotted, value in ORIGINAL_SCHEMA_FIELDS.items():
        set_at(raw, dotted, value)
    job = load_job(write_job(tmp_path, raw))
    # The original's spellings are mapped onto ours in the loaded job, so the dumped job.yaml holds both, agreeing.
    assert job.base_config["max_length"] == 128
    assert (job.base_config["torch_compile"], job.base_config["torch_compile_backend"],
            job.base_config["torch_compile_mode"]) == (True, "inductor", "max-autotune")
    dump_job(job, tmp_path / "dumped.yaml")
    again = load_job(tmp_path / "dumped.yaml")
    assert again.base_config == job.base_config and again.model == job.model


@pytest.mark.parametrize("dotted, value", [
    ("scaling_config.placement_strategy", "DIAGONAL"),
    ("scaling_config.pg_timeout_s", 0),
    ("scaling_config.resources_per_worker", {"accelerator_type_cpu": "many"}),
    ("model_config.generation.max_batch_size", 0),
    ("model_config.initialization.initializer.torch_compile.fullgraph", "sometimes"),
    ("ft_config.data_config.max_length", 0),
    ("ft_config.data_config.stride", -1),
    ("model_config.initialization.s3_mirror_config.s3_sync_args", "--no-sign-request"),
])
def test_wrong_values_of_the_original_fields_name_their_key(tmp_path, dotted, value):
    raw = yaml.safe_load(SEED_EXAMPLE)
    assert f"'{dotted}" in load_error(write_job(tmp_path, set_at(raw, dotted, value)))


def test_seed_example_round_trips_through_to_dict(tmp_path):
    job = load_job(write_job(tmp_path, SEED_EXAMPLE))
    again = parse_job(job.to_dict())
    assert again.to_dict() == job.to_dict()
    assert "model_config" in job.to_dict()  # dumped under the seed's name, not the Python attribute name


@pytest.mark.parametrize("method", [None, "", "absent"])
def test_missing_or_null_ft_method_is_full(tmp_path, method):
    raw = copy.deepcopy(MINIMAL)
    if method != "absent":
        raw["ft_config"]["ft_method"] = method
    job = load_job(write_job(tmp_path, raw))
    assert job.method == "full"
    assert job.ft_config.ft_method == "full"


def test_input_columns_string_becomes_list(tmp_path):
    raw = set_at(copy.deepcopy(MINIMAL), "ft_config.data_config.input_columns", "sentence1")
    assert load_job(write_job(tmp_path, raw)).data.input_columns == ["sentence1"]


# ------------------------------------------------------------------ overrides


def test_overrides_are_yaml_typed(tmp_path):
    path = write_job(tmp_path, SEED_EXAMPLE)
    job = load_job(path, [
        "ft_config.train_config.base_config.max_steps=5",
        "ft_config.train_config.base_config.fp16=true",
        "ft_config.train_config.base_config.warmup_ratio=0.1",
        "ft_config.data_config.input_columns=[sentence1, sentence2]",
        "ft_config.data_config.subset=null",
        "ft_config.ft_method=full",
        "model_config.model_id=org/other-model",
    ])
    base = job.base_config
    assert base["max_steps"] == 5 and type(base["max_steps"]) is int
    assert base["fp16"] is True
    assert base["warmup_ratio"] == 0.1
    assert job.data.input_columns == ["sentence1", "sentence2"]
    assert job.data.subset is None
    assert job.method == "full"
    assert job.model.model_id == "org/other-model"


def test_override_with_equals_in_value_keeps_the_rest(tmp_path):
    job = load_job(write_job(tmp_path, MINIMAL), ["model_config.model_id=a=b"])
    assert job.model.model_id == "a=b"


def test_override_creates_new_keys_and_sections(tmp_path):
    job = load_job(write_job(tmp_path, MINIMAL), [
        "ft_config.train_config.base_config.seed=7",
        "ft_config.train_config.lora_config.r=4",
        "scaling_config.num_workers=3",
    ])
    assert job.base_config == {"seed": 7}
    assert job.ft_config.train_config.lora_config == {"r": 4}
    assert job.scaling_config.num_workers == 3


def test_override_of_unknown_key_is_caught_by_validation(tmp_path):
    message = load_error(write_job(tmp_path, MINIMAL), ["ft_config.data_config.locl_path=x"])
    assert "unknown key 'ft_config.data_config.locl_path'" in message
    assert "Did you mean 'local_path'?" in message


@pytest.mark.parametrize("override, section", [
    ("model_config.model_id.revision=main", "model_config.model_id"),
    ("ft_config.data_config.local_path.x.y=1", "ft_config.data_config.local_path"),
])
def test_override_through_a_scalar_is_an_error(tmp_path, override, section):
    message = load_error(write_job(tmp_path, MINIMAL), [override])
    assert f"override '{override}'" in message
    assert f"'{section}' is a value, not a section" in message


@pytest.mark.parametrize("override", ["no_equals_sign", "=5"])
def test_malformed_override(override):
    raw = copy.deepcopy(MINIMAL)
    with pytest.raises(UserError, match=r"expected KEY\.PATH=VALUE"):
        apply_override(raw, override)
    assert raw == MINIMAL


def test_override_value_that_is_not_yaml():
    with pytest.raises(UserError, match=r"override 'a\.b=\[1': value is not valid YAML"):
        apply_override({}, "a.b=[1")


@settings(max_examples=50, deadline=None)
@given(
    path=st.lists(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True), min_size=1, max_size=4),
    value=st.one_of(st.integers(), st.booleans(), st.none(), st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)),
)
def test_override_sets_exactly_that_value(path, value):
    raw: dict = {}
    apply_override(raw, f"{'.'.join(path)}={yaml.safe_dump(value).splitlines()[0] if value is not None else 'null'}")
    node = raw
    for part in path[:-1]:
        assert list(node) == [part]
        node = node[part]
    expected = yaml.safe_load(yaml.safe_dump(value))
    assert node == {path[-1]: expected}


# ------------------------------------------------------------------ validation messages


@pytest.mark.parametrize("section, typo, suggestion", [
    ("", "modl_config", "model_config"),
    ("model_config", "model_idd", "model_id"),
    ("model_config.initialization", "initializr", "initializer"),
    ("model_config.initialization.initializer", "dtpye", "dtype"),
    ("model_config.initialization.s3_mirror_config", "bucket_url", "bucket_uri"),
    ("ft_config", "ft_metod", "ft_method"),
    ("ft_config.data_config", "locl_path", "local_path"),
    ("ft_config.data_config", "input_column", "input_columns"),
    ("ft_config.train_config", "base_confg", "base_config"),
    ("scaling_config", "num_worker", "num_workers"),
])
def test_unknown_key_names_dotted_key_and_suggests(tmp_path, section, typo, suggestion):
    raw = copy.deepcopy(MINIMAL)
    dotted = f"{section}.{typo}" if section else typo
    set_at(raw, dotted, "x")
    path = write_job(tmp_path, raw)
    message = load_error(path)
    assert message.startswith(f"{path}: ")
    assert f"unknown key '{dotted}'." in message
    assert f"Did you mean '{suggestion}'?" in message
    assert "Valid keys here:" in message and suggestion in message.split("Valid keys here:")[1]


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path):
    raw = set_at(copy.deepcopy(MINIMAL), "ft_config.data_config.zzzzzz", 1)
    message = load_error(write_job(tmp_path, raw))
    assert "unknown key 'ft_config.data_config.zzzzzz'." in message
    assert "Did you mean" not in message
    assert "Valid keys here: data_path, subset, local_path" in message


@pytest.mark.parametrize("dotted", ["model_config.model_id", "ft_config.ft_task", "ft_config.data_config"])
def test_missing_required_key_is_named(tmp_path, dotted):
    raw = copy.deepcopy(MINIMAL)
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[last]
    path = write_job(tmp_path, raw)
    message = load_error(path)
    assert message == f"{path}: missing required key '{dotted}'."


def test_several_errors_are_all_listed(tmp_path):
    path = write_job(tmp_path, {"model_config": {}, "ft_config": {"data_config": {}, "ft_tsk": 1}})
    message = load_error(path)
    assert message.startswith(f"{path}: invalid job file:")
    for fragment in ("missing required key 'model_config.model_id'", "missing required key 'ft_config.ft_task'",
                     "unknown key 'ft_config.ft_tsk'. Did you mean 'ft_task'?"):
        assert fragment in message


@pytest.mark.parametrize("dotted, value", [
    ("ft_config.data_config.num_row", "abc"),
    ("model_config.initialization.initializer.dtype", "float64"),
    ("model_config.quantization_bit", 3),
    ("model_config.max_input_words", 0),
    ("scaling_config.num_workers", 0),
    ("ft_config.data_config.validation_fraction", 1.5),
    ("ft_config.train_config.base_config", "lr=1"),
])
def test_wrong_type_names_the_key_and_value(tmp_path, dotted, value):
    raw = set_at(copy.deepcopy(MINIMAL), dotted, value)
    message = load_error(write_job(tmp_path, raw))
    assert f"key '{dotted}':" in message
    assert f"(got {value!r})" in message


def test_section_given_as_scalar(tmp_path):
    raw = copy.deepcopy(MINIMAL)
    raw["model_config"] = "bert-base-uncased"
    message = load_error(write_job(tmp_path, raw))
    assert "key 'model_config':" in message and "'bert-base-uncased'" in message


def test_yaml_syntax_error_reports_file_line_column(tmp_path):
    path = write_job(tmp_path, "model_config:\n  model_id: a: b\nft_config:\n  ft_task: x\n")
    message = load_error(path)
    assert message.startswith(f"{path}:2:14: YAML syntax error:")
    assert "mapping values are not allowed here" in message


def test_yaml_unclosed_bracket_reports_position(tmp_path):
    path = write_job(tmp_path, "model_config:\n  model_id: [a\nft_config:\n  ft_task: x\n")
    message = load_error(path)
    assert message.startswith(f"{path}:3:") and "YAML syntax error" in message


@pytest.mark.parametrize("content, kind", [("- a\n- b\n", "list"), ("just some text\n", "str"), ("42\n", "int")])
def test_non_mapping_yaml(tmp_path, content, kind):
    path = write_job(tmp_path, content)
    assert load_error(path) == (f"{path}: expected a YAML mapping with model_config and ft_config, got {kind}.")


def test_missing_job_file_names_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = load_error(Path("nope.yaml"))
    assert "--ft: job file 'nope.yaml' not found" in message
    assert str(tmp_path.resolve() / "nope.yaml") in message


def test_job_file_not_utf8(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes("model_config:\n  model_id: caf\u00e9\n".encode("latin-1"))
    message = load_error(path)
    assert message.startswith(f"{path}: not UTF-8 text")


# ------------------------------------------------------------------ redact


def test_redact_hides_secret_values():
    raw = {
        "model_config": {"initialization": {"initializer": {"from_pretrained_kwargs": {"token": "hf_abc"}}}},
        "ft_config": {"train_config": {"base_config": {"hub_token": "hf_xyz", "learning_rate": 1e-4}}},
        "accounts": [{"password": "hunter2", "user": "me"}, {"API_KEY": "k", "Secret": "s"}],
    }
    out = redact(raw)
    assert out["model_config"]["initialization"]["initializer"]["from_pretrained_kwargs"] == {"token": "<redacted>"}
    assert out["ft_config"]["train_config"]["base_config"] == {"hub_token": "<redacted>", "learning_rate": 1e-4}
    assert out["accounts"] == [{"password": "<redacted>", "user": "me"}, {"API_KEY": "<redacted>", "Secret": "<redacted>"}]
    assert raw["accounts"][0]["password"] == "hunter2"  # the input is not modified


def test_redact_leaves_empty_secrets_and_plain_values():
    assert redact({"token": None, "password": "", "model_id": "x", "n": [1, {"a": 2}]}) == {
        "token": None, "password": "", "model_id": "x", "n": [1, {"a": 2}]}


def test_redact_keeps_tokenizer_special_tokens():
    raw = {"add_special_tokens": {"pad_token": "<pad>", "eos_token": "</s>"}, "include_tokens_per_second": True}
    assert redact(raw) == raw


def test_dumped_job_loads_back(tmp_path):
    job = load_job(write_job(tmp_path, SEED_EXAMPLE))
    dump_job(job, tmp_path / "dumped.yaml")
    assert load_job(tmp_path / "dumped.yaml").to_dict() == job.to_dict()


def test_dumped_job_hides_hub_token(tmp_path):
    raw = set_at(copy.deepcopy(MINIMAL), "model_config.initialization.initializer.from_pretrained_kwargs.token", "hf_X")
    dump_job(load_job(write_job(tmp_path, raw)), tmp_path / "dumped.yaml")
    text = (tmp_path / "dumped.yaml").read_text()
    assert "hf_X" not in text and "token: <redacted>" in text


# ------------------------------------------------------------------ input paths


def _job_in(folder: Path) -> Job:
    folder.mkdir(parents=True, exist_ok=True)
    return load_job(write_job(folder, MINIMAL))


def test_resolve_input_path_prefers_cwd(tmp_path, monkeypatch):
    job = _job_in(tmp_path / "jobs")
    (tmp_path / "jobs" / "data").mkdir()
    (tmp_path / "cwd" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    assert job.resolve_input_path("data", "k") == (tmp_path / "cwd" / "data").resolve()


def test_resolve_input_path_falls_back_to_job_folder(tmp_path, monkeypatch):
    job = _job_in(tmp_path / "jobs")
    (tmp_path / "jobs" / "data").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert job.resolve_input_path("data", "k") == (tmp_path / "jobs" / "data").resolve()
    assert job.resolve_input_path("../jobs/data", "k") == (tmp_path / "jobs" / "data").resolve()


def test_resolve_input_path_error_lists_both_paths(tmp_path, monkeypatch):
    job = _job_in(tmp_path / "jobs")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(UserError) as info:
        job.resolve_input_path("missing/dir", "ft_config.data_config.local_path")
    message = str(info.value)
    cwd_try = (tmp_path / "cwd" / "missing" / "dir").resolve()
    job_try = (tmp_path / "jobs" / "missing" / "dir").resolve()
    assert message.startswith(f"ft_config.data_config.local_path in {(tmp_path / 'jobs' / 'job.yaml').resolve()}: "
                              "path 'missing/dir' does not exist")
    assert f"(tried {cwd_try}, {job_try})" in message
    assert message.index(str(cwd_try)) < message.index(str(job_try))


def test_resolve_input_path_absolute_missing(tmp_path):
    job = _job_in(tmp_path / "jobs")
    target = tmp_path / "absent"
    with pytest.raises(UserError, match=f"path '{target}' does not exist \\(tried {target}\\)"):
        job.resolve_input_path(str(target), "k")


def test_resolve_input_path_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "stuff").mkdir()
    job = _job_in(tmp_path / "jobs")
    assert job.resolve_input_path("~/stuff", "k") == (tmp_path / "stuff").resolve()
    assert os.path.isdir(job.resolve_input_path("~/stuff", "k"))
