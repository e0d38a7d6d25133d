"""What every task provides to the workflow, and the preprocessing pieces tasks share."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from ..errors import UserError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from ..config import Job


@dataclass
class Prepared:
    """Tokenized train/eval splits plus what the model needs to know about the data (labels)."""

    train: "Dataset"
    eval: "Dataset"
    model_kwargs: dict[str, Any] = field(default_factory=dict)


DATA = "ft_config.data_config"
BASE = "ft_config.train_config.base_config"
# Keys that only some tasks read: full key -> (the tasks that read it, its default). On any other task the setting
# would be silently ignored, so `check` refuses a value other than the default, naming the key (the user meant
# something this job will not do); a base_config key written out at its default changes nothing and gets a warning.
# Preference tuning and reward models render conversations as SFT does: they read template and system_prompt too.
READ_BY = {
    f"{DATA}.label_column": (("sequenceclassification", "tokenclassification"), None),
    f"{DATA}.response_column": (("text-generation",), None),
    f"{DATA}.format": (("text-generation",), "auto"),
    f"{DATA}.messages_column": (("text-generation",), None),
    f"{DATA}.template": (("text-generation", "preference", "rewardmodeling"), None),
    f"{DATA}.system_prompt": (("text-generation", "preference", "rewardmodeling"), None),
    f"{DATA}.train_on_prompt": (("text-generation",), False),
    f"{BASE}.packing": (("text-generation",), False),
    f"{BASE}.lm_head_on_targets_only": (("text-generation",), True),
    f"{BASE}.generation_eval": (("text-generation",), None),
    f"{BASE}.last_layer_cls_only": (("sequenceclassification",), True),
    f"{BASE}.mlm_probability": (("maskedlm",), 0.15),
    f"{BASE}.whole_word_mask": (("maskedlm",), False),
    # Token classification tags given words one by one; cutting them would need cutting the tags too.
    "model_config.max_input_words": (("sequenceclassification", "maskedlm", "text-generation"), None),
}


def _setting(job: "Job", key: str) -> tuple[bool, Any]:
    """(given, value) of a key of READ_BY."""
    section, name = key.rsplit(".", 1)
    if section == BASE:
        return name in job.base_config, job.base_config.get(name)
    owner = job.data if section == DATA else job.model
    return name in owner.model_fields_set, getattr(owner, name)


class Task:
    name: ClassVar[str]
    model_class: ClassVar[str]  # the transformers Auto class that loads the model for this task
    peft_task_type: ClassVar[str]
    # How many data_config.input_columns the task reads (the rest would be ignored).
    input_columns_read: ClassVar[int] = 1
    input_columns_hint: ClassVar[str] = "Keep one."
    # Language-model evals only need the loss; collecting vocabulary-sized logits would exhaust memory.
    loss_only_eval: ClassVar[bool] = False
    reports_perplexity: ClassVar[bool] = False
    # Whether the model's loss divides by the item count Trainer passes (num_items_in_batch), as the causal-LM loss
    # functions of transformers do; classification and masked-LM heads take a plain mean instead.
    loss_sums_over_items: ClassVar[bool] = False
    # Whether LoRA under bf16 mixed precision loads the frozen base in bf16 (methods/lora.py, base_dtype). Measured
    # for causal LMs (SFT bench, bf16 with AMX: +11% tokens/s, -140 MiB, the same losses to 4 decimals), as
    # LLaMA-Factory and TRL users load them; the encoder tasks keep the fp32 base their accuracy was measured with.
    half_precision_base: ClassVar[bool] = False
    # from_pretrained arguments the model class always needs, whatever the data (a reward model has one output).
    model_init_kwargs: ClassVar[dict[str, Any]] = {}

    def check(self, job: "Job") -> None:
        """Settings this task cannot honour, found before anything loads: keys only other tasks read (READ_BY),
        more input columns than the task reads, a subset beside a data source that has none."""
        from ..config import as_number

        refused: dict[tuple[str, ...], list[str]] = {}
        for key, (tasks, default) in READ_BY.items():
            given, value = _setting(job, key)
            if job.task in tasks or not given:
                continue
            if as_number(value) != default:
                refused.setdefault(tasks, []).append(key)
            else:
                logger.warning("%s: only read by ft_task %s; at its default here, it has no effect on %s.", key,
                               task_names(tasks), job.task)
        if refused:
            count = sum(len(keys) for keys in refused.values())
            raise UserError("; ".join(f"{', '.join(keys)}: only for ft_task {task_names(tasks)}"
                                      for tasks, keys in refused.items())
                            + f"; this job's task is {job.task}. Remove {'it' if count == 1 else 'them'}.")
        data = job.data
        columns = data.input_columns or []
        if len(columns) > self.input_columns_read:
            raise UserError(f"{DATA}.input_columns: ft_task {job.task} reads {self.input_columns_read} text "
                            f"column{'s' if self.input_columns_read != 1 else ''}, got {len(columns)} "
                            f"({', '.join(columns)}); the others would be ignored. {self.input_columns_hint}")
        elsewhere = [k for k in ("local_path", "train_file", "validation_file") if getattr(data, k)]
        if data.subset and data.data_path and elsewhere:
            # The original's own job files: data_path and subset name the hub dataset that local_path is a copy of.
            logger.warning("%s.subset: no effect: %s is read; data_path and subset only name the dataset it holds.",
                           DATA, " and ".join(elsewhere))
        elif data.subset and (elsewhere or not data.data_path):
            source = f"this job reads {' and '.join(elsewhere)}" if elsewhere else "this job sets no data_path"
            raise UserError(f"{DATA}.subset: only read with data_path (a hub dataset's subset, or a subfolder of a "
                            f"local data_path folder); {source}. Point local_path at the subset's own folder and "
                            "remove subset.")

    def prepare(self, splits: "DatasetDict", eval_split: str, tokenizer, job: "Job") -> Prepared:
        raise NotImplementedError

    def collator(self, tokenizer, job: "Job"):
        raise NotImplementedError

    def check_model(self, job: "Job", model_path: str) -> None:
        """Settings this task cannot honour with this model, known from its config alone (no weights load); called
        once the model is resolved, so the resolution (hub, S3 copy, merge) happens once."""

    def record_run_files(self, run_dir, splits: "DatasetDict", tokenizer, job: "Job", resuming: bool,
                         write: bool) -> None:
        """Record in the run directory what `eval` and `predict` must know of how training read the data (`write`:
        this process writes the run directory); a resumed run checks it still reads the data that way."""

    def as_trained(self, run_dir, job: "Job", tokenizer) -> "Job":
        """The job with its data settings as the run in `run_dir` resolved them at train time."""
        return job

    def compute_metrics(self, model_kwargs: dict[str, Any]) -> Optional[Callable]:
        return None

    def trainer_hooks(self, tokenizer, job: "Job", model_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The Trainer arguments this task decides; training and `eval` share them so their numbers agree."""
        return {
            "data_collator": self.collator(tokenizer, job),
            "compute_metrics": None if self.loss_only_eval else self.compute_metrics(model_kwargs),
            "preprocess_logits_for_metrics": None if self.loss_only_eval else self.preprocess_logits_for_metrics,
        }

    def trainer_class(self, job: "Job"):
        """The Trainer this task trains and evaluates with; training and `eval` share it."""
        from transformers import Trainer

        return Trainer

    def training_arguments(self, job: "Job") -> tuple[type, dict[str, Any]]:
        """The TrainingArguments class the trainer wants (TRL's trainers bring their own subclass) and the settings
        the task adds to base_config's; arguments.build_training_arguments applies the same rules to every task."""
        from transformers import TrainingArguments

        return TrainingArguments, {}

    def preprocess_logits_for_metrics(self, logits, labels):
        """Keep only the predicted class ids: evaluation then holds ints, not float logits."""
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.argmax(dim=-1)

    def derived_metrics(self, metrics: dict[str, float], prefix: str) -> dict[str, float]:
        loss = metrics.get(f"{prefix}_loss")
        if self.reports_perplexity and loss is not None:
            return {f"{prefix}_perplexity": math.exp(min(loss, 50.0))}
        return {}


