"""The job file: YAML in the seed layout, validated by pydantic before anything heavy is imported.

Every key of the seed format is accepted. `base_config` and `lora_config` are open dictionaries whose keys are
checked against `transformers.TrainingArguments` and `peft.LoraConfig` in `workflow.check_job` (that needs torch,
so it runs after this module's cheap checks).
"""
from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .errors import UserError

logger = logging.getLogger(__name__)

class _Strict(BaseModel):
    # Unknown keys are errors: the original silently dropped them and users trained with settings they never got.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)

    @field_validator("*", mode="before")
    @classmethod
    def _true_is_not_a_number(cls, value, info):
        # pydantic reads `num_row: true` as 1; a number key given true/false is a mistake, not a count.
        if isinstance(value, bool):
            annotation = cls.model_fields[info.field_name].annotation
            kinds = {annotation, *getattr(annotation, "__args__", ())}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError("expected a number, not true/false")
        return value


class S3MirrorConfig(_Strict):
    """Where the model is copied from before loading (s3_mirror.py): an s3:// prefix or a local folder."""
    endpoint_url: Optional[str] = None  # S3-compatible endpoint (MinIO, Ceph, ...); None: AWS
    bucket_uri: Optional[str] = None
    s3_sync_args: Optional[list[str]] = None  # `aws s3 sync` arguments, honoured where they map (s3_mirror.py)


class TorchCompile(_Strict):
    """The original's initializer.torch_compile, given to Trainer's torch.compile (see ORIGINAL_KEYS)."""
    backend: Optional[str] = "inductor"
    mode: Optional[str] = None
    fullgraph: bool = False
    dynamic: bool = False
    options: Optional[dict[str, Any]] = None


class Initializer(_Strict):
    type: str = "Finetune"
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "float32"
    from_pretrained_kwargs: dict[str, Any] = Field(default_factory=dict)
    use_bettertransformer: bool = False
    torch_compile: Optional[TorchCompile] = None


class Initialization(_Strict):
    s3_mirror_config: Optional[S3MirrorConfig] = None
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    initializer: Initializer = Field(default_factory=Initializer)
    hf_model_id: Optional[str] = None  # the hub id to load when model_id is only a display name
    pipeline: Optional[str] = None  # the original's serving pipeline; no effect on training


class Generation(_Strict):
    """The original's generation settings; `predict` takes its defaults from generate_kwargs (see ORIGINAL_KEYS)."""
    prompt_format: Optional[str] = None
    max_batch_size: Optional[int] = Field(default=None, ge=1)
    batch_wait_timeout_s: Optional[float] = None
    generate_kwargs: dict[str, Any] = Field(default_factory=dict)
    stopping_sequences: Optional[list[Any]] = None


class ModelConfig(_Strict):
    model_id: str
    warmup: bool = False  # accepted for seed compatibility; it never affected training
    model_task: Optional[str] = None  # informational, as in the seed
    max_input_words: Optional[int] = Field(default=None, gt=0)
    quantization_bit: Optional[Literal[4, 8]] = None
    add_special_tokens: dict[str, str] = Field(default_factory=dict)
    initialization: Initialization = Field(default_factory=Initialization)
    generation: Optional[Generation] = None
    model_url: Optional[str] = None  # informational (the original's model card link)
    model_description: Optional[str] = None  # informational


class DataConfig(_Strict):
    data_path: Optional[str] = None
    subset: Optional[str] = None
    local_path: Optional[str] = None
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    num_row: int = Field(default=0, ge=-1)  # 0 or -1: all rows
    input_columns: Optional[list[str]] = None
    label_column: Optional[str] = None
    response_column: Optional[str] = None
    validation_column: Optional[str] = None
    validation_fraction: float = Field(default=0.1, gt=0, lt=1)
    # text-generation (SFT) only:
    format: Literal["auto", "prompt_response", "alpaca", "messages", "sharegpt", "text"] = "auto"
    messages_column: Optional[str] = None
    template: Optional[str] = None  # None: the tokenizer's chat template if it has one, else "plain"
    system_prompt: Optional[str] = None
    train_on_prompt: bool = False
    # Tokenized data is cached by content hash; false re-tokenizes every run.
    cache_tokenized: bool = True
    # The original's tokenizer settings (see ORIGINAL_KEYS): max_length is base_config.max_length.
    max_length: Optional[int] = Field(default=None, ge=1)
    truncation: Optional[bool] = None
    stride: Optional[int] = Field(default=None, ge=0)
    return_overflowing_tokens: Optional[bool] = None

    @field_validator("input_columns", mode="before")
    @classmethod
    def _one_column_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value


