"""Start N local workers without a launcher, and catch launches that would silently not be distributed."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE")


def under_launcher() -> bool:
    """torchrun, accelerate, the deepspeed launcher and Ray Train all set these in every worker."""
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def spawn_local_workers(nproc: int, cli_args: list[str]) -> int:
    """Run `llmfinetune <cli_args>` in `nproc` processes through torch's elastic launcher (torchrun's own `run`, in
    this process), each with an even share of the CPU threads. When a worker dies or fails, the agent stops the
    others at once; this raises WorkerFailed naming the rank and how it ended, instead of torchrun's traceback."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    threads = max(1, (os.cpu_count() or 1) // nproc)
    command = ["--standalone", f"--nproc_per_node={nproc}", "-m", "llmfinetune", *cli_args]
    print(f"Starting {nproc} local workers: torch.distributed.run {' '.join(command)}", flush=True)
    # The package must be importable by the workers even when run from a checkout that is not installed; the agent
    # passes this process's environment on to them.
    package_root = str(Path(__file__).resolve().parent.parent)
    worker_env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
                  "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    saved = {name: os.environ.get(name) for name in worker_env}
    os.environ.update(worker_env)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)  # no rendezvous chatter
    try:
        run(get_args_parser().parse_args(command))
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
