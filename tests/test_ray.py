"""`llmfinetune ray-ft`: the job on a local Ray cluster, 2 CPU workers training as one DDP job (gloo on loopback).

The run must be really distributed (world size 2 recorded by the Trainer) and leave the same run directory as
`run-ft`. Ray is imported by this command only; without Ray the command says how to install it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, job_dict, make_dataset

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def _job(tmp_path, tiny_models, out_name: str, **scaling):
    data = make_dataset(tmp_path / "data", "sequenceclassification", train_rows=64, eval_rows=16)
    config = job_dict("sequenceclassification", "lora", tiny_models["bert"], data, tmp_path / out_name)
    if scaling:
        config["scaling_config"] = scaling
    path = tmp_path / f"{out_name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, tmp_path / out_name


def _run(args: list[str], timeout: int, env=None) -> subprocess.CompletedProcess:
    """Run in its own process group and kill the whole group (Ray's raylet and workers too) on a timeout."""
    process = subprocess.Popen(args, cwd=REPO, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{output[-6000:]}")
    return subprocess.CompletedProcess(args, process.returncode, output, "")


@pytest.mark.slow
def test_ray_ft_two_cpu_workers_train_as_one_job_and_leave_the_run_ft_layout(tmp_path, tiny_models):
    pytest.importorskip("ray.train")
    job, out = _job(tmp_path, tiny_models, "ray", num_workers=2, num_cpus_per_worker=1, num_gpus_per_worker=0)
    result = _run([sys.executable, "-m", "llmfinetune", "ray-ft", f"--ft={job}"], timeout=240)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "Done (2 Ray workers)" in result.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2, "the Ray workers trained alone instead of as one DDP job"
    assert metrics["global_batch_size"] == 8  # 4 per worker x 2
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    assert yaml.safe_load((out / "job.yaml").read_text())["scaling_config"]["num_workers"] == 2
    # Ray placed its workers on loopback (it names their address when it starts them).
    addresses = set(re.findall(r"\(ip=([0-9.]+),", result.stdout))
    assert addresses <= {"127.0.0.1"}, addresses

    # The same layout as run-ft leaves (one process here; the layout does not depend on the launcher).
    single_job, single_out = _job(tmp_path, tiny_models, "single")
    single = _run([sys.executable, "-m", "llmfinetune", "run-ft", f"--ft={single_job}"], timeout=240)
    assert single.returncode == 0, single.stdout[-4000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single_out.iterdir())

    def checkpoint_files(run):  # the Trainer keeps one RNG state per rank: rng_state_0.pth, rng_state_1.pth
        return sorted(p.name for p in (run / "checkpoint-4").iterdir() if not p.name.startswith("rng_state"))

    assert checkpoint_files(out) == checkpoint_files(single_out)
    assert (out / "checkpoint-4" / "rng_state_1.pth").is_file()


def test_ray_ft_without_ray_says_how_to_install_it(tmp_path, tiny_models):
    job, out = _job(tmp_path, tiny_models, "noray")
    code = ("import sys; sys.modules['ray'] = None; from llmfinetune.cli import main; "
            f"sys.exit(main(['ray-ft', '--ft={job}']))")
    result = _run([sys.executable, "-c", code], timeout=120)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "pip install 'llmfinetune[ray]'" in result.stdout
    assert not out.exists()


@pytest.mark.parametrize("scaling, message", [
    ({"use_gpu": False, "num_gpus_per_worker": 1}, "use_gpu: false but num_gpus_per_worker: 1"),
    ({"num_gpus_per_worker": 64}, "asks for 64 GPU(s)"),
    ({"num_cpus_per_worker": 0}, "scaling_config.num_cpus_per_worker"),
    ({"num_workers": 0}, "scaling_config.num_workers"),
])
def test_ray_ft_refuses_scaling_configs_it_cannot_run(tmp_path, tiny_models, scaling, message):
    """Impossible requests end with an error before a cluster starts (Ray would wait for them forever)."""
    job, out = _job(tmp_path, tiny_models, "bad", **scaling)
    result = _run([sys.executable, "-m", "llmfinetune", "ray-ft", f"--ft={job}"], timeout=120)
    assert result.returncode == 2, result.stdout[-3000:]
    assert message in result.stdout
    assert "Starting a local Ray cluster" not in result.stdout


@pytest.mark.parametrize("args", [("--help",), ("ray-ft", "--help")])
def test_help_imports_neither_ray_nor_torch(args):
    from test_cli import imported_modules

    result = _run([sys.executable, "-X", "importtime", "-m", "llmfinetune", *args], timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "ray-ft" in result.stdout
    modules = imported_modules(result.stdout)
    assert "argparse" in modules
    assert not modules & {"ray", "torch", "transformers"}, sorted(modules & {"ray", "torch", "transformers"})