class TrainConfig(_Strict):
    lora_config: Optional[dict[str, Any]] = None
    # ft_task preference: algorithm, ref_model and the fields of TRL's config class for it (checked by the task)
    preference_config: Optional[dict[str, Any]] = None
    base_config: dict[str, Any] = Field(default_factory=dict)


class FtConfig(_Strict):
    ft_task: str
    ft_stage: Optional[str] = None  # informational in the original
    ft_method: Optional[str] = "full"
    data_config: DataConfig
    train_config: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("ft_method", mode="after")
    @classmethod
    def _absent_method_is_full(cls, value):
        return value or "full"


class ScalingConfig(_Strict):
    num_workers: int = Field(default=1, ge=1)
    num_gpus_per_worker: float = Field(default=0, ge=0)
    num_cpus_per_worker: float = Field(default=1, gt=0)
    use_gpu: Optional[bool] = None
    # Ray placement, used by ray-ft (ray_launch.py):
    placement_strategy: Optional[Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]] = None
    resources_per_worker: Optional[dict[str, float]] = None
    pg_timeout_s: Optional[float] = Field(default=None, gt=0)
    ray_actor_options: Optional[dict[str, Any]] = None


class Job(_Strict):
    model: ModelConfig = Field(alias="model_config")
    ft_config: FtConfig
    scaling_config: ScalingConfig = Field(default_factory=ScalingConfig)

    _source: Optional[Path] = PrivateAttr(default=None)
    _original_keys_warned: bool = PrivateAttr(default=False)

    @property
    def source(self) -> Optional[Path]:
        return self._source

    @property
    def task(self) -> str:
        return self.ft_config.ft_task

    @property
    def method(self) -> str:
        return self.ft_config.ft_method or "full"

    @property
    def data(self) -> DataConfig:
        return self.ft_config.data_config

    @property
    def base_config(self) -> dict[str, Any]:
        return self.ft_config.train_config.base_config

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")

    def resolve_input_path(self, value: str, key: str) -> Path:
        """An input path as the user meant it: relative to the working directory, else to the job file's folder."""
        path = Path(os.path.expanduser(value))
        tried = [path.resolve()]
        if path.is_absolute() or path.exists():
            if path.exists():
                return path.resolve()
        elif self._source is not None:
            beside_job = (self._source.parent / path).resolve()
            if beside_job.exists():
                return beside_job
            tried.append(beside_job)
        where = f" in {self._source}" if self._source else ""
        raise UserError(
            f"{key}{where}: path '{value}' does not exist (tried {', '.join(str(t) for t in tried)}). "
            "Relative paths are read from the current directory first, then from the job file's folder."
        )


# ---------------------------------------------------------------- loading, overrides, error messages

def load_job(path: str | os.PathLike, overrides: list[str] | None = None) -> Job:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--ft: job file '{path}' not found (absolute: {path.resolve()}).")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{where}: YAML syntax error: {problem}.") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a YAML mapping with model_config and ft_config, got {type(raw).__name__}.")
    for override in overrides or []:
        apply_override(raw, override)
    return parse_job(raw, source=path)


def parse_job(raw: dict, source: Path | None = None) -> Job:
    try:
        job = Job.model_validate(raw)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc, source)) from None
    job._source = source.resolve() if source else None
    _map_original_keys(job)
    return job


