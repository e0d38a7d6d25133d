"""Generation eval: the scores against hand-computed values, the eval rows as training reads them, the
generation_eval setting, and the proof that SFT teaches (a tiny random model learns a templated task)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import job_dict, write_jsonl
from llmfinetune.config import parse_job
from llmfinetune.errors import UserError
from llmfinetune.generation_eval import exact_match, score, settings, tokenize, tokenization

# ---------------------------------------------------------------- the scores, by hand

# Reference "the cat sat on the mat", generated "the cat sat on the rug": 6 tokens each.
#   unigrams: the x2, cat, sat, on match -> 5/6; bigrams: the cat, cat sat, sat on, on the -> 4/5;
#   trigrams 3/4; 4-grams 2/3; same length, so no brevity penalty: BLEU-4 = (5/6 * 4/5 * 3/4 * 2/3) ** (1/4).
#   ROUGE-1 F = 5/6, ROUGE-2 F = 4/5, ROUGE-L: longest common subsequence "the cat sat on the" = 5 -> 5/6.
LATIN = ("the cat sat on the mat", "the cat sat on the rug")
LATIN_SCORES = {"exact_match": 0.0, "rouge1": 5 / 6, "rouge2": 4 / 5, "rougeL": 5 / 6, "bleu4": (1 / 3) ** 0.25}
# Chinese on characters: 今 天 天 气 很 好 against 今 天 天 气 不 好.
#   unigrams 5/6; bigrams 今天 天天 天气 -> 3/5; trigrams 今天天 天天气 -> 2/4; 4-grams 今天天气 -> 1/3;
#   LCS 今天天气好 = 5. As one whitespace-free "word" each text would score 0 everywhere.
CJK = ("今天天气很好", "今天天气不好")
CJK_SCORES = {"exact_match": 0.0, "rouge1": 5 / 6, "rouge2": 3 / 5, "rougeL": 5 / 6,
              "bleu4": (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25}


def _close(found: dict, expected: dict) -> None:
    for name, value in expected.items():
        assert math.isclose(found[name], value, rel_tol=1e-9, abs_tol=1e-12), (name, found[name], value)


def test_latin_text_is_scored_on_words():
    totals, rows = score([LATIN[0]], [LATIN[1]])
    _close(totals, LATIN_SCORES)
    _close(rows[0], LATIN_SCORES)
    assert totals["tokenization"] == "words"


def test_cjk_text_is_scored_on_characters():
    totals, rows = score([CJK[0]], [CJK[1]])
    _close(totals, CJK_SCORES)
    _close(rows[0], CJK_SCORES)
    assert totals["tokenization"] == "characters (CJK) + words"


def test_corpus_scores_pool_the_rows():
    totals, rows = score([LATIN[0], CJK[0], "Yes."], [LATIN[1], CJK[1], " Yes. "])
    assert [row["exact_match"] for row in rows] == [0.0, 0.0, 1.0]
    _close(rows[1], CJK_SCORES)
    # ROUGE and exact match average the rows; corpus BLEU pools the n-gram counts of all rows:
    # unigrams (5+5+2)/(6+6+2), bigrams (4+3+1)/(5+5+1), trigrams (3+2)/(4+4), 4-grams (2+1)/(3+3).
    _close(totals, {"exact_match": 1 / 3, "rouge1": (5 / 6 + 5 / 6 + 1) / 3, "rouge2": (4 / 5 + 3 / 5 + 1) / 3,
                    "rougeL": (5 / 6 + 5 / 6 + 1) / 3,
                    "bleu4": (12 / 14 * 8 / 11 * 5 / 8 * 3 / 6) ** 0.25})
    assert totals["tokenization"] == "characters (CJK) + words"


def test_exact_match_ignores_only_surrounding_whitespace():
    assert exact_match("The capital is Paris.", "  The capital is Paris.\n") == 1.0
    assert exact_match("The capital is Paris.", "the capital is Paris.") == 0.0
    assert exact_match("The capital is Paris.", "The capital is Paris") == 0.0


def test_tokens_are_words_punctuation_and_single_unsegmented_characters():
    assert tokenize("iPhone 15 很好! ok") == ["iPhone", "15", "很", "好", "!", "ok"]
    assert tokenize("こんにちは、世界") == ["こ", "ん", "に", "ち", "は", "、", "世", "界"]
    assert tokenize("Don't stop.") == ["Don", "'", "t", "stop", "."]
    assert tokenization(["plain English", "more text"]) == "words"
    assert tokenization(["plain English", "東京"]) == "characters (CJK) + words"


def test_an_empty_generation_scores_zero():
    totals, rows = score(["The capital of France is Paris."], [""])
    assert rows[0] == {"exact_match": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "bleu4": 0.0}
    assert totals["bleu4"] == 0.0


# ---------------------------------------------------------------- the setting

def _job(tiny_models, tmp_path, task="text-generation", **base):
    model = tiny_models["qwen2"] if task == "text-generation" else tiny_models["bert"]
    return parse_job(job_dict(task, "full", model, tmp_path, tmp_path / "run", **base))


def test_generation_eval_setting_defaults_and_checks(tiny_models, tmp_path):
    assert settings(_job(tiny_models, tmp_path)) is None
    chosen = settings(_job(tiny_models, tmp_path, eval_strategy="epoch",
                           generation_eval={"every_eval": True, "rows": 4}))
    assert (chosen.at_end, chosen.every_eval, chosen.rows, chosen.max_new_tokens) == (True, True, 4, 64)
    assert settings(_job(tiny_models, tmp_path, generation_eval=True)).at_end is True
    with pytest.raises(UserError, match="every_eval: true, but the job never evaluates during training"):
        settings(_job(tiny_models, tmp_path, generation_eval={"every_eval": True}))
    bad = [({"row": 4}, "unknown key row"), ({"rows": 0}, "generation_eval.rows: expected a whole number"),
           ({"at_end": "yes"}, "generation_eval.at_end: expected true or false"), ("all", "expected a mapping")]
    for value, message in bad:
        with pytest.raises(UserError, match=message):
            settings(_job(tiny_models, tmp_path, generation_eval=value))
    from llmfinetune.registry import TASKS

    with pytest.raises(UserError, match="base_config.generation_eval: only for ft_task text-generation"):
        TASKS.get("sequenceclassification").check(_job(tiny_models, tmp_path, "sequenceclassification",
                                                       generation_eval={"at_end": True}))


def test_generation_eval_is_checked_with_the_job(tiny_models, tmp_path):
    """`check` and run-ft read base_config through arguments.translate: the key is known there and checked."""
    from llmfinetune import arguments

    arguments.translate(_job(tiny_models, tmp_path, generation_eval={"rows": 2}))
    with pytest.raises(UserError, match="base_config.generation_eval.max_new_tokens"):
        arguments.translate(_job(tiny_models, tmp_path, generation_eval={"max_new_tokens": -1}))


# ---------------------------------------------------------------- the eval rows, as training reads them

def test_the_reference_is_the_last_assistant_turn_of_each_format(tiny_models, tmp_path):
    from datasets import Dataset, DatasetDict

    from llmfinetune.generation_eval import cases

    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2 plus 2?"},
                    {"role": "assistant", "content": "4."}]
    rows = {"messages": {"messages": conversation},
            "alpaca": {"instruction": "Add.", "input": "2 and 2", "output": "4."},
            "prompt_response": {"question": "2 plus 2?", "answer": "4."}}
    for name, row in rows.items():
        split = Dataset.from_list([row])
        [case] = cases(_job(tiny_models, tmp_path), DatasetDict({"train": split, "validation": split}), "validation")
        assert case.reference == "4.", name
        assert case.conversation[-1]["role"] == "user" and "4." not in [m["content"] for m in case.conversation]
    assert case.prompt == "2 plus 2?"
    split = Dataset.from_list([{"messages": conversation}])
    [case] = cases(_job(tiny_models, tmp_path), DatasetDict({"train": split, "validation": split}), "validation")
    assert case.conversation == conversation[:4] and case.prompt == "2 plus 2?"
    text = Dataset.from_list([{"text": "just text"}])
    with pytest.raises(UserError, match="raw text"):
        cases(_job(tiny_models, tmp_path), DatasetDict({"train": text, "validation": text}), "validation")


def test_generation_eval_is_skipped_with_a_warning_under_several_processes(tiny_models, tmp_path, caplog):
    import logging

    from llmfinetune.generation_eval import TrainingJudge

    job = _job(tiny_models, tmp_path, eval_strategy="steps", generation_eval={"every_eval": True})
    with caplog.at_level(logging.WARNING, logger="llmfinetune"):
        judge = TrainingJudge(job, None, None, {}, "validation", tmp_path / "run", world_size=2)
    assert judge.callbacks == [] and judge.at_end(model=None) == {}
    assert f"llmfinetune eval --model {tmp_path / 'run'} --generate" in caplog.text


# ---------------------------------------------------------------- proof that SFT teaches

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Japan": "Tokyo", "Brazil": "Brasilia", "Canada": "Ottawa",
            "Kenya": "Nairobi", "India": "Delhi", "Spain": "Madrid", "Italy": "Rome", "Norway": "Oslo",
            "Egypt": "Cairo", "Mexico": "Mexico City"}
PHRASINGS = ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital of {c}.",
             "Tell me the capital of {c}."]


def capital_rows() -> tuple[list[dict], list[dict]]:
    """Every country asked four ways; one way per country is held out, so each held-out question pairs a phrasing
    and a country the model saw only apart: it must answer from the country, not recall the row."""
    train, held_out = [], []
    for index, (country, capital) in enumerate(CAPITALS.items()):
        for way, phrasing in enumerate(PHRASINGS):
            row = {"prompt": phrasing.format(c=country), "response": f"The capital of {country} is {capital}."}
            (held_out if way == index % len(PHRASINGS) else train).append(row)
    return train, held_out


@pytest.fixture(scope="module")
def capitals(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny random qwen2 trained on the capitals task (with generation_eval at each evaluation and at the
    end), and the same model saved untouched (learning rate 0)."""
    from llmfinetune.workflow import run

    root = tmp_path_factory.mktemp("capitals")
    train, held_out = capital_rows()
    write_jsonl(root / "data" / "train.jsonl", train)
    write_jsonl(root / "data" / "validation.jsonl", held_out)
    runs = {}
    for name, base in {
        "trained": {"max_steps": 150, "learning_rate": 3e-3, "eval_strategy": "steps", "eval_steps": 50,
                    "generation_eval": {"every_eval": True, "rows": 4, "max_new_tokens": 24}},
        "untrained": {"max_steps": 1, "learning_rate": 0.0},
    }.items():
        raw = job_dict("text-generation", "full", tiny_models["qwen2"], root / "data", root / name,
                       per_device_train_batch_size=12, per_device_eval_batch_size=12, save_strategy="no",
                       logging_steps=50, warmup_steps=10, lr_scheduler_type="cosine", weight_decay=0.0, **base)
        run(parse_job(raw))
        runs[name] = root / name
    return runs


