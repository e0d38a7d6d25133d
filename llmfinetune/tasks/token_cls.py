"""Token classification: a column of word lists and a column of tag lists; each word's tag goes on its first
sub-token, the other sub-tokens are ignored by the loss (-100)."""
from __future__ import annotations

import numpy as np

from ..data import require_columns
from ..errors import UserError
from .base import Task, max_length, text_columns
from .labels import encode_label, label_lookup, label_names, prepare_classification
from .seq_cls import confusion, label_list

TAG_COLUMN_GUESSES = ["label", "ner_tags", "tags", "labels"]


class TokenClassification(Task):
    name = "tokenclassification"
    model_class = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"

    def prepare(self, splits, eval_split, tokenizer, job):
        if not getattr(tokenizer, "is_fast", False):
            raise UserError("tokenclassification needs a fast (Rust) tokenizer to align tags with sub-tokens; "
                            "this model only has a slow one.")
        train = splits["train"]
        words_column = text_columns(job, ["tokens", "words"], train.column_names)[0]
        tag_column = job.data.label_column or next((c for c in TAG_COLUMN_GUESSES if c in train.column_names), "label")
        used = {"train": train, eval_split: splits[eval_split]}
        for name, split in used.items():
            require_columns(split, [words_column], "input_columns", name)
            require_columns(split, [tag_column], "label_column", name)
        feature = getattr(train.features[tag_column], "feature", None)
        names = label_names((t for tags in train[tag_column] for t in (tags or [])), feature, tag_column)
        lookup = label_lookup(names, feature)
        limit = max_length(job, tokenizer)

        def encode(split_name):
            def function(batch, indices):
                for words, tags, row in zip(batch[words_column], batch[tag_column], indices):
                    if not words or not isinstance(words, list):
                        raise UserError(f"split '{split_name}', row {row}: column '{words_column}' must be a "
                                        f"non-empty list of words, got {words!r}.")
                    if tags is None or len(tags) != len(words):
                        raise UserError(f"split '{split_name}', row {row}: {len(words)} words in '{words_column}' "
                                        f"but {len(tags or [])} tags in '{tag_column}'; they must be equally long.")
                encoded = tokenizer(batch[words_column], is_split_into_words=True, truncation=True, max_length=limit)
                labels = []
                for position, (tags, row) in enumerate(zip(batch[tag_column], indices)):
                    ids = [encode_label(t, lookup, tag_column, split_name, row) for t in tags]
                    previous = None
                    aligned = []
                    for word in encoded.word_ids(position):
                        aligned.append(-100 if word is None or word == previous else ids[word])
                        previous = word
                    labels.append(aligned)
                encoded["labels"] = labels
                return encoded
            return function

        return prepare_classification(used, encode, names, eval_split)

    def collator(self, tokenizer, job):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=8)

    def compute_metrics(self, model_kwargs):
        names = label_list(model_kwargs)

        def metrics(prediction):
            from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

            predicted = np.asarray(prediction.predictions)
            labels = np.asarray(prediction.label_ids)
            true_tags, predicted_tags = [], []
            for pred_row, label_row in zip(predicted, labels):
                keep = label_row != -100
                true_tags.append([names[int(i)] for i in label_row[keep]])
                predicted_tags.append([names[int(i)] for i in pred_row[keep]])
            keep = labels != -100
            metrics.details = entity_report(true_tags, predicted_tags, labels[keep], predicted[keep], names)
            return {
                "precision": float(precision_score(true_tags, predicted_tags, zero_division=0)),
                "recall": float(recall_score(true_tags, predicted_tags, zero_division=0)),
                "f1": float(f1_score(true_tags, predicted_tags, zero_division=0)),
                "accuracy": float(accuracy_score(true_tags, predicted_tags)),
            }

        return metrics


def entity_report(true_tags: list[list[str]], predicted_tags: list[list[str]], true_ids, predicted_ids,
                  names: list[str]) -> dict:
    """Per entity type (seqeval: an entity counts when its type and every word of its span are right) precision,
    recall, F1 and support; and the confusion matrix of the word tags (each word's first sub-token)."""
    from seqeval.metrics import classification_report

    report = classification_report(true_tags, predicted_tags, output_dict=True, zero_division=0)
    per_type = {kind: {"precision": float(row["precision"]), "recall": float(row["recall"]),
                       "f1": float(row["f1-score"]), "support": int(row["support"])}
                for kind, row in report.items() if not kind.endswith(" avg")}
    return {"eval_per_class": per_type, "eval_confusion_matrix": confusion(true_ids, predicted_ids, names)}
