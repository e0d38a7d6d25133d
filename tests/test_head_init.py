"""A new classification head starts at the train labels' class prior (bench/README.md, MRPC session 7); a head the
checkpoint already trained keeps its own bias."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import job_dict, write_jsonl
from llmfinetune.config import parse_job
from llmfinetune.models import NewWeights
from llmfinetune.registry import TASKS
from llmfinetune.tasks.base import Prepared


def _centred_log_prior(counts: list[int]) -> list[float]:
    smoothed = [c + 1 for c in counts]  # add-one, so a class with no train row still gets a finite bias
    logs = [math.log(c / sum(smoothed)) for c in smoothed]
    return [v - sum(logs) / len(logs) for v in logs]


def _imbalanced_data(folder, n: int = 40):
    # 30 rows of 'a', 10 of 'b': label ids follow first appearance in the train split
    rows = [{"text": f"row {i}", "label": "b" if i % 4 == 0 else "a"} for i in range(n)]
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "validation.jsonl", rows[:8])
    return folder


def test_the_trained_run_saves_a_new_head_that_started_at_the_class_prior(tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from llmfinetune.workflow import run

    data = _imbalanced_data(tmp_path / "data")
    # lr 0: what the run saves is the head as it started, after LoRA wrapped it in modules_to_save
    job = parse_job(job_dict("sequenceclassification", "lora", tiny_models["bert"], data, tmp_path / "out",
                             max_steps=1, learning_rate=0.0, warmup_steps=0))
    result = run(job)
    labels = [result.model.config.id2label[i] for i in range(2)]
    expected = _centred_log_prior([30 if name == "a" else 10 for name in labels])
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "out"))
    assert reloaded.base_model.model.classifier.bias.tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[labels.index("a")] > 0 > expected[labels.index("b")]


def test_only_a_new_head_moves_and_only_its_output_bias(tiny_models):
    from transformers import AutoModelForSequenceClassification

    task = TASKS.get("sequenceclassification")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=3)
    prepared = Prepared(train={"labels": [0, 0, 0, 0, 1]}, eval=None,
                        model_kwargs={"num_labels": 3, "id2label": {0: "x", 1: "y", 2: "z"}})
    pooler_bias = model.bert.pooler.dense.bias.detach().clone()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.3, -0.1, 0.2]))  # as if the checkpoint had trained it

    task.init_new_weights(model, NewWeights(["classifier.weight", "bert.pooler.dense.bias"]), prepared)
    assert model.classifier.bias.tolist() == pytest.approx([0.3, -0.1, 0.2])  # not listed as new: kept
    task.init_new_weights(model, NewWeights(["classifier.weight", "classifier.bias", "bert.pooler.dense.bias"]),
                          prepared)
    assert model.classifier.bias.tolist() == pytest.approx(_centred_log_prior([4, 1, 0]), abs=1e-6)
    assert torch.equal(model.bert.pooler.dense.bias, pooler_bias)  # new too, but not the output layer's
