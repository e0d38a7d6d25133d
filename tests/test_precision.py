"""The default precision: bf16 where the hardware runs it natively, fp32 elsewhere, said in one line, overridden by
the job; and every task's bf16 loss trajectory follows its fp32 one."""
from __future__ import annotations

import logging

import pytest

from conftest import job_dict, logged_losses, make_dataset
from llmfinetune import arguments
from llmfinetune.config import parse_job
from llmfinetune.registry import TASKS

# Per-step train loss, bf16 autocast vs fp32, over the 8 steps below: |bf16 - fp32| <= RELATIVE * fp32 at every step
# (measured here: at most 0.24%, reward model; 0.18% packed SFT; full fine-tuning on bf16 weights with fp32 masters:
# 0.04% packed SFT, 0.19% DPO).
RELATIVE = 0.01


@pytest.fixture
def auto_precision(monkeypatch):
    monkeypatch.setenv(arguments.AUTO_PRECISION_ENV, "1")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, None)])
def test_the_cpu_default_is_bf16_only_where_it_is_native(auto_precision, monkeypatch, native, expected):
    monkeypatch.setattr(arguments, "cpu_supports_bf16", lambda: native)
    precision, why = arguments.default_precision({}, None)
    assert precision == expected and why
    assert arguments.default_precision({"bf16": False}, None) == (None, "")
    assert arguments.default_precision({"fp16": True}, None) == (None, "")
    assert arguments.default_precision({}, "ds.json")[0] is None  # DeepSpeed on the CPU: fp32, as tested


def test_accelerate_or_the_environment_decide_when_they_say(auto_precision, monkeypatch):
    monkeypatch.setattr(arguments, "cpu_supports_bf16", lambda: True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert arguments.default_precision({}, None) == (None, "")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.setenv(arguments.AUTO_PRECISION_ENV, "0")
    assert arguments.default_precision({}, None) == (None, "")


def test_a_gpu_with_bf16_gets_it(auto_precision, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert arguments.default_precision({}, None)[0] == "bf16"
    assert arguments.default_precision({"use_cpu": True}, None)[0] is None or arguments.cpu_supports_bf16()


@pytest.mark.parametrize("native", [True, False])
def test_the_training_arguments_take_the_default_and_say_so_in_one_line(tiny_models, tmp_path, auto_precision,
                                                                       monkeypatch, caplog, native):
    monkeypatch.setattr(arguments, "cpu_supports_bf16", lambda: native)
    data = make_dataset(tmp_path / "data", "sequenceclassification")
    task = TASKS.get("sequenceclassification")
    for written, expected in (({}, native), ({"bf16": False}, False)):
        job = parse_job(job_dict("sequenceclassification", "lora", tiny_models["bert"], data, tmp_path / "run",
                                 **written))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="llmfinetune.arguments"):
            args = arguments.build_training_arguments(job, task, tmp_path / "run")
        assert args.bf16 is expected
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training in")]
        if written:
            assert lines == []
        else:
            assert len(lines) == 1 and lines[0].startswith(f"Training in {'bf16' if native else 'fp32'}: ")
            assert f"base_config.bf16: {'false' if native else 'true'} to override" in lines[0]


def _job(task: str, tiny_models, tmp_path, bf16: bool, method: str = "lora", **base):
    settings = dict(max_steps=8, logging_steps=1, save_strategy="no", eval_strategy="no", seed=0, bf16=bf16,
                    learning_rate=2e-2 if method == "lora" else 1e-3, **base)
    if task == "preference":
        from test_preference import make_data, preference_job

        return preference_job(tiny_models["qwen2"], make_data(tmp_path / "data"), tmp_path / f"run-{bf16}",
                              method, **settings)
    if task == "rewardmodeling":
        from test_reward import reward_job

        return reward_job(tiny_models["bert"], tmp_path / f"r-{bf16}", **settings)
    from conftest import TASK_DATA

    data = make_dataset(tmp_path / "data", task)
    return parse_job(job_dict(task, method, tiny_models[TASK_DATA[task][1]], data, tmp_path / f"run-{bf16}",
                              **settings))


@pytest.mark.parametrize("task, base", [
    ("text-generation", {"packing": True}), ("text-generation", {}), ("sequenceclassification", {}),
    ("tokenclassification", {}), ("maskedlm", {}), ("preference", {}), ("rewardmodeling", {}),
    # Full fine-tuning of causal LMs trains bf16 weights on fp32 masters (master_weights.py).
    ("text-generation", {"packing": True, "method": "full"}), ("preference", {"method": "full"}),
], ids=["sft-packed", "sft", "seqcls", "tokencls", "maskedlm", "dpo", "reward", "sft-packed-full", "dpo-full"])
def test_every_task_trains_in_bf16_along_its_fp32_loss_trajectory(tiny_models, tmp_path, caplog, task, base):
    from llmfinetune.workflow import run

    losses = {}
    for bf16 in (False, True):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="llmfinetune.methods.full"):
            result = run(_job(task, tiny_models, tmp_path, bf16, **base))
        on_masters = any("fp32 master copies of them" in r.getMessage() for r in caplog.records)
        assert on_masters == (bf16 and base.get("method") == "full")
        losses[bf16] = logged_losses(result.output_dir)
    assert len(losses[False]) == len(losses[True]) == 8
    assert min(losses[False][1:]) < losses[False][0]  # it trains
    assert losses[True] != losses[False]  # bf16 did run: its rounding shows
    for step, (fp32, bf16) in enumerate(zip(losses[False], losses[True])):
        assert abs(bf16 - fp32) <= RELATIVE * abs(fp32), (step, losses)
