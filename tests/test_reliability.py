"""Faults during a run: Ctrl-C, a full disk while saving, running out of memory. Each ends with a clear message and
the right exit code, keeps the last complete checkpoint, and the run resumes from it."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, job_dict, make_dataset
from llmfinetune.checkpoints import COMPLETE_MARK



def env() -> dict[str, str]:
    """Read when a test runs, after conftest has pointed the tokenization cache at a temporary folder."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1"}


def _job_file(tmp_path: Path, tiny_models, out: Path, steps: int, **base) -> Path:
    data = make_dataset(tmp_path / "data", "text-generation", train_rows=64, eval_rows=8)
    config = job_dict("text-generation", "lora", tiny_models["qwen2"], data, out, max_steps=steps,
                      logging_steps=1, eval_strategy="no", **base)
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str) -> tuple[int, str]:
    """`llmfinetune ARGS` in this process: (exit code, stderr + stdout)."""
    from llmfinetune import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, err.getvalue() + out.getvalue()


def _steps_logged(out: Path) -> list[int]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [entry["step"] for entry in history if "loss" in entry]


# ------------------------------------------------------------------ Ctrl-C


@pytest.mark.slow
def test_ctrl_c_saves_a_complete_checkpoint_exits_130_and_resumes(tmp_path, tiny_models):
    out = tmp_path / "run"
    steps = 400
    job = _job_file(tmp_path, tiny_models, out, steps, save_steps=10_000)  # no checkpoint but the one Ctrl-C makes
    process = subprocess.Popen([sys.executable, "-m", "llmfinetune", "run-ft", f"--ft={job}"], cwd=REPO, env=env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while not any("'loss'" in line for line in lines):  # the first logged step
        assert process.poll() is None, "".join(lines)[-3000:]
        assert time.time() < deadline, "no step was logged"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=120)
    reader.join(timeout=10)
    output = "".join(lines)
    assert code == 130, output[-3000:]
    assert "Traceback" not in output
    assert "Ctrl-C: finishing this step, then saving a checkpoint and stopping" in output
    message = output[output.index("interrupted: "):]
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, checkpoints
    checkpoint = checkpoints[0]
    step = int(checkpoint.name.split("-")[1])
    assert 1 <= step < steps, "the run finished before Ctrl-C; the test proves nothing"
    assert (checkpoint / COMPLETE_MARK).is_file()
    assert f"stopped by Ctrl-C at step {step}: saved {checkpoint} (complete)" in message
    assert f"Resume with: llmfinetune run-ft --ft={job} --resume" in message
    assert not (out / "metrics.json").exists() and not (out / "adapter_model.safetensors").exists()

    resumed = subprocess.run([sys.executable, "-m", "llmfinetune", "run-ft", f"--ft={job}", "--resume"], cwd=REPO,
                             env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {checkpoint}" in resumed.stderr
    # The history restored from the checkpoint, then the steps after it: each step once, none repeated.
    assert _steps_logged(out) == list(range(1, steps + 1))
    assert (out / "metrics.json").is_file()


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_every_worker_of_nproc_after_the_same_step(tmp_path, tiny_models):
    """A terminal's Ctrl-C goes to the launcher's process group; the agent passes it to the workers, which agree
    (an all-reduce per step) on the step to stop after, save one complete checkpoint and exit 130; the launcher's
    message gives the resume command with --nproc."""
    out = tmp_path / "run"
    job = _job_file(tmp_path, tiny_models, out, 20_000, save_steps=100_000)
    process = subprocess.Popen([sys.executable, "-m", "llmfinetune", "run-ft", f"--ft={job}", "--nproc", "2"],
                               cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + 240
    try:
        while not any("'loss'" in line for line in lines):
            assert process.poll() is None, "".join(lines)[-3000:]
            assert time.time() < deadline, "no step was logged"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    reader.join(timeout=10)
    output = "".join(lines)
    assert code == 130, output[-3000:]
    assert "Traceback" not in output
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / COMPLETE_MARK).is_file(), (checkpoints, output[-3000:])
    step = int(checkpoints[0].name.split("-")[1])
    stops = {line.split("stopped by Ctrl-C at step ")[1].split(":")[0] for line in output.splitlines()
             if "stopped by Ctrl-C at step " in line}
    assert stops == {str(step)}, stops  # every worker stopped after the same step
    assert f"SIGINT stopped the 2 workers; checkpoints completely written are kept. Resume with: llmfinetune " \
           f"run-ft --ft={job} --nproc 2 --resume" in output

    resumed = subprocess.run([sys.executable, "-m", "llmfinetune", "run-ft", f"--ft={job}", "--nproc", "2",
                              "--resume", f"ft_config.train_config.base_config.max_steps={step + 2}"], cwd=REPO,
                             env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == step + 2


def test_second_ctrl_c_exits_at_once_and_the_old_handler_comes_back():
    from llmfinetune.faults import SaveOnInterrupt, interruptible

    before = signal.getsignal(signal.SIGINT)
    callback = SaveOnInterrupt()
    with pytest.raises(KeyboardInterrupt):
        with interruptible(callback):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs between bytecodes; the first Ctrl-C only asks to stop
            assert callback.requested
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            pytest.fail("the second Ctrl-C did not stop at once")
    assert signal.getsignal(signal.SIGINT) is before


def test_after_ctrl_c_the_step_ends_with_a_save_and_a_stop():
    from transformers import TrainerControl

    from llmfinetune.faults import SaveOnInterrupt

    class State:
        global_step = 7

    for save in (True, False):
        callback, control = SaveOnInterrupt(save), TrainerControl()
        callback.on_step_end(None, State(), control)
        assert not control.should_training_stop  # nothing asked yet
        callback.requested = True
        callback.on_step_end(None, State(), control)
        assert control.should_training_stop and control.should_save is save and callback.stopped_at == 7


@pytest.mark.slow
def test_ctrl_c_with_save_on_interrupt_false_saves_nothing(tmp_path, tiny_models, monkeypatch):
    from transformers import Trainer

    out = tmp_path / "run"
    job = _job_file(tmp_path, tiny_models, out, 50, save_steps=2, save_on_interrupt=False)
    original = Trainer.training_step

    def step_then_interrupt(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.state.global_step == 2:  # the third step: checkpoint-2 was written before it
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "training_step", step_then_interrupt)
    code, output = run_cli("run-ft", f"--ft={job}")
    assert code == 130, output[-3000:]
    assert "stopped by Ctrl-C at step 3: nothing saved (save_on_interrupt: false); newest complete checkpoint: " \
           f"{out / 'checkpoint-2'}" in output
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


# ------------------------------------------------------------------ disk full while saving


@pytest.mark.slow
def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one_and_resumes(tmp_path, tiny_models, monkeypatch,
                                                                               caplog):
    import logging

    from transformers import Trainer

    caplog.set_level(logging.INFO, logger="llmfinetune")

    out = tmp_path / "run"
    job = _job_file(tmp_path, tiny_models, out, 6, save_steps=2)
    original = Trainer._save_optimizer_and_scheduler

    def disk_full_at_step_4(self, output_dir):
        if self.state.global_step == 4:  # the weights of checkpoint-4 are on disk, the optimizer is not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(output_dir, "optimizer.pt"))
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", disk_full_at_step_4)
    code, output = run_cli("run-ft", f"--ft={job}")
    assert code == 2, output[-3000:]
    assert "Traceback" not in output
    message = output[output.index("error: "):]
    assert f"training: could not write to {out} (disk full or write error: No space left on device)." in message
    assert "checkpoint-4 was not completely written and is not marked complete; --resume skips it." in message
    assert f"The previous checkpoint {out / 'checkpoint-2'} is intact." in message
    assert f"resume with: llmfinetune run-ft --ft={job} --resume" in message
    assert (out / "checkpoint-2" / COMPLETE_MARK).is_file()
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / COMPLETE_MARK).exists()

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", original)  # space freed
    code, output = run_cli("run-ft", f"--ft={job}", "--resume")
    assert code == 0, output[-3000:]
    assert f"Resuming from {out / 'checkpoint-2'}" in caplog.text  # not the partial checkpoint-4
    assert _steps_logged(out) == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoint-6" / COMPLETE_MARK).is_file() and (out / "metrics.json").is_file()


@pytest.mark.parametrize("exc, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "Disk quota exceeded"),
    (OSError(errno.EIO, "Input/output error"), "Input/output error"),
    # torch.save reports a full disk like this, safetensors like the next one
    (RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed"), "file write failed"),
    (Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
               'device" })'), "no space left on device"),
])
def test_write_failures_are_recognised(exc, reason):
    from llmfinetune.faults import write_failure

    assert write_failure(exc) == reason
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = exc
    assert write_failure(wrapped) == reason


