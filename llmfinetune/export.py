"""`llmfinetune export --model RUN_DIR --out DIR [--merge]`: a standalone model folder that plain
`AutoModelFor....from_pretrained(DIR)` loads.

LoRA runs need --merge: the adapter is merged into the base weights (`merge_and_unload`) and saved with the tokenizer
and a config holding id2label/label2id; a QLoRA run merges into the base loaded unquantized. Full runs are copied as
they are (model, tokenizer, config). Either way the folder also gets a job.yaml (ft_method: full) and labels.json, so
`llmfinetune predict/eval --model DIR` work on it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .errors import UserError
from .inference import JOB_FILE, LABELS_FILE, add_run_arguments

logger = logging.getLogger("llmfinetune")

# Training state, not part of the model.
NOT_EXPORTED = {"training_args.bin", "trainer_state.json"}


def add_command(commands) -> None:
    """`export`; called by cli._parser()."""
    help_text = "write a standalone model folder from a run directory (LoRA runs: merged with --merge)"
    parser = commands.add_parser("export", help=help_text, description=help_text)
    add_run_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    parser.add_argument("--merge", action="store_true",
                        help="merge a LoRA adapter into the base weights (required for LoRA runs)")
    parser.set_defaults(handler=main)


def export_run(model: str | Path, out: str | Path, merge: bool = False, ft: str | Path | None = None,
               overrides: Optional[list[str]] = None, device: str = "auto") -> Path:
    from .inference import locate_run

    located = locate_run(model, ft, overrides)
    run_dir, job, kind = located
    target = Path(out).expanduser().resolve()
    if target == run_dir or run_dir in target.parents:
        raise UserError(f"--out: {target} is inside the run directory {run_dir}; export to another folder.")
    if kind == "lora" and not merge:
        raise UserError(f"--model: {run_dir} holds a LoRA adapter, which needs its base model to load; add --merge "
                        "to merge it into the base weights and write a standalone model.")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--out: {target} already exists and is not an empty folder; choose a new folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if kind == "full":
            if merge:
                logger.info("%s is a full fine-tune: nothing to merge, copying it.", run_dir)
            _copy_full(run_dir, scratch)
        else:
            _merge_lora(model, located, device, scratch)
        _ordinary_permissions(scratch)
        if target.exists():
            target.rmdir()  # checked empty above
        os.replace(scratch, target)  # whole or nothing: no half-written model folder under --out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("Exported %s to %s", run_dir, target)
    return target


def _ordinary_permissions(folder: Path) -> None:
    """mkdtemp makes the folder private and safetensors writes 0600 files; an export is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def _copy_full(run_dir: Path, scratch: Path) -> None:
    for path in sorted(run_dir.iterdir()):  # checkpoint-* folders are training state: left behind
        if path.is_file() and path.name not in NOT_EXPORTED:
            shutil.copy2(path, scratch / path.name)


def _merge_lora(model, located, device: str, scratch: Path) -> None:
    from .config import dump_job, parse_job
    from .inference import load_run

    run_dir, job, kind = located
    if job.model.quantization_bit:
        # Merging into 4/8-bit weights would round the adapter away (and needs a GPU): a QLoRA run merges into the
        # base loaded unquantized, in the job's dtype, so the export is a full-precision model.
        logger.info("%s is a QLoRA run (model_config.quantization_bit %s): merging into the base model loaded "
                    "without quantization, in %s. The adapter was trained against the quantized weights, so the "
                    "merged model's outputs differ slightly from the quantized one's.", run_dir,
                    job.model.quantization_bit, job.model.initialization.initializer.dtype)
        job = job.model_copy(update={"model": job.model.model_copy(update={"quantization_bit": None})})
    run = load_run(model, device=device, located=(run_dir, job, kind))
    merged = run.model.merge_and_unload()
    merged.save_pretrained(str(scratch), safe_serialization=True)
    run.tokenizer.save_pretrained(str(scratch))
    if run.id2label:
        labels = {"id2label": run.id2label, "label2id": {name: index for index, name in run.id2label.items()}}
        (scratch / LABELS_FILE).write_text(json.dumps(labels, indent=2, ensure_ascii=False), encoding="utf-8")
    # The folder is now a full model: say so in its job.yaml, so llmfinetune predict/eval read it as one.
    raw = run.job.to_dict()
    raw["ft_config"]["ft_method"] = "full"
    raw["ft_config"]["train_config"]["lora_config"] = None
    dump_job(parse_job(raw), scratch / JOB_FILE)


def main(args) -> int:
    target = export_run(args.model, args.out, args.merge, args.ft, args.overrides, args.device)
    print(f"Exported to {target}", flush=True)
    return 0
