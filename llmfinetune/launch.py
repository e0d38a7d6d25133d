"""Start N local workers without a launcher, and catch launches that would silently not be distributed."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .errors import UserError

if TYPE_CHECKING:
    from .config import Job

logger = logging.getLogger(__name__)

LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE")
# Set in the workers that `spawn_local_workers` starts: they are under a launcher, but it is ours.
OWN_WORKERS_VARIABLE = "LLMFINETUNE_LOCAL_WORKERS"
SCALING = "scaling_config"
# How long the agent waits, after passing Ctrl-C on, for the workers to finish their step and save. torchrun's own
# default is 30 s and then SIGKILL, which a large model's checkpoint (weights and optimizer state) can outlast. A
# second Ctrl-C still stops them at once: the agent then sends SIGTERM, which the workers do not catch.
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT, when set, decides instead.
WORKERS_SAVE_TIMEOUT_S = 3600
USE_CPU_OVERRIDE = "ft_config.train_config.base_config.use_cpu=true"


def under_launcher() -> bool:
    """torchrun, accelerate, the deepspeed launcher and Ray Train all set these in every worker."""
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


@dataclass
class LocalWorkers:
    """What `scaling_config` (and --nproc) mean for `run-ft` without a launcher: one DDP process per worker, each on
    one GPU or on the CPU, with `threads` CPU threads each (None: an even share of the machine)."""

    processes: int
    threads: Optional[int] = None
    on_cpu: bool = False  # GPUs are visible but the job asked for the CPU: they are hidden from the workers


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_local_workers(job: "Job", nproc: Optional[int]) -> LocalWorkers:
    """Every scaling_config key is honoured or refused here, against the GPUs this machine shows: num_workers (or
    --nproc) processes, num_cpus_per_worker threads each, use_gpu / num_gpus_per_worker choosing GPU or CPU."""
    scaling = job.scaling_config
    given = scaling.model_fields_set
    processes = nproc if nproc is not None else scaling.num_workers
    if processes < 1:
        raise UserError(f"--nproc: expected at least 1, got {processes}.")
    count_name = f"--nproc {processes}" if nproc is not None else f"{SCALING}.num_workers: {processes}"
    gpus = visible_gpus()
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = f"CUDA_VISIBLE_DEVICES={devices!r}" if devices is not None else "CUDA_VISIBLE_DEVICES unset"
    per_worker = scaling.num_gpus_per_worker if "num_gpus_per_worker" in given else None
    if scaling.use_gpu is False and per_worker:
        raise UserError(f"{job.source}: {SCALING} sets use_gpu: false but num_gpus_per_worker: {per_worker:g}; set "
                        "use_gpu: true, or num_gpus_per_worker: 0 to train on the CPU.")
    if per_worker is not None and per_worker not in (0, 1):
        shared = ("several workers cannot share one GPU under DDP (NCCL refuses two processes on one device)"
                  if per_worker < 1 else "a worker trains on one GPU")
        raise UserError(
            f"{job.source}: {SCALING}.num_gpus_per_worker: {per_worker:g} cannot be honoured by run-ft, which starts "
            f"one DDP process per GPU: {shared}. Set num_gpus_per_worker: 1 with num_workers up to the number of "
            "GPUs; for a model larger than one GPU, shard it with DeepSpeed ZeRO-3 (`deepspeed --num_gpus N "
            "llm_finetune.py run-ft --ft=F --deepspeed ds.json`); `llmfinetune ray-ft` reserves GPUs per worker on a "
            "Ray cluster.")
    use_cpu = bool(job.base_config.get("use_cpu"))
    if scaling.use_gpu is not None:
        wants_gpu, asked_by = scaling.use_gpu, f"{SCALING}.use_gpu: {str(scaling.use_gpu).lower()}"
    elif per_worker is not None:
        wants_gpu, asked_by = per_worker > 0, f"{SCALING}.num_gpus_per_worker: {per_worker:g}"
    else:
        wants_gpu, asked_by = gpus > 0 and not use_cpu, None  # nothing said: follow the machine
    if wants_gpu and use_cpu:
        raise UserError(f"{job.source}: {asked_by} asks for GPUs but ft_config.train_config.base_config.use_cpu is "
                        "true; keep one of them.")
    if wants_gpu and gpus == 0:
        raise UserError(f"{job.source}: {asked_by} asks for a GPU per worker, but this machine shows none "
                        f"({devices}). Set {SCALING}.use_gpu: false (num_gpus_per_worker: 0) to train on the CPU.")
    if wants_gpu and processes > gpus:
        raise UserError(
            f"{job.source}: {count_name} starts {processes} workers, one per GPU, but this machine shows {gpus} "
            f"GPU{'s' if gpus != 1 else ''} ({devices}). "
            f"Set {SCALING}.num_workers: {gpus} (or --nproc {gpus}), or {SCALING}.use_gpu: false to train "
            f"{processes} workers on the CPU.")
    on_cpu = not wants_gpu and gpus > 0 and not use_cpu
    if on_cpu:
        logger.info("%s: training on the CPU although this machine shows %d GPU(s); remove it (or set use_gpu: "
                    "true, num_gpus_per_worker: 1) to train on them.", asked_by, gpus)
    return LocalWorkers(processes, _threads_per_worker(job, processes), on_cpu)


def _threads_per_worker(job: "Job", processes: int) -> Optional[int]:
    scaling = job.scaling_config
    if "num_cpus_per_worker" not in scaling.model_fields_set:
        return None
    wanted = scaling.num_cpus_per_worker
    threads = max(1, int(wanted))
    if threads != wanted:
        logger.warning("%s.num_cpus_per_worker: %g: a worker runs whole CPU threads; using %d.", SCALING, wanted,
                       threads)
    cores = os.cpu_count() or 1
    if threads * processes > cores:
        logger.warning("%s.num_cpus_per_worker: %d threads x %d workers = %d, more than this machine's %d CPUs: "
                       "they will compete for them.", SCALING, threads, processes, threads * processes, cores)
    return threads


def warn_scaling_under_launcher(job: "Job", nproc: Optional[int] = None) -> None:
    """Under torchrun/accelerate/deepspeed the launcher decides processes and devices: say which keys do not apply."""
    if os.environ.get(OWN_WORKERS_VARIABLE) or os.environ.get("RANK", "0") != "0":
        return
    given = [f"{SCALING}.{key}" for key in sorted(job.scaling_config.model_fields_set & {
        "num_workers", "num_gpus_per_worker", "num_cpus_per_worker", "use_gpu"})]
    if nproc is not None:
        given.append(f"--nproc {nproc}")
    if given:
        logger.warning("%s: not used under this launcher (WORLD_SIZE=%s), whose own options decide the processes, "
                       "devices and threads; they are for `llmfinetune run-ft` without a launcher and `ray-ft`.",
                       ", ".join(given), os.environ.get("WORLD_SIZE", "?"))


def spawn_local_workers(nproc: int, cli_args: list[str], threads: Optional[int] = None,
                        on_cpu: bool = False) -> int:
    """Run `llmfinetune <cli_args>` in `nproc` processes through torch's elastic launcher (torchrun's own `run`, in
    this process), each with `threads` CPU threads (default: OMP_NUM_THREADS, else an even share of the machine),
    and no GPU when `on_cpu`. When a worker dies or fails, the agent stops the others at once; this raises
    WorkerFailed naming the rank and how it ended, instead of torchrun's traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    threads = threads or int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // nproc))
    parser = get_args_parser()
    command = torchrun_arguments(nproc, cli_args, parser)
    print(f"Starting {nproc} local workers: torch.distributed.run {' '.join(command)}", flush=True)
    # The package must be importable by the workers even when run from a checkout that is not installed; the agent
    # passes this process's environment on to them.
    package_root = str(Path(__file__).resolve().parent.parent)
    worker_env = {"OMP_NUM_THREADS": str(threads), OWN_WORKERS_VARIABLE: "1",
                  "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    if on_cpu:
        worker_env["CUDA_VISIBLE_DEVICES"] = ""
    saved = {name: os.environ.get(name) for name in worker_env}
    os.environ.update(worker_env)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)  # no rendezvous chatter
    try:
        run(parser.parse_args(command))
        return 0
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise WorkerFailed(rank, failure.exitcode, failure.signal_name(), nproc, cli_args) from None
    except SignalException as exc:
        # Ctrl-C (or SIGTERM) reached the agent, which passed it to the workers: they stopped after the same step
        # and saved a checkpoint unless save_on_interrupt is false (their own lines above say which).
        from .faults import Interrupted

        raise Interrupted(f"{exc.sigval.name} stopped the {nproc} workers; checkpoints completely written are "
                          f"kept. Resume with: llmfinetune run-ft --ft={_job_file(cli_args)} --nproc {nproc} "
                          "--resume") from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def torchrun_arguments(nproc: int, cli_args: list[str], parser) -> list[str]:
    """torchrun's command line for `parser` (torch.distributed.run's): the save timeout only where that torch's
    torchrun has the option (torch 2.11's does not, and rejects the whole command line; it stops the workers 30 s
    after Ctrl-C, which one info line says)."""
    arguments = ["--standalone", f"--nproc_per_node={nproc}"]
    if takes_save_timeout(parser):
        timeout = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or str(WORKERS_SAVE_TIMEOUT_S)
        arguments.append(f"--shutdown-timeout={timeout}")
    else:
        import torch

        logger.info("torch %s's launcher stops the workers 30 s after Ctrl-C: a checkpoint still being written then "
                    "is cut short (those completely written before it are kept); newer torch lets them take up to "
                    "%d s.", torch.__version__, WORKERS_SAVE_TIMEOUT_S)
    return [*arguments, "-m", "llmfinetune", *cli_args]


