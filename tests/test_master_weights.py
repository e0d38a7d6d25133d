"""Full fine-tuning in bf16: bf16 weights, fp32 masters in the optimizer (master_weights.py); the masters are what
the run saves, and what a resumed run continues from."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from conftest import job_dict, logged_losses, make_dataset
from llmfinetune import master_weights
from llmfinetune.config import parse_job


def _full_job(tiny_models, tmp_path, out_name="run", initializer=None, **base):
    data = make_dataset(tmp_path / "data", "text-generation")
    settings = {"max_steps": 4, "save_steps": 2, "logging_steps": 1, "eval_strategy": "no", "bf16": True,
                "packing": True, "learning_rate": 1e-3, **base}
    raw = job_dict("text-generation", "full", tiny_models["qwen2"], data, tmp_path / out_name, **settings)
    if initializer:
        raw["model_config"]["initialization"] = {"initializer": initializer}
    return parse_job(raw)


def _stop_after_checkpoint_2(run_dir):
    """What a run killed after checkpoint-2 of 4 leaves: its later files removed."""
    for leftover in ("checkpoint-4", "trainer_state.json", "metrics.json", "model.safetensors"):
        path = run_dir / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _saved_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_bf16_weights_train_on_fp32_masters_which_the_run_saves(tiny_models, tmp_path, monkeypatch, caplog):
    from llmfinetune.workflow import run

    at_the_end = []
    original = master_weights.masters_into_model

    def spy(optimizer):
        weights, masters = optimizer._llmfinetune_masters
        at_the_end.append(({w.dtype for w in weights}, {m.dtype for m in masters}, len(weights)))
        return original(optimizer)

    monkeypatch.setattr(master_weights, "masters_into_model", spy)
    with caplog.at_level(logging.INFO):
        result = run(_full_job(tiny_models, tmp_path))
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("Full fine-tuning in bf16: the weights in bf16") for m in messages) == 1
    trained = [p for p in result.model.parameters() if p.requires_grad]
    assert at_the_end == [({torch.bfloat16}, {torch.float32}, len(trained))]

    # The model holds the masters again, in fp32, and they carry more than bf16's 8 bits: updates too small for a
    # bf16 weight added up in them.
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
    assert any(not torch.equal(p, p.to(torch.bfloat16).float()) for p in trained)
    saved = _saved_weights(result.output_dir)
    for name, parameter in result.model.named_parameters():
        if name in saved:
            assert torch.equal(saved[name], parameter.detach()), name

    # A checkpoint holds the bf16 weights, and the masters in the optimizer's state.
    checkpoint = result.output_dir / "checkpoint-2"
    assert {t.dtype for t in _saved_weights(checkpoint).values()} == {torch.bfloat16}
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    masters = state[master_weights.MASTERS_KEY]
    assert len(masters) == len(trained) and {m.dtype for m in masters} == {torch.float32}


def test_a_resumed_run_continues_from_the_masters_not_their_bf16_rounding(tiny_models, tmp_path):
    from llmfinetune.workflow import run

    straight = run(_full_job(tiny_models, tmp_path, "straight")).output_dir
    stopped = run(_full_job(tiny_models, tmp_path, "stopped")).output_dir
    _stop_after_checkpoint_2(stopped)
    resumed = run(_full_job(tiny_models, tmp_path, "stopped", resume_from_checkpoint=True)).output_dir

    expected, actual = _saved_weights(straight), _saved_weights(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
    losses = [logged_losses(out) for out in (straight, resumed)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize("base, initializer, reason", [
    ({"optim": "adafactor"}, None, "optim 'adafactor'"),
    ({}, {"dtype": "float32"}, None),  # the job's written dtype wins, without a word
    ({"bf16": False}, None, None),  # fp32 training
])
def test_fp32_weights_where_masters_cannot_work_or_the_job_says_so(tiny_models, tmp_path, caplog, base, initializer,
                                                                  reason):
    from llmfinetune import arguments
    from llmfinetune.registry import METHODS, TASKS

    job = _full_job(tiny_models, tmp_path, initializer=initializer, **base)
    task = TASKS.get(job.task)
    training_args = arguments.build_training_arguments(job, task, tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="llmfinetune.methods.full"):
        assert METHODS.get("full").base_dtype(job, task, training_args) is None
    messages = [r.getMessage() for r in caplog.records]
    if reason:
        assert len(messages) == 1 and "fp32 weights under autocast" in messages[0] and reason in messages[0]
    else:
        assert messages == []


def test_the_best_checkpoint_loaded_at_the_end_is_kept_not_overwritten_by_the_last_masters(tiny_models, tmp_path,
                                                                                          caplog):
    """load_best_model_at_end puts a checkpoint's bf16 weights in the model before training ends: those are the
    run's result, so the masters (the last step's) must not replace them."""
    from llmfinetune.workflow import run

    # Loss going up from step 2 (a learning rate far too high): the best checkpoint is the first.
    job = _full_job(tiny_models, tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                    metric_for_best_model="eval_loss", learning_rate=0.5)
    with caplog.at_level(logging.INFO, logger="llmfinetune.master_weights"):
        result = run(job)
    state = json.loads((result.output_dir / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"].endswith("checkpoint-2")
    best = _saved_weights(result.output_dir / "checkpoint-2")
    for name, parameter in result.model.named_parameters():
        if name in best:
            assert torch.equal(parameter.detach(), best[name].float()), name
    assert any("best checkpoint's weights" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("first, then", [("fp32 weights", "masters"), ("masters", "fp32 weights")])
def test_a_run_resumes_from_a_checkpoint_of_the_other_kind(tiny_models, tmp_path, caplog, first, then):
    """A job whose precision setup changed between the stop and the resume (the dtype written or removed) still
    resumes: masters that the checkpoint lacks start from its weights, and one line says so; fp32 weights start from
    the checkpoint's bf16 ones (its masters unused: nothing in an fp32 run reads them)."""
    from llmfinetune.workflow import run

    fp32 = {"dtype": "float32"}
    run(_full_job(tiny_models, tmp_path, "stopped", initializer=fp32 if first == "fp32 weights" else None))
    stopped = tmp_path / "stopped"
    _stop_after_checkpoint_2(stopped)
    with caplog.at_level(logging.WARNING, logger="llmfinetune.master_weights"):
        result = run(_full_job(tiny_models, tmp_path, "stopped", initializer=fp32 if then == "fp32 weights" else None,
                               resume_from_checkpoint=True))
    warned = [r.getMessage() for r in caplog.records if "fp32 master weights" in r.getMessage()]
    assert len(warned) == (1 if then == "masters" else 0)
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
    history = json.loads((result.output_dir / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]


def test_masters_of_another_model_are_refused_by_name():
    from llmfinetune.errors import UserError

    weights = [torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16)), torch.nn.Parameter(torch.ones(2))]
    optimizer = torch.optim.AdamW(weights, lr=0.1)
    master_weights.step_on_masters(optimizer)
    state = optimizer.state_dict()
    assert [m.shape for m in state[master_weights.MASTERS_KEY]] == [(3,)]  # only the bf16 weight has a master
    state[master_weights.MASTERS_KEY] = [torch.zeros(4)]
    with pytest.raises(UserError, match="1 fp32 master weights that do not match the 1 weights this job trains"):
        optimizer.load_state_dict(state)


