"""After training: load a run directory through its job.yaml (full model or LoRA adapter) and predict with it.

`llmfinetune predict --model RUN_DIR (--text "..." | --input FILE.jsonl) [--output FILE.jsonl]`

Only the standard library is imported at module level (the CLI builds its parser from here); torch, transformers
and peft load when a command runs.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from .data import read_jsonl
from .errors import UserError, first_line

if TYPE_CHECKING:
    from .config import Job
    from .tasks.base import Task

logger = logging.getLogger("llmfinetune")

DEVICES = ("auto", "cpu", "cuda")
JOB_FILE = "job.yaml"
LABELS_FILE = "labels.json"
ADAPTER_CONFIG = "adapter_config.json"


# ---------------------------------------------------------------- command-line arguments shared by the three commands

def add_run_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="RUN_DIR",
                        help="run directory made by `llmfinetune run-ft` (full model or LoRA adapter)")
    parser.add_argument("--ft", default=None, metavar="FILE",
                        help="job file to read instead of RUN_DIR/job.yaml (e.g. the one you trained with)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda if available, else cpu")
    parser.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE",
                        help="override a key of the job file, e.g. ft_config.data_config.local_path=data/demo/reviews")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def add_command(commands) -> None:
    """`predict`; called by cli._parser()."""
    help_text = "predict with a trained run directory: one --text, or a JSONL file of rows"
    parser = commands.add_parser("predict", help=help_text, description=help_text)
    add_run_arguments(parser)
    parser.add_argument("--text", default=None, help="one input text (masked LM: containing the mask token)")
    parser.add_argument("--text-pair", default=None, metavar="TEXT",
                        help="second text, for sequence classification trained on two input columns")
    parser.add_argument("--input", default=None, metavar="FILE.jsonl",
                        help="JSON lines; each row's text comes from the job's input column(s) or a 'text' key")
    parser.add_argument("--output", default=None, metavar="FILE.jsonl",
                        help="write result rows here, batch by batch (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="rows per forward pass (default: the job's per_device_eval_batch_size, else 8)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="masked LM: fills per mask (default 5)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="text generation: most tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=None, help="text generation, with --do-sample")
    parser.add_argument("--top-p", type=float, default=None, help="text generation, with --do-sample")
    parser.add_argument("--do-sample", action="store_true", help="text generation: sample instead of greedy decoding")
    parser.set_defaults(handler=main)


# ---------------------------------------------------------------- loading a run directory

def resolve_device(name: str) -> str:
    import torch

    if name not in DEVICES:
        raise UserError(f"--device: expected one of {', '.join(DEVICES)}, got {name!r}.")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU on this machine (torch.cuda.is_available() is "
                        "False); use --device cpu or --device auto.")
    return name


def locate_run(model: str | Path, ft: str | Path | None = None,
               overrides: Optional[list[str]] = None) -> tuple[Path, "Job", str]:
    """The run directory, its job (RUN_DIR/job.yaml unless --ft names another) and what it holds: 'full' or 'lora'."""
    from .config import load_job

    run_dir = Path(model).expanduser()
    if not run_dir.exists():
        raise UserError(f"--model: run directory '{model}' not found (absolute: {run_dir.resolve()}).")
    if not run_dir.is_dir():
        raise UserError(f"--model: '{model}' is a file; expected a run directory made by `llmfinetune run-ft`.")
    run_dir = run_dir.resolve()
    if ft is None:
        job_path = run_dir / JOB_FILE
        if not job_path.is_file():
            hint = ""
            if (run_dir.parent / JOB_FILE).is_file():
                hint = f" It looks like a checkpoint folder: add --ft={run_dir.parent / JOB_FILE}."
            raise UserError(f"--model: {run_dir} has no {JOB_FILE}, so it is not a run directory made by "
                            f"`llmfinetune run-ft`.{hint} To use a model trained elsewhere, pass --ft=JOB_FILE, "
                            "the job file it was trained with.")
    else:
        job_path = Path(ft)
    job = load_job(job_path, overrides)
    if (run_dir / ADAPTER_CONFIG).is_file():
        kind = "lora"
    elif (run_dir / "config.json").is_file():
        kind = "full"
    else:
        raise UserError(f"--model: {run_dir} holds neither a model (config.json) nor a LoRA adapter "
                        f"({ADAPTER_CONFIG}); did the training run stop before it saved the model?")
    if kind != job.method:
        held = "a LoRA adapter" if kind == "lora" else "a full model"
        logger.warning("%s says ft_method '%s' but %s holds %s; loading it as such.", job_path, job.method, run_dir,
                       held)
    return run_dir, job, kind


@dataclass
class LoadedRun:
    run_dir: Path
    job: "Job"
    task: "Task"
    kind: str  # 'full' or 'lora'
    model: Any  # a transformers model, or a PeftModel wrapping one
    tokenizer: Any
    device: str
    id2label: Optional[dict[int, str]] = None
    base_model: Optional[str] = None  # the base weights' folder or hub id, for LoRA runs


def load_run(model: str | Path, ft: str | Path | None = None, overrides: Optional[list[str]] = None,
             device: str = "auto", located: Optional[tuple[Path, "Job", str]] = None) -> LoadedRun:
    """Load RUN_DIR's model and tokenizer the way the training run built them; the base model of a LoRA run comes
    from job.yaml (`models.resolve_model`), so the user never names it again. `located`: what `locate_run` returned,
    when the caller already has it."""
    from . import models
    from .registry import TASKS

    run_dir, job, kind = located or locate_run(model, ft, overrides)
    task = TASKS.get(job.task)
    device = resolve_device(device)
    tokenizer = models.load_tokenizer(str(run_dir), job, base_model=False)
    labelled = PREDICTORS[job.task].labelled
    id2label = read_labels(run_dir, job, task, tokenizer) if labelled and kind == "lora" else None
    base = None
    if kind == "full":
        loaded, _ = models.load_model(str(run_dir), job, task.model_class, {}, tokenizer)
        if labelled:
            id2label = {int(k): v for k, v in loaded.config.id2label.items()}
    else:
        from peft import PeftModel

        base = base_model_path(run_dir, job)
        label_kwargs = dict(task.model_init_kwargs)  # a reward model's one output
        if id2label:
            label_kwargs = {"num_labels": len(id2label), "id2label": id2label,
                            "label2id": {name: index for index, name in id2label.items()}}
        with _quiet_transformers():  # the head is "newly initialized" here only until the adapter replaces it
            base_model, _ = models.load_model(base, job, task.model_class, label_kwargs, tokenizer)
        try:
            loaded = PeftModel.from_pretrained(base_model, str(run_dir))
        except (ValueError, RuntimeError, KeyError) as exc:
            raise UserError(f"--model: could not load the LoRA adapter in {run_dir} onto {base} "
                            f"({type(exc).__name__}: {first_line(exc)}). Was it trained from "
                            "this base model?") from exc
    if getattr(loaded, "hf_quantizer", None) is None:  # quantized weights are placed by bitsandbytes
        loaded.to(device)
    loaded.eval()
    return LoadedRun(run_dir, job, task, kind, loaded, tokenizer, device, id2label, base)


def base_model_path(run_dir: Path, job: "Job") -> str:
    """job.yaml's model (resolved as training did); if that path no longer resolves from here, the absolute folder
    peft recorded in adapter_config.json."""
    from .models import resolve_model

    try:
        return resolve_model(job)
    except UserError:
        recorded = _read_json(run_dir / ADAPTER_CONFIG).get("base_model_name_or_path")
        if recorded and (Path(recorded) / "config.json").is_file():
            logger.warning("Base model from %s: %s (model_config.model_id in the job file does not resolve from "
                           "here).", ADAPTER_CONFIG, recorded)
            return recorded
        raise


def read_labels(run_dir: Path, job: "Job", task: "Task", tokenizer) -> dict[int, str]:
    """Label names of a classification run: labels.json (beside the adapter, or beside job.yaml for a checkpoint);
    runs made before labels.json existed get them recomputed from the train data exactly as training did."""
    source = job.source
    for folder in dict.fromkeys([run_dir] + ([source.parent] if source else [])):
        path = folder / LABELS_FILE
        if path.is_file():
            labels = _read_json(path).get("id2label")
            if not isinstance(labels, dict) or not labels:
                raise UserError(f"{path}: expected {{\"id2label\": {{\"0\": name, ...}}, ...}}.")
            return {int(k): str(v) for k, v in labels.items()}
    from . import data

    logger.warning("%s has no %s; recomputing the label names from the train data named in the job file.",
                   run_dir, LABELS_FILE)
    try:
        splits = data.load_raw_splits(job)
        prepared = task.prepare(splits, data.eval_split_name(job, splits), tokenizer, job)
    except UserError as exc:
        raise UserError(f"--model: {run_dir} has no {LABELS_FILE} and the label names cannot be recomputed from "
                        f"the train data ({exc}). Pass --ft=the job file you trained with, or override the data "
                        "path, e.g. ft_config.data_config.local_path=FOLDER.") from None
    return {int(k): v for k, v in prepared.model_kwargs["id2label"].items()}


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc}).") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(value).__name__}.")
    return value


class _quiet_transformers:
    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)


# ---------------------------------------------------------------- predictors, one per task

@dataclass
class Options:
    batch_size: int = 8
    top_k: int = 5
    max_new_tokens: int = 64
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    do_sample: bool = False


class Predictor:
    """Turns input rows into model inputs and model outputs into JSON-ready predictions."""

    labelled: ClassVar[bool] = False
    default_columns: ClassVar[list[str]] = ["text"]

    def __init__(self, run: LoadedRun, options: Options):
        from .tasks.base import max_length

        self.run = run
        self.options = options
        self.tokenizer = run.tokenizer
        self.limit = max_length(run.job, run.tokenizer)

    def columns(self) -> list[str]:
        """Where a row's input is: the job's input column(s), else the task's usual column names; then 'text'."""
        named = (self.run.job.data.input_columns or [])[:1] or self.default_columns
        return list(dict.fromkeys([*named, "text"]))

    def read(self, row: dict, where: str) -> Any:
        key = next((c for c in self.columns() if row.get(c) is not None), None)
        if key is None:
            raise UserError(f"{where}: no input; expected a key named {' or '.join(repr(c) for c in self.columns())}"
                            f" (the job's input column or 'text'); keys found: {', '.join(row) or 'none'}.")
        return _text(row[key], key, where)

    def predict(self, inputs: list[Any]) -> list[dict]:
        raise NotImplementedError

    def _encode(self, *texts, **kwargs):
        encoded = self.tokenizer(*texts, truncation=True, max_length=self.limit, padding=True, return_tensors="pt",
                                 **kwargs)
        return encoded

    def _forward(self, encoded):
        import torch

        with torch.inference_mode():
            return self.run.model(**encoded.to(self.run.device)).logits.float()


