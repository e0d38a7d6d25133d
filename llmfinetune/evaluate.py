"""`llmfinetune eval --model RUN_DIR [--ft=FILE] [--split NAME] [--generate]`: the task's metrics on a split, as JSON.

The numbers are the ones the training run's final eval reported for that split: the same data preparation, collator,
metrics and `transformers.Trainer(...).evaluate()`, with the job's eval batch size and seed. Classification adds
per-class precision, recall, F1 and support and the confusion matrix. `--generate` (text-generation) also generates
for every row of the split and scores the answers (generation_eval.py), writing them to RUN_DIR/generations.jsonl.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .errors import UserError
from .inference import add_run_arguments

if TYPE_CHECKING:
    from .inference import Options

logger = logging.getLogger("llmfinetune")


def add_command(commands) -> None:
    """`eval`; called by cli._parser()."""
    help_text = "evaluate a trained run directory on a split of its job's data; prints the metrics as JSON"
    parser = commands.add_parser("eval", help=help_text, description=help_text)
    add_run_arguments(parser)
    parser.add_argument("--split", default=None, metavar="NAME",
                        help="the split to evaluate (default: the job's eval split, as in training)")
    parser.add_argument("--generate", action="store_true",
                        help="text-generation and preference runs: also generate for every row and score it "
                             "against the reference answer (exact match, ROUGE-1/2/L, BLEU-4); rows go to "
                             "RUN_DIR/generations.jsonl")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="with --generate: rows per generate call (default: the job's per_device_eval_batch_size,"
                             " else 8)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="with --generate: most tokens to generate per row (default: the job's "
                             "model_config.generation, else 64)")
    parser.add_argument("--temperature", type=float, default=None, help="with --generate --do-sample")
    parser.add_argument("--top-p", type=float, default=None, help="with --generate --do-sample")
    parser.add_argument("--do-sample", action="store_true",
                        help="with --generate: sample instead of greedy decoding")
    parser.set_defaults(handler=main)


def evaluate_run(model: str | Path, ft: str | Path | None = None, overrides: Optional[list[str]] = None,
                 split: Optional[str] = None, device: str = "auto", generate: Optional["Options"] = None,
                 located: Optional[tuple] = None) -> dict[str, Any]:
    """The eval metrics of RUN_DIR on `split` (default: the job's eval split), keyed `eval_*` as in metrics.json.
    With `generate` (text-generation), also the generation scores (eval_gen_*), the rows written beside the run's
    metrics.json. `located`: what inference.locate_run returned, when the caller already has it."""
    from transformers import set_seed

    from . import arguments, data
    from .inference import load_run, locate_run

    located = located or locate_run(model, ft, overrides)
    job = located[1]
    if generate is not None:
        _require_generating(job)
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
        metrics.update(last_eval_details(trainer))
    for counter in ("epoch", "num_input_tokens_seen"):  # a fresh Trainer's training counters (0) mean nothing here
        metrics.pop(counter, None)
    metrics.update(task.derived_metrics(metrics, "eval"))
    if generate is not None:
        from . import generation_eval
        from .inference import TextGenerationPredictor

        found = generation_eval.cases(as_trained, splits, name)
        output = generation_eval.generations_path(run.run_dir, name, data.eval_split_name(job, splits))
        scores, _ = generation_eval.generate_and_score(TextGenerationPredictor(run, generate), found, output)
        metrics.update(scores)
        logger.info("Generations written to %s", output)
    return {"split": name, "eval_examples": len(prepared.eval), **metrics}


def last_eval_details(trainer) -> dict[str, Any]:
    """What the last evaluation's metrics function kept beside its numbers (classification: eval_per_class and
    eval_confusion_matrix). They are not scalars, so they stay out of the Trainer's log and its integrations; the
    run's metrics.json and this command's output carry them."""
    return dict(getattr(trainer.compute_metrics, "details", None) or {})


def _require_generating(job) -> None:
    """--generate scores runs that generate text: those `predict` generates for (SFT, preference-tuned policies)."""
    from .inference import PREDICTORS, TextGenerationPredictor

    if not issubclass(PREDICTORS[job.task], TextGenerationPredictor):
        generating = [task for task, kind in PREDICTORS.items() if issubclass(kind, TextGenerationPredictor)]
        raise UserError(f"--generate: only for runs that generate text ({', '.join(generating)}); this run is "
                        f"{job.task}.")


def generation_options(args, job) -> Optional["Options"]:
    """--generate's decoding flags, checked as `predict` checks them; None without --generate."""
    import argparse

    from .inference import _options

    if not args.generate:
        given = [flag for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--temperature",
                 args.temperature), ("--top-p", args.top_p), ("--do-sample", args.do_sample or None),
                 ("--batch-size", args.batch_size)) if value is not None]
        if given:
            raise UserError(f"{', '.join(given)}: only with --generate.")
        return None
    _require_generating(job)
    return _options(argparse.Namespace(**vars(args), top_k=None), job)  # eval has no --top-k


