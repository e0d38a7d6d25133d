"""The methods' decisions: which new modules LoRA trains in full, which embedding rows of added tokens it trains, and
QLoRA (quantization_bit): compute dtype, prepare_model_for_kbit_training, the refusal of full fine-tuning, and the
export merge into an unquantized base. bitsandbytes needs CUDA, so the 4-bit load itself is not run here: the tests
check what is handed to transformers and peft."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
import yaml

from conftest import job_dict, make_dataset
from llmfinetune.config import parse_job
from llmfinetune.errors import UserError
from llmfinetune.methods.lora import LoRA, fresh_modules_to_save, token_rows_to_train


def _load(model_class: str, path, **kwargs):
    import transformers

    model, info = getattr(transformers, model_class).from_pretrained(path, output_loading_info=True, **kwargs)
    return model, sorted(info["missing_keys"])


def test_a_new_mlm_head_trains_its_transform_not_a_copy_of_the_tied_embedding(encoder_only_bert):
    model, missing = _load("AutoModelForMaskedLM", encoder_only_bert)
    assert model.cls.predictions.decoder.weight is model.get_input_embeddings().weight
    # cls.predictions holds the decoder, whose weight is the word embedding; nesting cls.predictions and its
    # children is what peft could not load back.
    assert fresh_modules_to_save(model, missing, []) == (["cls.predictions.transform"], ["cls.predictions.bias"])
    # Where the user trains the decoder in full, its bias is covered and nothing is nested inside it.
    assert fresh_modules_to_save(model, missing, ["cls.predictions.decoder"]) == (["cls.predictions.transform"], [])


def test_new_modules_never_nest_with_modules_to_save_entries(tiny_models):
    model, missing = _load("AutoModelForSequenceClassification", tiny_models["bert"], num_labels=3)
    assert missing == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]
    # peft adds 'classifier' and 'score' itself for classification task types.
    assert fresh_modules_to_save(model, missing, ["classifier", "score"]) == (["bert.pooler"], [])
    # 'dense' (matched by suffix, as peft does) claims bert.pooler.dense: bert.pooler around it must not be listed.
    assert fresh_modules_to_save(model, missing, ["dense", "classifier"]) == ([], [])


def test_added_token_rows_on_tied_and_untied_embeddings():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    small = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=32)
    tied = Qwen2ForCausalLM(Qwen2Config(**small, tie_word_embeddings=True))
    untied = Qwen2ForCausalLM(Qwen2Config(**small, tie_word_embeddings=False))
    # peft ties the trained rows of a tied head itself; an untied head gets its own rows.
    assert token_rows_to_train(tied, None, [40, 41], []) == {"model.embed_tokens": [40, 41]}
    assert token_rows_to_train(untied, None, [40, 41], []) == {"model.embed_tokens": [40, 41], "lm_head": [40, 41]}
    assert token_rows_to_train(untied, [3], [40], []) == {"model.embed_tokens": [3, 40], "lm_head": [40]}
    assert token_rows_to_train(untied, {"embed_tokens": [3]}, [40], ["lm_head"]) == {"embed_tokens": [3, 40]}


def test_lora_trains_an_untied_heads_row_of_a_new_token(tiny_models):
    """The tiny qwen2 ties its head; here an untied copy, so the head's own row of the new token must train."""
    from transformers import AutoModelForCausalLM

    from llmfinetune.models import NewWeights
    from llmfinetune.registry import TASKS

    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], tie_word_embeddings=False)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    new_id = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(new_id + 1)
    job = parse_job(job_dict("text-generation", "lora", tiny_models["qwen2"], tiny_models["qwen2"], "unused"))
    peft_model = LoRA().wrap(model, job, TASKS.get("text-generation"), NewWeights([], [new_id]))
    ids = torch.tensor([[5, new_id, 7]])
    peft_model(input_ids=ids, labels=torch.tensor([[5, new_id, new_id]])).loss.backward()
    head = peft_model.get_base_model().lm_head.token_adapter.trainable_tokens_delta["default"]
    embedding = peft_model.get_base_model().model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    assert head.shape == embedding.shape == (1, model.config.hidden_size)
    assert head.grad is not None and head.grad.abs().sum() > 0
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0


