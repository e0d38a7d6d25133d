"""base_config -> transformers.TrainingArguments: every field by its own name, plus the seed's names.

Nothing is copied field by field (the original dropped gradient accumulation, scheduler, warmup and max steps that
way): keys pass through to TrainingArguments, so every field it has works and every unknown key is an error.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from . import validate
from .errors import UserError, first_line

if TYPE_CHECKING:
    from .config import Job
    from .tasks.base import Task

logger = logging.getLogger(__name__)

# The seed's spellings of TrainingArguments fields.
SEED_ALIASES = {
    "evaluation_strategy": "eval_strategy",
    "num_warmup_steps": "warmup_steps",
    "max_train_steps": "max_steps",
}
# Keys of base_config that are ours, not TrainingArguments fields.
OWN_KEYS = {
    "checkpoints_output_dir": "folder under which the run directory <model>-finetuned-<task>-<data> is made",
    "max_length": "tokens per example (per block for maskedlm)",
    "mlm_probability": "maskedlm: share of tokens masked (default 0.15)",
    "whole_word_mask": "maskedlm: mask whole words instead of single sub-tokens (default false)",
    "resume_from_checkpoint": "true: continue from the newest complete checkpoint of the run directory; or a path",
    "save_on_interrupt": "Ctrl-C during training saves a checkpoint before exiting (default true)",
    "packing": "text-generation: several examples per row of max_length tokens, each attending only to itself",
    "lm_head_on_targets_only": "text-generation: vocabulary logits only where a token is learned (default true)",
    "last_layer_cls_only": "sequenceclassification: the last layer computes only the first position, the one a "
                           "BERT-family head reads (default true; cls_head.FIRST_POSITION_HEADS)",
    "generation_eval": "text-generation: generate for the eval rows and score the answers (exact match, ROUGE, "
                       "BLEU) at the end of training and optionally at each evaluation (generation_eval.SETTINGS)",
    "pad_to_max_length": "the original's padding switch; accepted, no effect (config.NO_EFFECT says why)",
}
BASE = "ft_config.train_config.base_config"
POSITIVE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
NON_NEGATIVE = ("learning_rate", "weight_decay", "warmup_steps", "num_train_epochs")
# Types of our own keys, and ranges of fields whose type alone lets nonsense through (checked in `translate`).
OWN_TYPES = {"checkpoints_output_dir": str, "max_length": int, "mlm_probability": float, "whole_word_mask": bool,
             "resume_from_checkpoint": Optional[Union[bool, str]], "save_on_interrupt": bool, "packing": bool,
             "lm_head_on_targets_only": bool, "last_layer_cls_only": bool,
             "generation_eval": Optional[Union[bool, dict]], "pad_to_max_length": bool}
# Our defaults where transformers' would surprise a user of a small job: logs every 500 steps, wandb if installed.
DEFAULTS = {"logging_steps": 10, "report_to": "none", "remove_unused_columns": False, "save_total_limit": None,
            "include_num_input_tokens_seen": "non_padding",
            # Log NaN/inf losses as they are (transformers' default hides them) so the run stops on them.
            "logging_nan_inf_filter": False}
# On a GPU each batch goes to the device without the host waiting for the copy (from the pinned memory Trainer's data
# loader gives there): a blocking copy waits for every kernel queued before it, the whole previous step.
GPU_DEFAULTS = {"accelerator_config": {"non_blocking": True}}


def our_defaults(on_gpu: bool) -> dict:
    """DEFAULTS, and GPU_DEFAULTS on a GPU (on the CPU, non_blocking without pinned memory only makes transformers
    warn); a fresh copy each time (Trainer pops keys out of accelerator_config)."""
    return copy.deepcopy({**DEFAULTS, **(GPU_DEFAULTS if on_gpu else {})})


_KIND = {bool: "true or false", int: "a whole number", float: "a number"}


@lru_cache(maxsize=1)
def training_argument_fields() -> dict[str, dataclasses.Field]:
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def _coerce(name: str, value: Any, field: dataclasses.Field) -> Any:
    """YAML reads `2e-5` as a string and users write `"true"`; convert by the field's default type."""
    default = field.default
    if isinstance(value, bool) and isinstance(default, str) and not isinstance(default, bool):
        # YAML 1.1 reads an unquoted `no` as false: `save_strategy: no` means the string "no".
        return "no" if value is False else value
    if not isinstance(value, str) or default is dataclasses.MISSING or default is None:
        return value
    try:
        if isinstance(default, bool):
            if value.lower() in ("true", "yes", "1"):
                return True
            if value.lower() in ("false", "no", "0"):
                return False
            raise ValueError(value)
        if isinstance(default, int):
            number = float(value)
            return int(number) if number.is_integer() else number
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise UserError(f"{BASE}.{name}: expected {_KIND[type(default)]}, got {value!r}.") from None
    return value


