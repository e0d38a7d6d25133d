"""SFT data: the accepted data formats, turned into conversations, and conversations into tokens with the loss on
assistant turns only.

Every format becomes a list of messages ({"role": system|user|assistant, "content": str}); one renderer turns
messages into text with a chat template (the tokenizer's own, or one named in the job file), so training, `eval` and
`predict` build prompts the same way. Raw text (continued pre-training) skips templates: every token is learned.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from ..data import response_from_validation_column
from ..errors import UserError

if TYPE_CHECKING:
    from datasets import DatasetDict

    from ..config import Job

logger = logging.getLogger(__name__)

IGNORE = -100
# The run directory's record of how its SFT data was read and rendered (TrainedFormat); `eval` and `predict` read it.
FORMAT_FILE = "sft_format.json"
ROLES = ("system", "user", "assistant")

# Templates a job file can name (data_config.template). The tokenizer's own template is "tokenizer".
# Every template writes its turn terminator as text, so the model learns to stop from the rendered tokens.
TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token or '' }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + m['content'] + (eos_token or '') + '\n\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    # The prompt, a newline, the response and EOS: for base models and data written as plain continuations.
    "plain": (
        "{{ bos_token or '' }}{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}{{ m['content'] + (eos_token or '') }}"
        "{% else %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}"
    ),
}

# Columns each format is recognised by, in the order they are tried; shown when none matches.
FORMATS = {
    "messages": "a 'messages' column of {role, content} lists (OpenAI chat)",
    "sharegpt": "a 'conversations' column of {from, value} lists (ShareGPT)",
    "alpaca": "'instruction' and 'output' columns (optional 'input', 'system', 'history')",
    "prompt_response": "a prompt column (prompt, question, content or input_columns) and a response column "
                       "(response, output, answer, summary, completion or response_column)",
    "text": "a 'text' column (or input_columns) of raw text for continued pre-training; every token is learned",
}
PROMPT_COLUMNS = ["prompt", "question", "content", "instruction"]
RESPONSE_COLUMNS = ["response", "output", "answer", "summary", "completion"]
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "model": "assistant", "bot": "assistant"}


def as_text(value) -> str:
    # AdvertiseGen-style data keeps attributes as lists; join them instead of printing a Python list.
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------- formats -> conversations

def detect_format(job: "Job", columns: list[str], split_names: Iterable[str] = ()) -> str:
    chosen = job.data.format
    if chosen != "auto":
        return chosen
    if job.data.response_column:
        return "prompt_response"
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    seed_response = response_from_validation_column(job, split_names)
    has_prompt = job.data.input_columns or any(c in columns for c in PROMPT_COLUMNS)
    has_response = seed_response in columns if seed_response else any(c in columns for c in RESPONSE_COLUMNS)
    if has_prompt and has_response:
        return "prompt_response"
    if "text" in columns or (job.data.input_columns and not has_response):
        return "text"
    accepted = "\n".join(f"  - {name}: {needs}" for name, needs in FORMATS.items())
    missing = seed_response if seed_response and not has_response else None
    raise UserError(
        f"ft_config.data_config.format: cannot tell the data format from the columns found ({', '.join(columns)}). "
        + (f"ft_config.data_config.validation_column names the response column '{missing}', which is not among "
           "them (nor is it a split). " if missing else "") +
        f"Accepted formats:\n{accepted}\nRename the columns, set input_columns/response_column, or set "
        "data_config.format."
    )


@dataclass(frozen=True)
class TrainedFormat:
    """How a run reads its SFT data: the format, which columns hold what, and the chat template that rendered it.
    `decide_format` makes it at train time; the run directory keeps it (FORMAT_FILE) so that `eval` and `predict`
    build their inputs the way training did, whatever the job file says later."""

    format: str
    prompt: Optional[str] = None
    response: Optional[str] = None
    conversation: Optional[str] = None
    template: Optional[str] = None  # None for raw text; else tokenizer | plain | chatml | alpaca
    system_prompt: Optional[str] = None

    def required(self) -> list[str]:
        return [c for c in (self.prompt, self.response, self.conversation) if c]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any, path: Path) -> "TrainedFormat":
        names = {f.name for f in fields(cls)}
        if not isinstance(value, dict) or value.get("format") not in FORMATS or not set(value) <= names:
            raise UserError(f"{path}: expected {{\"format\": one of {', '.join(FORMATS)}, \"template\": ..., "
                            f"...}} as written by `llmfinetune run-ft`; got {str(value)[:200]}.")
        return cls(**value)

    def apply(self, job: "Job") -> "Job":
        """A copy of the job whose data settings name this format explicitly, so detection cannot differ."""
        job = job.model_copy(deep=True)
        data = job.ft_config.data_config
        data.format = self.format
        data.template = self.template
        data.system_prompt = self.system_prompt
        if self.format in ("messages", "sharegpt"):
            data.messages_column = self.conversation
        else:
            data.input_columns = [self.prompt]
            data.response_column = self.response
        return job


def format_columns(job: "Job", columns: list[str], split_names: Iterable[str] = ()) -> TrainedFormat:
    fmt = detect_format(job, columns, split_names)
    data = job.data
    if fmt == "messages":
        return TrainedFormat(fmt, conversation=data.messages_column or "messages")
    if fmt == "sharegpt":
        return TrainedFormat(fmt, conversation=data.messages_column or "conversations")
    if fmt == "alpaca":
        return TrainedFormat(fmt, prompt=(data.input_columns or ["instruction"])[0],
                             response=data.response_column or "output")
    if fmt == "text":
        return TrainedFormat(fmt, prompt=(data.input_columns or ["text"])[0])
    prompt = data.input_columns[0] if data.input_columns else next((c for c in PROMPT_COLUMNS if c in columns), None)
    # The seed's files named the response column in validation_column; response_column is the clear spelling.
    response = data.response_column or response_from_validation_column(job, split_names) or next(
        (c for c in RESPONSE_COLUMNS if c in columns), None)
    if prompt is None:
        raise UserError("ft_config.data_config.input_columns: not set and no usual prompt column "
                        f"({', '.join(PROMPT_COLUMNS)}) found; columns found: {', '.join(columns)}.")
    if response is None:
        raise UserError("ft_config.data_config.response_column: not set and no usual response column "
                        f"({', '.join(RESPONSE_COLUMNS)}) found; columns found: {', '.join(columns)}.")
    return TrainedFormat(fmt, prompt=prompt, response=response)


def decide_format(job: "Job", tokenizer, splits: "DatasetDict") -> TrainedFormat:
    """The one decision of how SFT data is read and rendered: format, columns, template and system prompt."""
    found = format_columns(job, splits["train"].column_names, list(splits))
    if found.conversation and job.data.input_columns:
        raise UserError(f"ft_config.data_config.input_columns: not read by the {found.format} format (the "
                        f"'{found.conversation}' column holds the prompts); remove input_columns, or set "
                        "data_config.format to the format the columns are meant for.")
    template = None if found.format == "text" else template_name(tokenizer, job)
    return replace(found, template=template, system_prompt=None if found.format == "text" else job.data.system_prompt)


def record_trained_format(run_dir: Path, trained: TrainedFormat, resuming: bool, write: bool) -> None:
    """Record the trained format in the run directory (`write`: the process that writes the run directory). A
    resumed run must read its data as it was first read, or its checkpoints would go on training on differently
    rendered examples; every process checks that, so none trains on while another stops."""
    path = run_dir / FORMAT_FILE
    if resuming and path.is_file():
        before = read_format_file(path)
        if before != trained:
            raise UserError(f"{path}: this run directory was trained on {_describe(before)}, but the job now reads "
                            f"the data as {_describe(trained)}. Resume with the data settings it was trained with "
                            "(ft_config.data_config format, template, system_prompt, columns), or train into a new "
                            "output_dir.")
    if write:
        # Whole or not at all: on a resumed run the other processes read the file while this one writes it.
        scratch = path.with_name(f".{FORMAT_FILE}.{os.getpid()}")
        scratch.write_text(json.dumps(trained.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(scratch, path)


def read_format_file(path: Path) -> TrainedFormat:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc}).") from None
    return TrainedFormat.from_json(value, path)


def trained_format(run_dir: Path, job: "Job", tokenizer) -> TrainedFormat:
    """What a run directory was trained on: its FORMAT_FILE, or, for runs made before that file existed, the
    decision training would make on the job's data now (with a warning)."""
    path = run_dir / FORMAT_FILE
    if path.is_file():
        return read_format_file(path)
    if job.source is not None and (job.source.parent / FORMAT_FILE).is_file():  # a checkpoint read with --ft
        return read_format_file(job.source.parent / FORMAT_FILE)
    from ..data import load_raw_splits

    logger.warning("%s has no %s (made before it existed); deciding the data format from the train data named in "
                   "the job file.", run_dir, FORMAT_FILE)
    try:
        return decide_format(job, tokenizer, load_raw_splits(job))
    except UserError as exc:
        raise UserError(f"--model: {run_dir} has no {FORMAT_FILE} and the data format cannot be decided from the "
                        f"job's data ({exc}). Pass --ft=the job file you trained with, or override the data path, "
                        "e.g. ft_config.data_config.local_path=FOLDER.") from None