def _text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must be a string, got {type(value).__name__}.")
    if not value.strip():
        raise UserError(f"{where}: '{key}' is empty.")
    return value


class SequenceClassificationPredictor(Predictor):
    labelled = True
    default_columns = ["sentence", "text"]

    def pair(self) -> bool:
        return len(self.run.job.data.input_columns or []) == 2

    def columns(self) -> list[str]:
        if self.pair():
            return list(self.run.job.data.input_columns)
        return super().columns()

    def read(self, row, where):
        if not self.pair():
            return super().read(row, where)
        for keys in (tuple(self.run.job.data.input_columns), ("text", "text_pair")):
            if all(row.get(k) is not None for k in keys):
                return tuple(_text(row[k], k, where) for k in keys)
        first, second = self.run.job.data.input_columns
        raise UserError(f"{where}: this model was trained on text pairs; expected keys '{first}' and '{second}' "
                        f"(or 'text' and 'text_pair'; on the command line --text and --text-pair); keys found: "
                        f"{', '.join(k for k in row if row[k] is not None) or 'none'}.")

    def predict(self, inputs):
        from .tasks.base import clip_words

        job = self.run.job
        if self.pair():
            encoded = self._encode([clip_words(a, job) for a, _ in inputs], [clip_words(b, job) for _, b in inputs])
        else:
            encoded = self._encode([clip_words(t, job) for t in inputs])
        probabilities = self._forward(encoded).softmax(dim=-1).cpu()
        names = self.run.id2label
        results = []
        for row in probabilities.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            results.append({"label": names[best], "score": row[best],
                            "scores": {names[i]: p for i, p in enumerate(row)}})
        return results


