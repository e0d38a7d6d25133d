"""scaling_config on plain `run-ft` (no launcher): every key honoured or refused against the GPUs the machine shows,
faked here (torch.cuda.is_available / device_count) without starting a worker; and FSDP, which accelerate turns on
only for GPU runs, refused on a machine without CUDA instead of training plain DDP."""
from __future__ import annotations

import logging
import os

import pytest
import torch
import yaml

from conftest import job_dict
from llmfinetune import launch
from llmfinetune.config import parse_job
from llmfinetune.errors import UserError


@pytest.fixture
def gpus(monkeypatch):
    """gpus(n): this machine shows n CUDA devices."""
    def show(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    return show


def _job(tmp_path, scaling=None, **base):
    raw = job_dict("sequenceclassification", "lora", tmp_path / "model", tmp_path / "data", tmp_path / "run", **base)
    if scaling is not None:
        raw["scaling_config"] = scaling
    return parse_job(raw)


SEED_BERT = {"num_workers": 2, "num_gpus_per_worker": 0, "num_cpus_per_worker": 1}  # the seed's bert job files


def test_more_workers_than_gpus_is_refused_naming_both_counts(tmp_path, gpus):
    gpus(2)
    with pytest.raises(UserError, match=r"scaling_config\.num_workers: 4 starts 4 workers, one per GPU, but this "
                                        r"machine shows 2 GPUs .*Set scaling_config\.num_workers: 2 \(or --nproc 2\), "
                                        r"or scaling_config\.use_gpu: false"):
        launch.plan_local_workers(_job(tmp_path, {"num_workers": 4}), None)
    with pytest.raises(UserError, match=r"--nproc 3 starts 3 workers, one per GPU, but this machine shows 2 GPUs"):
        launch.plan_local_workers(_job(tmp_path), 3)
    assert launch.plan_local_workers(_job(tmp_path, {"num_workers": 2}), None) == launch.LocalWorkers(2, None, False)


def test_the_seed_files_num_gpus_per_worker_0_trains_its_workers_on_the_cpu(tmp_path, gpus):
    gpus(1)
    assert launch.plan_local_workers(_job(tmp_path, SEED_BERT), None) == launch.LocalWorkers(2, 1, True)
    gpus(0)
    assert launch.plan_local_workers(_job(tmp_path, SEED_BERT), None) == launch.LocalWorkers(2, 1, False)


def test_use_gpu_false_hides_the_gpus_and_true_needs_them(tmp_path, gpus):
    gpus(4)
    assert launch.plan_local_workers(_job(tmp_path, {"num_workers": 8, "use_gpu": False}), None).on_cpu
    gpus(0)
    with pytest.raises(UserError, match=r"scaling_config\.use_gpu: true asks for a GPU per worker, but this machine "
                                        r"shows none"):
        launch.plan_local_workers(_job(tmp_path, {"use_gpu": True}), None)
    with pytest.raises(UserError, match=r"scaling_config\.num_gpus_per_worker: 1 asks for a GPU per worker"):
        launch.plan_local_workers(_job(tmp_path, {"num_gpus_per_worker": 1}), None)
    assert launch.plan_local_workers(_job(tmp_path, {"num_workers": 2}), None) == launch.LocalWorkers(2, None, False)


@pytest.mark.parametrize("per_worker, reason", [(2, "a worker trains on one GPU"),
                                                (0.5, "several workers cannot share one GPU")])
def test_gpus_per_worker_other_than_0_or_1_is_refused(tmp_path, gpus, per_worker, reason):
    gpus(4)
    with pytest.raises(UserError, match=rf"scaling_config\.num_gpus_per_worker: {per_worker:g} cannot be honoured by "
                                        rf"run-ft.*{reason}.*DeepSpeed ZeRO-3.*ray-ft"):
        launch.plan_local_workers(_job(tmp_path, {"num_gpus_per_worker": per_worker}), None)


def test_contradictions_are_refused(tmp_path, gpus):
    gpus(2)
    with pytest.raises(UserError, match=r"use_gpu: false but num_gpus_per_worker: 1"):
        launch.plan_local_workers(_job(tmp_path, {"use_gpu": False, "num_gpus_per_worker": 1}), None)
    with pytest.raises(UserError, match=r"use_gpu: true asks for GPUs but .*base_config\.use_cpu is true"):
        launch.plan_local_workers(_job(tmp_path, {"use_gpu": True}, use_cpu=True), None)
    # use_cpu alone: the workers train on the CPU, as many as asked.
    assert launch.plan_local_workers(_job(tmp_path, {"num_workers": 3}, use_cpu=True), None).processes == 3


def test_num_cpus_per_worker_sets_the_threads_of_each_worker(tmp_path, gpus, caplog):
    gpus(0)
    assert launch.plan_local_workers(_job(tmp_path, {"num_workers": 2, "num_cpus_per_worker": 3}), None).threads == 3
    with caplog.at_level(logging.WARNING, logger="llmfinetune.launch"):
        assert launch.plan_local_workers(_job(tmp_path, {"num_cpus_per_worker": 2.5}), None).threads == 2
    assert "num_cpus_per_worker: 2.5: a worker runs whole CPU threads; using 2" in caplog.text


def test_workers_get_their_threads_and_no_gpu_when_on_cpu(monkeypatch):
    import torch.distributed.run as torch_run

    seen = {}
    monkeypatch.setattr(torch_run, "run", lambda parsed: seen.update(
        {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
                                                 launch.OWN_WORKERS_VARIABLE)}, nproc=parsed.nproc_per_node))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert launch.spawn_local_workers(2, ["run-ft", "--ft=x.yaml"], threads=3, on_cpu=True) == 0
    assert seen == {"OMP_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": "", launch.OWN_WORKERS_VARIABLE: "1",
                    "nproc": "2"}
    assert "CUDA_VISIBLE_DEVICES" not in os.environ, "the launching process's environment is restored"


