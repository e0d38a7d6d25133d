"""The whole fine-tuning job, top to bottom: check, data, tokenizer, model, method, Trainer, train, save, evaluate."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .config import Job, apply_original_keys, dump_job, redact_arguments
from .errors import UserError
from .registry import METHODS, TASKS

logger = logging.getLogger("llmfinetune")


def _checked(job: Job):
    """Task, method and model path, after every check that needs no model weights."""
    from . import arguments, models

    task = TASKS.get(job.task)
    method = METHODS.get(job.method)
    task.check(job)
    method.check(job)
    arguments.translate(job)
    apply_original_keys(job)
    model_path = models.resolve_model(job)
    task.check_model(job, model_path)
    return task, method, model_path


def check_job(job: Job, load_data: bool = True) -> dict[str, Any]:
    """Everything that can be known wrong before a model is loaded; returns a summary for `llmfinetune check`."""
    from . import arguments, data

    task, _, model_path = _checked(job)
    summary: dict[str, Any] = {"task": job.task, "method": job.method, "model": model_path,
                               "output_dir": str(arguments.run_dir(job))}
    if load_data:
        from . import models
        from .checkpoints import resume_point

        # The same checks run-ft makes before it loads weights: TrainingArguments' own, the resume point, and every
        # row of the data through the task's preparation (columns, empty texts, labels, lengths).
        training_args = arguments.build_training_arguments(job, task, arguments.run_dir(job))
        resume_point(job.base_config.get("resume_from_checkpoint"), arguments.run_dir(job))
        splits = data.load_raw_splits(job)
        summary["splits"] = {name: len(split) for name, split in splits.items()}
        # Through the cache: the run-ft that follows a successful check starts training without tokenizing again.
        prepared = _prepare(task, splits, data.eval_split_name(job, splits), models.load_tokenizer(model_path, job),
                            job)
        _require_one_batch(prepared, job, training_args.per_device_train_batch_size, job.scaling_config.num_workers)
    summary["task_class"] = type(task).__name__
    return summary


@dataclass
class RunResult:
    output_dir: Path
    metrics: dict[str, Any]
    model: Any  # the trained model as it is in memory (a PeftModel for LoRA)
    tokenizer: Any


def run(job: Job, deepspeed: Optional[str] = None) -> RunResult:
    from . import arguments, data, models
    from .distributed import world
    from .launch import check_launch

    started = time.time()
    task, method, model_path = _checked(job)
    output_dir = arguments.run_dir(job)
    # Built first: under torchrun/accelerate/deepspeed this also sets up the process group.
    training_args = arguments.build_training_arguments(job, task, output_dir, deepspeed)
    dist = world()
    check_launch(dist.world_size)
    if training_args.device.type == "cpu":
        from .allocator import keep_step_memory_mapped

        keep_step_memory_mapped()
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_job(job, output_dir / "job.yaml")
    logger.info("Run directory: %s", output_dir)

    tokenizer = models.load_tokenizer(model_path, job)
    splits = data.load_raw_splits(job)
    eval_split = data.eval_split_name(job, splits)
    prepared = _prepare(task, splits, eval_split, tokenizer, job, training_args)
    _require_one_batch(prepared, job, training_args.per_device_train_batch_size, dist.world_size)
    logger.info("Data: %d train and %d eval examples (eval split '%s').", len(prepared.train), len(prepared.eval),
                eval_split)

    from transformers import set_seed

    from . import faults
    from .checkpoints import MarkCompleteCheckpoints, StopOnNonFiniteLoss, resume_point

    set_seed(training_args.seed)  # new heads are initialised while loading: make them reproducible
    base_dtype = method.base_dtype(job, task, training_args)
    model, fresh_modules = models.load_model(model_path, job, task.model_class, prepared.model_kwargs, tokenizer,
                                             dtype=base_dtype)
    if not task.loss_sums_over_items:
        # BERT-style heads average their own loss yet accept **kwargs, so Trainer would multiply that average by
        # the world size under DDP: gradients and logged loss N times too large. Tell it the loss is already a mean.
        model.accepts_loss_kwargs = False
    model = method.wrap(model, job, task, fresh_modules, trainable_fp32=base_dtype is not None)
    from .kernels import (compile_swiglu_mlps, compiled_kernels_wanted, eager_kernels_wanted, swap_frozen_linears,
                          swap_lora_linears, swap_swiglu_mlps)

    hooks = task.trainer_hooks(tokenizer, job, prepared.model_kwargs)
    if eager_kernels_wanted(training_args):
        swap_lora_linears(model)  # peft's plain LoRA layers as one function (kernels.py); a no-op without LoRA
        swap_swiglu_mlps(model)
        # A frozen base's layers with their weights packed once, where oneDNN's state per shape stays bounded: in
        # half precision, and in fp32 for packed rows (the collator then rounds them as in half precision).
        swap_frozen_linears(model, half_precision=arguments.kernels_keep_state_per_shape(training_args),
                            fp32=hasattr(hooks.get("data_collator"), "bind_to"))
    elif compiled_kernels_wanted(training_args):
        compile_swiglu_mlps(model)
    from .generation_eval import TrainingJudge

    judge = TrainingJudge(job, task, tokenizer, splits, eval_split, output_dir, dist.world_size)

    from .sampling import with_shuffled_length_groups

    trainer = with_shuffled_length_groups(task.trainer_class(job))(
        model=model,
        args=training_args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        **hooks,
        # The NaN guard comes last: its "do not save" wins over Ctrl-C's "save" when both happen at one step.
        callbacks=[MarkCompleteCheckpoints(nan_guard := StopOnNonFiniteLoss()),
                   interrupt := faults.SaveOnInterrupt(job.base_config.get("save_on_interrupt", True)), nan_guard,
                   *judge.callbacks],
    )
    nan_guard.watch(trainer)
    method.attach(trainer, half_precision_base=base_dtype is not None)
    resume = resume_point(job.base_config.get("resume_from_checkpoint"), output_dir)
    # How training read the data (SFT: format and chat template), for `eval` and `predict`; checked on resume.
    task.record_run_files(output_dir, splits, tokenizer, job, resuming=resume is not None, write=dist.is_main)
    with faults.guarded("training", job, output_dir, training_args), faults.interruptible(interrupt):
        train_result = trainer.train(resume_from_checkpoint=resume)
    nan_guard.raise_if_diverged(output_dir, train_result.metrics.get("train_loss"), trainer.state.global_step)
    interrupt.raise_if_stopped(job, output_dir)
    with faults.guarded("saving the model", job, output_dir, training_args):
        trainer.save_model(str(output_dir))
        if dist.is_main:
            from .checkpoints import unpickle_training_arguments

            unpickle_training_arguments(output_dir, training_args)
    set_seed(training_args.seed)  # random masks (maskedlm) must not depend on where training left the RNG
    with faults.guarded("evaluating", job, output_dir, training_args):
        eval_metrics = trainer.evaluate()
    from .evaluate import last_eval_details

    eval_metrics.update(last_eval_details(trainer))
    eval_metrics.update(task.derived_metrics(eval_metrics, "eval"))
    with faults.guarded("generating for the eval rows", job, output_dir, training_args):
        eval_metrics.update(judge.at_end(trainer.model))
    metrics = {
        **train_result.metrics,
        **eval_metrics,
        "world_size": dist.world_size,
        "global_batch_size": training_args.per_device_train_batch_size * dist.world_size
        * training_args.gradient_accumulation_steps,
        "train_examples": len(prepared.train),
        "eval_examples": len(prepared.eval),
        "wall_seconds": round(time.time() - started, 2),
    }
    if dist.is_main:
        trainer.save_state()
        if "id2label" in prepared.model_kwargs:
            # A LoRA run directory has no config.json (transformers would then look for full weights there), so the
            # label names live beside the adapter; full runs have them in config.json as well.
            labels = {"id2label": prepared.model_kwargs["id2label"], "label2id": prepared.model_kwargs["label2id"]}
            (output_dir / "labels.json").write_text(json.dumps(labels, indent=2, ensure_ascii=False), encoding="utf-8")
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        _write_report(output_dir, trainer)
        _log_summary(metrics, output_dir)
    _leave_process_group()
    return RunResult(output_dir, metrics, trainer.model, tokenizer)


def _prepare(task, splits, eval_split: str, tokenizer, job: Job, training_args=None):
    """Tokenized splits, from the cache when allowed (one process per machine tokenizes, the others wait for it)."""
    if job.data.cache_tokenized:
        from .cache import prepare_cached

        return prepare_cached(task, splits, eval_split, tokenizer, job)
    if training_args is None:
        return task.prepare(splits, eval_split, tokenizer, job)
    with training_args.main_process_first(desc="tokenizing"):
        return task.prepare(splits, eval_split, tokenizer, job)


def _require_one_batch(prepared, job: Job, per_device: int, processes: int) -> None:
    """A train split smaller than one batch across all processes is a mistake (often num_row); the samplers would
    silently repeat rows to fill the batch."""
    needed = per_device * processes
    if len(prepared.train) < needed:
        rows = "packed rows" if job.base_config.get("packing") else "examples"
        raise UserError(
            f"split 'train': {len(prepared.train)} {rows} after tokenizing, fewer than one batch across all processes "
            f"(per_device_train_batch_size {per_device} x {processes} process{'es' if processes > 1 else ''} = "
            f"{needed}). Add rows (ft_config.data_config.num_row: 0 reads all), lower the batch size or use fewer "
            "processes."
        )


def _leave_process_group() -> None:
    """Ranks leave together: ZeRO-3 and offload runs otherwise abort (SIGABRT) at exit after saving."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def _write_report(output_dir: Path, trainer) -> None:
    """report.png and report.md; a plotting problem must never fail a finished training run."""
    import sys

    from .report import peak_rss_mib, write_report

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    extra = {"trainable_parameters": trainable, "total_parameters": total, "peak_rss_mib": peak_rss_mib(),
             "train_tokens": trainer.state.num_input_tokens_seen or None,
             "command": " ".join(["llmfinetune", *redact_arguments(sys.argv[1:])]) if sys.argv[1:2] == ["run-ft"]
             else None}
    try:
        write_report(output_dir, extra)
    except Exception as exc:  # noqa: BLE001
        logger.warning("Could not write the run report: %s", exc)


def _log_summary(metrics: dict[str, Any], output_dir: Path) -> None:
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()
             if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second", "_file"))
             and not isinstance(v, (dict, list))}  # per-class tables and the confusion matrix are in metrics.json
    logger.info("Final eval: %s", ", ".join(f"{k}={v}" for k, v in shown.items()))
    logger.info("Model saved to %s", output_dir)
    print(f"\nDone. Model, checkpoints, job.yaml and metrics.json are in: {output_dir}", flush=True)