# A word: a run of letters/digits/underscore, or one other non-space character, the way BERT-style pre-tokenizers
# and CoNLL-style word lists split text ("Paris." -> "Paris", ".").
WORD = re.compile(r"\w+|[^\w\s]")


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    matches = list(WORD.finditer(text))
    return [m.group() for m in matches], [m.span() for m in matches]


def join_words(words: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """A word-list row as text (words joined by spaces) and each word's span in it."""
    spans, position = [], 0
    for word in words:
        spans.append((position, position + len(word)))
        position += len(word) + 1
    return " ".join(words), spans


def _tag_parts(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); a tag without a scheme prefix ('PER') continues like I-."""
    if len(tag) > 2 and tag[0] in "BIESLU" and tag[1] in "-_":
        return tag[0], tag[2:]
    return "I", tag


def group_entities(text: str, spans: list[tuple[int, int]], tags: list[Optional[str]],
                   scores: list[Optional[float]]) -> list[dict]:
    """Word tags -> entities with character spans into `text`. B- (or S-) starts an entity, I- (or E-) of the same
    type continues it, I- of another type after O starts one (as seqeval reads IOB2), O ends it."""
    entities: list[dict] = []
    current: Optional[dict] = None
    for span, tag, score in zip(spans, tags, scores):
        if tag is None or tag == "O":
            current = None
            continue
        prefix, kind = _tag_parts(tag)
        if current is None or prefix in "BSU" or kind != current["entity"]:
            current = {"entity": kind, "start": span[0], "end": span[1], "scores": []}
            entities.append(current)
        current["end"] = span[1]
        current["scores"].append(score)
        if prefix in "ESLU":
            current = None
    return [{"entity": e["entity"], "text": text[e["start"]:e["end"]], "start": e["start"], "end": e["end"],
             "score": sum(e["scores"]) / len(e["scores"])} for e in entities]


class TokenClassificationPredictor(Predictor):
    labelled = True
    default_columns = ["tokens", "words"]

    def read(self, row, where):
        key = next((c for c in self.columns() if row.get(c) is not None), None)
        value = row.get(key) if key else None
        if isinstance(value, list):  # a word list, as in the training data
            if not value or not all(isinstance(w, str) and w.strip() for w in value):
                raise UserError(f"{where}: '{key}' must be a non-empty list of non-empty strings.")
            text, spans = join_words(value)
            return text, list(value), spans
        text = super().read(row, where)
        words, spans = split_words(text)
        return text, words, spans

    def predict(self, inputs):
        encoded = self._encode([words for _, words, _ in inputs], is_split_into_words=True)
        probabilities = self._forward(encoded).softmax(dim=-1).cpu()
        names = self.run.id2label
        results = []
        for index, (text, words, spans) in enumerate(inputs):
            tags: list[Optional[str]] = [None] * len(words)
            scores: list[Optional[float]] = [None] * len(words)
            seen = set()
            for position, word in enumerate(encoded.word_ids(index)):
                if word is None or word in seen:
                    continue  # the model tags each word on its first sub-token, as in training
                seen.add(word)
                best = int(probabilities[index, position].argmax())
                tags[word], scores[word] = names[best], float(probabilities[index, position, best])
            if None in tags:
                logger.warning("An input has more words than fit in max_length=%d tokens; words past the limit get "
                               "no tag (null).", self.limit)
            results.append({"entities": group_entities(text, spans, tags, scores), "words": words, "tags": tags})
        return results


class MaskedLMPredictor(Predictor):
    default_columns = ["text", "sentence", "content"]

    def read(self, row, where):
        text = super().read(row, where)
        mask = self.tokenizer.mask_token
        if mask is None:
            raise UserError(f"--model: the tokenizer of {self.run.run_dir} has no mask token.")
        if mask not in text:
            raise UserError(f"{where}: the text has no mask token; write {mask} where a word should be filled in, "
                            f"e.g. \"The capital of France is {mask}.\"")
        return text

    def predict(self, inputs):
        import torch

        from .tasks.base import clip_words

        texts = [clip_words(t, self.run.job) for t in inputs]
        encoded = self._encode(texts)
        logits = self._forward(encoded).cpu()
        special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)
        results = []
        for index, text in enumerate(texts):
            positions = (encoded["input_ids"][index] == self.tokenizer.mask_token_id).nonzero().flatten().tolist()
            if not positions:
                raise UserError(f"input {text[:60]!r}...: every {self.tokenizer.mask_token} lies past max_length="
                                f"{self.limit} tokens; shorten the text.")
            fills = []
            for position in positions:
                probabilities = logits[index, position].softmax(dim=-1)
                probabilities[special] = 0.0  # a special token is never a fill
                top = probabilities.topk(min(self.options.top_k, probabilities.numel()))
                fills.append([{"token": self.tokenizer.decode([int(i)]).strip(), "score": float(p)}
                              for p, i in zip(top.values, top.indices)])
            sequence = text
            for candidates in fills:
                sequence = sequence.replace(self.tokenizer.mask_token, candidates[0]["token"], 1)
            results.append({"fills": fills, "sequence": sequence})
        return results


class TextGenerationPredictor(Predictor):
    """Prompts are the token ids training put before an answer: the run directory's trained format (chat.FORMAT_FILE:
    raw text or a conversation format, with the chat template training used) decides how an input row is read and
    rendered, not the job file's data_config, whose `format: auto` training resolved from the data."""

    default_columns = ["prompt", "instruction", "question", "content"]

    def __init__(self, run: LoadedRun, options: Options):
        from .tasks.chat import Renderer, trained_format

        super().__init__(run, options)
        self.trained = trained_format(run.run_dir, run.job, run.tokenizer)
        self.job = self.trained.apply(run.job)  # data settings as training resolved them
        self.renderer = None if self.trained.format == "text" else Renderer(run.tokenizer, self.job)

    def columns(self) -> list[str]:
        named = [self.trained.prompt] if self.trained.prompt else self.default_columns
        return list(dict.fromkeys([*named, *self.default_columns, "text"]))

    def read(self, row, where):
        """A row as the trained format reads it: the conversation column for chat data (its last assistant turn, if
        any, is the answer to generate), else the prompt column (or `text`) with the row's other columns that format
        reads (alpaca's input/system/history, a system column)."""
        from .tasks.base import clip_words
        from .tasks.chat import as_text, prompt_messages

        trained, job = self.trained, self.job
        clip = lambda text: clip_words(text, job)  # noqa: E731
        if trained.conversation and row.get(trained.conversation) is not None:
            return prompt_messages(row, trained, job, where, clip)
        key = next((c for c in self.columns() if row.get(c) is not None), None)
        if key is not None and isinstance(row[key], list):  # AdvertiseGen-style attribute lists, as in training
            row = {**row, key: as_text(row[key])}
        text = super().read(row, where)
        if trained.format == "text":
            return clip(text)
        return prompt_messages({**row, key: text}, trained, job, where, clip, fallback=key)

    def prompts(self, inputs: list) -> tuple[list[list[int]], list[int]]:
        """Token ids of the prompts `read` made, as training tokenized the same text, and the ids that end an
        answer."""
        from .tasks.chat import text_ids

        if self.renderer is None:
            return text_ids(self.tokenizer, inputs), [self.tokenizer.eos_token_id]
        return self.conversation_prompts(inputs)

    def conversation_prompts(self, conversations: list[list[dict]]) -> tuple[list[list[int]], list[int]]:
        """As `prompts`, for conversations that stop before an assistant turn (`eval --generate` on the eval
        split's rows, rendered as training rendered them up to the answer it learned)."""
        from .tasks.chat import encode_prompts

        if self.renderer is None:
            raise UserError(f"{self.run.run_dir} was trained on raw text (data format 'text'); it continues a text "
                            "and has no conversations to answer.")
        wheres = [f"conversation {i}" for i in range(len(conversations))]
        return encode_prompts(self.renderer, conversations, wheres), self.renderer.stop_token_ids()

    def predict(self, inputs):
        return self.generate(*self.prompts(inputs))

    def generate(self, prompt_ids: list[list[int]], stops: list[int]) -> list[dict]:
        """Continue prompts in one batch: left padding, the KV cache, each row cut at its first stop token."""
        import torch

        tokenizer, options = self.tokenizer, self.options
        # Left: new tokens follow each prompt directly. Per call, not by setting the tokenizer's padding_side: the
        # tokenizer may be the training collator's, which pads on its own side.
        encoded = tokenizer.pad({"input_ids": prompt_ids}, padding=True, padding_side="left", return_tensors="pt")
        settings: dict[str, Any] = {"max_new_tokens": options.max_new_tokens, "do_sample": options.do_sample,
                                    "pad_token_id": tokenizer.pad_token_id, "eos_token_id": stops,
                                    "use_cache": True}
        if options.do_sample:
            from transformers import set_seed

            set_seed(int(self.run.job.base_config.get("seed", 42)))
            settings.update({k: v for k, v in (("temperature", options.temperature), ("top_p", options.top_p))
                             if v is not None})
        else:  # greedy: do not inherit sampling settings from the model's generation_config
            settings.update({"temperature": None, "top_p": None, "top_k": None})
        encoded = encoded.to(self.run.device)
        with torch.inference_mode():
            output = self.run.model.generate(**encoded, **settings)
        results = []
        for row in output[:, encoded["input_ids"].shape[1]:].tolist():
            end = next((i for i, token in enumerate(row) if token in stops), None)
            stopped = end is not None
            if stopped:
                row = row[:end]
            results.append({"generated_text": tokenizer.decode(row, skip_special_tokens=True),
                            "finish_reason": "eos" if stopped else "length"})
        return results