def _describe(trained: TrainedFormat) -> str:
    return ", ".join(f"{k} {v!r}" for k, v in trained.to_json().items() if v is not None)


def to_messages(row: dict[str, Any], columns: TrainedFormat, job: "Job", where: str,
                clip: Callable[[str], str] = lambda text: text) -> list[dict[str, str]]:
    """One data row as a conversation. `where` names the split and row for error messages. `clip`
    (model_config.max_input_words) applies to every user turn, in every format: those are the model's input; the
    assistant turns are what it learns to say and are never cut short."""
    system = job.data.system_prompt
    if columns.format in ("messages", "sharegpt"):
        messages = _conversation(row.get(columns.conversation), columns, where)
    elif columns.format == "alpaca":
        prompt = row_text(row, columns.prompt, where)
        extra = row.get("input")
        if extra is not None and str(extra).strip():
            prompt = f"{prompt}\n{as_text(extra)}"
        messages = []
        for turn in row.get("history") or []:
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
                raise UserError(f"{where}: column 'history' must be a list of [instruction, response] pairs.")
            messages += [{"role": "user", "content": as_text(turn[0])},
                         {"role": "assistant", "content": as_text(turn[1])}]
        messages += [{"role": "user", "content": prompt},
                     {"role": "assistant", "content": row_text(row, columns.response, where)}]
        system = row.get("system") or system
    else:
        messages = [{"role": "user", "content": row_text(row, columns.prompt, where)},
                    {"role": "assistant", "content": row_text(row, columns.response, where)}]
        system = row.get("system") if isinstance(row.get("system"), str) and row.get("system") else system
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return [{**m, "content": clip(m["content"])} if m["role"] == "user" else m for m in messages]


