"""from_pretrained_kwargs that say where the model comes from reach the config check and the tokenizer, not only the
weights: a gated model's `token` must pass `check`, and the tokenizer must come from the weights' `revision`."""
from __future__ import annotations

import pytest

from conftest import job_dict
from llmfinetune.config import parse_job
from llmfinetune.errors import UserError

LOCATION = {"revision": "0123abc", "token": "hf_secret", "cache_dir": "/tmp/hf-cache", "subfolder": "v2",
            "local_files_only": True, "trust_remote_code": True}
WEIGHTS_ONLY = {"dtype": "bfloat16", "device_map": "auto", "attn_implementation": "sdpa", "low_cpu_mem_usage": True}


def _job(tmp_path, model_id="some-org/gated-model"):
    config = job_dict("sequenceclassification", "full", tmp_path, tmp_path, tmp_path / "run")
    config["model_config"]["model_id"] = model_id
    config["model_config"]["initialization"] = {
        "initializer": {"from_pretrained_kwargs": {**LOCATION, **WEIGHTS_ONLY}}}
    return parse_job(config)


class Captured(Exception):
    pass


def _capture(monkeypatch, target: str, calls: list):
    def fake(name, *args, **kwargs):
        calls.append((name, kwargs))
        raise Captured

    monkeypatch.setattr(target, fake)


def test_the_config_check_gets_the_location_kwargs_and_no_others(tmp_path, monkeypatch):
    from llmfinetune.models import resolve_model

    calls = []
    _capture(monkeypatch, "transformers.AutoConfig.from_pretrained", calls)
    with pytest.raises(UserError, match=r"model_config\.model_id: model 'some-org/gated-model' not found"):
        resolve_model(_job(tmp_path))
    assert calls == [("some-org/gated-model", LOCATION)]


def test_the_tokenizer_of_the_base_model_gets_the_location_kwargs_and_no_others(tmp_path, monkeypatch):
    from llmfinetune.models import load_tokenizer

    calls = []
    _capture(monkeypatch, "transformers.AutoTokenizer.from_pretrained", calls)
    with pytest.raises(Captured):
        load_tokenizer("some-org/gated-model", _job(tmp_path))
    assert calls == [("some-org/gated-model", LOCATION)]


def test_a_run_directory_tokenizer_gets_no_revision_or_subfolder(tmp_path, monkeypatch):
    """A run directory is a flat folder this project wrote: the base repo's revision and subfolder do not apply."""
    from llmfinetune.models import load_tokenizer

    calls = []
    _capture(monkeypatch, "transformers.AutoTokenizer.from_pretrained", calls)
    with pytest.raises(Captured):
        load_tokenizer(str(tmp_path / "run"), _job(tmp_path), base_model=False)
    assert calls == [(str(tmp_path / "run"), {"trust_remote_code": True})]


def test_without_kwargs_remote_code_stays_off(tmp_path, monkeypatch):
    from llmfinetune.models import load_tokenizer, resolve_model

    config = job_dict("sequenceclassification", "full", tmp_path, tmp_path, tmp_path / "run")
    config["model_config"]["model_id"] = "some-org/model"
    job = parse_job(config)
    calls = []
    _capture(monkeypatch, "transformers.AutoConfig.from_pretrained", calls)
    _capture(monkeypatch, "transformers.AutoTokenizer.from_pretrained", calls)
    with pytest.raises(UserError):
        resolve_model(job)
    with pytest.raises(Captured):
        load_tokenizer("some-org/model", job)
    assert calls == [("some-org/model", {"trust_remote_code": False})] * 2
