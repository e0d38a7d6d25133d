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


# ---------------------------------------------------------------- keys only another task reads

DATA, BASE = "ft_config.data_config", "ft_config.train_config.base_config"


def _job(task, tiny_models, tmp_path, key=None, value=None):
    from conftest import set_at

    model = tiny_models["qwen2" if task == "text-generation" else "bert"]
    config = job_dict(task, "full", model, tmp_path, tmp_path / "run")
    if key is not None:
        set_at(config, key, value)
    return parse_job(config)


@pytest.mark.parametrize("task, key, value", [
    ("sequenceclassification", f"{BASE}.mlm_probability", 0.3),
    ("text-generation", f"{BASE}.mlm_probability", 0.3),
    ("tokenclassification", f"{BASE}.whole_word_mask", True),
    ("text-generation", f"{BASE}.whole_word_mask", True),
    ("maskedlm", f"{BASE}.lm_head_on_targets_only", False),
    ("sequenceclassification", f"{BASE}.lm_head_on_targets_only", False),
    ("text-generation", f"{BASE}.last_layer_cls_only", False),
    ("tokenclassification", f"{BASE}.last_layer_cls_only", False),
    ("maskedlm", f"{DATA}.label_column", "label"),
    ("text-generation", f"{DATA}.label_column", "label"),
    ("sequenceclassification", f"{DATA}.response_column", "answer"),
    ("tokenclassification", f"{DATA}.response_column", "answer"),
    ("maskedlm", f"{DATA}.response_column", "answer"),
    ("maskedlm", f"{DATA}.system_prompt", "Be brief."),
    ("tokenclassification", "model_config.max_input_words", 100),
])
def test_a_key_only_another_task_reads_is_refused_by_its_full_name(task, key, value, tiny_models, tmp_path):
    from llmfinetune.tasks.base import READ_BY, task_names

    readers = task_names(READ_BY[key][0])
    with pytest.raises(UserError) as info:
        TASKS.get(task).check(_job(task, tiny_models, tmp_path, key, value))
    assert str(info.value) == f"{key}: only for ft_task {readers}; this job's task is {task}. Remove it."


def test_keys_of_several_other_tasks_are_named_together(tiny_models, tmp_path):
    config = job_dict("sequenceclassification", "full", tiny_models["bert"], tmp_path, tmp_path / "run",
                      whole_word_mask=True, packing=True)
    config["ft_config"]["data_config"]["response_column"] = "answer"
    with pytest.raises(UserError) as info:
        TASKS.get("sequenceclassification").check(parse_job(config))
    assert str(info.value) == (f"{DATA}.response_column, {BASE}.packing: only for ft_task text-generation; "
                               f"{BASE}.whole_word_mask: only for ft_task maskedlm; this job's task is "
                               "sequenceclassification. Remove them.")


def test_a_base_config_key_of_another_task_at_its_default_is_a_warning(tiny_models, tmp_path, caplog):
    job = _job("sequenceclassification", tiny_models, tmp_path, f"{BASE}.mlm_probability", 0.15)
    with caplog.at_level("WARNING"):
        TASKS.get("sequenceclassification").check(job)
    assert f"{BASE}.mlm_probability: only read by ft_task maskedlm; at its default here" in caplog.text


def test_the_tasks_that_read_a_key_take_it(tiny_models, tmp_path):
    for task, key, value in [("maskedlm", f"{BASE}.whole_word_mask", True),
                             ("maskedlm", f"{BASE}.mlm_probability", 0.3),
                             ("text-generation", f"{BASE}.lm_head_on_targets_only", False),
                             ("sequenceclassification", f"{BASE}.last_layer_cls_only", False),
                             ("text-generation", f"{DATA}.response_column", "answer"),
                             ("tokenclassification", f"{DATA}.label_column", "ner_tags"),
                             ("text-generation", "model_config.max_input_words", 100)]:
        TASKS.get(task).check(_job(task, tiny_models, tmp_path, key, value))


@pytest.mark.parametrize("task, columns, readable", [
    ("text-generation", ["prompt", "context"], 1), ("maskedlm", ["text", "title"], 1),
    ("tokenclassification", ["tokens", "pos"], 1), ("sequenceclassification", ["a", "b", "c"], 2)])
def test_more_input_columns_than_the_task_reads_are_refused(task, columns, readable, tiny_models, tmp_path):
    with pytest.raises(UserError, match=rf"^{DATA}\.input_columns: ft_task {task} reads {readable} text columns? "
                                        rf", got {len(columns)} \({', '.join(columns)}\); the others would be "
                                        "ignored".replace(" ,", ",")):
        TASKS.get(task).check(_job(task, tiny_models, tmp_path, f"{DATA}.input_columns", columns))
    TASKS.get(task).check(_job(task, tiny_models, tmp_path, f"{DATA}.input_columns", columns[:readable]))


def test_subset_beside_local_path_is_refused(tiny_models, tmp_path):
    job = _job("sequenceclassification", tiny_models, tmp_path, f"{DATA}.subset", "mrpc")
    with pytest.raises(UserError, match=rf"^{DATA}\.subset: only read with data_path .*; this job reads local_path\. "
                                        "Point local_path at the subset's own folder"):
        TASKS.get("sequenceclassification").check(job)


def test_input_columns_beside_a_conversation_column_are_refused(tiny_models, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             "prompt": "hi"}]
    with pytest.raises(UserError, match=rf"{DATA}\.input_columns: not read by the messages format \(the 'messages' "
                                        r"column holds the prompts\)"):
        _prepare("text-generation", rows, rows, tiny_models, tmp_path, input_columns=["prompt"])


def test_max_input_words_cuts_every_user_turn_of_a_conversation_and_no_answer(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    long = " ".join(f"w{i}" for i in range(12))
    rows = [{"messages": [{"role": "system", "content": long}, {"role": "user", "content": long},
                          {"role": "assistant", "content": long}, {"role": "user", "content": long},
                          {"role": "assistant", "content": long}]}]
    config = job_dict("text-generation", "full", tiny_models["qwen2"], tmp_path, tmp_path / "run", max_length=256)
    config["model_config"]["max_input_words"] = 3
    job = parse_job(config)
    splits = DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows)})
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen2"])
    text = tokenizer.decode(TASKS.get("text-generation").prepare(splits, "validation", tokenizer, job).train[0]
                            ["input_ids"])
    assert text.count("<|im_start|>user\nw0 w1 w2<|im_end|>") == 2
    assert text.count(f"<|im_start|>assistant\n{long}<|im_end|>") == 2 and f"system\n{long}<|im_end|>" in text
