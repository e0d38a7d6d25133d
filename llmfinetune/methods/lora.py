"""LoRA through peft: low-rank adapters on the attention/MLP projections; the run directory holds the adapter."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
from typing import TYPE_CHECKING

from ..arguments import checkpointing
from ..config import as_number
from ..errors import UserError
from .base import Method, half_precision_base_allowed

if TYPE_CHECKING:
    from ..models import NewWeights

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

    def config(self, job, task_type: str, new_weights: "NewWeights | None" = None, model=None):
        from peft import LoraConfig

        settings = {**LORA_DEFAULTS, **{k: as_number(v) for k, v in (job.ft_config.train_config.lora_config or {}).items()}}
        settings.setdefault("task_type", task_type)
        if model is not None and "target_modules" not in settings and not _peft_knows(model):
            # peft ships defaults for common architectures only; elsewhere adapt every linear layer.
            settings["target_modules"] = "all-linear"
        if model is not None and new_weights is not None:
            own = list(settings.get("modules_to_save") or [])
            fresh, stranded = fresh_modules_to_save(model, new_weights.parameters,
                                                    own + _added_by_peft(settings["task_type"]))
            if fresh:
                settings["modules_to_save"] = sorted(set(own) | set(fresh))
            if stranded:
                _warn_stranded(model, stranded)
            if new_weights.token_ids:
                settings["trainable_token_indices"] = token_rows_to_train(
                    model, settings.get("trainable_token_indices"), new_weights.token_ids, own)
        try:
            return LoraConfig(**settings)
        except (TypeError, ValueError) as exc:
            raise UserError(f"ft_config.train_config.lora_config: {exc}") from None

    def base_dtype(self, job, task, training_args):
        """bf16 for the frozen base where base.half_precision_base_allowed: autocast then casts no frozen weight
        every step, and the residual stream is half the bytes."""
        import torch

        if not half_precision_base_allowed(job, task, training_args):
            return None
        logger.info("LoRA in bf16: the frozen base is loaded in bf16, adapters and every trained weight stay fp32; "
                    "set model_config.initialization.initializer.dtype: float32 for an fp32 base.")
        return torch.bfloat16

    def wrap(self, model, job, task, new_weights, trainable_fp32=False):
        import torch
        from peft import get_peft_model

        if job.model.quantization_bit:
            from peft import prepare_model_for_kbit_training

            # QLoRA: norms and the unquantized layers in float32, everything frozen, and the input embeddings'
            # output made to require grad when gradient checkpointing is on (else no gradient reaches the adapters).
            recompute, recompute_kwargs = checkpointing(job.base_config)
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=recompute, gradient_checkpointing_kwargs=recompute_kwargs)
        config = self.config(job, task.peft_task_type, new_weights, model)
        try:
            peft_model = get_peft_model(model, config)
        except TypeError as exc:
            if not (new_weights and new_weights.token_ids and "trainable_token_indices" in str(exc)):
                raise
            raise UserError(
                "ft_config.train_config.lora_config.target_modules: adapts an embedding with LoRA, but "
                f"model_config.add_special_tokens added tokens (ids {new_weights.token_ids}) whose new rows must "
                "train on their own (trainable_token_indices). Remove the embedding from target_modules, or move it to "
                "lora_config.modules_to_save to train every row in full.") from None
        except ValueError as exc:
            raise UserError(f"ft_config.train_config.lora_config: {exc}") from None
        if new_weights is not None and new_weights.token_ids:
            # A resized vocabulary makes peft save both whole embedding matrices in every checkpoint and in the run
            # directory (gigabytes for an 8B model), though every row the resize added is trained and saved in the
            # adapter (trainable_token_indices, or modules_to_save) and the other rows are the base model's.
            peft_model.save_pretrained = functools.partial(peft_model.save_pretrained, save_embedding_layers=False)
        if trainable_fp32:
            # peft makes its adapters fp32, not the modules it trains in full (a new head, modules_to_save) nor
            # added embedding rows: the optimizer must not step on bf16 weights.
            for parameter in peft_model.parameters():
                if parameter.requires_grad and parameter.dtype != torch.float32:
                    parameter.data = parameter.data.float()
        trainable, total = peft_model.get_nb_trainable_parameters()
        logger.info("LoRA r=%s on %s; also trained in full: %s; embedding rows trained: %s; trainable %d of %d "
                    "parameters (%.2f%%)", config.r, sorted(config.target_modules)
                    if isinstance(config.target_modules, set) else config.target_modules, config.modules_to_save,
                    config.trainable_token_indices, trainable, total, 100 * trainable / total)
        return peft_model


def fresh_modules_to_save(model, fresh_parameters: list[str], claimed: list[str]) -> tuple[list[str], list[str]]:
    """The modules to train in full because the checkpoint had none of their weights: for each new weight, the
    outermost module whose parameters (tied ones counted) are all new. Never a module that also holds a pretrained
    weight: an MLM head's decoder weight is the word embedding, and wrapping the head would copy, untie and train
    the whole embedding. Never a module inside or around one that `claimed` (modules_to_save entries, matched by
    suffix as peft does) already trains: peft cannot load nested ones back (KeyError in set_peft_model_state_dict).
    Returns those modules' full paths, and the new parameters that none of them covers."""
    fresh: dict[int, str] = {}
    for name in fresh_parameters:
        try:
            fresh.setdefault(id(model.get_parameter(name)), name)
        except AttributeError:  # a buffer, not a weight
            continue
    if not fresh:
        return [], []
    claimed_paths = [name for name, _ in model.named_modules() if name and any(name.endswith(c) for c in claimed)]
    chosen: list[str] = []
    covered: set[int] = set()

    def visit(path: str, module) -> None:
        ids = {id(p) for _, p in module.named_parameters(remove_duplicate=False)}
        if not ids & fresh.keys():
            return
        if path in claimed_paths:
            covered.update(ids)
            return
        if path and ids <= fresh.keys() and not any(c.startswith(path + ".") for c in claimed_paths):
            chosen.append(path)
            covered.update(ids)
            return
        for child_name, child in module.named_children():
            visit(f"{path}.{child_name}" if path else child_name, child)

    visit("", model)
    return chosen, [name for key, name in fresh.items() if key not in covered]


