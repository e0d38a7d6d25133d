"""Judge a text-generation run by what it generates: exact match, ROUGE-1/2/L and BLEU-4 against the reference answers.

Every row of the eval split becomes the conversation training rendered up to the answer it learned (the last
assistant turn, found by the same format detection as training: chat.format_columns / to_messages); the model
continues it with the text-generation predictor's batched generation, and the continuation is scored against that
answer. `llmfinetune eval --generate` runs it on a saved run; `base_config.generation_eval` runs it at the end of
training and, optionally, on a few rows at every evaluation.

Scores are on 0-1 (BLEU is sacrebleu's corpus score / 100). Text is split into words and punctuation, case kept; a
character of a script written without spaces (Chinese, Japanese, Thai, ...) is one token on its own, as is usual for
AdvertiseGen, so one tokenizer serves Latin, CJK and mixed text; the output says which was found.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .errors import UserError

if TYPE_CHECKING:
    from .config import Job
    from .inference import LoadedRun

logger = logging.getLogger("llmfinetune")

GENERATIONS_FILE = "generations.jsonl"
PREFIX = "eval_gen_"
SCORES = ("exact_match", "rouge1", "rouge2", "rougeL", "bleu4")
KEY = "ft_config.train_config.base_config.generation_eval"
# base_config.generation_eval: key -> (type, default, meaning); the README's job-file reference repeats the meanings.
SETTINGS = {
    "at_end": (bool, True, "after training, generate for every eval row: scores in metrics.json, generations.jsonl, "
                           "examples in report.md"),
    "every_eval": (bool, False, "also generate at each evaluation during training (curves in report.png)"),
    "rows": (int, 16, "eval rows generated at each evaluation during training (the first N)"),
    "max_new_tokens": (int, 64, "most tokens generated per row"),
}

# Scripts written without spaces between words: each of their characters is one token.
_UNSEGMENTED = ("\u0e00-\u0eff"  # Thai, Lao
                "\u1000-\u109f"  # Myanmar
                "\u1780-\u17ff"  # Khmer
                "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f"  # Hiragana, Katakana
                "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f")  # Han
_UNSEGMENTED_CHAR = re.compile(f"[{_UNSEGMENTED}]")
_TOKEN = re.compile(f"[{_UNSEGMENTED}]|[^\\W{_UNSEGMENTED}]+|[^\\w\\s]")


def tokenize(text: str) -> list[str]:
    """Words (runs of letters and digits), single punctuation marks, and single characters of unsegmented scripts."""
    return _TOKEN.findall(text)


class _Tokenizer:  # the interface rouge-score takes: an object with tokenize(text)
    @staticmethod
    def tokenize(text: str) -> list[str]:
        return tokenize(text)


def tokenization(references: list[str]) -> str:
    """What the scores were computed on, in words for the output."""
    if any(_UNSEGMENTED_CHAR.search(text) for text in references):
        return "characters (CJK) + words"
    return "words"


def exact_match(reference: str, generated: str) -> float:
    """1.0 when the texts are equal after trimming whitespace at both ends, else 0.0."""
    return float(reference.strip() == generated.strip())


def score(references: list[str], generations: list[str]) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """(corpus scores, per-row scores). ROUGE is the mean of the rows' F-measures; BLEU-4 is sacrebleu's corpus BLEU
    (per row: its sentence BLEU with sacrebleu's default smoothing)."""
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu.metrics import BLEU

    if len(references) != len(generations) or not references:
        raise ValueError(f"score: {len(references)} references and {len(generations)} generations")
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Tokenizer())
    # Tokenized here and joined by spaces, so BLEU sees exactly the tokens ROUGE sees.
    joined = [(" ".join(tokenize(r)), " ".join(tokenize(g))) for r, g in zip(references, generations)]
    sentence_bleu = BLEU(tokenize="none", effective_order=True)
    rows = []
    for (reference, generated), (ref_tokens, gen_tokens) in zip(zip(references, generations), joined):
        rouge = scorer.score(reference, generated)
        rows.append({"exact_match": exact_match(reference, generated),
                     **{name: float(rouge[name].fmeasure) for name in ("rouge1", "rouge2", "rougeL")},
                     "bleu4": min(float(sentence_bleu.sentence_score(gen_tokens, [ref_tokens]).score) / 100.0, 1.0)})
    corpus = BLEU(tokenize="none").corpus_score([g for _, g in joined], [[r for r, _ in joined]])
    totals = {name: sum(row[name] for row in rows) / len(rows) for name in SCORES if name != "bleu4"}
    totals["bleu4"] = min(float(corpus.score) / 100.0, 1.0)  # sacrebleu's 100 can come out as 100.00000000000004
    totals["tokenization"] = tokenization(references)
    return totals, rows


# ---------------------------------------------------------------- the eval split as (conversation so far, answer)

