"""Preference data: the accepted layouts, told apart by their columns, and their tokenization.

Layouts (values may be strings or conversations, i.e. lists of {role, content} messages):
- paired: `chosen` and `rejected`, with a `prompt` (explicit) or without one (implicit: the shared beginning of the
  two is the prompt; for conversations the shared messages, for strings the shared words);
- unpaired (KTO): `prompt`, `completion` and a true/false `label` (desirable or not).
Paired data given to KTO becomes unpaired: each pair gives its chosen answer labelled true and its rejected one false.

Prompts and answers are rendered with the SFT renderer (chat.Renderer: the tokenizer's chat template or the one the
job names, `system_prompt` too), so a policy trained after SFT sees the prompts it was tuned on, and `predict` builds
them the same way. A string prompt is a user turn and a string answer the assistant's, as SFT's prompt_response.
Only implicit-prompt strings are taken as raw text (no template: the text already holds whatever format it has).
The rendered text holds the template's BOS, so tokens are made without adding special tokens: never a second BOS.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

from ..errors import UserError
from . import chat
from .chat import ROLES, as_text

if TYPE_CHECKING:
    from ..config import Job

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]
LAYOUTS = {
    "paired": "'chosen' and 'rejected' columns (strings or message lists), with an optional 'prompt' column "
              "(without it the shared beginning of chosen and rejected is the prompt)",
    "unpaired": "'prompt', 'completion' and 'label' (true: desirable, false: undesirable) columns, for KTO",
}


def detect_layout(columns: list[str], split_name: str) -> str:
    if "chosen" in columns and "rejected" in columns:
        return "paired"
    if "completion" in columns and "label" in columns and "prompt" in columns:
        return "unpaired"
    accepted = "\n".join(f"  - {name}: {needs}" for name, needs in LAYOUTS.items())
    raise UserError(f"ft_config.data_config: split '{split_name}' is not preference data; columns found: "
                    f"{', '.join(columns)}. Accepted layouts:\n{accepted}")


def renderer(tokenizer, job: "Job"):
    """The SFT renderer for this job's template (data_config.template, else the tokenizer's own, else plain)."""
    return chat.Renderer(tokenizer, job)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value)


def _side(row: dict, column: str, where: str) -> Union[str, Messages]:
    value = row.get(column)
    if _missing(value):
        raise UserError(f"{where}: column '{column}' is empty or null; remove the row or fill it in.")
    if isinstance(value, list):
        return _messages(value, column, where)
    if isinstance(value, dict):
        raise UserError(f"{where}: column '{column}' must be a string or a list of {{role, content}} messages, got "
                        f"one object {value!r}.")
    return as_text(value)


def _messages(turns: list, column: str, where: str) -> Messages:
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or turn.get("content") is None:
            raise UserError(f"{where}: {column}[{index}] must be {{role: system|user|assistant, content: text}}, "
                            f"got {turn!r}.")
        messages.append({"role": turn["role"], "content": as_text(turn["content"])})
    return messages


@dataclass
class Example:
    """One prompt with its answers. `prompt` is None for raw text (implicit-prompt strings)."""

    prompt: Optional[Messages]
    answers: list[Union[str, Messages]]
    raw_prompt: Optional[str] = None


def as_answer(value: Union[str, Messages], column: str, where: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if len(value) != 1 or value[0]["role"] != "assistant":
        raise UserError(f"{where}: column '{column}' must be one assistant message (or a string) when the prompt is "
                        f"given; got roles {[m['role'] for m in value]}.")
    return value


def as_prompt(value: Union[str, Messages], job: "Job") -> Messages:
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else list(value)
    system = job.data.system_prompt
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def paired_example(row: dict, job: "Job", where: str) -> Example:
    chosen, rejected = _side(row, "chosen", where), _side(row, "rejected", where)
    if chosen == rejected:
        raise UserError(f"{where}: 'chosen' and 'rejected' are identical, so there is no preference to learn; "
                        "remove the row or fix one side.")
    if row.get("prompt") is not None:
        prompt = _side(row, "prompt", where)
        return Example(as_prompt(prompt, job), [as_answer(chosen, "chosen", where),
                                                 as_answer(rejected, "rejected", where)])
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise UserError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists.")
    if isinstance(chosen, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0 or chosen[shared:] == [] or rejected[shared:] == []:
            raise UserError(f"{where}: without a 'prompt' column, chosen and rejected must start with the same "
                            "messages (the prompt) and then differ in the answer; these share "
                            f"{shared} message(s).")
        return Example(as_prompt(chosen[:shared], job), [as_answer(chosen[shared:], "chosen", where),
                                                          as_answer(rejected[shared:], "rejected", where)])
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # Cut at a word boundary, so the prompt does not end inside a word one answer continues.
    while shared > 0 and not chosen[shared - 1].isspace():
        shared -= 1
    if shared == 0:
        raise UserError(f"{where}: without a 'prompt' column, chosen and rejected must begin with the same words (the "
                        "prompt); these share none. Add a 'prompt' column.")
    return Example(None, [chosen[shared:], rejected[shared:]], raw_prompt=chosen[:shared])


def unpaired_example(row: dict, job: "Job", where: str) -> tuple[Example, bool]:
    label = row.get("label")
    if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
        label = bool(label)
    if not isinstance(label, bool):
        raise UserError(f"{where}: column 'label' must be true (desirable) or false (undesirable), got {label!r}.")
    prompt, completion = _side(row, "prompt", where), _side(row, "completion", where)
    return Example(as_prompt(prompt, job), [as_answer(completion, "completion", where)]), label


class PreferenceEncoder:
    """Examples -> (prompt_ids, [answer_ids, ...]), each answer ending with EOS and cut to max_length with its prompt."""

    def __init__(self, tokenizer, job: "Job", limit: int):
        self.tokenizer = tokenizer
        self.renderer = renderer(tokenizer, job)
        self.limit = limit
        self.cut = 0  # answers shortened to fit max_length, reported once per split

    def texts(self, example: Example, where: str) -> tuple[str, list[str], bool]:
        """The prompt's text, each answer's text, and whether the tokenizer must add its special tokens (raw text)."""
        if example.prompt is None:
            return example.raw_prompt, list(example.answers), True
        prompt_text, answers = None, []
        for answer in example.answers:
            pieces = self.renderer.pieces(example.prompt + answer, where)
            last = max(i for i, (_, learn) in enumerate(pieces) if learn)
            head = "".join(text for text, _ in pieces[:last])
            if prompt_text is None:
                prompt_text = head
            elif head != prompt_text:
                raise UserError(f"{where}: template '{self.renderer.name}' renders the prompt differently before "
                                "chosen and rejected; set data_config.template to chatml, alpaca or plain.")
            answers.append(pieces[last][0])
        return prompt_text, answers, False

    def encode(self, examples: list[Example], wheres: list[str]) -> list[tuple[list[int], list[list[int]]]]:
        tokenizer, eos = self.tokenizer, self.tokenizer.eos_token_id
        rendered = [self.texts(example, where) for example, where in zip(examples, wheres)]
        out = []
        for (prompt, answers, special), where in zip(rendered, wheres):
            prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
            if len(prompt_ids) >= self.limit:
                raise UserError(f"{where}: the prompt alone is {len(prompt_ids)} tokens and max_length is "
                                f"{self.limit}, so no answer token would be learned; raise "
                                "ft_config.train_config.base_config.max_length, shorten the prompt or remove the row.")
            encoded = []
            for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]:
                if eos is not None and (not ids or ids[-1] != eos):
                    ids = ids + [eos]
                room = self.limit - len(prompt_ids)
                if len(ids) > room:
                    self.cut += 1
                    ids = ids[:room]
                encoded.append(ids)
            out.append((prompt_ids, encoded))
        return out


class SequenceEncoder:
    """Reward models: each answer with its prompt as one sequence the score head reads. Decoders (a tokenizer with
    EOS) get the rendered conversation ending in EOS, whose hidden state the score reads; encoders without EOS (BERT,
    MiniLM) get their own special tokens ([CLS] prompt [SEP] answer [SEP])."""

    def __init__(self, tokenizer, job: "Job", limit: int):
        self.tokenizer = tokenizer
        self.limit = limit
        self.decoder = tokenizer.eos_token_id is not None
        self.policy = PreferenceEncoder(tokenizer, job, limit) if self.decoder else None
        self.cut = 0

    def encode(self, examples: list[Example], wheres: list[str]) -> list[list[list[int]]]:
        if self.decoder:
            out = []
            for prompt_ids, answers in self.policy.encode(examples, wheres):
                out.append([prompt_ids + ids for ids in answers])
            self.cut = self.policy.cut
            return out
        out = []
        for example, where in zip(examples, wheres):
            prompt = example.raw_prompt if example.prompt is None else _plain(example.prompt)
            sequences = []
            for answer in example.answers:
                text = answer if isinstance(answer, str) else _plain(answer)
                ids = self.tokenizer(prompt, text, truncation="only_second", max_length=self.limit)["input_ids"] \
                    if prompt.strip() else self.tokenizer(text, truncation=True, max_length=self.limit)["input_ids"]
                sequences.append(ids)
            out.append(sequences)
        return out


def _plain(messages: Messages) -> str:
    """A conversation for an encoder without a chat template: its turns' contents, one per line."""
    return "\n".join(m["content"] for m in messages)


def log_cut(count: int, split_name: str, limit: int) -> None:
    if count:
        logger.warning("split '%s': %d answer(s) cut to fit max_length %d with their prompt.", split_name, count,
                       limit)