def token_rows_to_train(model, configured, token_ids: list[int], trained_in_full: list[str]):
    """peft's trainable_token_indices with the new tokens' rows added: only those rows train, so the adapter stays
    small. On the input embedding and, where it has its own weight, the output embedding; where the model ties the
    two, peft ties the trained rows as well. An embedding already in modules_to_save trains every row anyway."""
    paths = {id(module): name for name, module in model.named_modules()}
    embeddings = [model.get_input_embeddings()]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not embeddings[0].weight:
        embeddings.append(output)
    rows = dict(configured) if isinstance(configured, dict) else {}
    if configured and not isinstance(configured, dict):
        rows[paths[id(embeddings[0])]] = list(configured)
    for layer in embeddings:
        path = paths[id(layer)]
        if any(path.endswith(name) for name in trained_in_full):
            continue
        key = next((name for name in rows if path.endswith(name)), path)
        rows[key] = sorted(set(rows.get(key, [])) | set(token_ids))
    return rows or configured


def _added_by_peft(task_type) -> list[str]:
    """Heads that peft itself puts in modules_to_save for classification task types."""
    return ["classifier", "score"] if str(getattr(task_type, "value", task_type)).upper() in ("SEQ_CLS", "TOKEN_CLS") \
        else []


def _warn_stranded(model, names: list[str]) -> None:
    # (A ZeRO-3 partitioned parameter has no values here: numel 0.)
    random = [name for name in names if model.get_parameter(name).detach().count_nonzero().item()]
    why = (f"Not trained under LoRA: {', '.join(names)}. New (not in the checkpoint), but in a module whose other "
           "weights come from it (an MLM decoder's weight is the word embedding), so training that module in full "
           "would copy and untie them.")
    if not random:
        logger.info("%s They start at zero, as a new bias does, and stay there.", why)
    else:
        logger.warning("%s %s start(s) at random values: add the module to "
                       "ft_config.train_config.lora_config.modules_to_save to train it in full, or use ft_method: full.",
                       why, ", ".join(random))


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