class RewardPredictor(Predictor):
    """Reward models: a score per answer (after its prompt, when the row has one), or which of two answers wins.
    Rows: {text} or {prompt, text}; two answers as {prompt, chosen, rejected} (the training layout) or
    {text, text_pair}. Answers are tokenized as training tokenized its pairs (tasks/preference_data.py)."""

    PAIRS = (("chosen", "rejected"), ("text", "text_pair"))
    ANSWER_KEYS = ("text", "completion", "response", "chosen")

    def read(self, row, where):
        prompt = row.get("prompt")
        keys = next((pair for pair in self.PAIRS if all(row.get(k) is not None for k in pair)), None)
        if keys is None:
            keys = next(((k,) for k in self.ANSWER_KEYS if row.get(k) is not None), None)
        if keys is None:
            raise UserError(f"{where}: no answer to score; expected 'text' (optionally with 'prompt'), or two answers "
                            f"as 'chosen' and 'rejected' or 'text' and 'text_pair'; keys found: "
                            f"{', '.join(k for k in row if row[k] is not None) or 'none'}.")
        for key in (*keys, *(["prompt"] if prompt is not None else [])):
            value = row[key]
            if not isinstance(value, (str, list)) or (isinstance(value, str) and not value.strip()) or value == []:
                raise UserError(f"{where}: '{key}' must be a non-empty string or message list, got {value!r}.")
        return prompt, [(key, row[key]) for key in keys], where

    def predict(self, inputs):
        import torch

        from .tasks.preference_data import Example, SequenceEncoder, as_answer, as_prompt

        job, tokenizer = self.run.job, self.tokenizer
        examples, wheres = [], []
        for prompt, answers, where in inputs:
            if prompt is None:
                examples.append(Example(None, [value for _, value in answers], raw_prompt=""))
            else:
                examples.append(Example(as_prompt(prompt, job), [as_answer(value, key, where)
                                                                  for key, value in answers]))
            wheres.append(where)
        sequences = [ids for pair in SequenceEncoder(tokenizer, job, self.limit).encode(examples, wheres)
                     for ids in pair]
        encoded = tokenizer.pad({"input_ids": sequences}, padding=True, padding_side="right",  # as TRL's collator
                                return_tensors="pt")
        with torch.inference_mode():
            scores = iter(self.run.model(**encoded.to(self.run.device)).logits[:, 0].float().cpu().tolist())
        results = []
        for _, answers, _ in inputs:
            got = {key: next(scores) for key, _ in answers}
            if len(got) == 1:
                results.append({"score": next(iter(got.values()))})
            else:
                (first, a), (second, b) = got.items()
                results.append({"scores": got, "winner": first if a >= b else second, "margin": a - b})
        return results


