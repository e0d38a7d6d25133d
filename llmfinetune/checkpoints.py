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


class MarkCompleteCheckpoints(TrainerCallback):
    """on_save runs after every file of the checkpoint is written (model, optimizer, scheduler, RNG, state)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                unpickle_training_arguments(folder, args)
                (folder / COMPLETE_MARK).write_text(str(state.global_step), encoding="utf-8")


def unpickle_training_arguments(folder: Path, args) -> None:
    """Trainer pickles TrainingArguments into training_args.bin (torch.save), which nothing needs to resume and which
    would run code if loaded; keep the same record as training_args.json (tokens hidden by transformers)."""
    pickled = folder / "training_args.bin"
    if pickled.is_file():
        (folder / "training_args.json").write_text(args.to_json_string(), encoding="utf-8")
        pickled.unlink()


class StopOnNonFiniteLoss(TrainerCallback):
    """A NaN/inf loss poisons every later step and checkpoint: stop at once, keep the checkpoints already made."""

    def __init__(self):
        self.bad_step: Optional[int] = None
        self.bad_value: Optional[float] = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.bad_step, self.bad_value = state.global_step, loss
            control.should_training_stop = True
            control.should_save = False


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
        raise UserError(f"ft_config.train_config.base_config.resume_from_checkpoint: checkpoint folder {path} "
                        "does not exist.")
    return str(path.resolve())
