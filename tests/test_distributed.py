"""The same job file under real multi-process launchers, on CPU over gloo: torchrun, accelerate, and --nproc.

Each test checks what the run recorded (world size, global batch), not just the exit code.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, job_dict, make_dataset

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
       "TOKENIZERS_PARALLELISM": "false"}


def _write_job(tmp_path, tiny_models, **base) -> tuple:
    data = make_dataset(tmp_path / "data", "sequenceclassification", train_rows=64, eval_rows=16)
    out = tmp_path / "run"
    config = job_dict("sequenceclassification", "lora", tiny_models["bert"], data, out, **base)
    # No dropout anywhere: different ranks draw different masks, and the invariance test compares loss curves.
    config["ft_config"]["train_config"]["lora_config"]["lora_dropout"] = 0.0
    config["model_config"]["initialization"] = {"initializer": {"from_pretrained_kwargs": {
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, out


def _run(command: list[str], cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_torchrun_two_processes_train_as_one_ddp_job(tmp_path, tiny_models):
    job, out = _write_job(tmp_path, tiny_models)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "llm_finetune.py", "run-ft", f"--ft={job}"])
    metrics = _metrics(out)
    assert metrics["world_size"] == 2
    assert metrics["global_batch_size"] == 8  # 4 per device x 2 processes
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_nproc_flag_starts_local_workers(tmp_path, tiny_models):
    job, out = _write_job(tmp_path, tiny_models)
    _run([sys.executable, "-m", "llmfinetune", "run-ft", f"--ft={job}", "--nproc", "2"])
    assert _metrics(out)["world_size"] == 2


def test_accelerate_cpu_single_process_seed_command(tmp_path, tiny_models):
    job, out = _write_job(tmp_path, tiny_models)
    _run(["accelerate", "launch", "--cpu", "--num_machines=1", "--num_processes=1",
          "--num_cpu_threads_per_process=1", "--mixed_precision=no", "--dynamo_backend=no",
          "llm_finetune.py", "run-ft", f"--ft={job}"])
    assert _metrics(out)["world_size"] == 1


def test_accelerate_multi_process_on_cpu(tmp_path, tiny_models):
    job, out = _write_job(tmp_path, tiny_models)
    _run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29611",
          "llm_finetune.py", "run-ft", f"--ft={job}"])
    assert _metrics(out)["world_size"] == 2


def test_accelerate_cpu_with_several_processes_is_refused_with_advice(tmp_path, tiny_models):
    job, out = _write_job(tmp_path, tiny_models)
    result = subprocess.run(["accelerate", "launch", "--cpu", "--num_processes", "2", "llm_finetune.py", "run-ft",
                             f"--ft={job}"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    # accelerate turns our exit code 2 into its own 1 (and prints its own traceback after our message).
    assert result.returncode != 0, result.stderr[-3000:]
    assert "error: `accelerate launch --cpu --num_processes 2` starts one process" in result.stderr
    assert "--multi_gpu --num_processes 2" in result.stderr
    assert not (out / "metrics.json").exists()


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_models):
    """2 processes x batch 4 see the same examples per step as 1 process x batch 8, so the loss curve agrees."""
    common = {"max_steps": 6, "logging_steps": 1, "learning_rate": 1e-3, "train_sampling_strategy": "sequential",
              "save_strategy": "no", "eval_strategy": "no"}
    single_job, single_out = _write_job(tmp_path / "one", tiny_models, **{**common, "per_device_train_batch_size": 8})
    _run([sys.executable, "llm_finetune.py", "run-ft", f"--ft={single_job}"])
    double_job, double_out = _write_job(tmp_path / "two", tiny_models, **{**common, "per_device_train_batch_size": 4})
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "llm_finetune.py", "run-ft", f"--ft={double_job}"])

    def losses(out):
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [entry["loss"] for entry in history if "loss" in entry]

    one, two = losses(single_out), losses(double_out)
    assert len(one) == len(two) == 6
    # Same data and order per step; the only difference is the float summation order of the all-reduce.
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)



def test_two_hosts_on_loopback_through_accelerate(tmp_path, tiny_models):
    """The seed's multi-host command, with two 'machines' that are two launches on this host.

    Reliability: a fixed port let another run on the machine take it; that run's host 0 was then refused the port and
    exited while its host 1 waited for a rendezvous store that never came (reproduced: the lone host waits until
    killed). So: a free port, host 1 starts once host 0's store listens, `--rdzv_conf timeout=60` makes a lone host
    give up, `ddp_timeout` bounds a collective whose peer died, and both process groups are killed on any failure.
    """
    from multihost import free_port, run_together

    job, out = _write_job(tmp_path, tiny_models, ddp_timeout=120)
    port = free_port()
    common = ["accelerate", "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
              "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--rdzv_conf", "timeout=60",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    run_together([common + ["--machine_rank", str(rank), "llm_finetune.py", "run-ft", f"--ft={job}"]
                  for rank in (0, 1)], cwd=REPO, env=ENV, logs=tmp_path / "logs", timeout=240,
                 first_listens_on=port)
    metrics = _metrics(out)
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 8
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_a_failed_launch_takes_its_peers_down_at_once(tmp_path):
    """The cleanup the multi-host tests rely on: one launch failing ends the job at once, the other's whole process
    group is killed (a host whose peer left would otherwise wait), and the failure shows every launch's output."""
    import time

    from multihost import run_together

    pid_file = tmp_path / "waiting.pid"
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failed:
        run_together([["sh", "-c", f"sleep 300 & echo $! > {pid_file}; echo waiting for my peer; wait"],
                      ["sh", "-c", "sleep 1; echo port in use; exit 3"]],
                     cwd=tmp_path, env=ENV, logs=tmp_path / "logs", timeout=60)
    assert time.monotonic() - started < 30
    assert "launch [1] failed" in str(failed.value) and "port in use" in str(failed.value)
    assert "waiting for my peer" in str(failed.value)
    sleeper = int(pid_file.read_text())
    time.sleep(0.5)
    assert not os.path.exists(f"/proc/{sleeper}") or "Z" in open(f"/proc/{sleeper}/stat").read().split()[2], \
        "the waiting launch's child was left running"


def test_accelerate_fp16_on_cpu_trains_in_bf16_or_fp32_with_a_warning(tmp_path, tiny_models):
    """The seed's `accelerate launch --multi_gpu --mixed_precision=fp16` on a machine without a GPU."""
    from llmfinetune.arguments import cpu_supports_bf16

    job, out = _write_job(tmp_path, tiny_models)
    result = _run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--mixed_precision=fp16",
                   "--dynamo_backend", "no", "--main_process_port", "0", "llm_finetune.py", "run-ft", f"--ft={job}"])
    used = "bf16" if cpu_supports_bf16() else "fp32"
    assert f"mixed precision fp16 is not supported on CPU; training in {used} instead" in result.stderr
    assert _metrics(out)["world_size"] == 2
    args = json.loads((out / "checkpoint-4" / "training_args.json").read_text())
    assert args["fp16"] is False and args["bf16"] is (used == "bf16")