PREDICTORS: dict[str, type[Predictor]] = {
    "sequenceclassification": SequenceClassificationPredictor,
    "tokenclassification": TokenClassificationPredictor,
    "maskedlm": MaskedLMPredictor,
    "text-generation": TextGenerationPredictor,
    "preference": TextGenerationPredictor,  # a preference-tuned policy generates as an SFT model does
    "rewardmodeling": RewardPredictor,
}


# ---------------------------------------------------------------- the command

def main(args) -> int:
    """`llmfinetune predict ...`: check the arguments, load the run, predict, write JSON lines."""
    if (args.text is None) == (args.input is None):
        raise UserError("predict: give exactly one of --text \"...\" or --input FILE.jsonl "
                        f"(got {'both' if args.text is not None else 'neither'}).")
    if args.text_pair is not None and args.text is None:
        raise UserError("--text-pair goes with --text; in an --input file put both texts in each row.")
    input_path = None
    if args.input is not None:
        input_path = Path(args.input).expanduser()
        if not input_path.is_file():
            raise UserError(f"--input: file '{args.input}' not found (absolute: {input_path.resolve()}).")
        if args.output and Path(args.output).expanduser().resolve() == input_path.resolve():
            raise UserError("--output: is the --input file; write the results to another file.")
    located = locate_run(args.model, args.ft, args.overrides)
    run_dir, job, _ = located
    options = _options(args, job)
    takes_pairs = job.task == "rewardmodeling" or (job.task == "sequenceclassification"
                                                   and len(job.data.input_columns or []) == 2)
    if args.text_pair is not None and not takes_pairs:
        raise UserError(f"--text-pair: {run_dir} was not trained on text pairs ({job.task}, input_columns: "
                        f"{job.data.input_columns}); give --text only.")
    with library_output_to_stderr():  # stdout carries the JSON lines only
        run = load_run(args.model, device=args.device, located=located)
    predictor = PREDICTORS[job.task](run, options)
    if args.text is not None:
        row = {"text": args.text, **({"text_pair": args.text_pair} if args.text_pair is not None else {})}
        inputs = predictor.read(row, "--text")  # checked before --output is created
        with _open_output(args.output) as out:
            _write(out, [{**row, "prediction": predictor.predict([inputs])[0]}])
    else:
        from .evaluate import LabelledPredictions

        labelled = LabelledPredictions.for_run(run)  # a file with labels also gets eval's per-class table
        with _open_output(args.output) as out:
            predict_file(predictor, input_path, out, options.batch_size, labelled)
        if labelled is not None:
            labelled.print_table(input_path)
    if args.output:
        logger.info("Predictions written to %s", args.output)
    return 0


