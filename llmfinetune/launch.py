"""Start N local workers without a launcher, and catch launches that would silently not be distributed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .errors import UserError

LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE")


def under_launcher() -> bool:
    """torchrun, accelerate, the deepspeed launcher and Ray Train all set these in every worker."""
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def spawn_local_workers(nproc: int, cli_args: list[str]) -> int:
    """Run `llmfinetune <cli_args>` in `nproc` processes through torch's elastic launcher (torchrun), each with an
    even share of the CPU threads, and return the launcher's exit code."""
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "llmfinetune", *cli_args]
    print(f"Starting {nproc} local workers: {' '.join(command[2:])}", flush=True)
    # The package must be importable by the workers even when run from a checkout that is not installed.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return subprocess.call(command, env=env)


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