def test_the_agent_waits_for_the_workers_to_save_after_ctrl_c_longer_than_torchruns_30_s(monkeypatch):
    """torchrun SIGKILLs workers 30 s after passing Ctrl-C on: a large checkpoint can take longer to write."""
    import torch.distributed.run as torch_run

    if not launch.takes_save_timeout(torch_run.get_args_parser()):
        pytest.skip(f"torch {torch.__version__}'s torchrun has no --shutdown-timeout (the next test covers it)")
    seen = []
    monkeypatch.setattr(torch_run, "run", lambda parsed: seen.append(parsed.shutdown_timeout))
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    launch.spawn_local_workers(2, ["run-ft", "--ft=x.yaml"], threads=1)
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "45")  # the user's own setting decides
    launch.spawn_local_workers(2, ["run-ft", "--ft=x.yaml"], threads=1)
    assert seen == [launch.WORKERS_SAVE_TIMEOUT_S, 45] and launch.WORKERS_SAVE_TIMEOUT_S >= 600


def test_a_torchrun_without_the_save_timeout_option_still_starts_the_workers(monkeypatch, caplog):
    """torch 2.11's torchrun (the GPU machines' image) has no --shutdown-timeout and rejects a command line with it."""
    import torch.distributed.run as torch_run

    newer = torch_run.get_args_parser

    def older_parser():
        parser = newer()
        for option in [action for action in parser._actions if "--shutdown-timeout" in action.option_strings]:
            parser._remove_action(option)
            for name in option.option_strings:
                parser._option_string_actions.pop(name)
        assert not launch.takes_save_timeout(parser)
        return parser

    seen = []
    monkeypatch.setattr(torch_run, "get_args_parser", older_parser)
    monkeypatch.setattr(torch_run, "run", lambda parsed: seen.append(parsed.nproc_per_node))
    with caplog.at_level(logging.INFO, logger="llmfinetune.launch"):
        assert launch.spawn_local_workers(2, ["run-ft", "--ft=x.yaml"], threads=1) == 0
    assert seen == ["2"]
    assert "stops the workers 30 s after Ctrl-C" in caplog.text