def library_output_to_stderr():
    """Some libraries print to stdout on import (DeepSpeed's accelerator notice, via transformers); commands whose
    stdout is data send that chatter to stderr."""
    import contextlib
    import sys

    return contextlib.redirect_stdout(sys.stderr)


def _options(args, job: "Job") -> Options:
    generation = {"--max-new-tokens": args.max_new_tokens, "--temperature": args.temperature, "--top-p": args.top_p,
                  "--do-sample": args.do_sample or None}
    if not issubclass(PREDICTORS[job.task], TextGenerationPredictor):  # decoding flags: for runs that generate
        given = [name for name, value in generation.items() if value is not None]
        if given:
            raise UserError(f"{', '.join(given)}: only for text-generation runs; this run is {job.task}.")
    if job.task != "maskedlm" and args.top_k is not None:
        raise UserError(f"--top-k: only for maskedlm runs; this run is {job.task}.")
    # model_config.generation.generate_kwargs of the job are the defaults; a flag given here wins.
    from .config import generation_defaults

    defaults = generation_defaults(job)
    do_sample = args.do_sample or defaults.get("do_sample", False)
    if not do_sample and (args.temperature is not None or args.top_p is not None):
        raise UserError("--temperature and --top-p shape sampling; add --do-sample (without it decoding is greedy).")
    batch_size = args.batch_size
    if batch_size is None:
        batch_size = int(job.base_config.get("per_device_eval_batch_size") or 8)
    checks = [("--batch-size", batch_size, batch_size >= 1, "at least 1"),
              ("--top-k", args.top_k, args.top_k is None or args.top_k >= 1, "at least 1"),
              ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens is None or args.max_new_tokens >= 1,
               "at least 1"),
              ("--temperature", args.temperature, args.temperature is None or args.temperature > 0, "above 0"),
              ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1, "in (0, 1]")]
    for name, value, ok, expected in checks:
        if not ok:
            raise UserError(f"{name}: must be {expected}, got {value}.")
    return Options(batch_size=batch_size, top_k=args.top_k or 5,
                   max_new_tokens=args.max_new_tokens or defaults.get("max_new_tokens", 64),
                   temperature=args.temperature if args.temperature is not None else defaults.get("temperature"),
                   top_p=args.top_p if args.top_p is not None else defaults.get("top_p"), do_sample=do_sample)