PLACEHOLDER = "\u2026"  # stands for the answer an input row does not have; removed before rendering


def prompt_messages(row: dict[str, Any], trained: TrainedFormat, job: "Job", where: str,
                    clip: Callable[[str], str] = lambda text: text,
                    fallback: Optional[str] = None) -> list[dict[str, str]]:
    """A prediction input as the conversation the model continues: built from the row exactly as training built
    it (to_messages), without the last assistant turn, which a training row has and an input row need not have.
    `fallback`: the key holding the prompt when the row lacks the trained prompt column (e.g. --text)."""
    row = dict(row)
    if trained.format in ("messages", "sharegpt"):
        turns = row.get(trained.conversation)
        if fallback is not None and turns is None:
            turns = [{"role": "user", "content": row[fallback]}]
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and \
                _role(turns[-1]) != "assistant":
            turns = [*turns, {"role": "assistant", "content": PLACEHOLDER}]
        row[trained.conversation] = turns
    else:
        if fallback is not None and row.get(trained.prompt) is None:
            row[trained.prompt] = row[fallback]
        if row.get(trained.response) is None or not str(row.get(trained.response)).strip():
            row[trained.response] = PLACEHOLDER
    messages = to_messages(row, trained, job, where, clip)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def _role(turn: dict) -> Optional[str]:
    return turn.get("role") if "role" in turn else SHAREGPT_ROLES.get(str(turn.get("from")).lower())


