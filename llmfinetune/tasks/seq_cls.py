"""Sequence classification: one or two text columns and a label column -> AutoModelForSequenceClassification."""
from __future__ import annotations

import contextlib
import logging

import numpy as np

from ..data import require_columns
from ..errors import UserError
from .base import Task, check_texts, clip_words, max_length, text_columns
from .labels import check_scalar_labels, encode_label, label_lookup, label_names, prepare_classification

logger = logging.getLogger(__name__)


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

    def init_new_weights(self, model, new_weights, prepared):
        start_bias_at_class_prior(model, new_weights, prepared.train["labels"], prepared.model_kwargs)

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


def start_bias_at_class_prior(model, new_weights, train_label_ids, model_kwargs) -> None:
    """A new head's output bias starts at the log of each class's share of the train labels (add-one smoothed,
    centred), so the first steps need not learn the class balance. With a zero bias on imbalanced data (GLUE MRPC: 68%
    positive) the quickest way down from the loss of ln 2 is to predict that balance for every input: a LoRA run of
    the default job at batch 8 and rank 32 got there by making the [CLS] state the same for every input (its spread
    across validation rows fell from the base model's 0.23 to 0.003), its gradients died and it stayed on the majority
    class; started at the prior it learned (bench/README.md, MRPC session 7). A head the checkpoint already had keeps
    its trained bias."""
    import torch

    num_labels = model_kwargs["num_labels"]
    fresh = set(new_weights.parameters)
    # The output layer's bias is the new bias with one entry per class (a RoBERTa head's dense layer before it has one
    # per hidden unit); the last such parameter in module order is the one nearest the logits.
    # Under DeepSpeed ZeRO-3 each process holds a slice of every weight: ds_shape is the whole one.
    biases = [(name, p) for name, p in model.named_parameters()
              if name in fresh and name.endswith("bias") and tuple(getattr(p, "ds_shape", p.shape)) == (num_labels,)]
    if not biases or num_labels < 2:
        return
    name, bias = biases[-1]
    counts = np.bincount(np.asarray(train_label_ids).reshape(-1), minlength=num_labels)[:num_labels] + 1.0
    log_prior = np.log(counts / counts.sum())
    whole = contextlib.nullcontext()
    if hasattr(bias, "ds_id"):
        import deepspeed

        whole = deepspeed.zero.GatheredParameters([bias], modifier_rank=0)
    with whole, torch.no_grad():
        bias.copy_(torch.as_tensor(log_prior - log_prior.mean(), dtype=bias.dtype))
    names = label_list(model_kwargs)
    logger.info("New head %s starts at the train labels' log prior: %s.", name,
                ", ".join(f"{names[i]} {counts[i] / counts.sum():.1%}" for i in range(num_labels)))


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