def test_under_several_processes_accumulation_keeps_fp32_weights():
    from types import SimpleNamespace

    args = SimpleNamespace(optim="adamw_torch_fused", gradient_accumulation_steps=2, world_size=2)
    assert "all-reduce the last micro-batch only" in master_weights.unsupported_because(args)
    assert master_weights.unsupported_because(SimpleNamespace(**{**vars(args), "world_size": 1})) is None
    assert master_weights.unsupported_because(SimpleNamespace(**{**vars(args), "gradient_accumulation_steps": 1,
                                                                 "world_size": 4})) is None


def test_micro_batch_gradients_add_up_in_fp32_on_the_masters():
    """Three micro-batches whose bf16 sum rounds away the small ones (1 + 2**-9 + 2**-9 is 1 in bf16)."""
    weight = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    master = weight.detach().float()
    for index, value in enumerate((1.0, 2.0 ** -9, 2.0 ** -9)):
        weight.grad = torch.full((2,), value, dtype=torch.bfloat16)  # what one backward leaves
        last = index == 2
        master_weights.gradients_to_masters([weight], [master], last=last)
        assert (weight.grad is None) == (not last)
    assert torch.equal(master.grad, torch.full((2,), 1.0 + 2.0 ** -8))
    assert torch.equal(weight.grad, master.grad.to(torch.bfloat16))  # the total again, for what reads the weights' gradients


