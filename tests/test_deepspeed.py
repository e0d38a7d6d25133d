"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (gloo), through the deepspeed launcher and through accelerate, with the seed's
deepspeed.json ("auto" everywhere). Saved models load with plain transformers/peft and reproduce the run's eval."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, job_dict, make_dataset

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
       "TOKENIZERS_PARALLELISM": "false"}
SEED_DEEPSPEED = {  # the seed README's deepspeed.json
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
             "hysteresis": 2, "min_loss_scale": 1},
    "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 5e8,
                          "reduce_scatter": True, "reduce_bucket_size": 5e8, "overlap_comm": False,
                          "contiguous_gradients": True},
}


def _setup(tmp_path, tiny_models, method: str, stage: int):
    data = make_dataset(tmp_path / "data", "sequenceclassification", train_rows=64, eval_rows=16)
    out = tmp_path / "run"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict("sequenceclassification", method, tiny_models["bert"], data, out)))
    config = json.loads(json.dumps(SEED_DEEPSPEED))
    if stage == 3:
        config["zero_optimization"] = {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                       "stage3_gather_16bit_weights_on_model_save": True}
    ds = tmp_path / "deepspeed.json"
    ds.write_text(json.dumps(config))
    return job, ds, out


def _run(command):
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _eval_reproduces(out):
    """The saved weights are the trained ones: evaluating them again gives the run's own final eval loss."""
    trained = json.loads((out / "metrics.json").read_text())
    result = _run([sys.executable, "-m", "llmfinetune", "eval", "--model", str(out)])
    again = json.loads(result.stdout)
    assert again["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_launcher_full_fine_tuning(tmp_path, tiny_models, stage):
    job, ds, out = _setup(tmp_path, tiny_models, "full", stage)
    _run([shutil.which("deepspeed"), "--num_gpus", "2", "llm_finetune.py", "run-ft", f"--ft={job}",
          "--deepspeed", str(ds)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 8
    assert (out / "checkpoint-4" / "global_step4").is_dir(), "no DeepSpeed checkpoint: DeepSpeed was not used"
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    weights = load_file(str(out / "model.safetensors"))
    assert weights and all(t.numel() > 0 for t in weights.values()), "ZeRO-3 saved empty (partitioned) tensors"
    AutoModelForSequenceClassification.from_pretrained(out)
    _eval_reproduces(out)


def test_deepspeed_zero3_lora_saves_a_non_empty_adapter(tmp_path, tiny_models):
    job, ds, out = _setup(tmp_path, tiny_models, "lora", 3)
    _run([shutil.which("deepspeed"), "--num_gpus", "2", "llm_finetune.py", "run-ft", f"--ft={job}",
          "--deepspeed", str(ds)])
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora = {k: t for k, t in adapter.items() if "lora_" in k}
    assert lora and all(t.numel() > 0 for t in lora.values()), "empty LoRA adapter saved under ZeRO-3"
    assert any(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k)
    _eval_reproduces(out)


def _seed_deepspeed_accelerate_config(tmp_path, offload: str = "none", port: int = 0, **top) -> str:
    """The seed's DeepSpeed accelerate config ("Case 1": ZeRO-3, 16-bit save), 2 processes, written to a file;
    `offload` is its offload device, `top` overrides top-level keys."""
    path = tmp_path / "default_config.yaml"
    path.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"deepspeed_multinode_launcher": "standard", "gradient_accumulation_steps": 1,
                             "gradient_clipping": 1.0, "offload_optimizer_device": offload,
                             "offload_param_device": offload, "zero3_init_flag": True,
                             "zero3_save_16bit_model": True, "zero_stage": 3},
        "mixed_precision": "no", "num_machines": 1, "num_processes": 2, "machine_rank": 0,
        "main_process_port": port, "use_cpu": False, "rdzv_backend": "static", "same_network": True, **top,
    }))
    return str(path)