def translate(job: "Job") -> dict[str, Any]:
    """base_config as TrainingArguments keyword arguments (our own keys left out), checked and converted."""
    fields = training_argument_fields()
    kwargs: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in job.base_config.items():
        if key in OWN_KEYS:
            continue
        name = SEED_ALIASES.get(key, key)
        if name not in fields:
            valid = list(fields) + list(SEED_ALIASES) + list(OWN_KEYS)
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{job.source}: unknown key '{BASE}.{key}'.{hint} base_config takes any "
                            "transformers.TrainingArguments field and: " + ", ".join(list(SEED_ALIASES) + list(OWN_KEYS)) + ".")
        if name in kwargs:
            raise UserError(f"{job.source}: {BASE} sets both '{spelled[name]}' and '{key}'; they are the same "
                            "setting, keep one.")
        spelled[name] = key
        kwargs[name] = _coerce(key, value, fields[name])
    for name, value in kwargs.items():
        if name not in POSITIVE:  # those have their own message below
                validate.check_type(f"{BASE}.{spelled[name]}", value, training_argument_types()[name])
    for name in POSITIVE:
        if name in kwargs and (isinstance(kwargs[name], bool) or not (isinstance(kwargs[name], int) and kwargs[name] >= 1)):
            raise UserError(f"{BASE}.{name}: must be a whole number of at least 1, got {kwargs[name]!r}.")
    for name in NON_NEGATIVE:
        if name in kwargs and (isinstance(kwargs[name], bool) or not (isinstance(kwargs[name], (int, float)) and kwargs[name] >= 0)):
            raise UserError(f"{BASE}.{name}: must be a number of at least 0, got {kwargs[name]!r}.")
    _check_ranges(job, kwargs, spelled)
    return kwargs


@lru_cache(maxsize=1)
def training_argument_types() -> dict[str, Any]:
    import typing

    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    if "fsdp" in hints:  # annotated `str | None`, yet `fsdp: true` is its documented form (and option lists its old one)
        hints["fsdp"] = Optional[Union[bool, str, list[str]]]
    return hints


def _ranges() -> dict[str, Any]:
    return {
        "logging_steps": validate.at_least(0, strict=True), "save_steps": validate.at_least(0, strict=True),
        "eval_steps": validate.at_least(0, strict=True), "save_total_limit": validate.at_least(1, whole=True),
        "max_grad_norm": validate.at_least(0), "warmup_ratio": validate.between(0, 1),
        "adam_beta1": validate.between(0, 1, high_open=True), "adam_beta2": validate.between(0, 1, high_open=True),
        "adam_epsilon": validate.at_least(0), "seed": validate.between(0, 2**32 - 1),
        "data_seed": validate.between(0, 2**32 - 1), "dataloader_num_workers": validate.at_least(0, whole=True),
    }


def _check_ranges(job: "Job", kwargs: dict[str, Any], spelled: dict[str, str]) -> None:
    """Values of the right type that still make no sense, and the types and ranges of our own keys."""
    from .config import as_number

    for name, rule in _ranges().items():
        if name in kwargs:
            validate.check_range(f"{BASE}.{spelled[name]}", kwargs[name], rule)
    steps = kwargs.get("max_steps")
    if steps is not None and steps != -1 and steps < 1:
        raise UserError(f"{BASE}.{spelled['max_steps']}: must be -1 (train num_train_epochs epochs) or at least 1, "
                        f"got {steps!r}.")
    if kwargs.get("num_train_epochs") == 0 and not (steps and steps > 0):
        raise UserError(f"{BASE}.num_train_epochs: 0 epochs and no max_steps would train nothing.")
    _check_report_to(kwargs.get("report_to"))
    own = {key: as_number(value) if key in ("max_length", "mlm_probability") else value
           for key, value in job.base_config.items() if key in OWN_TYPES}
    for key, value in own.items():
        if key == "max_length" and isinstance(value, float) and value.is_integer():
            value = int(value)
        validate.check_type(f"{BASE}.{key}", value, OWN_TYPES[key])
    if "max_length" in own:
        validate.check_range(f"{BASE}.max_length", own["max_length"], validate.at_least(1, whole=True))
    if "mlm_probability" in own:
        validate.check_range(f"{BASE}.mlm_probability", own["mlm_probability"],
                             validate.between(0, 1, low_open=True, high_open=True))
    if "generation_eval" in own:
        from .generation_eval import settings

        settings(job)  # its own keys, types and task