def test_wrapping_in_lora_says_nothing_the_job_cannot_change(tiny_models, tmp_path):
    """peft reads transformers' deprecated `is_gradient_checkpointing` itself, wrapping a model and reloading an
    adapter: that FutureWarning is peft's to fix, and a user would see it on every run (the CLI hides it)."""
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmfinetune.cli import hide_library_deprecations
    from llmfinetune.registry import TASKS

    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
    job = parse_job(job_dict("text-generation", "lora", tiny_models["qwen2"], tiny_models["qwen2"], "unused"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hide_library_deprecations()  # what the CLI does before any command
        LoRA().wrap(model, job, TASKS.get("text-generation"), None).save_pretrained(tmp_path / "adapter")
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"]), tmp_path / "adapter")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_lora_on_the_embedding_with_added_tokens_is_refused_by_key(tiny_models):
    from transformers import AutoModelForCausalLM

    from llmfinetune.models import NewWeights
    from llmfinetune.registry import TASKS

    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
    new_id = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(new_id + 1)
    raw = job_dict("text-generation", "lora", tiny_models["qwen2"], tiny_models["qwen2"], "unused")
    raw["ft_config"]["train_config"]["lora_config"]["target_modules"] = ["embed_tokens", "q_proj"]
    with pytest.raises(UserError, match=r"lora_config.target_modules: adapts an embedding .*add_special_tokens"):
        LoRA().wrap(model, parse_job(raw), TASKS.get("text-generation"), NewWeights([], [new_id]))


# ----------------------------------------------------------------------------------------------- QLoRA


def _qlora_job(tiny_models, method="lora", dtype="bfloat16", **base):
    raw = job_dict("text-generation", method, tiny_models["qwen2"], tiny_models["qwen2"], "unused", **base)
    raw["model_config"]["quantization_bit"] = 4
    raw["model_config"]["initialization"] = {"initializer": {"dtype": dtype}}
    return parse_job(raw)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA machine with bitsandbytes, as far as models.py can tell; `bf16` says whether the GPU has bf16."""
    import importlib.util

    from llmfinetune import models

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    state = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: state["bf16"])
    return state


class _Captured(Exception):
    pass


@pytest.mark.parametrize("dtype, gpu_bf16, expected", [
    ("bfloat16", True, torch.bfloat16),
    ("bfloat16", False, torch.float16),  # V100/T4: no bf16
    ("auto", True, torch.bfloat16),
    ("auto", False, torch.float16),
    ("float16", True, torch.float16),
    ("float32", True, torch.float32),
])
def test_qlora_computes_in_the_jobs_dtype_where_the_gpu_has_it(dtype, gpu_bf16, expected, fake_cuda, tiny_models,
                                                                monkeypatch):
    import transformers

    from llmfinetune import models

    fake_cuda["bf16"] = gpu_bf16
    captured = {}

    def from_pretrained(path, **kwargs):
        captured.update(kwargs)
        raise _Captured

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    tokenizer = models.load_tokenizer(str(tiny_models["qwen2"]), _qlora_job(tiny_models, dtype=dtype))
    with pytest.raises(_Captured):
        models.load_model(str(tiny_models["qwen2"]), _qlora_job(tiny_models, dtype=dtype), "AutoModelForCausalLM", {},
                          tokenizer)
    config = captured["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == expected
    assert captured["dtype"] == expected  # the unquantized layers compute alongside in the same dtype


def test_quantization_without_cuda_is_a_clear_error(tiny_models):
    from llmfinetune import models

    job = _qlora_job(tiny_models)
    tokenizer = models.load_tokenizer(str(tiny_models["qwen2"]), job)
    with pytest.raises(UserError, match=r"model_config.quantization_bit: 4-bit loading needs a CUDA GPU"):
        models.load_model(str(tiny_models["qwen2"]), job, "AutoModelForCausalLM", {}, tokenizer)


def test_full_fine_tuning_of_a_quantized_model_is_refused_at_check(tiny_models):
    from llmfinetune.workflow import check_job

    with pytest.raises(UserError) as refused:
        check_job(_qlora_job(tiny_models, method="full"), load_data=False)
    assert "model_config.quantization_bit" in str(refused.value)
    assert "ft_config.ft_method" in str(refused.value) and "lora" in str(refused.value)
    check_job(_qlora_job(tiny_models), load_data=False)  # QLoRA itself passes check


@pytest.mark.parametrize("checkpointing", [False, True])
def test_qlora_prepares_the_quantized_model_before_adding_adapters(checkpointing, tiny_models, monkeypatch):
    import peft
    from transformers import AutoModelForCausalLM

    from llmfinetune.models import NewWeights
    from llmfinetune.registry import TASKS

    calls = []

    def prepare(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=None):
        assert not isinstance(model, peft.PeftModel), "must run on the bare quantized model, before get_peft_model"
        calls.append((use_gradient_checkpointing, gradient_checkpointing_kwargs))
        return model

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
    extra = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}} \
        if checkpointing else {}
    wrapped = LoRA().wrap(model, _qlora_job(tiny_models, **extra), TASKS.get("text-generation"), NewWeights())
    assert isinstance(wrapped, peft.PeftModel)
    assert calls == [(True, {"use_reentrant": False})] if checkpointing else calls == [(False, None)]

    calls.clear()
    plain = parse_job(job_dict("text-generation", "lora", tiny_models["qwen2"], tiny_models["qwen2"], "unused"))
    LoRA().wrap(AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"]), plain, TASKS.get("text-generation"),
                NewWeights())
    assert calls == [], "prepare_model_for_kbit_training is for quantized models only"


def test_export_merge_of_a_qlora_run_loads_the_base_unquantized(tiny_models, tmp_path, monkeypatch):
    """A QLoRA run directory (job.yaml with quantization_bit: 4) exports by merging into the base loaded in the job's
    dtype without quantization_config: on this CPU machine, loading it quantized would be refused."""
    import transformers

    from llmfinetune.export import export_run
    from llmfinetune.workflow import run

    monkeypatch.setattr("llmfinetune.workflow._write_report", lambda *args, **kwargs: None, raising=False)
    out = tmp_path / "run"
    result = run(parse_job(job_dict("sequenceclassification", "lora", tiny_models["bert"],
                                    make_dataset(tmp_path / "data", "sequenceclassification"), out,
                                    max_steps=2, save_steps=2)))
    recorded = yaml.safe_load((out / "job.yaml").read_text())
    recorded["model_config"]["quantization_bit"] = 4  # as a QLoRA run on a GPU writes it
    (out / "job.yaml").write_text(yaml.safe_dump(recorded))

    loads = []
    original = transformers.AutoModelForSequenceClassification.from_pretrained

    def from_pretrained(*args, **kwargs):
        loads.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", from_pretrained)
    target = export_run(out, tmp_path / "merged", merge=True, device="cpu")
    assert loads and all("quantization_config" not in kwargs for kwargs in loads)
    assert loads[0]["dtype"] == torch.float32  # the job's dtype
    exported = yaml.safe_load((target / "job.yaml").read_text())
    assert exported["model_config"]["quantization_bit"] is None
    assert exported["ft_config"]["ft_method"] == "full"

    merged = original(target).eval()
    batch = result.tokenizer(["the film was great"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, result.model.eval()(**batch).logits, rtol=1e-5, atol=1e-5)
    assert json.loads((target / "labels.json").read_text())["id2label"]


def _trained_dtypes(tiny_models, tmp_path, task, caplog, initializer=None, model_config=None, lora=None, **base):
    """(dtypes of the frozen parameters, dtypes of the trained ones, the base_dtype log lines) after a short run."""
    import logging

    from conftest import TASK_DATA
    from llmfinetune.workflow import run

    data = make_dataset(tmp_path / "data", task)
    config = job_dict(task, "lora", tiny_models[TASK_DATA[task][1]], data, tmp_path / "run", max_steps=2,
                      save_strategy="no", **base)
    if initializer is not None:
        config["model_config"]["initialization"] = {"initializer": initializer}
    config["model_config"].update(model_config or {})
    config["ft_config"]["train_config"]["lora_config"].update(lora or {})
    with caplog.at_level(logging.INFO, logger="llmfinetune.methods.lora"):
        model = run(parse_job(config)).model
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    return frozen, trained, [r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRA in bf16")]


def test_lora_in_bf16_holds_a_causal_lms_frozen_base_in_bf16_and_trains_in_fp32(tiny_models, tmp_path, caplog):
    frozen, trained, lines = _trained_dtypes(tiny_models, tmp_path, "text-generation", caplog, bf16=True,
                                             packing=True)
    assert frozen == {torch.bfloat16} and trained == {torch.float32} and len(lines) == 1
    assert "initializer.dtype: float32" in lines[0]  # how to keep an fp32 base


@pytest.mark.parametrize("task, initializer, bf16", [
    ("text-generation", {"dtype": "float32"}, True),  # the user's written dtype wins
    ("text-generation", {"from_pretrained_kwargs": {"dtype": "float32"}}, True),
    ("text-generation", None, False),  # fp32 training
    ("sequenceclassification", None, True),  # encoder tasks keep the base their accuracy was measured with
])
def test_lora_keeps_an_fp32_base_where_the_job_or_the_task_says_so(tiny_models, tmp_path, caplog, task, initializer,
                                                                   bf16):
    frozen, trained, lines = _trained_dtypes(tiny_models, tmp_path, task, caplog, initializer, bf16=bf16)
    assert frozen == {torch.float32} and trained == {torch.float32} and lines == []


def test_lora_in_bf16_trains_modules_in_full_and_new_token_rows_in_fp32(tiny_models, tmp_path, caplog):
    """peft makes its adapters fp32, not a module it trains in full (modules_to_save): the optimizer must not step
    on bf16 weights. Rows of added tokens train in fp32 too."""
    added = {"add_special_tokens": {"sep_token": "<new_sep>"}}
    frozen, trained, lines = _trained_dtypes(tiny_models, tmp_path, "text-generation", caplog, model_config=added,
                                             bf16=True, lora={"modules_to_save": ["norm"]})
    assert frozen == {torch.bfloat16} and trained == {torch.float32} and len(lines) == 1


def test_under_autocast_adapters_take_their_input_as_it_comes_and_get_the_flag_back(tiny_models, tmp_path,
                                                                                   monkeypatch, caplog):
    """peft casts an adapter's input to its fp32 weights, which autocast casts straight back to bf16: SFT steps skip
    that (the same values), and afterwards (generation without autocast) the adapters cast again."""
    from peft.tuners.lora import LoraLayer

    from llmfinetune import lm_head

    seen = []
    original = lm_head._adapters_keep_input_dtype

    def spy(layers):
        assert layers and all(isinstance(m, LoraLayer) for m in layers)
        with original(layers):
            seen.append(({m.cast_input_dtype_enabled for m in layers}, len(layers)))
            yield

    monkeypatch.setattr(lm_head, "_adapters_keep_input_dtype", contextlib.contextmanager(spy))
    data = make_dataset(tmp_path / "data", "text-generation")
    from llmfinetune.workflow import run

    model = run(parse_job(job_dict("text-generation", "lora", tiny_models["qwen2"], data, tmp_path / "run",
                                   max_steps=2, save_strategy="no", bf16=True))).model
    adapters = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert seen and all(flags == {False} and count == len(adapters) for flags, count in seen)
    assert {getattr(m, "cast_input_dtype_enabled", True) for m in adapters} == {True}