def row_text(row: dict[str, Any], column: str, where: str) -> str:
    """A row's text in `column`; an empty or null one is an error naming the row."""
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()) or value == []:
        raise UserError(f"{where}: column '{column}' is empty or null; remove the row or fill it in.")
    return as_text(value)


def _conversation(turns, columns: TrainedFormat, where: str) -> list[dict[str, str]]:
    column = columns.conversation
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: column '{column}' must be a non-empty list of turns, got {type(turns).__name__}.")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: {column}[{index}] must be an object, got {type(turn).__name__}.")
        if "role" in turn:
            role, content = turn.get("role"), turn.get("content")
        else:
            role, content = SHAREGPT_ROLES.get(str(turn.get("from")).lower(), turn.get("from")), turn.get("value")
        if role not in ROLES:
            raise UserError(f"{where}: {column}[{index}] has role {role!r}; accepted roles: system, user, assistant "
                            f"(ShareGPT: {', '.join(sorted(SHAREGPT_ROLES))}).")
        if content is None:
            raise UserError(f"{where}: {column}[{index}] has no content.")
        messages.append({"role": role, "content": as_text(content)})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: column '{column}' has no assistant turn, so there is nothing to learn.")
    first = next(m["role"] for m in messages if m["role"] != "system")
    if first != "user":
        raise UserError(f"{where}: the conversation in '{column}' must start with a user turn (after any system "
                        f"turn), found {first}.")
    return messages


# ---------------------------------------------------------------- conversations -> tokens

def template_name(tokenizer, job: "Job") -> str:
    """The chat template a job renders conversations with: data_config.template, else the tokenizer's own when it
    has one, else plain."""
    name = job.data.template
    if name is None:
        name = "tokenizer" if getattr(tokenizer, "chat_template", None) else "plain"
    if name == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"ft_config.data_config.template: 'tokenizer', but the tokenizer of "
                            f"{job.model.model_id} has no chat template; name one of: {', '.join(TEMPLATES)}.")
    elif name not in TEMPLATES:
        raise UserError(f"ft_config.data_config.template: unknown template '{name}'; choose tokenizer, "
                        f"{', '.join(TEMPLATES)}.")
    return name


class Renderer:
    """Renders conversations with one chat template and tokenizes them, marking the assistant tokens."""

    def __init__(self, tokenizer, job: "Job"):
        self.tokenizer = tokenizer
        self.name = template_name(tokenizer, job)
        self.template = None if self.name == "tokenizer" else TEMPLATES[self.name]

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """The text a model continues at prediction time: the conversation so far and the assistant's opening."""
        return self.render(messages, add_generation_prompt=True)

    def pieces(self, messages: list[dict[str, str]], where: str,
               generation: bool = False) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is_assistant) pieces, by rendering it one turn at a time.
        `generation`: the conversation is a prompt; it ends with the assistant's opening, as the piece before an
        answer does in training."""
        pieces, done = [], ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = self.render(messages[:index], add_generation_prompt=True)
            full = self.render(messages[:index + 1])
            if not (head.startswith(done) and full.startswith(head)):
                raise UserError(f"{where}: template '{self.name}' does not render the conversation one turn at a "
                                "time (an earlier turn changes when a later one is added), so the assistant turns "
                                "cannot be found; set data_config.template to chatml, alpaca or plain.")
            answer = full[len(head):]
            # Whitespace after the turn's terminator belongs to the next prompt, not to what the model must say.
            kept = answer.rstrip()
            pieces += [(head[len(done):], False), (kept, True)]
            done = head + kept
        if generation:
            head = self.render(messages, add_generation_prompt=True)
            if not head.startswith(done):
                raise UserError(f"{where}: template '{self.name}' does not render the conversation one turn at a "
                                "time; set data_config.template to chatml, alpaca or plain.")
            pieces.append((head[len(done):], False))
        else:
            rest = self.render(messages)[len(done):]
            if rest.strip():  # a conversation ends with its last assistant turn, not with the template's newline
                pieces.append((rest, False))
        return [(text, learn) for text, learn in pieces if text]

    def stop_token_ids(self) -> list[int]:
        """EOS, plus the template's end-of-turn token (e.g. <|im_end|>) when it is a special token."""
        stops = [self.tokenizer.eos_token_id]
        sample = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        tail = self.render(sample)[len(self.prompt(sample[:1])) + 1:]
        ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        special = set(self.tokenizer.all_special_ids)
        if ids and ids[0] in special and ids[0] not in stops:
            stops.append(ids[0])
        return [s for s in stops if s is not None]


