"""`llmfinetune eval --model RUN_DIR [--ft=FILE] [--split NAME]`: the task's metrics on a split, printed as JSON.

The numbers are the ones the training run's final eval reported for that split: the same data preparation, collator,
metrics and `transformers.Trainer(...).evaluate()`, with the job's eval batch size and seed.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Optional

from .errors import UserError
from .inference import add_run_arguments

logger = logging.getLogger("llmfinetune")


def add_command(commands) -> None:
    """`eval`; called by cli._parser()."""
    help_text = "evaluate a trained run directory on a split of its job's data; prints the metrics as JSON"
    parser = commands.add_parser("eval", help=help_text, description=help_text)
    add_run_arguments(parser)
    parser.add_argument("--split", default=None, metavar="NAME",
                        help="the split to evaluate (default: the job's eval split, as in training)")
    parser.set_defaults(handler=main)


def evaluate_run(model: str | Path, ft: str | Path | None = None, overrides: Optional[list[str]] = None,
                 split: Optional[str] = None, device: str = "auto") -> dict[str, Any]:
    """The eval metrics of RUN_DIR on `split` (default: the job's eval split), keyed `eval_*` as in metrics.json."""
    from transformers import set_seed

    from . import arguments, data
    from .inference import load_run, locate_run

    located = locate_run(model, ft, overrides)
    job = located[1]
    if device == "cpu":
        # Evaluate where asked even when a GPU is visible (the Trainer otherwise moves the model to it).
        job.ft_config.train_config.base_config["use_cpu"] = True
    run = load_run(model, device=device, located=located)
    task, tokenizer = run.task, run.tokenizer
    splits = data.load_raw_splits(job)
    name = split or data.eval_split_name(job, splits)
    if name not in splits:
        raise UserError(f"--split: no split '{name}' in the job's data; splits found: {', '.join(splits)}.")
    # The data read as training read it (SFT: the run directory's trained format), whatever the job file says now.
    as_trained = task.as_trained(run.run_dir, job, tokenizer)
    prepared = task.prepare(splits, name, tokenizer, as_trained)
    trained_labels = prepared.model_kwargs.get("id2label")
    if trained_labels is not None and run.id2label is not None and \
            {int(k): v for k, v in trained_labels.items()} != run.id2label:
        raise UserError(f"the labels of the data now ({list(trained_labels.values())}) differ from the labels the "
                        f"model in {run.run_dir} was trained with ({list(run.id2label.values())}); the data changed "
                        "since training.")
    with tempfile.TemporaryDirectory(prefix="llmfinetune-eval-") as scratch:  # the Trainer insists on an output_dir
        training_args = arguments.build_training_arguments(job, task, Path(scratch))
        trainer = task.trainer_class(job)(
            model=run.model,
            args=training_args,
            eval_dataset=prepared.eval,
            processing_class=tokenizer,
            **task.trainer_hooks(tokenizer, job, prepared.model_kwargs),
        )
        # Seeded right before evaluating: masked-LM evaluation masks tokens at random.
        set_seed(training_args.seed)
        metrics = trainer.evaluate()
    for counter in ("epoch", "num_input_tokens_seen"):  # a fresh Trainer's training counters (0) mean nothing here
        metrics.pop(counter, None)
    metrics.update(task.derived_metrics(metrics, "eval"))
    return {"split": name, "eval_examples": len(prepared.eval), **metrics}


def main(args) -> int:
    from .inference import library_output_to_stderr

    with library_output_to_stderr():  # stdout carries the metrics JSON only
        metrics = evaluate_run(args.model, args.ft, args.overrides, args.split, args.device)
    print(json.dumps(metrics, indent=2), flush=True)
    return 0
