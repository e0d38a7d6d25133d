"""A non-finite loss is caught at the step it happens, whatever logging_steps says: no checkpoint from that step on
is marked complete, `--resume` takes the one before, and the message names both."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import job_dict, make_dataset
from llmfinetune.checkpoints import (COMPLETE_MARK, MarkCompleteCheckpoints, StopOnNonFiniteLoss, complete_checkpoints,
                                     resume_point)
from llmfinetune.config import parse_job
from llmfinetune.errors import UserError

BAD_STEP = 4


def _poison_classifier_at(monkeypatch, forward_call: int) -> None:
    """The classifier's output becomes NaN at the `forward_call`-th training forward (1-based), only then: the
    gradients and so the weights of that optimizer step are NaN, exactly as a real overflow does."""
    from llmfinetune import models

    load_model = models.load_model

    def loaded_with_poison(*args, **kwargs):
        model, fresh = load_model(*args, **kwargs)
        calls = {"n": 0}

        def poison(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] == forward_call:
                    return output * float("nan")
            return None

        model.classifier.register_forward_hook(poison)
        return model, fresh

    monkeypatch.setattr(models, "load_model", loaded_with_poison)


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2], ids=["one-micro-batch", "accumulation-2"])
def test_nan_between_logging_steps_is_caught_at_its_step_and_no_later_checkpoint_is_complete(
        tiny_models, tmp_path, monkeypatch, accumulation):
    from llmfinetune.workflow import run

    data = make_dataset(tmp_path / "data", "sequenceclassification")
    out = tmp_path / "run"
    # Under accumulation the first micro-batch of step 4 goes bad; the check must still fire at step 4.
    _poison_classifier_at(monkeypatch, (BAD_STEP - 1) * accumulation + 1)
    job = parse_job(job_dict("sequenceclassification", "full", tiny_models["bert"], data, out, max_steps=8,
                             save_steps=1, logging_steps=10, eval_strategy="no", per_device_train_batch_size=2,
                             gradient_accumulation_steps=accumulation, learning_rate=1e-3))
    with pytest.raises(UserError) as caught:
        run(job)
    message = str(caught.value)
    good = out / f"checkpoint-{BAD_STEP - 1}"
    assert f"the loss became nan at step {BAD_STEP};" in message
    assert f"Last good checkpoint: {good}." in message

    assert [c.name for c in complete_checkpoints(out)] == [f"checkpoint-{s}" for s in range(1, BAD_STEP)]
    for folder in out.glob("checkpoint-*"):
        step = int(folder.name.split("-")[1])
        assert step < BAD_STEP or not (folder / COMPLETE_MARK).exists(), folder
    assert resume_point(True, out) == str(good)
    from safetensors.torch import load_file

    weights = load_file(good / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values()), "the checkpoint named good holds non-finite weights"
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_read_a_step_late_the_bad_step_is_still_named_and_nothing_after_it_is_saved(tiny_models, tmp_path,
                                                                                    monkeypatch):
    """As on a GPU (READ_LATER_DEVICES, the CPU standing in): step 4 goes bad between saves (every 3 steps), is
    read at step 5's end, training stops there; checkpoint-3 is the last, step 4 is the step named."""
    from llmfinetune import checkpoints
    from llmfinetune.workflow import run

    monkeypatch.setattr(checkpoints, "READ_LATER_DEVICES", ("cpu",))
    data = make_dataset(tmp_path / "data", "sequenceclassification")
    out = tmp_path / "run"
    _poison_classifier_at(monkeypatch, BAD_STEP)
    job = parse_job(job_dict("sequenceclassification", "full", tiny_models["bert"], data, out, max_steps=8,
                             save_steps=3, logging_steps=10, eval_strategy="no", per_device_train_batch_size=2,
                             learning_rate=1e-3))
    with pytest.raises(UserError, match=f"the loss became nan at step {BAD_STEP};.*Last good checkpoint: "
                                        f"{out / 'checkpoint-3'}"):
        run(job)
    assert [c.name for c in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert [c.name for c in complete_checkpoints(out)] == ["checkpoint-3"]


def _guard_with(losses: list[float]) -> StopOnNonFiniteLoss:
    guard = StopOnNonFiniteLoss()
    trainer = SimpleNamespace(training_step=lambda value: torch.tensor(value))
    guard.watch(trainer)
    for value in losses:
        trainer.training_step(value)
    return guard


def _step_end(guard: StopOnNonFiniteLoss, step: int):
    from transformers import TrainerControl

    control = TrainerControl(should_save=True, should_evaluate=True)
    guard.on_step_end(SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(global_step=step), control)
    return control


def test_any_micro_batch_of_a_step_counts_and_the_step_stops_without_saving():
    guard = _guard_with([0.5, math.inf])
    control = _step_end(guard, 7)
    assert (guard.bad_step, guard.bad_value) == (7, math.inf)
    assert control.should_training_stop and not control.should_save and not control.should_evaluate

    healthy = _guard_with([0.5, 0.4])
    control = _step_end(healthy, 7)
    assert healthy.bad_step is None and control.should_save and not control.should_training_stop


def test_on_a_gpu_a_step_that_decides_nothing_is_read_a_step_late_and_one_that_saves_at_once(monkeypatch):
    """READ_LATER_DEVICES (the CPU standing in for a GPU here): a plain step's flag is read at the next step's end,
    with its own step number; a step that saves, evaluates, logs or ends training is read at once, with every
    step before it, so nothing is saved after a bad step."""
    from transformers import TrainerControl

    from llmfinetune import checkpoints

    monkeypatch.setattr(checkpoints, "READ_LATER_DEVICES", ("cpu",))
    args = SimpleNamespace(device=torch.device("cpu"))
    guard = StopOnNonFiniteLoss()
    trainer = SimpleNamespace(training_step=lambda value: torch.tensor(value))
    guard.watch(trainer)
    for step, loss in ((1, 0.5), (2, math.nan)):
        trainer.training_step(loss)
        control = TrainerControl()
        guard.on_step_end(args, SimpleNamespace(global_step=step), control)
        assert guard.bad_step is None and not control.should_training_stop  # step 2 not read yet
    trainer.training_step(0.25)
    control = TrainerControl()
    guard.on_step_end(args, SimpleNamespace(global_step=3), control)
    assert (guard.bad_step, math.isnan(guard.bad_value)) == (2, True) and control.should_training_stop

    for decision in ("should_save", "should_evaluate", "should_log", "should_training_stop"):
        guard = StopOnNonFiniteLoss()
        guard.watch(trainer)
        trainer.training_step(math.inf)
        control = TrainerControl(**{decision: True})
        guard.on_step_end(args, SimpleNamespace(global_step=5), control)
        assert guard.bad_step == 5 and not control.should_save, decision


def test_every_process_stops_when_one_process_saw_a_nan(monkeypatch, tmp_path):
    """This process's loss is finite; the all-reduce brings another process's NaN flag: it stops at the same step."""
    import torch.distributed as dist

    reduced = []

    def all_reduce(tensor, op=None):
        reduced.append(op)
        tensor.fill_(1.0)  # the maximum over the processes: another one saw a non-finite loss

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    guard = _guard_with([0.5])
    control = _step_end(guard, 3)
    assert reduced == [dist.ReduceOp.MAX]
    assert guard.bad_step == 3 and guard.bad_value is None
    assert control.should_training_stop and not control.should_save
    with pytest.raises(UserError, match="the loss became non-finite in another process at step 3"):
        guard.raise_if_diverged(tmp_path, 0.5, 3)


def test_a_checkpoint_saved_at_or_after_the_bad_step_is_not_marked(tmp_path):
    guard = StopOnNonFiniteLoss()
    guard.bad_step = 4
    marker = MarkCompleteCheckpoints(guard)
    for step in (3, 4, 5):  # e.g. Ctrl-C asked for a save at the same step
        (tmp_path / f"checkpoint-{step}").mkdir()
        marker.on_save(SimpleNamespace(output_dir=str(tmp_path)),
                       SimpleNamespace(global_step=step, is_world_process_zero=True), None)
    assert [c.name for c in complete_checkpoints(tmp_path)] == ["checkpoint-3"]


def test_the_mark_waits_for_every_process(tmp_path, monkeypatch):
    """Rank 0 writes the mark only after the barrier that every process reaches once its own files are written."""
    import torch.distributed as dist

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    seen_at_barrier = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: seen_at_barrier.append((folder / COMPLETE_MARK).exists()))
    MarkCompleteCheckpoints().on_save(SimpleNamespace(output_dir=str(tmp_path)),
                                      SimpleNamespace(global_step=2, is_world_process_zero=True), None)
    assert seen_at_barrier == [False]
    assert (folder / COMPLETE_MARK).exists()


