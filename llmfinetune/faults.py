"""Faults during a run, turned into a clear message that keeps the work done: Ctrl-C saves a checkpoint and stops,
a full disk or failed write names the folder and the checkpoint that is still good, running out of memory names the
settings that need less. `workflow.run` wraps `trainer.train()`, the final save and the final evaluation in these."""
from __future__ import annotations

import errno
import logging
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from transformers import TrainerCallback

from .arguments import checkpointing
from .checkpoints import complete_checkpoints, incomplete_checkpoints
from .errors import UserError, first_line

if TYPE_CHECKING:
    from .config import Job

logger = logging.getLogger(__name__)

WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}
# How libraries that do not raise OSError report the same faults (torch.save, safetensors' Rust writer).
WRITE_FAILURE_TEXT = ("no space left on device", "disk quota exceeded", "file write failed", "storagefull",
                      "input/output error", "read-only file system")
# What gloo and NCCL raise in the surviving ranks when another worker of the job died.
PEER_LOST_TEXT = ("connection reset by peer", "connection closed by peer", "broken pipe",
                  "nccl communicator was aborted")
OOM_TEXT = ("out of memory", "defaultcpuallocator: can't allocate memory", "cannot allocate memory")


class Interrupted(UserError):
    """Ctrl-C during training: the conventional exit code of a process stopped by SIGINT."""

    exit_code = 130
    label = "interrupted"


def resume_command(job: "Job") -> str:
    return f"llmfinetune run-ft --ft={job.source or '<job file>'} --resume"


# ---------------------------------------------------------------- Ctrl-C


class SaveOnInterrupt(TrainerCallback):
    """After the first Ctrl-C, the step in progress finishes, a checkpoint is saved (unless save_on_interrupt is
    false) and training stops; `workflow.run` then exits with `Interrupted` instead of saving a final model."""

    def __init__(self, save: bool = True):
        self.save = save
        self.requested = False
        self.stopped_at: Optional[int] = None

    def on_step_end(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank must stop after the same step, or the others wait forever in the next collective. A
            # terminal's Ctrl-C reaches all ranks at about the same time, not necessarily within the same step.
            import torch

            flag = torch.tensor([1.0 if self.requested else 0.0], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.requested = bool(flag.item())
        if self.requested:
            control.should_save = self.save
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def raise_if_stopped(self, job: "Job", output_dir: Path) -> None:
        if not self.requested:
            return
        kept = complete_checkpoints(output_dir)
        step = self.stopped_at
        if self.save and kept and step is not None and kept[-1].name == f"checkpoint-{step}":
            saved = f"saved {kept[-1]} (complete)"
        elif self.save:
            saved = f"no checkpoint could be saved; newest complete checkpoint: {kept[-1] if kept else 'none'}"
        else:
            saved = (f"nothing saved (save_on_interrupt: false); newest complete checkpoint: "
                     f"{kept[-1] if kept else 'none'}")
        raise Interrupted(f"stopped by Ctrl-C at step {step if step is not None else '?'}: {saved}. "
                          f"Resume with: {resume_command(job)}")


@contextmanager
def interruptible(callback: SaveOnInterrupt) -> Iterator[None]:
    """SIGINT handler for the duration of training: the first Ctrl-C asks `callback` to save and stop, the second
    exits at once (KeyboardInterrupt). The previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if callback.requested:
            print("\nSecond Ctrl-C: stopping at once, nothing more is saved.", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        callback.requested = True
        what = "saving a checkpoint and stopping" if callback.save else "stopping without saving"
        print(f"\nCtrl-C: finishing this step, then {what}. Press Ctrl-C again to exit at once.", file=sys.stderr,
              flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- disk full, write errors, out of memory


def write_failure(exc: BaseException) -> Optional[str]:
    """The reason, if `exc` (or what caused it) is a failed write: disk full, quota, I/O error, read-only."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            return exc.strerror or errno.errorcode.get(exc.errno, str(exc.errno))
        text = str(exc).lower()
        for pattern in WRITE_FAILURE_TEXT:
            if pattern in text:
                return pattern
        exc = exc.__cause__ or exc.__context__
    return None


def out_of_memory(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(p in str(exc).lower() for p in OOM_TEXT)


def _write_error_message(stage: str, reason: str, output_dir: Path, job: "Job") -> str:
    kept = complete_checkpoints(output_dir)
    partial = incomplete_checkpoints(output_dir)
    parts = [f"{stage}: could not write to {output_dir} (disk full or write error: {reason})."]
    if partial:
        parts.append(f"{', '.join(partial)} was not completely written and is not marked complete; --resume skips "
                     "it.")
    if kept:
        parts.append(f"The previous checkpoint {kept[-1]} is intact.")
    else:
        parts.append("No complete checkpoint was written yet.")
    parts.append(f"Free space there (or set base_config.output_dir to another disk), then resume with: "
                 f"{resume_command(job)}")
    return " ".join(parts)


def _oom_message(stage: str, exc: BaseException, job: "Job", training_args, output_dir: Path) -> str:
    base = job.base_config
    batch = training_args.per_device_train_batch_size if training_args is not None else \
        base.get("per_device_train_batch_size", 8)
    accumulation = training_args.gradient_accumulation_steps if training_args is not None else 1
    first = first_line(exc, 200)
    advice = [
        f"per_device_train_batch_size (now {batch}): halve it, and double gradient_accumulation_steps (now "
        f"{accumulation}) to keep the same global batch",
        f"max_length (now {base.get('max_length', 'the default: the model limit, at most 512')}): shorter examples",
        f"gradient_checkpointing: true (now {checkpointing(base)[0]}): recompute "
        "activations instead of storing them",
    ]
    if stage == "evaluating":
        eval_batch = training_args.per_device_eval_batch_size if training_args is not None else \
            base.get("per_device_eval_batch_size", 8)
        advice.insert(0, f"per_device_eval_batch_size (now {eval_batch})")
    if job.method != "lora":
        advice.append("ft_config.ft_method: lora (trains adapters; no optimizer state for the base weights)")
    advice.append("DeepSpeed ZeRO-3 with CPU offload (--deepspeed with zero_optimization.stage 3 and "
                  "offload_optimizer/offload_param device: cpu)")
    kept = complete_checkpoints(output_dir)
    return (f"out of memory while {stage} ({type(exc).__name__}: {first}). Settings in "
            f"ft_config.train_config.base_config that need less memory:\n  - " + "\n  - ".join(advice) +
            f"\nNewest complete checkpoint: {kept[-1] if kept else 'none'}"
            + (f" (resume with: {resume_command(job)})" if kept else "") + ".")


@contextmanager
def guarded(stage: str, job: "Job", output_dir: Path, training_args=None) -> Iterator[None]:
    """Write failures and out-of-memory errors inside the block become a UserError naming what to do."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised unless recognised
        reason = write_failure(exc)
        if reason is not None:
            raise UserError(_write_error_message(stage, reason, output_dir, job)) from exc
        if out_of_memory(exc):
            raise UserError(_oom_message(stage, exc, job, training_args, output_dir)) from exc
        if _peer_lost(exc):
            raise UserError(f"{stage}: lost the connection to another worker of this job, which probably died "
                            f"({first_line(exc, 160)}). The launcher reports which one.") from exc
        raise


def _peer_lost(exc: BaseException) -> bool:
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return False
    except ImportError:
        return False
    return isinstance(exc, RuntimeError) and any(p in str(exc).lower() for p in PEER_LOST_TEXT)
