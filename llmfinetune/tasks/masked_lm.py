"""Masked LM: a text column, concatenated and cut into blocks of max_length; random or whole-word masking."""
from __future__ import annotations

from ..data import require_columns
from ..errors import UserError
from .base import Prepared, Task, check_texts, clip_words, max_length, text_columns, tokenize_split


class MaskedLM(Task):
    name = "maskedlm"
    model_class = "AutoModelForMaskedLM"
    # peft has no masked-LM task type; FEATURE_EXTRACTION wraps the model without assuming a generation head.
    peft_task_type = "FEATURE_EXTRACTION"
    loss_only_eval = True
    reports_perplexity = True

    def prepare(self, splits, eval_split, tokenizer, job):
        if tokenizer.mask_token is None:
            raise UserError(f"maskedlm: the tokenizer of {job.model.model_id} has no mask token; pick a masked-LM "
                            "model (BERT, RoBERTa, DistilBERT, ...) or set model_config.add_special_tokens.mask_token.")
        train = splits["train"]
        column = text_columns(job, ["text", "sentence", "content"], train.column_names)[0]
        used = {"train": train, eval_split: splits[eval_split]}
        for name, split in used.items():
            require_columns(split, [column], "input_columns", name)
            check_texts(split, [column], name)
        block = max_length(job, tokenizer)
        whole_words = bool(job.base_config.get("whole_word_mask", False))

        def tokenize(batch):
            return tokenizer([clip_words(t, job) for t in batch[column]], return_special_tokens_mask=True,
                             return_offsets_mapping=whole_words)

        def group(batch):
            # Concatenate, then cut into equal blocks: no padding is wasted; the ragged tail is dropped.
            joined = {k: sum(batch[k], []) for k in batch}
            total = (len(joined["input_ids"]) // block) * block
            return {k: [v[i:i + block] for i in range(0, total, block)] for k, v in joined.items()}

        tokenized = {}
        for name, split in used.items():
            ids = tokenize_split(split, tokenize, name)
            grouped = ids.map(group, batched=True, desc=f"Grouping into blocks of {block} ({name})")
            if len(grouped) == 0:
                # Short splits still get one (shorter) block rather than an empty dataset.
                grouped = ids.map(lambda b: {k: [sum(b[k], [])[:block]] for k in b}, batched=True,
                                  batch_size=len(ids), desc="Single block")
            tokenized[name] = grouped
        return Prepared(tokenized["train"], tokenized[eval_split], {})

    def collator(self, tokenizer, job):
        from transformers import DataCollatorForLanguageModeling

        probability = float(job.base_config.get("mlm_probability", 0.15))
        if not 0 < probability < 1:
            raise UserError(f"ft_config.train_config.base_config.mlm_probability: must be between 0 and 1, got {probability}.")
        return DataCollatorForLanguageModeling(
            tokenizer, mlm=True, mlm_probability=probability,
            whole_word_mask=bool(job.base_config.get("whole_word_mask", False)),
        )
