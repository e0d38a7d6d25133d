"""Checkpoints that can be trusted: marked complete only after the Trainer finished writing them, and resumed from
the newest complete one. A run killed mid-save leaves a folder without the mark, which resume skips."""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Optional, Union

from transformers import TrainerCallback

from .errors import UserError

logger = logging.getLogger(__name__)

COMPLETE_MARK = "checkpoint_complete"
_STEP = re.compile(r"^checkpoint-(\d+)$")
RESUME_KEY = "ft_config.train_config.base_config.resume_from_checkpoint"


class MarkCompleteCheckpoints(TrainerCallback):
    """on_save runs in every process after its own files of the checkpoint are written (model, optimizer, scheduler,
    RNG, ZeRO shards, state); the mark waits until every process is there, and is never put on a checkpoint saved
    at or after the step where the loss became non-finite (its weights are NaN)."""

    def __init__(self, nan_guard: Optional["StopOnNonFiniteLoss"] = None):
        self.nan_guard = nan_guard

    def on_save(self, args, state, control, **kwargs):
        wait_for_every_process()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.nan_guard is not None and self.nan_guard.poisoned(state.global_step):
            if state.is_world_process_zero:
                logger.warning("%s was saved after the loss became non-finite at step %d: not marked complete, "
                               "never resumed from.", folder, self.nan_guard.bad_step)
            return
        if state.is_world_process_zero and folder.is_dir():
            unpickle_training_arguments(folder, args)
            (folder / COMPLETE_MARK).write_text(str(state.global_step), encoding="utf-8")