def test_accelerate_with_a_deepspeed_zero3_config_file(tmp_path, tiny_models):
    job, _, out = _setup(tmp_path, tiny_models, "full", 3)
    accelerate_config = _seed_deepspeed_accelerate_config(tmp_path, port=29633)  # mixed precision off for CPU
    _run(["accelerate", "launch", "--config_file", accelerate_config, "llm_finetune.py", "run-ft",
          f"--ft={job}"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert (out / "checkpoint-4" / "global_step4").is_dir(), "no DeepSpeed checkpoint: DeepSpeed was not used"
    _eval_reproduces(out)


def test_deepspeed_launcher_with_a_one_node_hostfile(tmp_path, tiny_models):
    """The seed's `deepspeed --hostfile` form, with this machine as the one node (no ssh needed)."""
    job, ds, out = _setup(tmp_path, tiny_models, "full", 2)
    hostfile = tmp_path / "myhostfile"
    hostfile.write_text("localhost slots=2\n")
    _run([shutil.which("deepspeed"), "--num_nodes=1", f"--hostfile={hostfile}", "--no_ssh_check",
          "--master_addr", "127.0.0.1", "--master_port", "29641", "llm_finetune.py", "run-ft", f"--ft={job}",
          "--deepspeed", str(ds)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert (out / "checkpoint-4" / "global_step4").is_dir()


def test_deepspeed_launcher_two_nodes_on_one_machine(tmp_path, tiny_models):
    """The seed's two-node hostfile (`node1 slots=1`, `node2 slots=1`), both nodes on this machine: one `deepspeed
    --no_ssh --node_rank R` launch per node, one process each, one ZeRO-2 job of world size 2."""
    from multihost import free_port, run_together

    job, ds, out = _setup(tmp_path, tiny_models, "full", 2)
    hostfile = tmp_path / "myhostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    port = free_port()
    outputs = run_together(
        [[shutil.which("deepspeed"), f"--hostfile={hostfile}", "--no_ssh", "--node_rank", str(rank),
          "--master_addr", "127.0.0.1", "--master_port", str(port), "llm_finetune.py", "run-ft", f"--ft={job}",
          "--deepspeed", str(ds)] for rank in (0, 1)],
        cwd=REPO, env=ENV, logs=tmp_path / "logs", timeout=360, first_listens_on=port)
    for rank, output in enumerate(outputs):  # each launch started one local process as node `rank` of 2
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in output, output[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 8
    assert (out / "checkpoint-4" / "global_step4").is_dir(), "no DeepSpeed checkpoint: DeepSpeed was not used"
    _eval_reproduces(out)


def test_accelerate_with_the_seed_offload_config(tmp_path, tiny_models):
    """The seed's 'Case 2' accelerate config: ZeRO-3 with optimizer and parameters offloaded to the CPU and
    `zero3_save_16bit_model`. DeepSpeed's cpu_adam op compiles on first use (gcc, once, cached under
    ~/.cache/torch_extensions). The saved model is the trained one: it equals the weights gathered from the ZeRO
    checkpoint of the last step, loads with plain from_pretrained, and reproduces the run's eval."""
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("DeepSpeed's cpu_adam (CPU offload) compiles with a C++ compiler; none here")
    pytest.importorskip("ninja", reason="DeepSpeed compiles cpu_adam with ninja")
    # Compile (or load the cached) cpu_adam here, once, rather than inside both ranks under the launch's timeout.
    from deepspeed.ops.op_builder import CPUAdamBuilder

    CPUAdamBuilder().load(verbose=False)
    job, _, out = _setup(tmp_path, tiny_models, "full", 3)
    accelerate_config = _seed_deepspeed_accelerate_config(tmp_path, offload="cpu")
    _run(["accelerate", "launch", "--config_file", accelerate_config, "llm_finetune.py", "run-ft",
          f"--ft={job}"])
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    step = out / "checkpoint-4" / "global_step4"
    ds_config = torch.load(step / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                           weights_only=False)["ds_config"]["zero_optimization"]
    assert ds_config["stage"] == 3
    assert ds_config["offload_optimizer"]["device"] == "cpu" and ds_config["offload_param"]["device"] == "cpu"

    saved = load_file(str(out / "model.safetensors"))
    assert saved and all(t.numel() > 0 for t in saved.values()), "ZeRO-3 saved empty (partitioned) tensors"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    trained = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-4"), tag="global_step4")
    # transformers writes BERT's LayerNorm weight/bias under their legacy names gamma/beta in this save path;
    # from_pretrained maps them back.
    saved = {name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): t
             for name, t in saved.items()}
    assert trained and set(trained) <= set(saved), sorted(set(trained) - set(saved))
    for name, tensor in trained.items():
        assert torch.equal(saved[name].float(), tensor.float()), f"{name}: saved weights differ from the trained ones"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"]).state_dict()
    assert any(not torch.equal(base[name], tensor) for name, tensor in trained.items() if name in base), \
        "the saved encoder equals the base model: nothing was trained"
    loaded = AutoModelForSequenceClassification.from_pretrained(out).state_dict()
    for name, tensor in trained.items():
        assert torch.equal(loaded[name].float(), tensor.float()), f"{name}: from_pretrained did not load the trained weights"
    _eval_reproduces(out)


def test_accelerate_deepspeed_config_with_fp16_on_cpu(tmp_path, tiny_models):
    """The seed's 'Case 1' accelerate config verbatim, `mixed_precision: fp16` included: on CPU DeepSpeed refused
    it (fp16.enabled vs the Trainer's fp16); now it trains in bf16 or fp32 with a warning."""
    from llmfinetune.arguments import cpu_supports_bf16

    job, _, out = _setup(tmp_path, tiny_models, "full", 3)
    accelerate_config = _seed_deepspeed_accelerate_config(tmp_path, mixed_precision="fp16", downcast_bf16="no")
    result = _run(["accelerate", "launch", "--config_file", accelerate_config, "llm_finetune.py", "run-ft",
                   f"--ft={job}"])
    used = "bf16" if cpu_supports_bf16() else "fp32"
    assert f"mixed precision fp16 is not supported on CPU; training in {used} instead" in result.stderr
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    assert (out / "checkpoint-4" / "global_step4").is_dir(), "no DeepSpeed checkpoint: DeepSpeed was not used"