def predict_file(predictor: Predictor, path: Path, out, batch_size: int, labelled=None) -> int:
    """Predict every row of a JSONL file in batches, writing each batch's result rows as soon as it is done.
    `labelled` (evaluate.LabelledPredictions) collects each row with its prediction."""
    from tqdm.auto import tqdm

    with path.open("rb") as handle:
        total = sum(1 for line in handle if line.strip())
    if total == 0:
        raise UserError(f"--input: {path} has no rows.")
    done = 0
    with tqdm(total=total, unit="row", desc="predict") as progress:
        batch: list[tuple[dict, Any]] = []
        for number, row in read_jsonl(path):
            batch.append((row, predictor.read(row, f"{path}:{number}")))
            if len(batch) == batch_size:
                done += _flush(predictor, batch, out, progress, labelled)
        if batch:
            done += _flush(predictor, batch, out, progress, labelled)
    return done


def _flush(predictor: Predictor, batch: list[tuple[dict, Any]], out, progress, labelled=None) -> int:
    predictions = predictor.predict([inputs for _, inputs in batch])
    if labelled is not None:
        for (row, _), prediction in zip(batch, predictions):
            labelled.add(row, prediction)
    _write(out, [{**row, "prediction": prediction} for (row, _), prediction in zip(batch, predictions)])
    progress.update(len(batch))
    count = len(batch)
    batch.clear()
    return count


def _write(out, rows: list[dict]) -> None:
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
    out.flush()


class _open_output:
    """--output FILE (created with its folder), else stdout, which is not closed."""

    def __init__(self, path: Optional[str]):
        self.path = Path(path).expanduser() if path else None

    def __enter__(self):
        import sys

        if self.path is None:
            self.handle = sys.stdout
            return self.handle
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = self.path.open("w", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"--output: cannot write {self.path} ({exc.strerror}).") from None
        return self.handle

    def __exit__(self, *exc):
        if self.path is not None:
            self.handle.close()