@dataclass
class Case:
    row: int
    conversation: list[dict[str, str]]  # up to, not including, the last assistant turn
    reference: str  # the last assistant turn

    @property
    def prompt(self) -> str:
        return next(m["content"] for m in reversed(self.conversation) if m["role"] == "user")


def cases(job: "Job", splits, split_name: str) -> list[Case]:
    """The rows of `split_name` as training reads them (format detected on the train split's columns, as training
    detects it; `eval` passes the job with the run's trained format applied)."""
    from .tasks.base import clip_words
    from .tasks.chat import format_columns, to_messages

    if job.task == "preference":
        return _preference_cases(job, splits[split_name], split_name)
    columns = format_columns(job, splits["train"].column_names, list(splits))
    if columns.format == "text":
        raise UserError("eval --generate / generation_eval: this run trained on raw text (data format 'text'), "
                        "which has no reference answers to compare with; it needs prompt/response, alpaca, "
                        "messages or ShareGPT data.")
    split = splits[split_name]
    found = []
    for index in range(len(split)):
        messages = to_messages(split[index], columns, job, f"split '{split_name}', row {index}",
                               clip=lambda text: clip_words(text, job))
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        found.append(Case(index, messages[:last], messages[last]["content"]))
    if not found:
        raise UserError(f"eval --generate: split '{split_name}' has no rows.")
    return found


def _preference_cases(job: "Job", split, split_name: str) -> list[Case]:
    """A preference-tuned policy's eval rows, read as its training read them: the prompt, and the chosen answer as
    the reference (KTO rows: the desirable completions)."""
    from .tasks.preference_data import detect_layout, paired_example, unpaired_example

    layout = detect_layout(split.column_names, split_name)
    found = []
    for index in range(len(split)):
        where = f"split '{split_name}', row {index}"
        if layout == "paired":
            example = paired_example(split[index], job, where)
        else:
            example, desirable = unpaired_example(split[index], job, where)
            if not desirable:
                continue
        if example.prompt is None:
            raise UserError(f"eval --generate: {where}: chosen and rejected without a 'prompt' column are raw text "
                            "with no conversation to answer; add a 'prompt' column.")
        found.append(Case(index, example.prompt, example.answers[0][-1]["content"]))
    if not found:
        raise UserError(f"eval --generate: split '{split_name}' has no rows with a desirable answer.")
    return found


# ---------------------------------------------------------------- generating and scoring

