"""Reward models (ft_task rewardmodeling) on TRL's RewardTrainer: an encoder without EOS (the MiniLM-shaped tiny BERT)
and a decoder (tiny Qwen2) learn which answer of a pair is better; the run directory reloads with plain transformers
(+ peft) in another process and scores the same."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BAD, GOOD, NOUNS, REPO, job_dict, write_jsonl
from llmfinetune.config import parse_job
from llmfinetune.errors import UserError


def pair_rows(n: int, seed: int, margin: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        noun = rng.choice(NOUNS)
        row = {"prompt": f"How was the {noun}?", "chosen": f"the {noun} was {rng.choice(GOOD)}",
               "rejected": f"the {noun} was {rng.choice(BAD)}"}
        if margin:
            row["margin"] = rng.choice([0.0, 0.5, 1.0])
        rows.append(row)
    return rows


def reward_job(model: Path, tmp_path: Path, method: str = "lora", rows=pair_rows, settings=None, **base):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", rows(64, 1))
    write_jsonl(data / "validation.jsonl", rows(32, 2))
    base = {"per_device_train_batch_size": 8, "learning_rate": 5e-3 if method == "lora" else 1e-3,
            "save_steps": 1000, **base}
    raw = job_dict("rewardmodeling", method, model, data, tmp_path / "run", **base)
    if settings is not None:
        raw["ft_config"]["train_config"]["preference_config"] = settings
    return parse_job(raw)


SCORE = """
import json, sys
import torch
from transformers import AutoModelForSequenceClassification
run_dir, base, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if base:
    from peft import PeftModel
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), run_dir)
else:
    model = AutoModelForSequenceClassification.from_pretrained(run_dir)
assert model.config.num_labels == 1
with torch.inference_mode():
    print(json.dumps([model.eval()(input_ids=torch.tensor([row])).logits[0, 0].item() for row in ids]))
