"""LoRA through peft: low-rank adapters on the attention/MLP projections; the run directory holds the adapter."""
from __future__ import annotations

import dataclasses
import difflib
import logging

from ..config import as_number
from ..errors import UserError
from .base import Method

logger = logging.getLogger(__name__)

LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}


def lora_fields() -> list[str]:
    from peft import LoraConfig

    return [f.name for f in dataclasses.fields(LoraConfig) if f.init]


class LoRA(Method):
    name = "lora"

    def check(self, job):
        settings = job.ft_config.train_config.lora_config or {}
        valid = lora_fields()
        for key in settings:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise UserError(f"{job.source}: unknown key 'ft_config.train_config.lora_config.{key}'.{hint} "
                                "Valid keys are the fields of peft.LoraConfig.")
        r = settings.get("r", LORA_DEFAULTS["r"])
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise UserError(f"ft_config.train_config.lora_config.r: must be a positive integer, got {r!r}.")
        _check_values(settings)
        self.config(job, task_type=settings.get("task_type") or "CAUSAL_LM")  # surface peft's own errors early

    def config(self, job, task_type: str, fresh_modules: list[str] | None = None, model=None):
        from peft import LoraConfig

        settings = {**LORA_DEFAULTS, **{k: as_number(v) for k, v in (job.ft_config.train_config.lora_config or {}).items()}}
        settings.setdefault("task_type", task_type)
        if model is not None and "target_modules" not in settings and not _peft_knows(model):
            # peft ships defaults for common architectures only; elsewhere adapt every linear layer.
            settings["target_modules"] = "all-linear"
        if fresh_modules:
            # Weights the checkpoint did not have are random: freezing them would train on noise.
            # Full dotted paths: peft matches by suffix, and a bare 'dense' would catch every layer.
            settings["modules_to_save"] = sorted(set(settings.get("modules_to_save") or []) | set(fresh_modules))
        try:
            return LoraConfig(**settings)
        except (TypeError, ValueError) as exc:
            raise UserError(f"ft_config.train_config.lora_config: {exc}") from None

    def wrap(self, model, job, task, fresh_modules):
        from peft import get_peft_model

        config = self.config(job, task.peft_task_type, fresh_modules, model)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as exc:
            raise UserError(f"ft_config.train_config.lora_config: {exc}") from None
        trainable, total = peft_model.get_nb_trainable_parameters()
        logger.info("LoRA r=%s on %s; also trained in full: %s; trainable %d of %d parameters (%.2f%%)",
                    config.r, sorted(config.target_modules) if isinstance(config.target_modules, set)
                    else config.target_modules, config.modules_to_save, trainable, total, 100 * trainable / total)
        return peft_model


def _check_values(settings: dict) -> None:
    """Each value against peft.LoraConfig's annotation, and the ranges that make sense, naming the key."""
    import typing

    from peft import LoraConfig
    from peft.utils.peft_types import TaskType

    from .. import validate

    types = typing.get_type_hints(LoraConfig)
    types["lora_alpha"] = float  # peft annotates int, yet scales by any number
    types["task_type"] = typing.Optional[TaskType]
    ranges = {"lora_alpha": validate.at_least(0, strict=True), "lora_dropout": validate.between(0, 1, high_open=True)}
    for key, value in settings.items():
        value = as_number(value) if key in ranges else value
        name = f"ft_config.train_config.lora_config.{key}"
        validate.check_type(name, value, types[key])
        if key in ranges:
            validate.check_range(name, value, ranges[key])


def _peft_knows(model) -> bool:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return getattr(model.config, "model_type", None) in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