def generate_and_score(predictor, found: list[Case], output: Optional[Path] = None,
                       progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate with a TextGenerationPredictor for every case, in batches of its options.batch_size; (metrics keyed
    eval_gen_*, rows for generations.jsonl). With `output`, the rows are written there."""
    from tqdm.auto import tqdm

    generated: list[dict] = []
    size = predictor.options.batch_size
    with tqdm(total=len(found), unit="row", desc="generate", disable=not progress) as bar:
        for start in range(0, len(found), size):
            batch = found[start:start + size]
            generated += predictor.generate(*predictor.conversation_prompts([c.conversation for c in batch]))
            bar.update(len(batch))
    totals, per_row = score([c.reference for c in found], [g["generated_text"] for g in generated])
    rows = [{"row": case.row, "prompt": case.prompt, "reference": case.reference,
             "generated": result["generated_text"], "finish_reason": result["finish_reason"], "scores": scores}
            for case, result, scores in zip(found, generated, per_row)]
    metrics = {f"{PREFIX}{name}": value for name, value in totals.items()}
    metrics[f"{PREFIX}rows"] = len(rows)
    if output is not None:
        write_rows(output, rows)
        metrics[f"{PREFIX}file"] = output.name
    return metrics, rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    try:
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror}).") from None


def generations_path(run_dir: Path, split: str, default_split: str) -> Path:
    """RUN_DIR/generations.jsonl for the eval split; generations-SPLIT.jsonl for another split, kept apart."""
    if split == default_split:
        return run_dir / GENERATIONS_FILE
    return run_dir / f"generations-{re.sub(r'[^A-Za-z0-9._-]+', '-', split)}.jsonl"


# ---------------------------------------------------------------- base_config.generation_eval

@dataclass
class Settings:  # the checked SETTINGS (their defaults are there)
    at_end: bool
    every_eval: bool
    rows: int
    max_new_tokens: int


def settings(job: "Job") -> Optional[Settings]:
    """base_config.generation_eval, checked; None when the job does not set it (or sets it to null/false). Other
    tasks than text-generation are refused it by Task.check (tasks/base.py READ_BY)."""
    value = job.base_config.get("generation_eval")
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise UserError(f"{KEY}: expected a mapping of {', '.join(SETTINGS)} (or true for the defaults), got "
                        f"{value!r}.")
    unknown = [k for k in value if k not in SETTINGS]
    if unknown:
        raise UserError(f"{KEY}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))}; "
                        f"accepted: " + "; ".join(f"{k} ({meaning})" for k, (_, _, meaning) in SETTINGS.items()) + ".")
    checked = {}
    for name, (kind, default, _) in SETTINGS.items():
        given = value.get(name, default)
        if kind is bool and not isinstance(given, bool):
            raise UserError(f"{KEY}.{name}: expected true or false, got {given!r}.")
        if kind is int and (isinstance(given, bool) or not isinstance(given, int) or given < 1):
            raise UserError(f"{KEY}.{name}: expected a whole number of at least 1, got {given!r}.")
        checked[name] = given
    strategy = job.base_config.get("eval_strategy", job.base_config.get("evaluation_strategy", "no"))
    if checked["every_eval"] and str(strategy).lower() in ("no", "false"):  # YAML reads a bare `no` as false
        raise UserError(f"{KEY}.every_eval: true, but the job never evaluates during training (eval_strategy "
                        f"{strategy!r}); set base_config.eval_strategy: steps (with eval_steps) or epoch, or drop "
                        "every_eval.")
    return Settings(**checked)


def options_for(job: "Job", chosen: Settings):
    """Greedy decoding (reproducible scores during training) with the job's eval batch size."""
    from .inference import Options

    return Options(batch_size=int(job.base_config.get("per_device_eval_batch_size") or 8),
                   max_new_tokens=chosen.max_new_tokens)


def in_memory_run(job: "Job", task, model, tokenizer, run_dir: Path) -> "LoadedRun":
    """The model being trained, in the shape the predictor takes."""
    from .inference import LoadedRun

    device = str(next(model.parameters()).device)
    return LoadedRun(run_dir, job, task, job.method, model, tokenizer, device)


class TrainingJudge:
    """base_config.generation_eval during `run-ft`: a callback scoring the first `rows` eval rows at each evaluation
    (every_eval), and the whole eval split after the final evaluation (at_end). Inert when the job does not ask."""

    def __init__(self, job: "Job", task, tokenizer, splits, eval_split: str, run_dir: Path, world_size: int):
        self.job, self.task, self.tokenizer, self.run_dir = job, task, tokenizer, run_dir
        self.chosen = settings(job)
        self.callbacks: list = []
        self.found: list[Case] = []
        if self.chosen is None or not (self.chosen.at_end or self.chosen.every_eval):
            self.chosen = None
            return
        if world_size > 1:
            # Generating on one process would leave the others waiting at their next collective (and ZeRO-3
            # shards the weights a single process would need); the saved run is judged afterwards instead.
            logger.warning("%s: not run under %d processes; after training run `llmfinetune eval --model %s "
                           "--generate`.", KEY, world_size, run_dir)
            self.chosen = None
            return
        self.found = cases(job, splits, eval_split)
        self.options = options_for(job, self.chosen)
        self._predictor = None
        if self.chosen.every_eval:
            self.callbacks.append(self._callback())

    def predictor(self, model):
        from .inference import TextGenerationPredictor

        if self._predictor is None:  # made at first use: the run directory then holds the trained format
            run = in_memory_run(self.job, self.task, model, self.tokenizer, self.run_dir)
            self._predictor = TextGenerationPredictor(run, self.options)
        return self._predictor

    def generate(self, model, found: list[Case], output: Optional[Path], progress: bool):
        """Generate with the model being trained, in eval mode, then give it back in the mode it was in."""
        was_training = model.training
        model.eval()
        try:
            return generate_and_score(self.predictor(model), found, output, progress)
        finally:
            if was_training:
                model.train()

    def at_end(self, model) -> dict[str, Any]:
        """After the final evaluation: every eval row, written to RUN_DIR/generations.jsonl; {} when not asked."""
        if self.chosen is None or not self.chosen.at_end:
            return {}
        scores, _ = self.generate(model, self.found, self.run_dir / GENERATIONS_FILE, progress=True)
        return scores

    def _callback(self):
        from transformers import TrainerCallback

        judge, subset = self, self.found[:self.chosen.rows]

        class GenerationEvalCallback(TrainerCallback):
            active = True

            def on_train_end(self, args, state, control, **kwargs):
                self.active = False  # the evaluation after training is judged on every row by at_end

            def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
                if not self.active or model is None:
                    return
                scores, _ = judge.generate(model, subset, None, progress=False)
                scores.pop(f"{PREFIX}tokenization", None)  # a string; the log carries numbers
                # The Trainer logged this evaluation just before calling here: the scores join that log entry, so
                # they are in trainer_state.json next to eval_loss and report.png draws them.
                entry = state.log_history[-1] if state.log_history else None
                if entry is not None and entry.get("step") == state.global_step and "eval_loss" in entry:
                    entry.update(scores)
                if metrics is not None:
                    metrics.update(scores)
                logger.info("Generation eval at step %d (%d rows): %s", state.global_step, len(subset),
                            ", ".join(f"{k[len(PREFIX):]}={v:.4f}" for k, v in scores.items()
                                      if isinstance(v, float)))

        return GenerationEvalCallback()
