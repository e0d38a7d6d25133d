"""The last layer on the head's position only (last_layer_cls_only): for every head it is used with, logits and every
gradient equal the full model's; the Trainer uses it in training and evaluation steps; other models step aside."""
from __future__ import annotations

import logging

import pytest

from llmfinetune.cls_head import FIRST_POSITION_HEADS, FirstPositionTrainer, first_position_module

MODEL_TYPES = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
               "xlm-roberta": "XLMRobertaForSequenceClassification",
               "camembert": "CamembertForSequenceClassification", "electra": "ElectraForSequenceClassification"}
# Two rows, the second padded: the first position must still attend to every real position of its row.
INPUTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [5, 14, 15, 16, 17, 1, 1, 1, 1]]
MASK = [[1] * 9, [1, 1, 1, 1, 1, 0, 0, 0, 0]]


def test_every_listed_head_is_proven_here():
    assert set(MODEL_TYPES.values()) == FIRST_POSITION_HEADS


def _tiny(model_type: str):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
                                  pad_token_id=1, **({"embedding_size": 32} if model_type == "electra" else {}))
    return AutoModelForSequenceClassification.from_config(config)


def _step(model, hooked: bool):
    import torch

    from llmfinetune.cls_head import _keep_first_position

    batch = {"input_ids": torch.tensor(INPUTS), "attention_mask": torch.tensor(MASK),
             "labels": torch.tensor([2, 0])}
    module = first_position_module(model)
    assert module is not None
    positions = []
    spy = module.register_forward_hook(lambda m, args, output: positions.append(output.shape[1]))
    handle = module.register_forward_pre_hook(_keep_first_position) if hooked else None
    model.zero_grad()
    try:
        output = model(**batch)
        output.loss.backward()
    finally:
        spy.remove()
        if handle is not None:
            handle.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output.logits.detach(), grads, positions


def _assert_same(got, want):
    import torch

    logits, grads, _ = got
    want_logits, want_grads, _ = want
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    # Key biases have a zero gradient in exact arithmetic (softmax ignores a shift shared by every key): only
    # rounding is left, so each gradient is compared on the scale of the largest one.
    scale = max(g.abs().max().item() for g in want_grads.values())
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_the_first_position_alone_gives_the_same_logits_and_gradients(model_type):
    model = _tiny(model_type)
    assert type(model).__name__ == MODEL_TYPES[model_type]
    full = _step(model, hooked=False)
    first_only = _step(model, hooked=True)
    assert full[2] == [len(INPUTS[0])] and first_only[2] == [1]
    _assert_same(first_only, full)


def test_with_lora_adapters_and_a_saved_pooler(tmp_path):
    """The default job's shape: peft wraps the model, adapts the last layer's dense layers, trains the pooler."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny("bert"), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, bias="all",
                                                      target_modules=["query", "key", "value", "dense"],
                                                      modules_to_save=["pooler"]))
    for name, parameter in model.named_parameters():  # lora_B starts at zero: give the adapters a gradient path
        if "lora_B" in name:
            parameter.data.normal_(0, 0.1)
    full = _step(model, hooked=False)
    first_only = _step(model, hooked=True)
    assert first_only[2] == [1]
    assert any("layer.1.output.dense.lora_A" in name for name in full[1])
    _assert_same(first_only, full)


def _trainer(model, tmp_path):
    from transformers import TrainingArguments

    return FirstPositionTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"))


def test_the_trainer_uses_it_in_training_and_evaluation_steps_only(tmp_path):
    import torch

    model = _tiny("bert")
    trainer = _trainer(model, tmp_path)
    seen = []
    model.bert.encoder.layer[-1].output.register_forward_hook(lambda m, args, output: seen.append(output.shape[1]))
    batch = {"input_ids": torch.tensor(INPUTS), "attention_mask": torch.tensor(MASK), "labels": torch.tensor([2, 0])}
    trainer.current_gradient_accumulation_steps = 1  # set by train(), which this test does not run
    trainer.training_step(model, dict(batch))
    trainer.prediction_step(model, dict(batch), prediction_loss_only=False)
    model(**batch)  # outside the Trainer (predict, export): every position
    assert seen == [1, 1, len(INPUTS[0])]


def test_a_head_that_reads_another_position_steps_aside(tiny_models, tmp_path, caplog):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["qwen2"], num_labels=2)
    assert first_position_module(model) is None
    with caplog.at_level(logging.INFO, logger="llmfinetune.cls_head"):
        _trainer(model, tmp_path)
    # transformers' own load report for the new score head may land in caplog too, depending on test order
    assert [r.getMessage() for r in caplog.records if r.name == "llmfinetune.cls_head"] == [
        "last_layer_cls_only steps aside (Qwen2ForSequenceClassification is not one of "
        "cls_head.FIRST_POSITION_HEADS): the last layer computes every position."]


@pytest.mark.parametrize("setting, trainer", [({}, "FirstPositionTrainer"), ({"last_layer_cls_only": True},
                                              "FirstPositionTrainer"), ({"last_layer_cls_only": False}, "Trainer")])
def test_the_job_key_chooses_the_trainer(setting, trainer, tiny_models, tmp_path):
    from conftest import job_dict

    from llmfinetune.config import parse_job
    from llmfinetune.registry import TASKS

    job = parse_job(job_dict("sequenceclassification", "lora", tiny_models["bert"], tmp_path, tmp_path / "run",
                             **setting))
    assert TASKS.get("sequenceclassification").trainer_class(job).__name__ == trainer


def test_a_setting_that_is_not_true_or_false_is_refused(tiny_models, tmp_path):
    from conftest import job_dict

    from llmfinetune.arguments import translate
    from llmfinetune.config import parse_job
    from llmfinetune.errors import UserError

    job = parse_job(job_dict("sequenceclassification", "lora", tiny_models["bert"], tmp_path, tmp_path / "run",
                             last_layer_cls_only="yes please"))
    with pytest.raises(UserError, match=r"last_layer_cls_only: expected true or false, got 'yes please'"):
        translate(job)
