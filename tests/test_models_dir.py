"""Every shipped job file stays valid, and every offline one trains for a few steps (so no example can rot)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import REPO
from llmfinetune.config import load_job
from llmfinetune.errors import UserError
from llmfinetune.registry import METHODS, TASKS

JOB_FILES = sorted((REPO / "models").glob("*.yaml"))
SMOKE = ["ft_config.data_config.num_row=24", "ft_config.train_config.base_config.max_steps=2",
         "ft_config.train_config.base_config.per_device_train_batch_size=4",
         "ft_config.train_config.base_config.per_device_eval_batch_size=8"]


def _offline(job) -> bool:
    from llmfinetune.models import resolve_model

    try:
        resolve_model(job)
    except UserError:
        return False
    return True


@pytest.fixture(scope="module", autouse=True)
def tiny_models_in_build():
    """The offline text-generation job file points at build/tiny/qwen2, which the repo script makes."""
    from scripts.make_tiny_models import make_tiny_causal_lm

    make_tiny_causal_lm(REPO / "build" / "tiny" / "qwen2")


def test_there_are_offline_job_files_for_every_task():
    offline_tasks = {load_job(p).task for p in JOB_FILES if _offline(load_job(p))}
    assert offline_tasks == set(TASKS.names())


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_job_file_is_valid(path: Path):
    from llmfinetune.arguments import translate

    job = load_job(path)
    TASKS.get(job.task)
    METHODS.get(job.method).check(job)
    translate(job)
    if not _offline(job):
        with pytest.raises(UserError, match="not found"):
            from llmfinetune.workflow import check_job

            check_job(job)


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_hub_job_file_passes_every_check_but_the_download(path: Path, tiny_models, monkeypatch, tmp_path):
    """A job file that needs the hub goes through what `check` and `run-ft` check before downloading: the task's and
    the method's checks, base_config as TrainingArguments, the tokenizer as the job loads it, with the hub model
    replaced by a tiny local one of the same family."""
    from llmfinetune import arguments, models
    from llmfinetune.workflow import check_job

    job = load_job(path, [f"ft_config.train_config.base_config.output_dir={tmp_path / 'run'}"])
    if _offline(job):
        pytest.skip("runs offline: test_offline_job_file_runs trains it")
    tiny = str(tiny_models["qwen2" if job.task == "text-generation" else "bert"])
    monkeypatch.setattr(models, "resolve_model", lambda _job: tiny)
    summary = check_job(job, load_data=False)  # task.check, method.check, translate, the model path
    assert summary["model"] == tiny and summary["task"] == job.task and summary["method"] == job.method
    task = TASKS.get(job.task)
    training_args = arguments.build_training_arguments(job, task, tmp_path / "run")
    assert training_args.per_device_train_batch_size == job.base_config["per_device_train_batch_size"]
    models.load_tokenizer(tiny, job)


@pytest.mark.slow
@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_offline_job_file_runs(path: Path, tmp_path):
    from llmfinetune.workflow import run

    job = load_job(path, SMOKE + [f"ft_config.train_config.base_config.output_dir={tmp_path / 'run'}"])
    if not _offline(job):
        pytest.skip("needs the Hugging Face hub")
    result = run(job)
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert (result.output_dir / "job.yaml").exists()
