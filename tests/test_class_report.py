"""Classification results people read: per-class (per-entity-type) precision, recall, F1 and support and the
confusion matrix with the label names, in `eval`, metrics.json, report.md and confusion.png."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import job_dict, make_dataset
from llmfinetune.config import parse_job
from llmfinetune.registry import TASKS


class _Prediction:  # what the Trainer hands compute_metrics
    def __init__(self, predictions, label_ids):
        self.predictions, self.label_ids = predictions, label_ids


def _kwargs(names):
    # id2label keys as strings, as they come back from the tokenization cache's JSON
    return {"num_labels": len(names), "id2label": {str(i): n for i, n in enumerate(names)}}


def test_sequence_classification_per_class_by_hand():
    # true 0 0 1 1 2, predicted 0 1 1 1 0:
    #   neg: tp 1 (row 0), fp 1 (row 4), fn 1 (row 1)  -> P 1/2, R 1/2, F1 1/2, support 2
    #   pos: tp 2, fp 1 (row 1), fn 0                   -> P 2/3, R 1,   F1 4/5, support 2
    #   mid: tp 0, fp 0, fn 1 (row 4)                   -> P 0,   R 0,   F1 0,   support 1
    metrics = TASKS.get("sequenceclassification").compute_metrics(_kwargs(["neg", "pos", "mid"]))
    result = metrics(_Prediction(np.array([0, 1, 1, 1, 0]), np.array([0, 0, 1, 1, 2])))
    assert math.isclose(result["accuracy"], 3 / 5)
    per_class = metrics.details["eval_per_class"]
    expected = {"neg": (1 / 2, 1 / 2, 1 / 2, 2), "pos": (2 / 3, 1.0, 4 / 5, 2), "mid": (0.0, 0.0, 0.0, 1)}
    assert list(per_class) == ["neg", "pos", "mid"]
    for name, (p, r, f1, support) in expected.items():
        row = per_class[name]
        assert [row["precision"], row["recall"], row["f1"]] == pytest.approx([p, r, f1]), name
        assert row["support"] == support
    confusion = metrics.details["eval_confusion_matrix"]
    assert confusion["labels"] == ["neg", "pos", "mid"]
    assert confusion["counts"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]  # rows: true label, columns: predicted


def test_token_classification_per_entity_type_by_hand():
    names = ["O", "B-LOC", "B-PER", "I-PER"]
    ids = {n: i for i, n in enumerate(names)}
    # Row 1: "Anna Berg in Lima": PER found, LOC missed. Row 2: "Lima ." tagged as a person.
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    predicted = [["B-PER", "I-PER", "O", "O"], ["B-PER", "O"]]

    def padded(rows, fill):  # sub-tokens after the first of a word, and padding, are -100 in the labels
        return np.array([[ids[t] for t in row] + [fill] * (5 - len(row)) for row in rows])

    metrics = TASKS.get("tokenclassification").compute_metrics(_kwargs(names))
    metrics(_Prediction(padded(predicted, 0), padded(true, -100)))
    per_type = metrics.details["eval_per_class"]
    # PER: 1 right of 2 predicted, 1 true -> P 1/2, R 1, F1 2/3; LOC: 0 of 2 true found, none predicted.
    assert sorted(per_type) == ["LOC", "PER"]
    assert [per_type["PER"][k] for k in ("precision", "recall", "f1", "support")] == pytest.approx([0.5, 1, 2 / 3, 1])
    assert [per_type["LOC"][k] for k in ("precision", "recall", "f1", "support")] == [0.0, 0.0, 0.0, 2]
    confusion = metrics.details["eval_confusion_matrix"]
    assert confusion["labels"] == names
    # Word tags: O->O twice, B-LOC->O and B-LOC->B-PER, B-PER->B-PER, I-PER->I-PER.
    assert confusion["counts"] == [[2, 0, 0, 0], [1, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


# ---------------------------------------------------------------- a trained run: eval, metrics.json, the report

@pytest.fixture(scope="module")
def classifier(tiny_models, tmp_path_factory) -> Path:
    from llmfinetune.workflow import run

    root = tmp_path_factory.mktemp("class-report")
    data = make_dataset(root / "data", "sequenceclassification", train_rows=32, eval_rows=16)
    run(parse_job(job_dict("sequenceclassification", "full", tiny_models["bert"], data, root / "run", max_steps=2,
                           save_strategy="no")))
    return root / "run"


def test_eval_and_metrics_json_carry_the_per_class_table(classifier, capsys):
    from llmfinetune.cli import main

    capsys.readouterr()
    assert main(["eval", "--model", str(classifier)]) == 0
    printed = json.loads(capsys.readouterr().out)
    trained = json.loads((classifier / "metrics.json").read_text())
    for metrics in (printed, trained):
        per_class = metrics["eval_per_class"]
        assert sorted(per_class) == ["neg", "pos"]
        assert sum(row["support"] for row in per_class.values()) == metrics["eval_examples"] == 16
        counts = metrics["eval_confusion_matrix"]["counts"]
        assert metrics["eval_confusion_matrix"]["labels"] == ["neg", "pos"]
        assert [sum(row) for row in counts] == [per_class["neg"]["support"], per_class["pos"]["support"]]
        assert math.isclose(sum(counts[i][i] for i in range(2)) / 16, metrics["eval_accuracy"])
    assert printed["eval_per_class"] == trained["eval_per_class"]


def test_report_shows_the_per_class_table_and_the_confusion_image(classifier):
    report = (classifier / "report.md").read_text()
    per_class = json.loads((classifier / "metrics.json").read_text())["eval_per_class"]
    assert "### Per class" in report
    assert "| class | precision | recall | F1 | support |" in report
    neg = per_class["neg"]
    assert f"| neg | {neg['precision']:.4f} | {neg['recall']:.4f} | {neg['f1']:.4f} | {neg['support']} |" in report
    assert "![confusion matrix](confusion.png)" in report
    assert "eval_per_class" not in report and "eval_confusion_matrix" not in report  # not dumped as a blob
    from PIL import Image

    with Image.open(classifier / "confusion.png") as image:
        assert image.size[0] > 200 and image.size[1] > 200


def test_generate_is_refused_for_classification(classifier, capsys):
    from llmfinetune.cli import main

    capsys.readouterr()
    assert main(["eval", "--model", str(classifier), "--generate"]) == 2
    assert "--generate: only for runs that generate text (text-generation, preference); this run is " \
           "sequenceclassification." in capsys.readouterr().err


def test_predict_on_a_labelled_file_prints_the_per_class_table(classifier, capsys, tmp_path):
    from conftest import classification_rows, write_jsonl
    from llmfinetune.cli import main

    rows = classification_rows(8, 5)
    source = write_jsonl(tmp_path / "labelled.jsonl", rows)
    capsys.readouterr()
    assert main(["predict", "--model", str(classifier), "--input", str(source), "--output",
                 str(tmp_path / "out.jsonl")]) == 0
    err = capsys.readouterr().err
    predicted = [json.loads(line)["prediction"]["label"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert f"Per class on {source} (8 labelled rows):" in err
    for name in ("neg", "pos"):
        tp = sum(p == name == r["label"] for p, r in zip(predicted, rows))
        said = sum(p == name for p in predicted)
        support = sum(r["label"] == name for r in rows)
        precision = tp / said if said else 0.0
        recall = tp / support
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        assert f"| {name} | {precision:.4f} | {recall:.4f} | {f1:.4f} | {support} |" in err, err
    write_jsonl(source, rows + [{"text": "the book was lovely"}])  # one row without a label: no table
    assert main(["predict", "--model", str(classifier), "--input", str(source), "--output",
                 str(tmp_path / "out.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "1 rows of" in err and "Per class" not in err


def test_labelled_predictions_of_token_classification_by_entity_type():
    from types import SimpleNamespace

    from llmfinetune.evaluate import LabelledPredictions

    names = ["O", "B-LOC", "B-PER", "I-PER"]
    run = SimpleNamespace(job=SimpleNamespace(task="tokenclassification", data=SimpleNamespace(label_column=None)),
                          id2label=dict(enumerate(names)))
    labelled = LabelledPredictions.for_run(run)
    # The same two rows as the by-hand test above; a word past max_length (tag null) counts as O.
    labelled.add({"tokens": ["Anna", "Berg", "in", "Lima"], "ner_tags": ["B-PER", "I-PER", "O", "B-LOC"]},
                 {"words": ["Anna", "Berg", "in", "Lima"], "tags": ["B-PER", "I-PER", "O", None]})
    labelled.add({"tokens": ["Lima", "."], "ner_tags": [1, 0]}, {"words": ["Lima", "."], "tags": ["B-PER", "O"]})
    found = labelled.report()
    assert found["eval_per_class"]["PER"]["precision"] == 0.5 and found["eval_per_class"]["LOC"]["support"] == 2
    assert found["eval_confusion_matrix"]["counts"] == [[2, 0, 0, 0], [1, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
