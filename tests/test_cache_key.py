"""The tokenization cache key covers every setting that changes tokenized data, and the library versions that make
the tokens; settings that only change training do not invalidate it."""
from __future__ import annotations

import pytest
from datasets import Dataset, DatasetDict

from conftest import job_dict, text_rows
from llmfinetune.config import parse_job
from llmfinetune.registry import TASKS


@pytest.fixture(scope="module")
def inputs(tiny_models, tmp_path_factory):
    from transformers import AutoTokenizer

    rows = text_rows(6, 1)
    splits = DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows[:2])})
    return TASKS.get("maskedlm"), splits, AutoTokenizer.from_pretrained(tiny_models["bert"]), \
        tmp_path_factory.mktemp("cache-key")


def _key(inputs, **base):
    from llmfinetune.cache import cache_key

    task, splits, tokenizer, folder = inputs
    job = parse_job(job_dict("maskedlm", "full", folder, folder, folder / "run", **base))
    return cache_key(task, splits, "validation", tokenizer, job)


def test_whole_word_mask_changes_the_key(inputs):
    """whole_word_mask makes the tokenizer return offsets, saved with the data: the other setting must miss."""
    assert _key(inputs, whole_word_mask=True) != _key(inputs, whole_word_mask=False)


def test_tokenization_settings_change_the_key_and_training_settings_do_not(inputs):
    plain = _key(inputs)
    assert _key(inputs, max_length=32) != plain
    assert _key(inputs, mlm_probability=0.3) == plain  # masks are drawn by the collator, not stored
    assert _key(inputs, learning_rate=1e-3, save_on_interrupt=False) == plain


def test_library_versions_are_in_the_key(inputs, monkeypatch):
    import datasets
    import tokenizers
    import transformers

    from llmfinetune.cache import key_material

    task, _, tokenizer, folder = inputs
    job = parse_job(job_dict("maskedlm", "full", folder, folder, folder / "run"))
    versions = dict(key_material(task, "validation", tokenizer, job))["versions"]
    assert versions == {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                        "datasets": datasets.__version__}
    before = _key(inputs)
    for module in (transformers, tokenizers):
        with monkeypatch.context() as patch:
            patch.setattr(module, "__version__", module.__version__ + ".post1")
            assert _key(inputs) != before, module.__name__
    assert _key(inputs) == before