@pytest.mark.parametrize("exc", [OSError(errno.ENOENT, "No such file"), ValueError("bad"), PermissionError(13, "x")])
def test_other_errors_are_not_write_failures(exc):
    from llmfinetune.faults import write_failure

    assert write_failure(exc) is None


# ------------------------------------------------------------------ out of memory


def _oom_errors():
    import torch

    return [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB total capacity)"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                     "tried to allocate 123456789 bytes. Error code 12 (Cannot allocate memory)"),
        MemoryError(),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1, 2], ids=["cuda-oom", "cpu-allocator", "memory-error"])
def test_out_of_memory_names_the_settings_that_reduce_memory(tmp_path, tiny_models, monkeypatch, which):
    from transformers import Trainer

    out = tmp_path / "run"
    job = _job_file(tmp_path, tiny_models, out, 6, save_steps=2, gradient_accumulation_steps=2)
    error = _oom_errors()[which]

    def step_out_of_memory(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(Trainer, "training_step", step_out_of_memory)
    code, output = run_cli("run-ft", f"--ft={job}")
    assert code == 2, output[-3000:]
    assert "Traceback" not in output
    message = output[output.index("error: "):]
    assert message.startswith(f"error: out of memory while training ({type(error).__name__}")
    for fragment in ("per_device_train_batch_size (now 4)", "gradient_accumulation_steps (now 2)",
                     "max_length (now 64)", "gradient_checkpointing: true (now False)",
                     "DeepSpeed ZeRO-3 with CPU offload", "Newest complete checkpoint: none"):
        assert fragment in message, fragment
    assert "ft_method: lora" not in message  # the job already trains LoRA adapters


def test_out_of_memory_advice_for_a_full_fine_tune(tmp_path):
    from llmfinetune.config import parse_job
    from llmfinetune.faults import UserError, guarded

    job = parse_job(job_dict("sequenceclassification", "full", tmp_path, tmp_path, tmp_path / "run"))
    with pytest.raises(UserError) as info:
        with guarded("training", job, tmp_path / "run"):
            raise _oom_errors()[0]
    message = str(info.value)
    assert "ft_config.ft_method: lora" in message and "per_device_train_batch_size (now 4)" in message


def test_errors_that_are_not_faults_pass_through(tmp_path):
    from llmfinetune.config import parse_job
    from llmfinetune.faults import guarded

    job = parse_job(job_dict("sequenceclassification", "full", tmp_path, tmp_path, tmp_path / "run"))
    with pytest.raises(ValueError, match="a bug"):
        with guarded("training", job, tmp_path / "run"):
            raise ValueError("a bug")


# ------------------------------------------------------------------ a killed worker in a multi-process run


def _workers_marked(mark: str) -> dict[int, int]:
    """rank -> pid of the worker processes whose environment carries `mark` (workers have RANK set)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        variables = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
        if variables.get(b"LLMFINETUNE_TEST_MARK") == mark.encode() and b"RANK" in variables:
            found[int(variables[b"RANK"])] = int(entry)
    return found


@pytest.mark.slow
def test_a_killed_worker_stops_the_others_and_the_launcher_names_its_rank(tmp_path, tiny_models):
    data = make_dataset(tmp_path / "data", "sequenceclassification", train_rows=64, eval_rows=16)
    config = job_dict("sequenceclassification", "lora", tiny_models["bert"], data, tmp_path / "run", max_steps=5000,
                      logging_steps=1, save_steps=100_000, eval_strategy="no")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config))
    mark = str(tmp_path)
    process = subprocess.Popen([sys.executable, "-m", "llmfinetune", "run-ft", f"--ft={job}", "--nproc", "2"],
                               cwd=REPO, env={**env(), "LLMFINETUNE_TEST_MARK": mark}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 300
        while not any("'loss'" in line for line in lines):  # both ranks are training
            assert process.poll() is None, "".join(lines)[-3000:]
            assert time.time() < deadline, "no step was logged"
            time.sleep(0.05)
        workers = _workers_marked(mark)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.time()
        code = process.wait(timeout=120)  # bounded: the agent stops rank 0 instead of letting it hang
        took = time.time() - killed_at
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    reader.join(timeout=10)
    output = "".join(lines)
    assert code == 128 + signal.SIGKILL, output[-3000:]
    assert took < 120
    assert "error: worker rank 1 of 2 died (SIGKILL); the other worker was stopped." in output
    assert f"Resume with: llmfinetune run-ft --ft={job} --nproc 2 --resume" in output
    assert "Traceback" not in output
    assert not _workers_marked(mark), "a worker outlived the launcher"


# ------------------------------------------------------------------ what a run leaves: no pickles, no secrets

# torch state of a checkpoint that Trainer needs to resume; transformers loads each with torch.load(weights_only=True)
RESUME_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}


@pytest.mark.slow
def test_run_dir_has_safetensors_weights_no_pickled_arguments_and_no_secrets(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_EnvSecret0123456789")
    out = tmp_path / "run"
    data = make_dataset(tmp_path / "data", "sequenceclassification", train_rows=16, eval_rows=8)
    config = job_dict("sequenceclassification", "full", tiny_models["bert"], data, out, max_steps=2, save_steps=2,
                      hub_token="hf_JobSecret0123456789")
    config["model_config"]["initialization"] = {"initializer": {"from_pretrained_kwargs": {
        "token": "hf_KwargSecret0123456789"}}}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", ["llmfinetune", "run-ft", f"--ft={job}",
                                      "model_config.initialization.initializer.from_pretrained_kwargs.token="
                                      "hf_ArgvSecret0123456789"])
    code, output = run_cli(*sys.argv[1:])
    assert code == 0, output[-3000:]

    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert "model.safetensors" in names and (out / "checkpoint-2" / "model.safetensors").is_file()
    for path in files:  # weights only as safetensors; TrainingArguments as JSON, not a pickle
        assert path.suffix not in (".bin", ".pkl", ".pickle") and (path.suffix not in (".pt", ".pth")
                                                                    or path.name in RESUME_STATE), path
    for folder in (out, out / "checkpoint-2"):
        assert json.loads((folder / "training_args.json").read_text())["max_steps"] == 2
    for path in files:
        if path.suffix in (".json", ".yaml", ".md", ".txt", ".jsonl", ".csv"):
            text = path.read_text(encoding="utf-8", errors="replace")
            assert "Secret0123456789" not in text, path
    assert "from_pretrained_kwargs.token=<redacted>" in (out / "report.md").read_text()


def test_redact_arguments_hides_secret_overrides_only():
    from llmfinetune.config import redact_arguments

    assert redact_arguments(["run-ft", "--ft=job.yaml", "a.b.hub_token=hf_x", "model_config.add_special_tokens."
                             "pad_token=<pad>", "x.api_key=k", "--resume"]) == [
        "run-ft", "--ft=job.yaml", "a.b.hub_token=<redacted>", "model_config.add_special_tokens.pad_token=<pad>",
        "x.api_key=<redacted>", "--resume"]