def _job_file(tmp_path, scaling):
    raw = job_dict("sequenceclassification", "lora", tmp_path / "model", tmp_path / "data", tmp_path / "run")
    raw["scaling_config"] = scaling
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_run_ft_starts_the_seed_files_workers_on_the_cpu_of_a_gpu_machine(tmp_path, gpus, monkeypatch):
    from llmfinetune import cli

    gpus(1)
    for name in launch.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    started = []
    monkeypatch.setattr(launch, "spawn_local_workers", lambda *a: started.append(a) or 0)
    assert cli.main(["run-ft", f"--ft={_job_file(tmp_path, SEED_BERT)}"]) == 0
    (processes, worker_args, threads, on_cpu), = started
    assert (processes, threads, on_cpu) == (2, 1, True)
    assert launch.USE_CPU_OVERRIDE in worker_args


def test_run_ft_refuses_more_workers_than_gpus(tmp_path, gpus, monkeypatch, capsys):
    from llmfinetune import cli

    gpus(1)
    for name in launch.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launch, "spawn_local_workers", lambda *a: pytest.fail("no worker may start"))
    assert cli.main(["run-ft", f"--ft={_job_file(tmp_path, {'num_workers': 2})}"]) == 2
    assert "scaling_config.num_workers: 2 starts 2 workers, one per GPU, but this machine shows 1 GPU " in \
        capsys.readouterr().err


def test_check_refuses_what_run_ft_would_refuse(tmp_path, gpus, monkeypatch, capsys):
    from llmfinetune import cli, workflow

    gpus(1)
    for name in launch.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(workflow, "check_job", lambda job: pytest.fail("refused before the other checks"))
    assert cli.main(["check", f"--ft={_job_file(tmp_path, {'num_workers': 2})}"]) == 2
    assert "scaling_config.num_workers: 2 starts 2 workers, one per GPU, but this machine shows 1 GPU " in \
        capsys.readouterr().err


def test_one_process_honours_threads_and_use_gpu_false(tmp_path, gpus, monkeypatch):
    from llmfinetune import cli, workflow

    gpus(1)
    for name in launch.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    ran, threads = [], []
    monkeypatch.setattr(workflow, "run", lambda job, deepspeed=None: ran.append(job))
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    path = _job_file(tmp_path, {"num_workers": 1, "use_gpu": False, "num_cpus_per_worker": 2})
    assert cli.main(["run-ft", f"--ft={path}"]) == 0
    assert ran[0].base_config["use_cpu"] is True and threads == [2]


