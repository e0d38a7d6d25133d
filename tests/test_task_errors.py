"""Bad rows are caught while preparing the data, before any model loads, with the split, row and column named."""
from __future__ import annotations

import pytest
from datasets import Dataset, DatasetDict

from conftest import job_dict
from llmfinetune.config import parse_job
from llmfinetune.errors import UserError
from llmfinetune.registry import TASKS


def _prepare(task, train_rows, eval_rows, tiny_models, tmp_path, **data_config):
    model = tiny_models["qwen2" if task == "text-generation" else "bert"]
    config = job_dict(task, "full", model, tmp_path, tmp_path / "run")
    config["ft_config"]["data_config"].update(data_config)
    job = parse_job(config)
    from transformers import AutoTokenizer

    splits = DatasetDict({"train": Dataset.from_list(train_rows), "validation": Dataset.from_list(eval_rows)})
    return TASKS.get(task).prepare(splits, "validation", AutoTokenizer.from_pretrained(model), job)


def test_eval_label_outside_the_train_labels(tiny_models, tmp_path):
    train = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    evaluation = [{"text": "fine", "label": "pos"}, {"text": "meh", "label": "neutral"}]
    with pytest.raises(UserError, match=r"split 'validation', row 1: label 'neutral' in column 'label' is not among"):
        _prepare("sequenceclassification", train, evaluation, tiny_models, tmp_path)


def test_unusable_label_values(tiny_models, tmp_path):
    rows = [{"text": "good", "label": 0.25}, {"text": "bad", "label": 0.75}]
    with pytest.raises(UserError, match=r"label_column: column 'label' holds float values; expected class labels"):
        _prepare("sequenceclassification", rows, rows, tiny_models, tmp_path)


def test_missing_text_column_lists_columns_found(tiny_models, tmp_path):
    rows = [{"review": "good", "label": 1}]
    with pytest.raises(UserError, match=r"column\(s\) text not in split 'train'; columns found: review, label"):
        _prepare("sequenceclassification", rows, rows, tiny_models, tmp_path, input_columns=["text"])


def test_empty_text_names_the_row(tiny_models, tmp_path):
    train = [{"text": "good", "label": 1}, {"text": "  ", "label": 0}]
    with pytest.raises(UserError, match=r"split 'train', row 1: column 'text' is empty or null"):
        _prepare("sequenceclassification", train, train[:1], tiny_models, tmp_path)


def test_tags_and_words_of_unequal_length(tiny_models, tmp_path):
    good = {"tokens": ["Anna", "flew"], "ner_tags": ["B-PER", "O"]}
    bad = {"tokens": ["Tom", "flew", "home"], "ner_tags": ["B-PER", "O"]}
    with pytest.raises(UserError, match=r"split 'validation', row 1: 3 words in 'tokens' but 2 tags in 'ner_tags'"):
        _prepare("tokenclassification", [good], [good, bad], tiny_models, tmp_path)


def test_text_generation_without_a_response_column(tiny_models, tmp_path):
    rows = [{"prompt": "hi", "reply": "hello"}]
    # The issue asks for the columns found and every accepted format, so the user can pick one.
    with pytest.raises(UserError, match=r"(?s)cannot tell the data format from the columns found \(prompt, reply\)"
                                        r".*messages.*sharegpt.*alpaca.*prompt_response.*response_column.*text"):
        _prepare("text-generation", rows, rows, tiny_models, tmp_path)


def test_seed_style_text_generation_reads_the_response_from_validation_column(tiny_models, tmp_path):
    rows = [{"content": "a red dress", "summary": "A lovely red dress."}] * 2
    prepared = _prepare("text-generation", rows, rows, tiny_models, tmp_path, input_columns=["content"],
                        validation_column="summary")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen2"])
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case where EOS is often lost as "padding"
    labels = prepared.train[0]["labels"]
    assert labels[0] == -100  # the prompt is not learned
    assert labels[-1] == tokenizer.eos_token_id  # the response ends with EOS, and EOS is a target


def test_a_train_split_smaller_than_one_batch_is_refused_at_check(tiny_models, tmp_path, capsys):
    import yaml

    from conftest import write_jsonl
    from llmfinetune import cli

    rows = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}, {"text": "fine", "label": "pos"}]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "validation.jsonl", rows)
    config = job_dict("sequenceclassification", "full", tiny_models["bert"], tmp_path / "data", tmp_path / "run")
    config["scaling_config"] = {"num_workers": 2}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["check", f"--ft={path}"]) == 2
    message = capsys.readouterr().err
    assert ("split 'train': 3 examples after tokenizing, fewer than one batch across all processes "
            "(per_device_train_batch_size 4 x 2 processes = 8)") in message
    assert "Traceback" not in message