def wait_for_every_process() -> None:
    """Rank 0 writes the mark only once the other ranks have written their files (RNG state, ZeRO shards)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def unpickle_training_arguments(folder: Path, args) -> None:
    """Trainer pickles TrainingArguments into training_args.bin (torch.save), which nothing needs to resume and which
    would run code if loaded; keep the same record as training_args.json (tokens hidden by transformers)."""
    pickled = folder / "training_args.bin"
    if pickled.is_file():
        (folder / "training_args.json").write_text(args.to_json_string(), encoding="utf-8")
        pickled.unlink()


# Devices whose step flags StopOnNonFiniteLoss reads a step late where the step decides nothing (see on_step_end).
READ_LATER_DEVICES = ("cuda", "xpu")


def _start_reading(flag):
    """(the flag's host copy, an event to wait for before reading it; None where the copy is done)."""
    import torch

    if flag.device.type == "cpu":
        return flag.clone(), None
    host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    written = torch.get_device_module(flag.device).Event()
    written.record()
    return host, written


class StopOnNonFiniteLoss(TrainerCallback):
    """A NaN/inf loss poisons the weights at the optimizer step it feeds, and every checkpoint after. The loss of
    every micro-batch is checked (through the trainer's own `training_step`, so every Trainer subclass is covered,
    and logging_steps does not matter); at the end of that optimizer step training stops, nothing more is saved or
    evaluated, and `MarkCompleteCheckpoints` marks no checkpoint from that step on. Under DDP the processes agree
    (one tiny all-reduce per step): the loss is per process, and a process that stops alone leaves the others
    waiting in the next collective."""

    def __init__(self):
        self.bad_step: Optional[int] = None
        self.bad_value: Optional[float] = None
        self._step_losses: list = []
        self._unread: list = []  # (step, losses, which are bad, the flag on its way to the host), oldest first
        self._watching = False

    def watch(self, trainer) -> None:
        """Wrap `trainer.training_step` on this instance: it returns the micro-batch's loss, which callbacks never
        see (Trainer adds it to a running sum that it reads only at logging steps)."""
        training_step = trainer.training_step

        def checked_training_step(*args, **kwargs):
            loss = training_step(*args, **kwargs)
            self._step_losses.append(loss.detach().float().reshape(-1))  # on its device: no sync per micro-batch
            return loss

        trainer.training_step = checked_training_step
        self._watching = True

    def poisoned(self, step: int) -> bool:
        self._read()
        return self.bad_step is not None and step >= self.bad_step

    def on_train_begin(self, args, state, control, **kwargs):
        if not self._watching:
            raise RuntimeError("StopOnNonFiniteLoss.watch(trainer) was not called: no step's loss would be checked.")

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        losses = torch.cat(self._step_losses) if self._step_losses else torch.zeros(1, device=args.device)
        self._step_losses = []
        local_bad = ~torch.isfinite(losses)
        flag = local_bad.any().float().reshape(1).to(args.device)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._unread.append((state.global_step, losses, local_bad, _start_reading(flag)))
        decided = control.should_save or control.should_evaluate or control.should_log or control.should_training_stop
        # Read now where this step saves, evaluates, logs or ends, or where reading costs nothing (the CPU); else
        # every step but this one, whose flag the GPU has long written: reading it now would wait for the GPU to
        # finish this step, and the host could not prepare the next meanwhile. Each process decides alike (the
        # flags above are the same everywhere), and a bad step is still found before anything is saved after it.
        self._read(keep=0 if decided or flag.device.type not in READ_LATER_DEVICES else 1)
        if self.bad_step is not None:
            self._stop(control)
        return control

    def _read(self, keep: int = 0) -> None:
        """The unread steps' flags but the newest `keep`: the first bad step, with its loss where this process had
        it."""
        count = len(self._unread) - keep
        for step, losses, local_bad, (host_flag, written) in self._unread[:count]:
            if written is not None:
                written.synchronize()
            if self.bad_step is None and host_flag.item() > 0:
                self.bad_step = step
                self.bad_value = float(losses[local_bad][0]) if bool(local_bad.any()) else None
        del self._unread[:count]

    def on_epoch_end(self, args, state, control, **kwargs):
        self._read()
        if self.bad_step is not None:  # save_strategy epoch would save the NaN weights after the loop
            self._stop(control)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._read()

    @staticmethod
    def _stop(control) -> None:
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False

    def raise_if_diverged(self, output_dir: Path, train_loss: Optional[float], last_step: int) -> None:
        """The run's end when the loss was non-finite: the first bad step and the newest checkpoint before it."""
        self._read()
        if self.bad_step is None and (train_loss is None or math.isfinite(train_loss)):
            return
        step = self.bad_step if self.bad_step is not None else last_step
        if self.bad_value is not None:
            value = f"{self.bad_value}"
        elif self.bad_step is not None:
            value = "non-finite in another process"
        else:
            value = f"{train_loss}"
        good = [folder for folder in complete_checkpoints(output_dir) if checkpoint_step(folder) < step]
        raise UserError(
            f"training diverged: the loss became {value} at step {step}; the model was not saved, and no checkpoint "
            f"from step {step} on is marked complete. Last good checkpoint: {good[-1] if good else 'none'}. "
            "Lower learning_rate, set max_grad_norm, or check the data."
        )


def checkpoint_step(folder: Path) -> int:
    match = _STEP.match(folder.name)
    return int(match.group(1)) if match else -1


def complete_checkpoints(output_dir: Path) -> list[Path]:
    found = []
    if output_dir.is_dir():
        for folder in output_dir.iterdir():
            match = _STEP.match(folder.name)
            if match and (folder / COMPLETE_MARK).is_file():
                found.append((int(match.group(1)), folder))
    return [folder for _, folder in sorted(found)]


def incomplete_checkpoints(output_dir: Path) -> list[str]:
    """Names of checkpoint folders without the completion mark: killed or failed mid-save, never resumed from."""
    if not output_dir.is_dir():
        return []
    return sorted(f.name for f in output_dir.glob("checkpoint-*") if f.is_dir() and not (f / COMPLETE_MARK).is_file())


def resume_point(setting: Union[bool, str, None], output_dir: Path) -> Optional[str]:
    """`resume_from_checkpoint`: true -> the newest complete checkpoint of this run directory (none: start fresh);
    a path -> that checkpoint, which must exist."""
    if setting in (None, False, "false", ""):
        return None
    if setting is True or str(setting).lower() == "true":
        complete = complete_checkpoints(output_dir)
        incomplete = incomplete_checkpoints(output_dir)
        if incomplete:
            logger.warning("Ignoring checkpoints that were not completely written: %s", ", ".join(incomplete))
        if not complete:
            logger.info("No complete checkpoint in %s: starting from the beginning.", output_dir)
            return None
        logger.info("Resuming from %s", complete[-1])
        return str(complete[-1])
    path = Path(str(setting)).expanduser()
    if not path.is_dir():
        raise UserError(f"{RESUME_KEY}: checkpoint folder {path} does not exist.")
    if not (path / COMPLETE_MARK).is_file():
        raise UserError(_incomplete_message(path.resolve()))
    return str(path.resolve())


def _incomplete_message(path: Path) -> str:
    inside = complete_checkpoints(path)
    if inside:
        return (f"{RESUME_KEY}: {path} is a run directory, not a checkpoint; its newest complete checkpoint is "
                f"{inside[-1]} (resume_from_checkpoint: true, or --resume, takes it).")
    missing = [name for name in ("trainer_state.json",) if not (path / name).is_file()]
    complete = complete_checkpoints(path.parent)
    return (f"{RESUME_KEY}: {path} is not a complete checkpoint: it has no '{COMPLETE_MARK}' file, which is "
            "written once every process has finished saving it, so it was killed or failed mid-save, or saved after "
            "the loss became non-finite" + (f"; also missing: {', '.join(missing)}" if missing else "") +
            f". Complete checkpoints in {path.parent}: {', '.join(c.name for c in complete) or 'none'} "
            "(resume_from_checkpoint: true, or --resume, takes the newest). A checkpoint written by plain "
            f"transformers has no mark: if you know it is complete, create {path / COMPLETE_MARK}.")