def _check_report_to(value: Any) -> None:
    if value is None:
        return
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    valid = ["none", "all", *INTEGRATION_TO_CALLBACK]
    for name in [value] if isinstance(value, str) else value:
        if name not in valid:
            raise UserError(f"{BASE}.report_to: unknown integration {name!r}; use one of: {', '.join(valid)}.")


def run_dir(job: "Job") -> Path:
    """base_config.output_dir exactly when given, else checkpoints_output_dir/<model>-finetuned-<task>-<data>."""
    given = job.base_config.get("output_dir")
    if given:
        return Path(os.path.expanduser(str(given))).resolve()
    parent = Path(os.path.expanduser(str(job.base_config.get("checkpoints_output_dir", "finetune_models"))))
    data = job.data
    source = data.data_path or data.local_path or data.train_file or "data"
    name = f"{_slug(job.model.model_id)}-finetuned-{job.task}-{_slug(source)}"
    if data.subset:
        name += f"-{_slug(data.subset)}"
    return (parent / name).resolve()


def _slug(value: str) -> str:
    stem = Path(str(value).rstrip("/\\")).name or str(value)
    stem = re.sub(r"\.(parquet|jsonl?|csv)$", "", stem)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "x"


def _deepspeed_config(job: "Job", value: str) -> str:
    path = Path(os.path.expanduser(value))
    if not path.is_file():
        raise UserError(f"--deepspeed: DeepSpeed config file {path.resolve()} not found.")
    import json

    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--deepspeed: {path} is not valid JSON ({exc}).") from None
    return str(path.resolve())


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# Where kernels keep state per shape, row counts that change every step (the LM head's targets, a flattened packed
# row) are rounded up to a multiple of this. A head of a new row count every step grew the SFT bench's RSS by ~10 MB
# a step, without end (1294 -> 1926 MiB over 60 steps); rounded up to 64 it levelled off at 1411.
SHAPE_MULTIPLE = 64


def kernels_keep_state_per_shape(training_args, model=None) -> bool:
    """True on the CPU in bf16/fp16, and in fp32 where `model`'s frozen layers multiply through packed weights
    (kernels.swap_frozen_linears): there oneDNN (and SDPA's half-precision flash kernel) compile and keep a kernel per
    matrix shape, so a new shape every step grows memory without end; training code keeps its shapes few there
    (SHAPE_MULTIPLE): in fp32 the rows then also keep malloc's heap from growing a hole for each new size."""
    if training_args.device.type != "cpu":
        return False
    if training_args.bf16 or training_args.fp16:
        return True
    if model is None:
        return False
    from .kernels import runs_packed_layers

    return runs_packed_layers(model)


# Set to 0 to keep fp32 unless the job asks for bf16/fp16 (the test suite does: its exact comparisons must not
# depend on which CPU kind runs them).
AUTO_PRECISION_ENV = "LLMFINETUNE_AUTO_PRECISION"


def default_precision(written: dict[str, Any], deepspeed: Optional[str]) -> tuple[Optional[str], str]:
    """("bf16" or None for fp32, why) when the job leaves precision open: bf16 where the hardware runs it natively
    (a GPU that supports it, a CPU with avx512_bf16/AMX: ~1.45x the fp32 SFT step here), fp32 elsewhere (bf16 is
    ~100x slower than fp32 on an AVX2-only CPU). None, "" when the job, accelerate or the environment decided."""
    import torch

    if written.get("bf16") is not None or written.get("fp16") is not None:
        return None, ""
    if os.environ.get("ACCELERATE_MIXED_PRECISION") or os.environ.get(AUTO_PRECISION_ENV, "1") == "0":
        return None, ""
    if torch.cuda.is_available() and not written.get("use_cpu"):
        if torch.cuda.is_bf16_supported():
            return "bf16", "this GPU runs bf16 natively"
        return None, "this GPU has no native bf16"
    if deepspeed:
        return None, "DeepSpeed on the CPU is tested in fp32 only"
    if cpu_supports_bf16():
        return "bf16", "this CPU has native bf16 matmuls (avx512_bf16/AMX)"
    return None, "this CPU has no native bf16 (no avx512_bf16/AMX), where bf16 is ~100x slower"