def test_a_guard_that_watches_no_trainer_refuses_to_start():
    with pytest.raises(RuntimeError, match="watch"):
        StopOnNonFiniteLoss().on_train_begin(None, None, None)


POISON_ONE_RANK = '''
import os, sys
from llmfinetune import models

load_model = models.load_model


def loaded(*args, **kwargs):
    model, fresh = load_model(*args, **kwargs)
    if os.environ["RANK"] == "1":  # only this process's loss goes bad; DDP then averages NaN into both
        calls = {"n": 0}

        def poison(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] == BAD_STEP:
                    return output * float("nan")
            return None

        model.classifier.register_forward_hook(poison)
    return model, fresh


models.load_model = loaded
from llmfinetune.cli import main

sys.exit(main(["run-ft", "--ft=" + sys.argv[1]]))
'''


@pytest.mark.slow
def test_under_ddp_a_nan_in_one_process_stops_every_process_at_that_step(tiny_models, tmp_path):
    """Rank 1 alone sees the NaN loss; rank 0's loss at that step is finite. Both stop after the same step, neither
    saves it, and neither waits for the other (a timeout here is the hang the agreement prevents)."""
    import os
    import subprocess
    import sys

    import yaml

    from conftest import REPO

    data = make_dataset(tmp_path / "data", "sequenceclassification", train_rows=32, eval_rows=8)
    out = tmp_path / "run"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict("sequenceclassification", "full", tiny_models["bert"], data, out,
                                           max_steps=8, save_steps=1, logging_steps=10, eval_strategy="no",
                                           per_device_train_batch_size=2, learning_rate=1e-3)))
    script = tmp_path / "poison_rank_1.py"
    script.write_text(POISON_ONE_RANK.replace("BAD_STEP", str(BAD_STEP)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(job)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode != 0
    assert f"the loss became nan at step {BAD_STEP};" in result.stderr  # rank 1
    assert f"the loss became non-finite in another process at step {BAD_STEP};" in result.stderr  # rank 0
    assert f"Last good checkpoint: {out / f'checkpoint-{BAD_STEP - 1}'}." in result.stderr
    assert [c.name for c in complete_checkpoints(out)] == [f"checkpoint-{s}" for s in range(1, BAD_STEP)]