def apply_override(raw: dict, override: str) -> None:
    """`a.b.c=value` sets raw['a']['b']['c'] to the YAML value, so `max_steps=5` is an int and `[x, y]` a list."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise UserError(f"override '{override}': expected KEY.PATH=VALUE, e.g. ft_config.train_config.base_config.max_steps=5.")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError as exc:
        raise UserError(f"override '{override}': value is not valid YAML ({exc}).") from None
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override '{override}': '{'.'.join(parts[:depth + 1])}' is a value, not a section.")
        node = child
    node[parts[-1]] = value


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of an error location, to list its valid keys."""
    model: Any = Job
    for part in loc[:-1]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return None
        annotation = field.annotation
        for arg in getattr(annotation, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                annotation = arg
        model = annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def describe_validation_error(exc: ValidationError, source: Path | None) -> str:
    where = f"{source}: " if source else ""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            owner = _model_at(loc)
            valid = _keys_of(owner) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            lines.append(f"unknown key '{dotted}'.{hint} Valid keys here: {', '.join(valid)}.")
        elif err["type"] == "missing":
            lines.append(f"missing required key '{dotted}'.")
        else:
            got = err.get("input")
            lines.append(f"key '{dotted}': {err['msg']} (got {got!r}).")
    return where + ("\n  ".join(["invalid job file:"] + lines) if len(lines) > 1 else lines[0])


def dump_job(job: Job, path: Path) -> None:
    """The resolved job, with secrets removed and input paths made absolute, so the run can be reproduced (and
    `predict`/`eval`/`export` find the base model and data) from the run directory alone."""
    record = job.to_dict()
    data = record["ft_config"]["data_config"]
    for key in ("local_path", "train_file", "validation_file", "data_path"):
        data[key] = _absolute_if_exists(job, data[key], key)
    record["model_config"]["model_id"] = _absolute_if_exists(job, record["model_config"]["model_id"], "model_id")
    path.write_text(yaml.safe_dump(redact(record), sort_keys=False, allow_unicode=True), encoding="utf-8")


def _absolute_if_exists(job: Job, value: Optional[str], key: str) -> Optional[str]:
    if not value:
        return value
    try:
        return str(job.resolve_input_path(value, key))
    except UserError:
        return value  # a hub id


# Whole-word matches only: pad_token, add_special_tokens or include_tokens_per_second are settings, not secrets.
_SECRET_KEY = re.compile(r"(^|[_-])(token|password|passwd|secret|api[_-]?key|access[_-]?key)$", re.IGNORECASE)
_TOKENIZER_TOKENS = {"pad_token", "eos_token", "bos_token", "unk_token", "mask_token", "sep_token", "cls_token"}


def _is_secret(key: Any) -> bool:
    return str(key) not in _TOKENIZER_TOKENS and bool(_SECRET_KEY.search(str(key)))


def redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<redacted>" if _is_secret(k) and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def redact_arguments(argv: list[str]) -> list[str]:
    """Command-line overrides of secret keys (`...from_pretrained_kwargs.token=hf_...`) with the value hidden."""
    hidden = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        hidden.append(f"{key}=<redacted>" if sep and value and not key.startswith("-") and
                      _is_secret(key.rsplit(".", 1)[-1]) else arg)
    return hidden


def as_number(value: Any) -> Union[int, float, Any]:
    """PyYAML reads `2e-5` (no dot) as a string; the seed files are full of such values."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# ---------------------------------------------------------------- keys of the original's schema

# Every key the original's schema declared loads. Those with a meaning here are mapped in `_map_original_keys`
# (data_config.max_length, initializer.torch_compile), by resolve_model (initialization.hf_model_id, s3_mirror_config),
# by ray-ft (the Ray placement keys) or by predict (generation.generate_kwargs); the rest are listed here with the
# reason they change nothing, and `apply_original_keys` warns once for each one a job sets.
NO_EFFECT = {
    "model_config.model_url": "informational (the original's link to the model card)",
    "model_config.model_description": "informational (the original's model card text)",
    "model_config.initialization.pipeline": "the original's serving pipeline; training and predict use none",
    "model_config.initialization.initializer.use_bettertransformer":
        "transformers 5 runs PyTorch's fused attention (SDPA) natively; BetterTransformer no longer exists",
    "model_config.initialization.initializer.torch_compile.options":
        "Trainer's torch.compile takes backend, mode, fullgraph and dynamic only",
    "model_config.generation.prompt_format": "predict renders prompts exactly as training did",
    "model_config.generation.max_batch_size": "a serving setting; predict's batch size is --batch-size",
    "model_config.generation.batch_wait_timeout_s": "a serving setting",
    "model_config.generation.stopping_sequences": "predict stops at the tokenizer's EOS token or max_new_tokens",
    "ft_config.ft_stage": "informational in the original",
    "scaling_config.ray_actor_options":
        "the original read it only for its serving replicas; ray-ft's training workers take num_cpus_per_worker, "
        "num_gpus_per_worker and resources_per_worker, and Ray Train 2's controller reserves no resources",
    "ft_config.data_config.truncation":
        "inputs always fit max_length: classification and chat examples are cut, masked-LM text and raw text "
        "(text-generation format text) are split into max_length blocks, so nothing is dropped",
    "ft_config.data_config.stride":
        "long masked-LM and raw texts are split into consecutive max_length blocks without overlap; classification "
        "and chat examples are cut at max_length",
    "ft_config.data_config.return_overflowing_tokens":
        "long masked-LM and raw texts are always split into max_length blocks; classification and chat examples "
        "are always cut at max_length",
    "ft_config.train_config.base_config.pad_to_max_length":
        "each batch is padded to its longest row; padding is masked out of attention and loss, so the result is "
        "the same",
}
# The Ray placement keys: ray-ft hands them to Ray Train (ray_launch.py); run-ft and check start no Ray workers.
RAY_ONLY = ("scaling_config.placement_strategy", "scaling_config.resources_per_worker", "scaling_config.pg_timeout_s")
# generation.generate_kwargs that become predict's defaults (the command-line flags win).
GENERATE_DEFAULTS = {"max_new_tokens": ("a whole number of at least 1", lambda v: float(v).is_integer() and v >= 1),
                     "do_sample": ("true or false", None),
                     "temperature": ("a number above 0", lambda v: v > 0),
                     "top_p": ("a number in (0, 1]", lambda v: 0 < v <= 1)}
GENERATE_KWARGS = "model_config.generation.generate_kwargs"
# Set by ray-ft for itself and its workers: the Ray keys then have their meaning, and the workers need not repeat
# the warnings the driver printed.
LAUNCHER_ENV = "LLMFINETUNE_LAUNCHER"
WARNED_ENV = "LLMFINETUNE_ORIGINAL_KEYS_WARNED"
_BASE = "ft_config.train_config.base_config"
_COMPILE = "model_config.initialization.initializer.torch_compile"


def given(job: Job, dotted: str) -> bool:
    """Whether the job file (or an override) set this key to a value; null counts as unset, as in a run
    directory's job.yaml, which lists every key."""
    node: Any = job
    parts = dotted.split(".")
    if parts[0] == "model_config":
        node, parts = job.model, parts[1:]
    for part in parts:
        if isinstance(node, dict):
            if part not in node:
                return False
            node = node[part]
        elif isinstance(node, BaseModel):
            if part not in node.model_fields_set:
                return False
            node = getattr(node, part)
        else:
            return False
    return node is not None


def _is_folder(job: Job, value: str) -> bool:
    try:
        return job.resolve_input_path(value, "model_config.model_id").is_dir()
    except UserError:
        return False


def _map_original_keys(job: Job) -> None:
    """The original's spellings of our settings, put where the rest of the code reads them; a job that gives both
    spellings with different values is refused. Mapping the stored job is idempotent, so a run directory's
    job.yaml (which holds both spellings) loads again."""
    base = job.base_config
    length = job.data.max_length
    if length is not None:
        if "max_length" in base and as_number(base["max_length"]) != length:
            raise UserError(f"{job.source}: ft_config.data_config.max_length ({length}) and {_BASE}.max_length "
                            f"({base['max_length']}) are the same setting with different values; keep one.")
        base["max_length"] = length
    compile_config = job.model.initialization.initializer.torch_compile
    if compile_config is not None:
        # Only what the file sets: the original's default backend (inductor) is TrainingArguments' default too.
        wanted = {"torch_compile": True, **{f"torch_compile_{key}": getattr(compile_config, key)
                                            for key in ("backend", "mode") if key in compile_config.model_fields_set}}
        for name, value in wanted.items():
            if name in base and str(base[name]).lower() != str(value).lower():  # YAML may give "true" for true
                original = _COMPILE if name == "torch_compile" else f"{_COMPILE}.{name.removeprefix('torch_compile_')}"
                raise UserError(f"{job.source}: {original} and {_BASE}.{name} disagree ({value!r} vs "
                                f"{base[name]!r}); keep one.")
            base[name] = value
    _generation_defaults(job)  # bad values are job-file mistakes: found at load, not first at predict


def _generation_defaults(job: Job) -> dict[str, Any]:
    generation = job.model.generation
    kwargs = generation.generate_kwargs if generation is not None else {}
    defaults = {}
    for name, (expected, in_range) in GENERATE_DEFAULTS.items():
        value = kwargs.get(name)
        if value is None:
            continue
        if name == "do_sample":
            ok = isinstance(value, bool)
        else:
            value = as_number(value)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and in_range(value)
        if not ok:
            raise UserError(f"{job.source}: {GENERATE_KWARGS}.{name}: expected {expected}, got {kwargs[name]!r}.")
        defaults[name] = int(value) if name == "max_new_tokens" else value
    return defaults


def generation_defaults(job: Job) -> dict[str, Any]:
    """predict's defaults for text generation from model_config.generation.generate_kwargs (max_new_tokens,
    do_sample, temperature, top_p); empty when the job sets none."""
    return _generation_defaults(job) if job.task == "text-generation" else {}


def original_key_warnings(job: Job, launcher: Optional[str] = None) -> list[str]:
    """One line for each key of the original's schema that this job sets and that changes nothing here."""
    launcher = launcher if launcher is not None else os.environ.get(LAUNCHER_ENV)
    notes = [f"{key}: accepted, no effect here: {why}." for key, why in NO_EFFECT.items() if given(job, key)
             and not (key.endswith("use_bettertransformer") and not job.model.initialization.initializer
                      .use_bettertransformer)]
    initialization = job.model.initialization
    if initialization.hf_model_id and _is_folder(job, job.model.model_id):
        notes.append("model_config.initialization.hf_model_id: accepted, no effect here: model_id is a local folder, "
                     "and the model is loaded from it.")
    mirror = initialization.s3_mirror_config
    if mirror is not None:
        if _is_folder(job, job.model.model_id):
            unused, why = ("bucket_uri", "endpoint_url", "s3_sync_args"), "model_id is a local folder, loaded from there"
        else:
            unused, why = ("endpoint_url", "s3_sync_args"), "bucket_uri is not an s3:// address, so nothing is copied"
            if mirror.bucket_uri and "://" in mirror.bucket_uri:
                unused = ()
        notes += [f"model_config.initialization.s3_mirror_config.{key}: no effect here: {why}." for key in unused
                  if getattr(mirror, key)]
    if launcher != "ray-ft":
        notes += [f"{key}: used by `llmfinetune ray-ft` only; no effect on run-ft, which starts no Ray workers."
                  for key in RAY_ONLY if given(job, key)]
    generation = job.model.generation
    if generation is not None and job.task != "text-generation" and generation.generate_kwargs:
        notes.append(f"{GENERATE_KWARGS}: accepted, no effect here: predict generates text for text-generation "
                     f"runs only; this job's task is {job.task}.")
    elif generation is not None:
        notes += [f"{GENERATE_KWARGS}.{name}: accepted, no effect here: predict takes max_new_tokens, do_sample, "
                  "temperature and top_p from generate_kwargs." for name in generation.generate_kwargs
                  if name not in GENERATE_DEFAULTS]
        if not generation.generate_kwargs.get("do_sample"):
            notes += [f"{GENERATE_KWARGS}.{name}: no effect unless do_sample is true (predict then decodes "
                      "greedily)." for name in ("temperature", "top_p")
                      if generation.generate_kwargs.get(name) is not None]
    return notes


def apply_original_keys(job: Job) -> None:
    """Called once per command (check, run-ft, every worker): warns for the original's keys that have no effect,
    and hands torch_compile's fullgraph/dynamic to accelerate, which reads them from the environment when the
    Trainer builds its compile plugin. Only the main process warns, and ray-ft's workers leave it to the driver."""
    compile_config = job.model.initialization.initializer.torch_compile
    if compile_config is not None:
        os.environ["ACCELERATE_DYNAMO_USE_FULLGRAPH"] = str(compile_config.fullgraph)
        if given(job, f"{_COMPILE}.dynamic"):
            os.environ["ACCELERATE_DYNAMO_USE_DYNAMIC"] = str(compile_config.dynamic)
    if job._original_keys_warned or os.environ.get("RANK", "0") != "0" or os.environ.get(WARNED_ENV):
        return
    job._original_keys_warned = True
    for note in original_key_warnings(job):
        logger.warning(note)

