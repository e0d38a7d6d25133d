"""One decision of how SFT data is read and rendered (chat.decide_format), recorded in the run directory
(sft_format.json) and read by `predict` and `eval`: the token ids predict prompts with are the ids training put
before the answer, for every format and template."""
from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

from conftest import job_dict
from llmfinetune.config import parse_job
from llmfinetune.errors import UserError
from llmfinetune.registry import TASKS
from llmfinetune.tasks.chat import FORMAT_FILE, IGNORE

ROWS = {
    "prompt_response": {"prompt": "What is 2 plus 2?", "response": "Four.", "system": "Be brief."},
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 2", "output": "Four.",
               "history": [["Add 1 and 1.", "Two."]]},
    "messages": {"messages": [{"role": "system", "content": "You count."},
                              {"role": "user", "content": "One?"}, {"role": "assistant", "content": "Two."},
                              {"role": "user", "content": "Three?"}, {"role": "assistant", "content": "Four."}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "What is 2 plus 2?"}, {"from": "gpt", "value": "Four."}]},
    "text": {"text": "The cat sat on the mat and looked at the door for a long time."},
}


def _setup(tiny_models, tmp_path, rows, **data_config):
    from transformers import AutoTokenizer

    config = job_dict("text-generation", "full", tiny_models["qwen2"], tmp_path, tmp_path / "run")
    config["ft_config"]["data_config"].update(data_config)
    job = parse_job(config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen2"])
    splits = DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows)})
    return job, tokenizer, splits


def _predictor(run_dir, job, tokenizer):
    from llmfinetune.inference import LoadedRun, Options, TextGenerationPredictor

    run = LoadedRun(run_dir, job, TASKS.get("text-generation"), "full", model=None, tokenizer=tokenizer, device="cpu")
    return TextGenerationPredictor(run, Options())


def _trained_run(tiny_models, tmp_path, rows, **data_config):
    """What training does with the data (tokenize, record the format) and a predictor reading that run directory."""
    job, tokenizer, splits = _setup(tiny_models, tmp_path, rows, **data_config)
    task = TASKS.get("text-generation")
    prepared = task.prepare(splits, "validation", tokenizer, job)
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    task.record_run_files(run_dir, splits, tokenizer, job, resuming=False, write=True)
    return prepared, _predictor(run_dir, job, tokenizer), job, tokenizer


def _before_last_answer(example) -> list[int]:
    """The training example's ids up to where its last learned answer starts."""
    labels = example["labels"]
    start = len(labels)
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    assert 0 < start < len(labels)
    return example["input_ids"][:start]


@pytest.mark.parametrize("template", [None, "plain", "alpaca", "chatml"])
@pytest.mark.parametrize("name", sorted(ROWS))
def test_predict_prompt_tokens_equal_the_training_rendering(name, template, tiny_models, tmp_path):
    extra = {"template": template} if template else {}
    prepared, predictor, _, tokenizer = _trained_run(tiny_models, tmp_path, [ROWS[name]] * 2, **extra)
    assert predictor.trained.format == name  # detected at train time (format: auto), recorded, read back
    example = prepared.train[0]
    (ids,), stops = predictor.prompts([predictor.read(ROWS[name], "row 0")])
    if name == "text":
        # Continued pre-training: the raw text as training tokenized it, no chat template; EOS is what ends it.
        assert example["labels"] == example["input_ids"] and example["input_ids"][-1] == tokenizer.eos_token_id
        assert ids == example["input_ids"][:-1]
        assert stops == [tokenizer.eos_token_id]
        assert "<|im_start|>" not in tokenizer.decode(ids)
    else:
        assert ids == _before_last_answer(example), (tokenizer.decode(ids), tokenizer.decode(example["input_ids"]))
        assert tokenizer.eos_token_id in stops


@pytest.mark.parametrize("name", ["prompt_response", "alpaca", "messages", "sharegpt"])
def test_a_plain_text_input_is_the_user_turn_training_rendered(name, tiny_models, tmp_path):
    """`predict --text Q` prompts as training rendered a row whose user turn was Q (and training's system prompt)."""
    one_turn = {"prompt_response": {"prompt": "What is 2 plus 2?", "response": "Four."},
                "alpaca": {"instruction": "What is 2 plus 2?", "output": "Four."},
                "messages": {"messages": [{"role": "user", "content": "What is 2 plus 2?"},
                                          {"role": "assistant", "content": "Four."}]},
                "sharegpt": ROWS["sharegpt"]}[name]
    prepared, predictor, _, _ = _trained_run(tiny_models, tmp_path, [one_turn] * 2, system_prompt="Answer briefly.")
    (ids,), _ = predictor.prompts([predictor.read({"text": "What is 2 plus 2?"}, "--text")])
    assert ids == _before_last_answer(prepared.train[0])


