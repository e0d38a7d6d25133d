"""The job file: YAML in the seed layout, validated by pydantic before anything heavy is imported.

Every key of the seed format is accepted. `base_config` and `lora_config` are open dictionaries whose keys are
checked against `transformers.TrainingArguments` and `peft.LoraConfig` in `workflow.check_job` (that needs torch,
so it runs after this module's cheap checks).
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .errors import UserError


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
    bucket_uri: Optional[str] = None


class Initializer(_Strict):
    type: str = "Finetune"
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "float32"
    from_pretrained_kwargs: dict[str, Any] = Field(default_factory=dict)


class Initialization(_Strict):
    s3_mirror_config: Optional[S3MirrorConfig] = None
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    initializer: Initializer = Field(default_factory=Initializer)


class ModelConfig(_Strict):
    model_id: str
    warmup: bool = False  # accepted for seed compatibility; it never affected training
    model_task: Optional[str] = None  # informational, as in the seed
    max_input_words: Optional[int] = Field(default=None, gt=0)
    quantization_bit: Optional[Literal[4, 8]] = None
    add_special_tokens: dict[str, str] = Field(default_factory=dict)
    initialization: Initialization = Field(default_factory=Initialization)


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


class Job(_Strict):
    model: ModelConfig = Field(alias="model_config")
    ft_config: FtConfig
    scaling_config: ScalingConfig = Field(default_factory=ScalingConfig)

    _source: Optional[Path] = PrivateAttr(default=None)

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