def task_names(tasks: tuple[str, ...]) -> str:
    """('a', 'b', 'c') -> 'a, b or c'."""
    return tasks[0] if len(tasks) == 1 else f"{', '.join(tasks[:-1])} or {tasks[-1]}"


def tokenize_split(split: "Dataset", function: Callable, split_name: str, **map_kwargs) -> "Dataset":
    """`split.map(function, batched=True)` replacing the raw columns, with a progress bar. A fresh fingerprint:
    otherwise datasets hashes the whole tokenizer (the vocabulary, through dill) on every call, which took 90% of
    `llmfinetune check` on a tiny model. Reusing tokenized data is the job of cache.py."""
    import uuid

    return split.map(function, batched=True, remove_columns=split.column_names, desc=f"Tokenizing ({split_name})",
                     new_fingerprint=uuid.uuid4().hex, **map_kwargs)


def max_length(job: "Job", tokenizer) -> int:
    requested = job.base_config.get("max_length")
    limit = tokenizer.model_max_length if tokenizer.model_max_length and tokenizer.model_max_length < 1e6 else None
    if requested is None:
        return min(limit or 512, 512)
    requested = int(requested)
    if requested <= 0:
        raise UserError(f"ft_config.train_config.base_config.max_length: must be positive, got {requested}.")
    if limit and requested > limit:
        raise UserError(f"ft_config.train_config.base_config.max_length: {requested} exceeds the model's limit of "
                        f"{limit} tokens.")
    return requested


def clip_words(text: Any, job: "Job") -> Any:
    """model_config.max_input_words: cut very long inputs before tokenizing them."""
    limit = job.model.max_input_words
    if limit and isinstance(text, str):
        words = text.split()
        if len(words) > limit:
            return " ".join(words[:limit])
    return text


def text_columns(job: "Job", default: list[str], columns: list[str]) -> list[str]:
    if job.data.input_columns:
        return list(job.data.input_columns)
    found = [c for c in default if c in columns]
    if not found:
        raise UserError(
            f"ft_config.data_config.input_columns: not set, and none of the usual columns ({', '.join(default)}) "
            f"exists; columns found: {', '.join(columns)}."
        )
    return found[:1]


def check_texts(split: "Dataset", columns: list[str], split_name: str) -> None:
    for column in columns:
        for row, value in enumerate(split[column]):
            if value is None or (isinstance(value, str) and not value.strip()):
                raise UserError(f"split '{split_name}', row {row}: column '{column}' is empty or null; "
                                "remove the row or fill it in.")