def test_the_recorded_format_wins_over_the_job_file(tiny_models, tmp_path):
    """A continued-pretraining run (format detected as text) is prompted with raw text even when the job read back
    says format: auto and the tokenizer has a chat template; a chat run keeps its template when the job file later
    names another."""
    prepared, predictor, job, tokenizer = _trained_run(tiny_models, tmp_path, [ROWS["text"]] * 2)
    assert json.loads((tmp_path / "run" / FORMAT_FILE).read_text())["format"] == "text"
    assert job.data.format == "auto" and tokenizer.chat_template
    (ids,), _ = predictor.prompts([predictor.read({"text": "The cat"}, "--text")])
    assert tokenizer.decode(ids) == "The cat"

    chat = tmp_path / "chat"
    prepared, _, job, tokenizer = _trained_run(tiny_models, chat, [ROWS["prompt_response"]] * 2, template="plain")
    later = job.model_copy(deep=True)
    later.ft_config.data_config.template = "chatml"
    predictor = _predictor(chat / "run", later, tokenizer)
    assert predictor.trained.template == "plain"
    (ids,), _ = predictor.prompts([predictor.read(ROWS["prompt_response"], "row")])
    assert ids == _before_last_answer(prepared.train[0])


def test_resume_with_other_data_settings_is_refused(tiny_models, tmp_path):
    job, tokenizer, splits = _setup(tiny_models, tmp_path, [ROWS["prompt_response"]] * 2, template="plain")
    task = TASKS.get("text-generation")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    task.record_run_files(run_dir, splits, tokenizer, job, resuming=False, write=True)
    task.record_run_files(run_dir, splits, tokenizer, job, resuming=True, write=True)  # same settings: fine
    changed, _, _ = _setup(tiny_models, tmp_path, [ROWS["prompt_response"]] * 2, template="chatml")
    with pytest.raises(UserError, match=r"sft_format\.json: this run directory was trained on .*template 'plain'.*"
                                        r"now reads the data as .*template 'chatml'"):
        task.record_run_files(run_dir, splits, tokenizer, changed, resuming=True, write=False)
    task.record_run_files(run_dir, splits, tokenizer, changed, resuming=False, write=True)  # a fresh run: rewritten
    assert json.loads((run_dir / FORMAT_FILE).read_text())["template"] == "chatml"


def test_a_broken_format_file_is_named(tiny_models, tmp_path):
    _, predictor, job, tokenizer = _trained_run(tiny_models, tmp_path, [ROWS["prompt_response"]] * 2)
    (tmp_path / "run" / FORMAT_FILE).write_text('{"format": "poetry"}')
    with pytest.raises(UserError, match=r"sft_format\.json: expected \{\"format\": one of"):
        _predictor(tmp_path / "run", job, tokenizer)


def test_eval_prepares_the_data_as_training_did(tiny_models, tmp_path):
    """`eval` tokenizes through task.as_trained: a job file read back with another template (or, for an old job file,
    format: auto on data that now looks different) still gives the examples training evaluated."""
    prepared, _, job, tokenizer = _trained_run(tiny_models, tmp_path, [ROWS["prompt_response"]] * 2, template="plain")
    later = job.model_copy(deep=True)
    later.ft_config.data_config.template = "chatml"
    later.ft_config.data_config.system_prompt = "Something new."
    task = TASKS.get("text-generation")
    _, _, splits = _setup(tiny_models, tmp_path, [ROWS["prompt_response"]] * 2)
    again = task.prepare(splits, "validation", tokenizer, task.as_trained(tmp_path / "run", later, tokenizer))
    assert again.eval["input_ids"] == prepared.eval["input_ids"] and again.eval["labels"] == prepared.eval["labels"]
    changed = task.prepare(splits, "validation", tokenizer, later)
    assert changed.eval["input_ids"] != prepared.eval["input_ids"]  # what reading the job file alone would give


def test_the_format_file_is_replaced_whole_for_processes_reading_it(tmp_path, monkeypatch):
    """On a resumed run under several processes the others read sft_format.json while the writing process writes
    it: a plain write_text truncates it first, and a reader then found it empty ('not readable JSON'). The new
    file is written beside it and renamed over it, so a reader sees the old or the new file whole."""
    import os

    from llmfinetune.tasks import chat

    trained = chat.TrainedFormat("alpaca", prompt="instruction", response="output", template="chatml")
    path = tmp_path / FORMAT_FILE
    path.write_text(json.dumps(trained.to_json()), encoding="utf-8")
    at_rename = []
    replace = os.replace

    def renamed(source, target):
        at_rename.append(chat.read_format_file(path))  # what a reader sees just before the rename: the old file
        replace(source, target)

    monkeypatch.setattr(chat.os, "replace", renamed)
    chat.record_trained_format(tmp_path, trained, resuming=True, write=True)
    assert at_rename == [trained] and chat.read_format_file(path) == trained
    assert [p.name for p in tmp_path.iterdir()] == [FORMAT_FILE]