def _eval_generate(capsys, run_dir: Path) -> dict:
    from llmfinetune.cli import main

    capsys.readouterr()
    assert main(["eval", "--model", str(run_dir), "--generate", "--max-new-tokens", "24"]) == 0
    return json.loads(capsys.readouterr().out)


def test_sft_teaches_a_templated_task(capitals, capsys):
    trained = _eval_generate(capsys, capitals["trained"])
    assert trained["eval_gen_exact_match"] >= 0.9, trained
    assert trained["eval_gen_rows"] == len(CAPITALS) and trained["eval_gen_tokenization"] == "words"
    before = _eval_generate(capsys, capitals["untrained"])
    assert before["eval_gen_exact_match"] <= 0.1, before
    assert before["eval_gen_rougeL"] < 0.3 < trained["eval_gen_rougeL"]
    rows = [json.loads(line) for line in (capitals["trained"] / "generations.jsonl").read_text().splitlines()]
    _, held_out = capital_rows()
    assert [(r["prompt"], r["reference"]) for r in rows] == [(h["prompt"], h["response"]) for h in held_out]
    for row in rows:
        assert row["scores"]["exact_match"] == float(row["generated"] == row["reference"])
        assert set(row["scores"]) == {"exact_match", "rouge1", "rouge2", "rougeL", "bleu4"}
        assert row["finish_reason"] in ("eos", "length")