def encode_conversations(renderer: Renderer, conversations: list[list[dict[str, str]]], wheres: list[str],
                         limit: int, train_on_prompt: bool) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per conversation; labels are -100 outside assistant turns unless train_on_prompt.
    The pieces of a whole batch go to the tokenizer in one call: the fast tokenizer then works in parallel."""
    tokenizer = renderer.tokenizer
    eos = tokenizer.eos_token_id
    cut = [renderer.pieces(messages, where) for messages, where in zip(conversations, wheres)]
    flat = [text for pieces in cut for text, _ in pieces]
    encoded = iter(tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
    out = []
    for pieces in cut:
        segments = [(next(encoded), learn) for _, learn in pieces]
        # The model must learn to stop: the last assistant turn ends with EOS, even when EOS is also the pad token.
        last = max(i for i, (_, learn) in enumerate(segments) if learn)
        if eos is not None and (not segments[last][0] or segments[last][0][-1] != eos):
            segments[last] = (segments[last][0] + [eos], True)
        segments = _fit(segments, limit)
        ids, labels = [], []
        for tokens, learn in segments:
            ids += tokens
            labels += tokens if (learn or train_on_prompt) else [IGNORE] * len(tokens)
        out.append((ids, labels))
    return out


def _fit(segments: list[tuple[list[int], bool]], limit: int) -> list[tuple[list[int], bool]]:
    """Cut a conversation to `limit` tokens. A single exchange keeps at least half the window for the answer (it is
    what the loss learns from) and cuts the prompt's end; longer conversations lose their last turns."""
    total = sum(len(tokens) for tokens, _ in segments)
    if total <= limit:
        return segments
    learned = [i for i, (_, learn) in enumerate(segments) if learn]
    if len(learned) == 1:
        answer_at = learned[0]
        before = [t for tokens, _ in segments[:answer_at] for t in tokens]
        answer = segments[answer_at][0]
        after = [t for tokens, _ in segments[answer_at + 1:] for t in tokens]
        answer = answer[:max(limit - len(before), limit // 2)]
        before = before[:limit - len(answer)]
        return [(before, False), (answer, True), (after[:max(0, limit - len(before) - len(answer))], False)]
    kept, room = [], limit
    for tokens, learn in segments:
        kept.append((tokens[:room], learn))
        room -= len(kept[-1][0])
        if room <= 0:
            break
    return kept


def encode_prompts(renderer: Renderer, conversations: list[list[dict[str, str]]],
                   wheres: list[str]) -> list[list[int]]:
    """Token ids of prompts for generation, tokenized piece by piece as encode_conversations tokenizes training
    examples: the ids a model is prompted with are those it saw before an answer in training."""
    cut = [renderer.pieces(messages, where, generation=True) for messages, where in zip(conversations, wheres)]
    flat = [text for pieces in cut for text, _ in pieces]
    encoded = iter(renderer.tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
    return [[token for _ in pieces for token in next(encoded)] for pieces in cut]


def encode_texts(tokenizer, texts: list[str], limit: int) -> list[tuple[list[int], list[int]]]:
    """Raw text: every token is learned; a text longer than the window becomes several windows instead of being
    cut, so no data is lost."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in text_ids(tokenizer, texts):
        if eos is not None:
            ids = ids + [eos]
        for start in range(0, len(ids), limit):
            window = ids[start:start + limit]
            if len(window) > 1:
                out.append((window, list(window)))
    return out


def text_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Raw text as training reads it (with the tokenizer's own special tokens) up to, not including, its end: a
    trailing EOS, which training learns as the text's end, is not part of a prompt."""
    eos = tokenizer.eos_token_id
    return [ids[:-1] if eos is not None and ids and ids[-1] == eos else ids for ids in tokenizer(texts)["input_ids"]]