def test_under_a_launcher_scaling_keys_are_named_as_not_applying(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv(launch.OWN_WORKERS_VARIABLE, raising=False)
    with caplog.at_level(logging.WARNING, logger="llmfinetune.launch"):
        launch.warn_scaling_under_launcher(_job(tmp_path, SEED_BERT))
    assert ("scaling_config.num_cpus_per_worker, scaling_config.num_gpus_per_worker, scaling_config.num_workers: not "
            "used under this launcher (WORLD_SIZE=2)") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmfinetune.launch"):
        launch.warn_scaling_under_launcher(_job(tmp_path), 4)
    assert "--nproc 4: not used under this launcher" in caplog.text
    caplog.clear()
    monkeypatch.setenv(launch.OWN_WORKERS_VARIABLE, "1")  # our own workers: the plan was made before they started
    launch.warn_scaling_under_launcher(_job(tmp_path, SEED_BERT))
    assert caplog.text == ""


# ---------------------------------------------------------------- FSDP


def _training_arguments(job, tmp_path):
    from llmfinetune import arguments
    from llmfinetune.registry import TASKS

    return arguments.build_training_arguments(job, TASKS.get(job.task), tmp_path / "run")


@pytest.mark.parametrize("base", [{"fsdp": True}, {"fsdp": "full_shard auto_wrap"}], ids=["true", "legacy-string"])
def test_fsdp_on_a_machine_without_cuda_is_refused_with_the_command_to_use(tmp_path, gpus, base):
    gpus(0)
    with pytest.raises(UserError, match=r"ft_config\.train_config\.base_config\.fsdp: FSDP needs CUDA GPUs, and this "
                                        r"run trains on the CPU.*`deepspeed --num_gpus 2 llm_finetune\.py run-ft "
                                        r"--ft=F --deepspeed ds\.json`"):
        _training_arguments(_job(tmp_path, **base), tmp_path)


def test_an_accelerate_fsdp_config_on_cpu_is_refused(tmp_path, gpus, monkeypatch):
    gpus(0)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for distributed_type: FSDP
    with pytest.raises(UserError, match=r"accelerate's FSDP config \(distributed_type: FSDP, ACCELERATE_USE_FSDP=true\)"
                                        r": FSDP needs CUDA GPUs"):
        _training_arguments(_job(tmp_path), tmp_path)


def test_fsdp_on_gpu_with_use_cpu_is_refused_and_fsdp_config_alone_is_named(tmp_path, gpus):
    gpus(2)
    with pytest.raises(UserError, match=r"base_config\.fsdp: FSDP needs CUDA GPUs, and this run trains on the CPU "
                                        r"\(use_cpu: true\)"):
        _training_arguments(_job(tmp_path, fsdp=True, use_cpu=True), tmp_path)
    with pytest.raises(UserError, match=r"base_config\.fsdp_config has no effect without .*base_config\.fsdp: true"):
        _training_arguments(_job(tmp_path, fsdp_config={"version": 2}), tmp_path)


def test_fsdp_on_gpu_reaches_the_training_arguments(tmp_path, gpus, monkeypatch):
    """No GPU here: the arguments class records what it is given instead of setting up CUDA."""
    import transformers
    from types import SimpleNamespace

    gpus(2)
    given = {}

    class Recording(transformers.TrainingArguments):
        def __init__(self, **kwargs):
            given.update(kwargs)

    monkeypatch.setattr(transformers, "TrainingArguments", Recording)
    task = SimpleNamespace(training_arguments=lambda job: (Recording, {}), loss_only_eval=False)
    from llmfinetune import arguments

    job = _job(tmp_path, fsdp="full_shard", fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": "BertLayer"})
    arguments.build_training_arguments(job, task, tmp_path / "run")
    assert given["fsdp"] == "full_shard"
    assert given["fsdp_config"] == {"version": 2, "transformer_layer_cls_to_wrap": "BertLayer"}
    assert "use_cpu" not in given


# ---------------------------------------------------------------- Liger kernels

def test_liger_kernels_are_refused_on_the_cpu_and_without_their_package_before_anything_loads(tmp_path, gpus,
                                                                                              monkeypatch):
    """TrainingArguments' use_liger_kernel otherwise fails with an ImportError once the model has loaded."""
    import importlib.util

    gpus(0)
    with pytest.raises(UserError, match=r"base_config\.use_liger_kernel: Liger's kernels are Triton kernels for GPUs, "
                                        r"and this run trains on the CPU"):
        _training_arguments(_job(tmp_path, use_liger_kernel=True), tmp_path)
    gpus(1)
    with pytest.raises(UserError, match=r"base_config\.use_liger_kernel: Liger's kernels are Triton kernels"):
        _training_arguments(_job(tmp_path, use_liger_kernel=True, use_cpu=True), tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    with pytest.raises(UserError, match=r"use_liger_kernel: needs the liger-kernel package, which is not installed: "
                                        r"`pip install liger-kernel`"):
        _training_arguments(_job(tmp_path, use_liger_kernel=True), tmp_path)