def test_accumulated_micro_batches_step_as_one_batch_of_their_size(tiny_models, tmp_path):
    """One SGD step of 2 micro-batches of 4 against one batch of 8, the same rows in order: the same update of the
    fp32 masters (bf16 forward noise aside). A step that kept one micro-batch's gradient would be ~half of it."""
    from safetensors.torch import load_file

    from llmfinetune.workflow import run

    final = {}
    for rows, accumulation in ((8, 1), (4, 2)):
        job = _full_job(tiny_models, tmp_path, f"run-{accumulation}", max_steps=1, save_strategy="no", packing=False,
                        optim="sgd", learning_rate=1.0, max_grad_norm=0.0, train_sampling_strategy="sequential",
                        per_device_train_batch_size=rows, gradient_accumulation_steps=accumulation)
        final[accumulation] = dict(run(job).model.named_parameters())
    initial = {name: weight.to(torch.bfloat16).float()
               for name, weight in load_file(str(tiny_models["qwen2"] / "model.safetensors")).items()}
    for name, weight in final[1].items():
        update = weight.detach() - initial[name]
        gap = final[2][name].detach() - weight.detach()
        assert update.norm() > 0, name
        assert gap.norm() <= 0.02 * update.norm(), (name, float(gap.norm() / update.norm()))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_step_clips_the_masters_fp32_gradients_to_max_grad_norm(tiny_models, tmp_path, accumulation):
    """One SGD step with learning rate 1: the masters move by the clipped gradient, whose norm is max_grad_norm."""
    from safetensors.torch import load_file

    from llmfinetune.workflow import run

    job = _full_job(tiny_models, tmp_path, max_steps=1, save_strategy="no", optim="sgd", learning_rate=1.0,
                    max_grad_norm=1e-3, per_device_train_batch_size=8 // accumulation,
                    gradient_accumulation_steps=accumulation)
    trained = dict(run(job).model.named_parameters())
    initial = load_file(str(tiny_models["qwen2"] / "model.safetensors"))
    moved = torch.stack([(trained[name].detach() - weight.to(torch.bfloat16).float()).norm()
                         for name, weight in initial.items() if name in trained]).norm()
    assert float(moved) == pytest.approx(1e-3, rel=1e-3)


def test_one_clipping_a_step_over_the_fp32_gradients_the_optimizer_steps_on_whose_norm_is_logged(tiny_models,
                                                                                                 tmp_path,
                                                                                                 monkeypatch):
    """Trainer's clipping goes to the masters: the model's bf16 gradients (which the step does not read) are not
    clipped too, and the logged grad_norm is the fp32 gradients' norm."""
    import json

    from llmfinetune.workflow import run

    clipped = []
    clip = torch.nn.utils.clip_grad_norm_

    def recorded(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        norm = clip(parameters, max_norm, *args, **kwargs)
        clipped.append(({p.grad.dtype for p in parameters if p.grad is not None}, float(norm)))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recorded)
    scale = torch.nn.utils.clip_grads_with_norm_

    def scaled(parameters, max_norm, total_norm, *args, **kwargs):  # accelerate's clipping (Trainer's), by name
        parameters = list(parameters)
        clipped.append(({p.grad.dtype for p in parameters if p.grad is not None}, float(total_norm)))
        return scale(parameters, max_norm, total_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", scaled)
    out = tmp_path / "run"
    run(_full_job(tiny_models, tmp_path, max_steps=3, save_strategy="no", max_grad_norm=0.5))
    assert [dtypes for dtypes, _ in clipped] == [{torch.float32}] * 3
    logged = [entry["grad_norm"] for entry in json.loads((out / "trainer_state.json").read_text())["log_history"]
              if "grad_norm" in entry]
    assert logged == pytest.approx([norm for _, norm in clipped], rel=1e-6)
