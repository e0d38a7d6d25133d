"""Seed x epochs grid of the default classification job on real GLUE MRPC, by CLI overrides only.

    python bench/mrpc_grid.py                                  # seeds 1 2 42 x epochs 2 3 4, the job file as shipped
    python bench/mrpc_grid.py --seeds 1 --epochs 2 --set ft_config.train_config.base_config.learning_rate=1e-3
    python bench/mrpc_grid.py --data /tmp/mrpc_holdout         # any folder with train/validation files of MRPC's columns
    python bench/mrpc_grid.py --seeds 1 42 --epochs 2 --parallel 2   # two cells at once, one thread each
    python bench/mrpc_grid.py --seeds 1 --epochs 2 --holdout 0:400     # train without train rows 0-399, score them

Each cell is one `llmfinetune run-ft` of models/ft--sequenceclassification--all-MiniLM-L6-v2-lora.yaml (or --job)
with local_path, input_columns, num_row, seed, num_train_epochs and output_dir overridden (plus any --set), run one
after another (--parallel N: N at once; on this project's 2-core machine with avx512_bf16, in bf16, two one-thread
cells take ~5 min each at 2 epochs). The table lists validation accuracy after every epoch, the final accuracy and F1, the optimizer steps,
steps/s and the wall time of the whole command (the machine may be shared: steps / (steps/s) is the training time).
--holdout START:END scores rows the recipe was never chosen on: it writes a folder whose train file is the train
split without rows START..END-1 and whose validation file is those rows, and runs the grid on it (session 11 found
the validation split easier than such slices by ~0.04 for the shipped recipe).
Not part of CI: without ../shared/datasets/glue/mrpc (or --data) it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JOB = REPO / "models" / "ft--sequenceclassification--all-MiniLM-L6-v2-lora.yaml"
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "glue" / "mrpc"
BASE = "ft_config.train_config.base_config"


def run_cell(args, seed: int, epochs: int) -> dict:
    out = Path(args.out) / f"seed{seed}-epochs{epochs}"
    command = [sys.executable, "-m", "llmfinetune", "run-ft", f"--ft={args.job}",
               f"ft_config.data_config.local_path={args.data}",
               "ft_config.data_config.input_columns=[sentence1, sentence2]",
               "ft_config.data_config.num_row=0",
               f"{BASE}.seed={seed}", f"{BASE}.num_train_epochs={epochs}", f"{BASE}.output_dir={out}",
               *args.set]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # One thread per process: on a shared 2-core machine two OpenMP threads fighting other jobs ran 5x slower.
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(out.with_suffix(".log"), "w") as log:
        code = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.monotonic() - start
    if code != 0:
        return {"seed": seed, "epochs": epochs, "error": f"exit {code}, see {out.with_suffix('.log')}", "wall": wall}
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "trainer_state.json").read_text())
    # The evaluation after training repeats the last epoch's: one value per epoch.
    per_epoch = list({entry["epoch"]: entry["eval_accuracy"]
                      for entry in history["log_history"] if "eval_accuracy" in entry}.values())
    return {"seed": seed, "epochs": epochs, "per_epoch": per_epoch, "accuracy": metrics["eval_accuracy"],
            "f1": metrics.get("eval_f1"), "steps": history["global_step"],
            "steps_per_s": metrics["train_steps_per_second"], "wall": wall}


def holdout_folder(data: Path, span: str, out: Path) -> Path:
    """A train/validation folder whose validation file is train rows START..END-1 and whose train file is the rest;
    written with datasets so the label names (ClassLabel) travel with the rows."""
    from datasets import load_dataset

    start, end = (int(part) for part in span.split(":"))
    train = load_dataset("parquet", data_files={"train": str(data / "train.parquet")})["train"]
    if not 0 <= start < end <= len(train):
        raise SystemExit(f"--holdout {span}: expected START:END with 0 <= START < END <= {len(train)} (train rows)")
    folder = out / f"holdout-{start}-{end}"
    folder.mkdir(parents=True, exist_ok=True)
    train.select([i for i in range(len(train)) if not start <= i < end]).to_parquet(str(folder / "train.parquet"))
    train.select(range(start, end)).to_parquet(str(folder / "validation.parquet"))
    return folder


def table(rows: list[dict]) -> str:
    lines = ["| seed | epochs | accuracy after each epoch | final accuracy | F1 | steps | steps/s | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        wall = f"{int(row['wall'] // 60)} min {int(row['wall'] % 60):02d} s"
        if "error" in row:
            lines.append(f"| {row['seed']} | {row['epochs']} | {row['error']} | | | | | {wall} |")
            continue
        per_epoch = ", ".join(f"{value:.3f}" for value in row["per_epoch"])
        f1 = f"{row['f1']:.4f}" if row["f1"] is not None else ""
        lines.append(f"| {row['seed']} | {row['epochs']} | {per_epoch} | **{row['accuracy']:.4f}** | {f1} | "
                     f"{row['steps']} | {row['steps_per_s']:.2f} | {wall} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 42])
    parser.add_argument("--epochs", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="MRPC folder (train + validation split files)")
    parser.add_argument("--job", default=str(DEFAULT_JOB))
    parser.add_argument("--out", default="/tmp/mrpc_grid", help="run directories go here, one per cell")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more job overrides (the recipe)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS unless already set")
    parser.add_argument("--parallel", type=int, default=1, help="cells run at once (each with --threads threads)")
    parser.add_argument("--holdout", metavar="START:END",
                        help="hold train rows START..END-1 out of training and score them instead of validation")
    args = parser.parse_args(argv)
    if args.parallel < 1 or args.threads < 1:
        parser.error(f"--parallel and --threads take 1 or more, got {args.parallel} and {args.threads}")
    if not Path(args.data).is_dir():
        print(f"skipped: no MRPC data at {args.data} (this benchmark needs GLUE MRPC train/validation files)")
        return 0
    if args.holdout:
        args.data = str(holdout_folder(Path(args.data), args.holdout, Path(args.out)))
        args.out = str(Path(args.out) / "runs")
    from concurrent.futures import ThreadPoolExecutor

    cells = [(seed, epochs) for epochs in args.epochs for seed in args.seeds]
    rows = []
    with ThreadPoolExecutor(args.parallel) as pool:
        # A cell's line is printed once it and every cell before it in the grid are done.
        for row in pool.map(lambda cell: run_cell(args, *cell), cells):
            rows.append(row)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
