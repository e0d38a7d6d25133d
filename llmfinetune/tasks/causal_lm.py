"""Causal-LM SFT: prompt and response columns; loss on the response only, EOS appended and learned."""
from __future__ import annotations

from ..data import require_columns
from ..errors import UserError
from .base import Prepared, Task, check_texts, clip_words, max_length, text_columns

IGNORE = -100


def prompt_response_columns(job, columns: list[str]) -> tuple[str, str]:
    prompt = text_columns(job, ["prompt", "instruction", "question", "content"], columns)[0]
    # The seed's files named the response column in validation_column; response_column is the clear spelling.
    response = job.data.response_column or job.data.validation_column
    if response is None:
        response = next((c for c in ("response", "output", "answer", "summary", "completion") if c in columns), None)
    if response is None:
        raise UserError("ft_config.data_config.response_column: not set and no usual response column "
                        f"(response, output, answer, summary, completion) found; columns found: {', '.join(columns)}.")
    return prompt, response


def as_text(value) -> str:
    # AdvertiseGen-style data keeps attributes as lists; join them instead of printing a Python list.
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value)


class CausalLM(Task):
    name = "text-generation"
    model_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    loss_only_eval = True
    reports_perplexity = True
    loss_sums_over_items = True

    def prepare(self, splits, eval_split, tokenizer, job):
        if tokenizer.eos_token_id is None:
            raise UserError(f"text-generation: the tokenizer of {job.model.model_id} has no EOS token, so the model "
                            "could never learn to stop; set model_config.add_special_tokens.eos_token.")
        train = splits["train"]
        prompt_column, response_column = prompt_response_columns(job, train.column_names)
        used = {"train": train, eval_split: splits[eval_split]}
        for name, split in used.items():
            require_columns(split, [prompt_column], "input_columns", name)
            require_columns(split, [response_column], "response_column", name)
            check_texts(split, [prompt_column, response_column], name)
        limit = max_length(job, tokenizer)
        eos = tokenizer.eos_token_id

        def encode(batch):
            prompts = tokenizer([clip_words(as_text(p), job) for p in batch[prompt_column]])["input_ids"]
            responses = tokenizer([as_text(r) for r in batch[response_column]], add_special_tokens=False)["input_ids"]
            out = {"input_ids": [], "attention_mask": [], "labels": []}
            for prompt, response in zip(prompts, responses):
                response = response + [eos]
                if len(prompt) + len(response) > limit:
                    # Keep at least half the window for the response: it is what the loss learns from.
                    response = response[:max(limit - len(prompt), limit // 2)]
                    prompt = prompt[:limit - len(response)]
                ids = prompt + response
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
                # Labels are built here rather than from input_ids in the collator, so an EOS that equals the pad
                # token is still a training target.
                out["labels"].append([IGNORE] * len(prompt) + response)
            return out

        tokenized = {
            name: split.map(encode, batched=True, remove_columns=split.column_names, desc=f"Tokenizing ({name})")
            for name, split in used.items()
        }
        return Prepared(tokenized["train"], tokenized[eval_split], {})

    def collator(self, tokenizer, job):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, pad_to_multiple_of=8)
