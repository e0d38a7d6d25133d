"""Sequence classification: one or two text columns and a label column -> AutoModelForSequenceClassification."""
from __future__ import annotations

import numpy as np

from ..data import require_columns
from ..errors import UserError
from .base import Task, check_texts, clip_words, max_length, text_columns
from .labels import check_scalar_labels, encode_label, label_lookup, label_names, prepare_classification


class SequenceClassification(Task):
    name = "sequenceclassification"
    model_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    input_columns_read = 2
    input_columns_hint = "Sequence classification takes one text column or a pair."

    def prepare(self, splits, eval_split, tokenizer, job):
        train = splits["train"]
        inputs = text_columns(job, ["sentence", "text"], train.column_names)
        if len(inputs) > 2:
            raise UserError(f"ft_config.data_config.input_columns: {inputs} names {len(inputs)} columns; sequence "
                            "classification takes one text column or a pair.")
        label_column = job.data.label_column or "label"
        used = {"train": train, eval_split: splits[eval_split]}
        for name, split in used.items():
            require_columns(split, inputs, "input_columns", name)
            require_columns(split, [label_column], "label_column", name)
            check_texts(split, inputs, name)
            check_scalar_labels(split[label_column], label_column, name)
        feature = train.features[label_column]
        names = label_names(train[label_column], feature, label_column)
        lookup = label_lookup(names, feature)
        limit = max_length(job, tokenizer)

        def encode(split_name):
            def function(batch, indices):
                texts = [[clip_words(t, job) for t in batch[c]] for c in inputs]
                encoded = tokenizer(*texts, truncation=True, max_length=limit)
                encoded["labels"] = [encode_label(v, lookup, label_column, split_name, i)
                                     for v, i in zip(batch[label_column], indices)]
                return encoded
            return function

        return prepare_classification(used, encode, names, eval_split)

    def trainer_class(self, job):
        if not job.base_config.get("last_layer_cls_only", True):
            return super().trainer_class(job)
        from ..cls_head import FirstPositionTrainer

        return FirstPositionTrainer

    def collator(self, tokenizer, job):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)

    def compute_metrics(self, model_kwargs):
        num_labels = model_kwargs["num_labels"]
        names = label_list(model_kwargs)

        def metrics(prediction):
            predicted = np.asarray(prediction.predictions).reshape(-1)
            labels = np.asarray(prediction.label_ids).reshape(-1)
            metrics.details = class_report(labels, predicted, names)
            result = {"accuracy": float((predicted == labels).mean())}
            classes = [1] if num_labels == 2 else range(num_labels)
            f1s = []
            for c in classes:
                tp = float(((predicted == c) & (labels == c)).sum())
                fp = float(((predicted == c) & (labels != c)).sum())
                fn = float(((predicted != c) & (labels == c)).sum())
                f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
            result["f1"] = float(np.mean(f1s))
            return result

        return metrics


def label_list(model_kwargs) -> list[str]:
    """The label names in class-id order (id2label's keys are strings after a round trip through JSON)."""
    id2label = {int(k): v for k, v in model_kwargs["id2label"].items()}
    return [id2label[i] for i in range(len(id2label))]


def class_report(true_ids, predicted_ids, names: list[str]) -> dict:
    """Per-class precision, recall, F1 and support, and the confusion matrix (rows: true label, columns: predicted),
    with the label names; keyed as they appear in metrics.json and `eval`'s output."""
    from sklearn.metrics import precision_recall_fscore_support

    ids = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(true_ids, predicted_ids, labels=ids,
                                                                     zero_division=0)
    per_class = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                        "support": int(support[i])} for i, name in enumerate(names)}
    return {"eval_per_class": per_class, "eval_confusion_matrix": confusion(true_ids, predicted_ids, names)}


def confusion(true_ids, predicted_ids, names: list[str]) -> dict:
    from sklearn.metrics import confusion_matrix

    counts = confusion_matrix(true_ids, predicted_ids, labels=list(range(len(names))))
    return {"labels": list(names), "rows": "true label", "columns": "predicted label", "counts": counts.tolist()}
