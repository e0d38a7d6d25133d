"""Causal-LM SFT: prompt/response, alpaca, chat messages, ShareGPT or raw text; loss on assistant turns only (by
default), EOS appended and learned, optional packing without cross-example attention."""
from __future__ import annotations

from ..data import require_columns
from ..errors import UserError
from .base import Prepared, Task, clip_words, max_length, tokenize_split
from .chat import (IGNORE, TEMPLATES, Renderer, decide_format, encode_conversations, encode_texts,
                   record_trained_format, row_text, to_messages, trained_format)

__all__ = ["CausalLM", "IGNORE"]


class CausalLM(Task):
    name = "text-generation"
    model_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    half_precision_base = True
    loss_only_eval = True
    reports_perplexity = True
    loss_sums_over_items = True

    input_columns_hint = ("The first is the prompt column: join the texts into one column, or for an instruction "
                          "with an input use the alpaca format (instruction, input, output columns).")

    def check(self, job):
        super().check(job)
        # packing / lm_head_on_targets_only are typed with the other own base_config keys (arguments.OWN_TYPES).
        if job.data.template is not None and job.data.template not in ("tokenizer", *TEMPLATES):
            raise UserError(f"ft_config.data_config.template: unknown template '{job.data.template}'; choose "
                            f"tokenizer (the model's own chat template), {', '.join(TEMPLATES)}.")

    def check_model(self, job, model_path):
        if packs(job):
            from ..packing import check_packing_isolates

            check_packing_isolates(job, model_path)

    def prepare(self, splits, eval_split, tokenizer, job):
        if tokenizer.eos_token_id is None:
            raise UserError(f"text-generation: the tokenizer of {job.model.model_id} has no EOS token, so the model "
                            "could never learn to stop; set model_config.add_special_tokens.eos_token.")
        train = splits["train"]
        columns = decide_format(job, tokenizer, splits)
        job = columns.apply(job)  # rendered exactly as decided (and as the run directory records it)
        used = {"train": train, eval_split: splits[eval_split]}
        for name, split in used.items():
            require_columns(split, columns.required(), _column_key(columns), name)
        limit = max_length(job, tokenizer)
        renderer = None if columns.format == "text" else Renderer(tokenizer, job)
        train_on_prompt = bool(job.data.train_on_prompt)

        def encode(batch, indices, split_name):
            rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
            wheres = [f"split '{split_name}', row {i}" for i in indices]
            if renderer is None:
                texts = [clip_words(row_text(row, columns.prompt, where), job) for row, where in zip(rows, wheres)]
                encoded = encode_texts(tokenizer, texts, limit)
            else:
                conversations = [to_messages(row, columns, job, where, clip=lambda t: clip_words(t, job))
                                 for row, where in zip(rows, wheres)]
                encoded = encode_conversations(renderer, conversations, wheres, limit, train_on_prompt)
            return {"input_ids": [ids for ids, _ in encoded], "labels": [labels for _, labels in encoded]}

        tokenized = {}
        for name, split in used.items():
            tokenized[name] = tokenize_split(split, encode, name, with_indices=True, fn_kwargs={"split_name": name})
            if len(tokenized[name]) == 0:
                raise UserError(f"split '{name}': no examples left after tokenizing.")
        if packs(job):
            from ..packing import pack_dataset

            tokenized = {name: pack_dataset(split, limit) for name, split in tokenized.items()}
        return Prepared(tokenized["train"], tokenized[eval_split], {})

    def record_run_files(self, run_dir, splits, tokenizer, job, resuming, write):
        record_trained_format(run_dir, decide_format(job, tokenizer, splits), resuming, write)

    def as_trained(self, run_dir, job, tokenizer):
        return trained_format(run_dir, job, tokenizer).apply(job)

    def trainer_class(self, job):
        from ..lm_head import CausalLMTrainer, TargetsOnlyTrainer

        return TargetsOnlyTrainer if job.base_config.get("lm_head_on_targets_only", True) else CausalLMTrainer

    def collator(self, tokenizer, job):
        if packs(job):
            from ..packing import PackedCollator

            # Its layout (rows or one flattened row) follows the model's attention: the Trainer binds it.
            return PackedCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                  else tokenizer.eos_token_id)
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, pad_to_multiple_of=8)


def packs(job) -> bool:
    return bool(job.base_config.get("packing", False))


def _column_key(columns) -> str:
    if columns.conversation:
        return "messages_column"
    return "input_columns" if columns.format == "text" else "input_columns/response_column"
