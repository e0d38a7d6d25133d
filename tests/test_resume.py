"""A run killed with SIGKILL after its first checkpoint resumes to the same result as an uninterrupted run, and a
checkpoint interrupted while being written is never resumed from."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, job_dict, make_dataset
from llmfinetune.checkpoints import COMPLETE_MARK, resume_point

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
STEPS = 30


def _job(tmp_path, tiny_models, out):
    data = make_dataset(tmp_path / "data", "text-generation", train_rows=64, eval_rows=8)
    config = job_dict("text-generation", "lora", tiny_models["qwen2"], data, out, max_steps=STEPS, save_steps=3,
                      logging_steps=1, eval_strategy="no")
    config["ft_config"]["train_config"]["lora_config"]["lora_dropout"] = 0.0
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _losses(out) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


@pytest.mark.slow
def test_sigkill_after_first_checkpoint_then_resume_matches_uninterrupted(tmp_path, tiny_models):
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "-m", "llmfinetune", "run-ft", f"--ft={_job(tmp_path, tiny_models, straight)}"],
                   cwd=REPO, env=ENV, check=True, capture_output=True)

    killed = tmp_path / "killed"
    job = _job(tmp_path, tiny_models, killed)
    process = subprocess.Popen([sys.executable, "-m", "llmfinetune", "run-ft", f"--ft={job}"], cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoint-3" / COMPLETE_MARK).exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it was killed; the test proves nothing"

    resumed = subprocess.run([sys.executable, "-m", "llmfinetune", "run-ft", f"--ft={job}",
                              "ft_config.train_config.base_config.resume_from_checkpoint=true"],
                             cwd=REPO, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr

    expected, actual = _losses(straight), _losses(killed)
    assert sorted(actual) == sorted(expected) == list(range(1, STEPS + 1))
    # Same optimizer, scheduler, RNG and data position: the same losses, step for step, to float tolerance.
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    assert json.loads((killed / "metrics.json").read_text())["eval_loss"] == pytest.approx(
        json.loads((straight / "metrics.json").read_text())["eval_loss"], rel=1e-5)


def test_resume_skips_a_checkpoint_that_was_not_completely_written(tmp_path):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / COMPLETE_MARK).write_text(str(step))
    (tmp_path / "checkpoint-6").mkdir()  # killed mid-save: no completion mark
    assert resume_point(True, tmp_path) == str(tmp_path / "checkpoint-4")


def test_resume_with_nothing_to_resume_starts_fresh(tmp_path):
    assert resume_point(True, tmp_path / "absent") is None
    assert resume_point(None, tmp_path) is None


def test_resume_from_a_missing_path_is_an_error(tmp_path):
    from llmfinetune.errors import UserError

    with pytest.raises(UserError, match="resume_from_checkpoint: checkpoint folder .*nope does not exist"):
        resume_point(str(tmp_path / "nope"), tmp_path)


def _run_dir_with_checkpoints(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / COMPLETE_MARK).write_text(str(step))
    (tmp_path / "checkpoint-6").mkdir()  # killed mid-save, or saved after the loss became NaN
    return tmp_path


def test_resume_from_an_explicit_incomplete_checkpoint_is_refused(tmp_path):
    from llmfinetune.errors import UserError

    run_dir = _run_dir_with_checkpoints(tmp_path)
    with pytest.raises(UserError) as caught:
        resume_point(str(run_dir / "checkpoint-6"), run_dir)
    message = str(caught.value)
    assert message.startswith("ft_config.train_config.base_config.resume_from_checkpoint: ")
    assert f"{run_dir / 'checkpoint-6'} is not a complete checkpoint: it has no '{COMPLETE_MARK}' file" in message
    assert "also missing: trainer_state.json" in message
    assert f"Complete checkpoints in {run_dir}: checkpoint-2, checkpoint-4 " in message
    assert resume_point(str(run_dir / "checkpoint-4"), run_dir) == str(run_dir / "checkpoint-4")


def test_resume_from_a_run_directory_names_its_newest_complete_checkpoint(tmp_path):
    from llmfinetune.errors import UserError

    run_dir = _run_dir_with_checkpoints(tmp_path / "run")
    with pytest.raises(UserError, match=r"resume_from_checkpoint: .*run is a run directory, not a checkpoint; its "
                                        r"newest complete checkpoint is .*checkpoint-4"):
        resume_point(str(run_dir), tmp_path / "elsewhere")


def test_check_refuses_an_explicit_incomplete_checkpoint(tmp_path, tiny_models, capsys):
    from llmfinetune.cli import main

    out = tmp_path / "run"
    _run_dir_with_checkpoints(out)
    data = make_dataset(tmp_path / "data", "sequenceclassification", train_rows=16, eval_rows=8)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict("sequenceclassification", "lora", tiny_models["bert"], data, out)))
    code = main(["check", f"--ft={job}",
                 f"ft_config.train_config.base_config.resume_from_checkpoint={out / 'checkpoint-6'}"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert "resume_from_checkpoint: " in error and f"no '{COMPLETE_MARK}' file" in error