def build_training_arguments(job: "Job", task: "Task", output_dir: Path, deepspeed: Optional[str] = None,
                             has_eval: bool = True):
    import torch

    arguments_class, task_settings = task.training_arguments(job)
    written = translate(job)
    # The task's settings are its defaults: what the user wrote in base_config wins.
    on_gpu = torch.cuda.is_available() and not written.get("use_cpu")
    kwargs = {**_plain_defaults(arguments_class), **our_defaults(on_gpu), **task_settings, **written}
    precision, why = default_precision(written, deepspeed)
    if why:
        kwargs["bf16"] = precision == "bf16"
        logger.info("Training in %s: %s; set %s.bf16: %s to override.", precision or "fp32", why, BASE,
                    "false" if precision else "true")
    kwargs["output_dir"] = str(output_dir)
    if deepspeed:
        kwargs["deepspeed"] = _deepspeed_config(job, deepspeed)
    _check_fsdp(job, kwargs)
    _check_liger(job, kwargs)
    if deepspeed and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # On CPU, DeepSpeed must own the gloo process group before TrainingArguments sizes the batch; otherwise
        # ZeRO-3 fails its batch check (train_batch_size != micro x accumulation x world).
        import deepspeed as deepspeed_module

        deepspeed_module.init_distributed(dist_backend="gloo")
    if not torch.cuda.is_available():
        # Without this, launchers start N processes on a CPU machine that each train alone (world size 1).
        kwargs["use_cpu"] = True
        if kwargs.get("fp16"):
            kwargs["fp16"] = False
            kwargs["bf16"] = cpu_supports_bf16()
            logger.warning("fp16 is not supported on CPU; training in %s instead.",
                           "bf16" if kwargs["bf16"] else "fp32")
        if os.environ.get("ACCELERATE_MIXED_PRECISION") == "fp16":
            # `accelerate launch --mixed_precision fp16` (or a config file saying so, like the seed's): the Trainer
            # reads this variable; on CPU it trains fp32 without a word, and DeepSpeed stops on fp16.enabled.
            use_bf16 = cpu_supports_bf16()
            os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if use_bf16 else "no"
            kwargs["bf16"] = kwargs.get("bf16") or use_bf16
            logger.warning("accelerate's mixed precision fp16 is not supported on CPU; training in %s instead.",
                           "bf16" if use_bf16 else "fp32")
    if task.loss_only_eval:
        kwargs.setdefault("prediction_loss_only", True)
    if not has_eval:
        kwargs["eval_strategy"] = "no"
    _current_names(kwargs, arguments_class)
    try:
        args = arguments_class(**kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{job.source}: {BASE}: {first_line(exc, 1000)}") from None
    if args.torch_compile:
        _compile_regions()
    return args


# transformers 5 renamed these and kept the old names as aliases that print a FutureWarning on every run; base_config
# keeps the old names (the seed's, LLaMA-Factory's, and the memory advice's), passed on under the new ones.
RENAMED_ARGUMENTS = {"gradient_checkpointing": "activation_checkpointing",
                     "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}


def _current_names(kwargs: dict[str, Any], arguments_class) -> None:
    """The renamed settings also under the names the installed TrainingArguments reads (transformers warns only when
    the old name alone is set); as in transformers, a value under the new name wins. The old name stays passed: it
    overrides a subclass's own default for it (TRL's configs turn gradient checkpointing on)."""
    fields = {field.name for field in dataclasses.fields(arguments_class)}
    for old, new in RENAMED_ARGUMENTS.items():
        if new in fields and kwargs.get(old) is not None and kwargs.get(new) is None:
            kwargs[new] = kwargs[old]


def checkpointing(base_config: dict[str, Any]) -> tuple[bool, Optional[dict]]:
    """Whether base_config asks for activation (gradient) checkpointing, and its kwargs, under either name."""
    def written(old: str):
        value = base_config.get(RENAMED_ARGUMENTS[old])
        return base_config.get(old) if value is None else value

    return bool(written("gradient_checkpointing")), written("gradient_checkpointing_kwargs")


REGIONAL_COMPILATION_ENV = "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"


def _compile_regions() -> None:
    """torch_compile compiles each decoder layer (accelerate's regional compilation: the layers share one compiled
    graph) and the few modules around them, not the whole model: whole, the graph broke in peft's and transformers'
    wrappers and recompiled 24-32 times in 16 steps of the SFT bench (a new graph where the wrappers met a new
    class), ~45 s of compilation on 2 cores before the first step; regional, ~30 s cold, every recompile within the
    first two steps (bench/README.md, #12, session 21). accelerate's own variable, when set, decides."""
    if REGIONAL_COMPILATION_ENV not in os.environ:
        os.environ[REGIONAL_COMPILATION_ENV] = "true"
        logger.info("torch_compile: each decoder layer is compiled (regional compilation); the first steps include "
                    "the compilation. %s=false compiles the whole model instead.", REGIONAL_COMPILATION_ENV)


def _trains_on_cpu(kwargs: dict[str, Any]) -> bool:
    import torch

    return not torch.cuda.is_available() or bool(kwargs.get("use_cpu"))


def _check_liger(job: "Job", kwargs: dict[str, Any]) -> None:
    """`use_liger_kernel` (TrainingArguments' switch to Liger's Triton kernels) fails only once the Trainer is built,
    after the model loaded, with an ImportError; and Triton kernels need a GPU. Said before anything loads."""
    import importlib.util

    if not kwargs.get("use_liger_kernel"):
        return
    if _trains_on_cpu(kwargs):
        raise UserError(f"{job.source}: {BASE}.use_liger_kernel: Liger's kernels are Triton kernels for GPUs, and "
                        "this run trains on the CPU; remove use_liger_kernel.")
    if importlib.util.find_spec("liger_kernel") is None:
        raise UserError(f"{job.source}: {BASE}.use_liger_kernel: needs the liger-kernel package, which is not "
                        "installed: `pip install liger-kernel`, or remove use_liger_kernel.")


def _check_fsdp(job: "Job", kwargs: dict[str, Any]) -> None:
    """accelerate turns FSDP on only for GPU runs: on the CPU, `fsdp` (or an accelerate FSDP config) would train
    plain DDP with every weight on every process, without a word. On GPUs it passes through to the Trainer."""
    import torch

    cuda = torch.cuda.is_available()
    on_cpu = _trains_on_cpu(kwargs)
    from_accelerate = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1", "yes")
    if kwargs.get("fsdp_config") and not kwargs.get("fsdp"):
        raise UserError(f"{job.source}: {BASE}.fsdp_config has no effect without {BASE}.fsdp: true (the Trainer "
                        "reads it only then); set fsdp: true as well, or remove fsdp_config.")
    if not on_cpu or not (kwargs.get("fsdp") or from_accelerate):
        return
    asked = (f"{BASE}.fsdp" if kwargs.get("fsdp") else
             "accelerate's FSDP config (distributed_type: FSDP, ACCELERATE_USE_FSDP=true)")
    raise UserError(
        f"{job.source}: {asked}: FSDP needs CUDA GPUs, and this run trains on the CPU"
        f"{' (use_cpu: true)' if cuda else ''}, where accelerate would silently train plain DDP "
        "with every weight on every process. To shard the model on the CPU use DeepSpeed ZeRO-3 instead "
        "(zero_optimization.stage 3 in ds.json): `deepspeed --num_gpus 2 llm_finetune.py run-ft --ft=F --deepspeed "
        "ds.json`; for plain DDP remove fsdp/fsdp_config and run `llmfinetune run-ft --ft=F --nproc 2`.")


def _plain_defaults(arguments_class) -> dict[str, Any]:
    """TrainingArguments' own defaults for the fields a subclass changes (TRL's: bf16 on, which fails on CPU,
    gradient checkpointing on, its own learning rate and logging_steps): base_config means the same for every task."""
    from transformers import TrainingArguments

    plain = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    changed = {}
    for field in dataclasses.fields(arguments_class):
        base = plain.get(field.name)
        if base is None or base.default is dataclasses.MISSING or field.default is dataclasses.MISSING:
            continue
        if field.default != base.default:
            changed[field.name] = base.default
    return changed
