"""SFT data: the accepted data formats, turned into conversations, and conversations into tokens with the loss on
assistant turns only.

Every format becomes a list of messages ({"role": system|user|assistant, "content": str}); one renderer turns
messages into text with a chat template (the tokenizer's own, or one named in the job file), so training, `eval` and
`predict` build prompts the same way. Raw text (continued pre-training) skips templates: every token is learned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..errors import UserError

if TYPE_CHECKING:
    from ..config import Job

IGNORE = -100
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

def detect_format(job: "Job", columns: list[str]) -> str:
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
    has_prompt = job.data.input_columns or any(c in columns for c in PROMPT_COLUMNS)
    has_response = job.data.validation_column in columns if job.data.validation_column else \
        any(c in columns for c in RESPONSE_COLUMNS)
    if has_prompt and has_response:
        return "prompt_response"
    if "text" in columns or (job.data.input_columns and not has_response):
        return "text"
    accepted = "\n".join(f"  - {name}: {needs}" for name, needs in FORMATS.items())
    missing = job.data.validation_column if job.data.validation_column and not has_response else None
    raise UserError(
        f"ft_config.data_config.format: cannot tell the data format from the columns found ({', '.join(columns)}). "
        + (f"ft_config.data_config.validation_column names the response column '{missing}', which is not among "
           "them. " if missing else "") +
        f"Accepted formats:\n{accepted}\nRename the columns, set input_columns/response_column, or set "
        "data_config.format."
    )


@dataclass
class Columns:
    """Which columns of a split hold what, for the chosen format."""

    format: str
    prompt: Optional[str] = None
    response: Optional[str] = None
    conversation: Optional[str] = None

    def required(self) -> list[str]:
        return [c for c in (self.prompt, self.response, self.conversation) if c]


def format_columns(job: "Job", columns: list[str]) -> Columns:
    fmt = detect_format(job, columns)
    data = job.data
    if fmt == "messages":
        return Columns(fmt, conversation=data.messages_column or "messages")
    if fmt == "sharegpt":
        return Columns(fmt, conversation=data.messages_column or "conversations")
    if fmt == "alpaca":
        return Columns(fmt, prompt=(data.input_columns or ["instruction"])[0], response=data.response_column or "output")
    if fmt == "text":
        return Columns(fmt, prompt=(data.input_columns or ["text"])[0])
    prompt = data.input_columns[0] if data.input_columns else next((c for c in PROMPT_COLUMNS if c in columns), None)
    # The seed's files named the response column in validation_column; response_column is the clear spelling.
    response = data.response_column or data.validation_column or next(
        (c for c in RESPONSE_COLUMNS if c in columns), None)
    if prompt is None:
        raise UserError("ft_config.data_config.input_columns: not set and no usual prompt column "
                        f"({', '.join(PROMPT_COLUMNS)}) found; columns found: {', '.join(columns)}.")
    if response is None:
        raise UserError("ft_config.data_config.response_column: not set and no usual response column "
                        f"({', '.join(RESPONSE_COLUMNS)}) found; columns found: {', '.join(columns)}.")
    return Columns(fmt, prompt=prompt, response=response)


def to_messages(row: dict[str, Any], columns: Columns, job: "Job", where: str,
                clip: Callable[[str], str] = lambda text: text) -> list[dict[str, str]]:
    """One data row as a conversation. `where` names the split and row for error messages."""
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
        messages += [{"role": "user", "content": clip(prompt)},
                     {"role": "assistant", "content": row_text(row, columns.response, where)}]
        system = row.get("system") or system
    else:
        messages = [{"role": "user", "content": clip(row_text(row, columns.prompt, where))},
                    {"role": "assistant", "content": row_text(row, columns.response, where)}]
        system = row.get("system") if isinstance(row.get("system"), str) and row.get("system") else system
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def row_text(row: dict[str, Any], column: str, where: str) -> str:
    """A row's text in `column`; an empty or null one is an error naming the row."""
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()) or value == []:
        raise UserError(f"{where}: column '{column}' is empty or null; remove the row or fill it in.")
    return as_text(value)


def _conversation(turns, columns: Columns, where: str) -> list[dict[str, str]]:
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

class Renderer:
    """Renders conversations with one chat template and tokenizes them, marking the assistant tokens."""

    def __init__(self, tokenizer, job: "Job"):
        self.tokenizer = tokenizer
        name = job.data.template
        if name is None:
            name = "tokenizer" if getattr(tokenizer, "chat_template", None) else "plain"
        if name == "tokenizer":
            if not getattr(tokenizer, "chat_template", None):
                raise UserError(f"ft_config.data_config.template: 'tokenizer', but the tokenizer of "
                                f"{job.model.model_id} has no chat template; name one of: "
                                f"{', '.join(TEMPLATES)}.")
            self.template = None
        elif name in TEMPLATES:
            self.template = TEMPLATES[name]
        else:
            raise UserError(f"ft_config.data_config.template: unknown template '{name}'; choose tokenizer, "
                            f"{', '.join(TEMPLATES)}.")
        self.name = name

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """The text a model continues at prediction time: the conversation so far and the assistant's opening."""
        return self.render(messages, add_generation_prompt=True)

    def pieces(self, messages: list[dict[str, str]], where: str) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is_assistant) pieces, by rendering it one turn at a time."""
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


def encode_texts(tokenizer, texts: list[str], limit: int) -> list[tuple[list[int], list[int]]]:
    """Raw text: every token is learned; a text longer than the window becomes several windows instead of being
    cut, so no data is lost."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(texts)["input_ids"]:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        for start in range(0, len(ids), limit):
            window = ids[start:start + limit]
            if len(window) > 1:
                out.append((window, list(window)))
    return out
