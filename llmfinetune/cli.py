"""Command line: `llmfinetune run-ft --ft=FILE [key.path=value ...]` and friends.

Only the standard library and pydantic/yaml are imported here; torch loads when a command needs it, so `--help`
answers at once.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Optional

from .errors import UserError

OVERRIDE_HELP = "override any job-file key, e.g. ft_config.train_config.base_config.max_steps=5 (value read as YAML)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmfinetune",
        description="Fine-tune Hugging Face models from one YAML job file.",
        epilog="Example: llmfinetune run-ft --ft=models/ft--sequenceclassification--all-MiniLM-L6-v2-lora.yaml",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    # The deepspeed launcher puts --local_rank=N before the command name.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def job_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--ft", required=True, metavar="FILE", help="the YAML job file")
        command.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE", help=OVERRIDE_HELP)
        command.add_argument("--debug", action="store_true", help="show full tracebacks")
        return command

    run = job_command("run-ft", "train the model the job file describes")
    run.add_argument("--deepspeed", metavar="JSON", help="DeepSpeed config file (as passed by the deepspeed launcher)")
    run.add_argument("--nproc", type=int, default=None, metavar="N",
                     help="train in N local processes (torchrun); default: scaling_config.num_workers")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest complete checkpoint in the run directory")
    # Launchers append these; accept both spellings.
    run.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ray_ft = job_command("ray-ft", "train on a local Ray cluster with scaling_config's workers "
                                  "(pip install 'llmfinetune[ray]')")
    ray_ft.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in the run directory")
    job_command("check", "validate a job file (keys, data files, model) without training")
    from . import evaluate, export, inference  # after training; argument definitions only, torch loads on use

    for module in (inference, evaluate, export):
        module.add_command(commands)
    report = commands.add_parser("report", help="(re)write report.png and report.md of a run directory",
                                 description="(re)write report.png and report.md of a run directory")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("--debug", action="store_true", help="show full tracebacks")
    report.set_defaults(handler=_report)
    return parser


def _report(args) -> int:
    from pathlib import Path

    from .report import write_report

    png, markdown = write_report(Path(args.run_dir))
    print(f"Wrote {png} and {markdown}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:
        _parser().print_help()
        return 0
    _setup_logging()
    try:
        return _dispatch(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"{getattr(exc, 'label', 'error')}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an environment fault: say what, keep the traceback behind --debug
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc}\n(run again with --debug for the traceback)", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    if getattr(args, "handler", None) is not None:  # predict, eval, export: they read RUN_DIR/job.yaml themselves
        return args.handler(args)
    from .config import load_job

    overrides = list(args.overrides)
    if getattr(args, "resume", False):
        overrides.append("ft_config.train_config.base_config.resume_from_checkpoint=true")
    job = load_job(args.ft, overrides)
    if args.command == "check":
        from .launch import plan_local_workers, under_launcher
        from .workflow import check_job

        if not under_launcher():  # what run-ft would refuse about scaling_config, check refuses too
            plan_local_workers(job, None)
        summary = check_job(job)
        print(f"OK: {args.ft}")
        for key, value in summary.items():
            print(f"  {key}: {value}")
        return 0
    if args.command == "ray-ft":
        from .ray_launch import run_on_ray  # Ray is imported by this command only

        return run_on_ray(args.ft, overrides, job)
    from .launch import (USE_CPU_OVERRIDE, plan_local_workers, spawn_local_workers, under_launcher,
                         warn_scaling_under_launcher)
    from .workflow import run

    if under_launcher():  # torchrun, accelerate, deepspeed, or our own workers: the launcher chose the processes
        warn_scaling_under_launcher(job, args.nproc)
        run(job, deepspeed=args.deepspeed)
        return 0
    plan = plan_local_workers(job, args.nproc)
    if plan.on_cpu:
        overrides.append(USE_CPU_OVERRIDE)
        job = load_job(args.ft, overrides)
    if plan.processes > 1:
        worker_args = ["run-ft", f"--ft={args.ft}", *overrides]  # workers see LOCAL_RANK: no respawn
        if args.deepspeed:
            worker_args.append(f"--deepspeed={args.deepspeed}")
        if args.debug:
            worker_args.append("--debug")
        return spawn_local_workers(plan.processes, worker_args, plan.threads, plan.on_cpu)
    if plan.threads is not None:
        import torch

        torch.set_num_threads(plan.threads)
    run(job, deepspeed=args.deepspeed)
    return 0


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    hide_library_deprecations()


# Deprecations raised inside the libraries we call, which no job setting can avoid: peft and TRL read transformers
# 5's deprecated `is_gradient_checkpointing` themselves, on every LoRA run, adapter reload and preference run.
LIBRARY_DEPRECATIONS = ("`is_gradient_checkpointing` is deprecated",)


def hide_library_deprecations() -> None:
    for message in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