"""


def scores_in_another_process(run_dir: Path, base, ids: list[list[int]]) -> list[float]:
    done = subprocess.run([sys.executable, "-c", SCORE, str(run_dir), str(base or ""), json.dumps(ids)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def scores_here(model, ids: list[list[int]]) -> list[float]:
    import torch

    model.eval()
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([row])).logits[0, 0].item() for row in ids]


RUNS = {("bert", "lora"): 40, ("qwen2", "full"): 20}


@pytest.fixture(scope="module")
def reward_runs(tiny_models, tmp_path_factory):
    """A LoRA reward model on the encoder and a full one on the decoder, trained once for this module."""
    from llmfinetune.workflow import run

    made = {}
    for (kind, method), steps in RUNS.items():
        made[(kind, method)] = run(reward_job(tiny_models[kind], tmp_path_factory.mktemp(f"{kind}-{method}"), method,
                                              max_steps=steps))
    return made


@pytest.mark.parametrize("kind, method", list(RUNS))
def test_a_reward_model_learns_which_answer_is_better_and_reloads_elsewhere(tiny_models, reward_runs, kind, method):
    result = reward_runs[(kind, method)]
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert metrics["eval_accuracy"] >= 0.9, metrics
    assert metrics["eval_margin"] > 0
    if method == "lora":
        adapter = json.loads((result.output_dir / "adapter_config.json").read_text())
        assert "classifier" in adapter["modules_to_save"]  # the new score head trains in full
    tokenizer = result.tokenizer
    texts = [("How was the film?", "the film was great"), ("How was the film?", "the film was awful")]
    if kind == "bert":
        ids = [tokenizer(p, a)["input_ids"] for p, a in texts]
    else:
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": a}],
                                             tokenize=True, return_dict=True)["input_ids"] for p, a in texts]
    here = scores_here(result.model, ids)
    assert here[0] > here[1]
    elsewhere = scores_in_another_process(result.output_dir, tiny_models[kind] if method == "lora" else None, ids)
    assert elsewhere == pytest.approx(here, abs=1e-5)


def test_the_margin_column_is_read_and_checked(tiny_models, tmp_path):
    from llmfinetune import data
    from llmfinetune.models import load_tokenizer
    from llmfinetune.registry import TASKS

    job = reward_job(tiny_models["bert"], tmp_path, rows=lambda n, seed: pair_rows(n, seed, margin=True))
    tokenizer = load_tokenizer(str(tiny_models["bert"]), job)
    splits = data.load_raw_splits(job)
    prepared = TASKS.get("rewardmodeling").prepare(splits, "validation", tokenizer, job)
    assert prepared.train["margin"] == [row["margin"] for row in pair_rows(64, 1, margin=True)]
    assert prepared.model_kwargs == {"num_labels": 1}
    # BERT-style pairs: [CLS] prompt [SEP] answer [SEP]; no EOS is needed.
    first = prepared.train[0]["chosen_ids"]
    assert first[0] == tokenizer.cls_token_id and first.count(tokenizer.sep_token_id) == 2

    from llmfinetune.workflow import run

    trained = run(job)  # TRL's reward loss subtracts each pair's margin
    assert math.isfinite(trained.metrics["train_loss"]) and math.isfinite(trained.metrics["eval_loss"])

    bad = pair_rows(8, 3, margin=True)
    bad[2]["margin"] = "much"
    write_jsonl(tmp_path / "data" / "train.jsonl", bad)
    with pytest.raises(UserError, match="split 'train', row 2: column 'margin' must be a number"):
        TASKS.get("rewardmodeling").prepare(data.load_raw_splits(job), "validation", tokenizer, job)


def test_reward_data_and_settings_errors_are_named(tiny_models, tmp_path):
    from llmfinetune.workflow import check_job

    unpaired = lambda n, seed: [{"prompt": "p", "completion": "c", "label": True}] * n  # noqa: E731
    with pytest.raises(UserError, match="a reward model learns from pairs"):
        check_job(reward_job(tiny_models["bert"], tmp_path, rows=unpaired))
    with pytest.raises(UserError, match="unknown key 'ft_config.train_config.preference_config.center_reward'.*"
                                        "Did you mean 'center_rewards_coefficient'"):
        check_job(reward_job(tiny_models["bert"], tmp_path, settings={"center_reward": 0.01}), load_data=False)
    with pytest.raises(UserError, match="preference_config.algorithm: for ft_task preference"):
        check_job(reward_job(tiny_models["bert"], tmp_path, settings={"algorithm": "dpo"}), load_data=False)


# ---------------------------------------------------------------- after training: eval, predict, export

def cli(capsys, *args) -> tuple[int, str, str]:
    from llmfinetune.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind, method", list(RUNS))
def test_eval_reproduces_the_final_eval_of_training(reward_runs, capsys, kind, method):
    run_dir = reward_runs[(kind, method)].output_dir
    code, out, err = cli(capsys, "eval", "--model", run_dir)
    assert code == 0, err
    metrics = json.loads(out)
    trained = json.loads((run_dir / "metrics.json").read_text())
    for key in ("eval_loss", "eval_accuracy", "eval_margin", "eval_mean_reward"):
        assert metrics[key] == pytest.approx(trained[key], rel=1e-6, abs=1e-7), key


def test_predict_scores_a_text_and_picks_the_better_of_two(reward_runs, capsys, tmp_path):
    run_dir = reward_runs[("bert", "lora")].output_dir
    code, out, err = cli(capsys, "predict", "--model", run_dir, "--text", "the film was great")
    assert code == 0, err
    assert isinstance(json.loads(out.strip().splitlines()[-1])["prediction"]["score"], float)
    code, out, err = cli(capsys, "predict", "--model", run_dir, "--text", "the meal was awful", "--text-pair",
                         "the meal was lovely")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["prediction"]["winner"] == "text_pair"
    # Held-out pairs in the training layout, with their prompts: the chosen answer wins.
    source = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16, 5))
    code, out, err = cli(capsys, "predict", "--model", run_dir, "--input", source)
    assert code == 0, err
    predictions = [json.loads(line)["prediction"] for line in out.strip().splitlines()]
    assert len(predictions) == 16 and sum(p["winner"] == "chosen" for p in predictions) >= 15
    assert all(p["margin"] == pytest.approx(p["scores"]["chosen"] - p["scores"]["rejected"]) for p in predictions)


def test_export_merge_gives_a_plain_one_output_classifier(reward_runs, capsys, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    result = reward_runs[("bert", "lora")]
    out = tmp_path / "merged"
    code, _, err = cli(capsys, "export", "--model", result.output_dir, "--out", out, "--merge")
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert merged.config.num_labels == 1
    batch = result.tokenizer(["How was the film?"], ["the film was great"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, result.model.eval()(**batch).logits, rtol=0, atol=1e-5)