def main(args) -> int:
    from .inference import library_output_to_stderr, locate_run

    located = locate_run(args.model, args.ft, args.overrides)
    generate = generation_options(args, located[1])
    with library_output_to_stderr():  # stdout carries the metrics JSON only
        metrics = evaluate_run(args.model, args.ft, args.overrides, args.split, args.device, generate, located)
    print(json.dumps(metrics, indent=2, ensure_ascii=False), flush=True)
    return 0


class LabelledPredictions:
    """`predict --input` on a file whose rows carry their labels (the job's label column): the predictions scored
    as `eval` scores them, printed as the per-class table. A file where some row has no label gets no table."""

    def __init__(self, run):
        from .tasks.labels import label_lookup

        self.job, self.task = run.job, run.job.task
        self.names = [run.id2label[i] for i in range(len(run.id2label))]
        self.lookup = label_lookup(self.names, None)
        self.true: list = []
        self.predicted: list = []
        self.unlabelled = 0

    @classmethod
    def for_run(cls, run) -> Optional["LabelledPredictions"]:
        return cls(run) if run.job.task in ("sequenceclassification", "tokenclassification") and run.id2label \
            else None

    def add(self, row: dict, prediction: dict) -> None:
        if self.task == "sequenceclassification":
            value = row.get(self.job.data.label_column or "label")
            truth = self._label_id(value)
            if truth is None:
                self.unlabelled += 1
                return
            self.true.append(truth)
            self.predicted.append(self.names.index(prediction["label"]))
            return
        from .tasks.token_cls import TAG_COLUMN_GUESSES

        column = self.job.data.label_column or next((c for c in TAG_COLUMN_GUESSES if c in row), None)
        tags = row.get(column) if column else None
        words = prediction["words"]
        ids = [self._label_id(tag) for tag in tags] if isinstance(tags, list) and len(tags) == len(words) else None
        if ids is None or None in ids:
            self.unlabelled += 1
            return
        self.true.append([self.names[i] for i in ids])
        self.predicted.append([tag or "O" for tag in prediction["tags"]])  # words past max_length got no tag

    def _label_id(self, value) -> Optional[int]:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or value is None:
            return None
        if value not in self.lookup and isinstance(value, int) and 0 <= value < len(self.names):
            return value  # a class id, as a ClassLabel column's rows hold them
        return self.lookup.get(value)

    def report(self) -> Optional[dict]:
        """eval_per_class and eval_confusion_matrix, as `eval` gives them; None unless every row was labelled."""
        if self.unlabelled or not self.true:
            return None
        if self.task == "sequenceclassification":
            from .tasks.seq_cls import class_report

            return class_report(self.true, self.predicted, self.names)
        from .tasks.token_cls import entity_report

        index = {name: i for i, name in enumerate(self.names)}
        true_ids = [index[t] for tags in self.true for t in tags]
        predicted_ids = [index.get(t, index.get("O", 0)) for tags in self.predicted for t in tags]
        return entity_report(self.true, self.predicted, true_ids, predicted_ids, self.names)

    def print_table(self, source) -> None:
        import sys

        from .report import per_class_table

        found = self.report()
        if found is None:
            if self.true:
                print(f"{self.unlabelled} rows of {source} have no label; no per-class table.", file=sys.stderr)
            return
        kind = "entity type" if self.task == "tokenclassification" else "class"
        print(f"\nPer {kind} on {source} ({len(self.true)} labelled rows):", file=sys.stderr)
        print("\n".join(per_class_table(found["eval_per_class"])), file=sys.stderr, flush=True)
