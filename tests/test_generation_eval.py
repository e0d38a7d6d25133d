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
    chosen = settings(_job(tiny_models, tmp_path, generation_eval={"every_eval": True, "rows": 4}))
    assert (chosen.at_end, chosen.every_eval, chosen.rows, chosen.max_new_tokens) == (True, True, 4, 64)
    assert settings(_job(tiny_models, tmp_path, generation_eval=True)).at_end is True
    bad = [({"row": 4}, "unknown key row"), ({"rows": 0}, "generation_eval.rows: expected a whole number"),
           ({"at_end": "yes"}, "generation_eval.at_end: expected true or false"), ("all", "expected a mapping")]
    for value, message in bad:
        with pytest.raises(UserError, match=message):
            settings(_job(tiny_models, tmp_path, generation_eval=value))
    with pytest.raises(UserError, match="only for ft_task text-generation"):
        settings(_job(tiny_models, tmp_path, "sequenceclassification", generation_eval={"at_end": True}))


def test_generation_eval_is_checked_with_the_job(tiny_models, tmp_path):
    """`check` and run-ft read base_config through arguments.translate: the key is known there and checked."""
    from llmfinetune import arguments

    arguments.translate(_job(tiny_models, tmp_path, generation_eval={"rows": 2}))
    with pytest.raises(UserError, match="base_config.generation_eval.max_new_tokens"):
        arguments.translate(_job(tiny_models, tmp_path, generation_eval={"max_new_tokens": -1}))