def test_generation_eval_during_and_after_training(capitals):
    run_dir = capitals["trained"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_gen_exact_match"] >= 0.9 and metrics["eval_gen_rows"] == len(CAPITALS)
    assert metrics["eval_gen_file"] == "generations.jsonl"
    state = json.loads((run_dir / "trainer_state.json").read_text())
    during = [e for e in state["log_history"] if "eval_gen_exact_match" in e]
    # Each evaluation during training (steps 50, 100, 150) scored its first 4 rows; the one after did not.
    assert [(e["step"], e["eval_gen_rows"]) for e in during] == [(50, 4), (100, 4), (150, 4)]
    assert all("eval_loss" in e for e in during)
    report = (run_dir / "report.md").read_text()
    assert "## Generations" in report and "Scores on words" in report
    first = json.loads((run_dir / "generations.jsonl").read_text().splitlines()[0])
    assert report.count("**Example ") == 3
    for part in ("prompt", "reference", "generated"):
        assert f"{part}:\n\n~~~~text\n{first[part]}\n~~~~" in report
    assert "| `eval_gen_exact_match` |" in report
    from PIL import Image

    with Image.open(run_dir / "report.png") as image, Image.open(capitals["untrained"] / "report.png") as plain:
        assert image.size[1] > plain.size[1]  # a third row of panels: the generation scores
    # The untrained run did not ask for it: no generation, no section.
    assert "eval_gen_exact_match" not in json.loads((capitals["untrained"] / "metrics.json").read_text())
    assert "## Generations" not in (capitals["untrained"] / "report.md").read_text()


def test_eval_generate_flag_mistakes(capitals, capsys):
    from llmfinetune.cli import main

    mistakes = [(["--max-new-tokens", "5"], "--max-new-tokens: only with --generate"),
                (["--do-sample"], "--do-sample: only with --generate"),
                (["--generate", "--temperature", "0.5"], "add --do-sample"),
                (["--generate", "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1")]
    for extra, message in mistakes:
        capsys.readouterr()
        assert main(["eval", "--model", str(capitals["trained"]), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_a_preference_tuned_policy_is_judged_against_the_chosen_answers(tiny_models, tmp_path, capsys):
    from llmfinetune.cli import main
    from llmfinetune.workflow import run

    rows = [{"prompt": f"What is {a} plus {a}?", "chosen": f"yes {2 * a}", "rejected": f"no {2 * a}"}
            for a in range(1, 17)]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows[:12])
    write_jsonl(tmp_path / "data" / "validation.jsonl", rows[12:])
    raw = job_dict("preference", "lora", tiny_models["qwen2"], tmp_path / "data", tmp_path / "run", max_steps=2,
                   save_strategy="no")
    raw["ft_config"]["train_config"]["preference_config"] = {}
    run(parse_job(raw))
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "run"), "--generate", "--max-new-tokens", "4"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["eval_gen_rows"] == 4 and 0 <= metrics["eval_gen_rougeL"] <= 1 and "eval_loss" in metrics
    generated = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert [(g["prompt"], g["reference"]) for g in generated] == [(r["prompt"], r["chosen"]) for r in rows[12:]]


def test_kto_rows_are_judged_on_their_desirable_completions(tiny_models, tmp_path):
    from datasets import Dataset, DatasetDict

    from llmfinetune.generation_eval import cases

    raw = job_dict("preference", "lora", tiny_models["qwen2"], tmp_path, tmp_path / "run")
    raw["ft_config"]["train_config"]["preference_config"] = {"algorithm": "kto"}
    split = Dataset.from_list([{"prompt": "2 plus 2?", "completion": "4", "label": True},
                               {"prompt": "2 plus 2?", "completion": "5", "label": False},
                               {"prompt": "3 plus 3?", "completion": "6", "label": True}])
    found = cases(parse_job(raw), DatasetDict({"train": split, "validation": split}), "validation")
    assert [(c.row, c.prompt, c.reference) for c in found] == [(0, "2 plus 2?", "4"), (2, "3 plus 3?", "6")]


def test_generating_during_training_does_not_change_training(tiny_models, tmp_path):
    """The callback generates with the model and tokenizer being trained (eval mode, left padding, greedy): the
    training losses step by step are those of the same run without it."""
    from conftest import make_dataset
    from llmfinetune.workflow import run

    data = make_dataset(tmp_path / "data", "text-generation", train_rows=24, eval_rows=4)
    losses = []
    for name, extra in (("plain", {}), ("judged", {"generation_eval": {"every_eval": True, "rows": 4,
                                                                          "max_new_tokens": 4}})):
        raw = job_dict("text-generation", "full", tiny_models["qwen2"], data, tmp_path / name, max_steps=6,
                       eval_strategy="steps", eval_steps=2, logging_steps=1, save_strategy="no", **extra)
        result = run(parse_job(raw))
        assert result.tokenizer.padding_side == "right"  # as the collator found it, generation pads left
        history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        losses.append([e["loss"] for e in history if "loss" in e])
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    judged = json.loads((tmp_path / "judged" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in judged if "eval_gen_rouge1" in e] == [2, 4, 6]