def takes_save_timeout(parser) -> bool:
    """Whether this torchrun argument parser has --shutdown-timeout (torch 2.11's has not)."""
    return any("--shutdown-timeout" in action.option_strings for action in parser._actions)


class WorkerFailed(UserError):
    """One worker of a local multi-process run died or failed; the agent stopped the others."""

    def __init__(self, rank: int, exitcode: int, signal_name: str, nproc: int, cli_args: list[str]):
        if exitcode < 0:
            how = f"died ({signal_name})"
            self.exit_code = 128 - exitcode
        else:
            how = f"failed (exit code {exitcode}; its own error is above)"
            self.exit_code = exitcode or 1
        others = "the other worker was" if nproc == 2 else "the other workers were"
        super().__init__(f"worker rank {rank} of {nproc} {how}; {others} stopped. Checkpoints completely written "
                         f"before this are kept. Resume with: llmfinetune run-ft --ft={_job_file(cli_args)} "
                         f"--nproc {nproc} --resume")


def _job_file(cli_args: list[str]) -> str:
    return next((a.split("=", 1)[1] for a in cli_args if a.startswith("--ft=")), "<job file>")


def check_launch(world_size: int) -> None:
    """Stop the launches that start N processes which each train alone, or one process where N were asked for."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if expected > 1 and world_size == 1:
        raise UserError(
            f"the launcher started {expected} processes (WORLD_SIZE={expected}) but this one trains alone "
            "(world size 1), so every process would train the same model into the same run directory. On a CPU "
            "machine use `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`."
        )
    parent = _parent_command()
    if "accelerate" in " ".join(parent[:3]) and "--cpu" in parent:
        asked = _flag_value(parent, "--num_processes")
        if asked and asked.isdigit() and int(asked) > 1 and world_size == 1:
            raise UserError(
                f"`accelerate launch --cpu --num_processes {asked}` starts one process: accelerate sends --cpu to its "
                f"single-process launcher. For {asked} CPU processes use `accelerate launch --multi_gpu "
                f"--num_processes {asked} ...` (llmfinetune trains on the CPU over gloo when there is no GPU), "
                f"or `llmfinetune run-ft --nproc {asked} ...`."
            )


def _parent_command() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _flag_value(argv: list[str], flag: str) -> str | None:
    for index, item in enumerate(argv):
        if item == flag and index + 1 < len(argv):
            return argv[index + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return None
