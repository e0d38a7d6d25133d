"""How much of a recipe's seed-to-seed spread on MRPC is variance: reload each run as a user would, then compare.

    python bench/mrpc_seed_spread.py /tmp/mrpc-grid/seed*-epochs4     # run dirs of bench/mrpc_grid.py (one recipe)

Each run directory is loaded by the package's own `predict` path (`inference.load_run`: fp32, base model plus the
adapter, as plain peft would) and scored on the validation split of --data (default ../shared/datasets/glue/mrpc).
Printed: each run's accuracy as reloaded (training-time evaluation runs in the job's precision, so it can differ by
a row or two), the mean and standard deviation over runs, how often two runs disagree on a row, and the accuracy of
the runs' average probability (an ensemble), and how much of the spread the validation rows alone explain: two runs
that disagree on a fraction d of n rows differ in accuracy by about sqrt(d / n) from which rows were drawn, even if
they are equally good models. A seed spread no larger than that is the split's sampling noise, not some seeds
training worse models; what a recipe change has to move then is the mean. Not part of CI; without the data it
prints one `skipped:` line.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "glue" / "mrpc"
sys.path.insert(0, str(REPO))


def probabilities(run_dir: Path, rows: list[dict], batch_size: int = 64):
    import numpy as np

    from llmfinetune.inference import Options, SequenceClassificationPredictor, load_run

    run = load_run(run_dir, device="cpu")
    predictor = SequenceClassificationPredictor(run, Options())
    names = [run.id2label[i] for i in range(len(run.id2label))]
    result = []
    for start in range(0, len(rows), batch_size):
        batch = [predictor.read(row, f"row {start + i}") for i, row in enumerate(rows[start:start + batch_size])]
        result += [[p["scores"][name] for name in names] for p in predictor.predict(batch)]
    return np.asarray(result), names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of one recipe (different seeds)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with validation.parquet")
    args = parser.parse_args()
    validation = args.data / "validation.parquet"
    if not validation.exists():
        print(f"skipped: {validation} not found (pass --data)")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import pandas as pd

    frame = pd.read_parquet(validation)
    rows = frame.to_dict("records")
    predicted, summed = [], None
    print("| run | accuracy (reloaded, fp32) |\n|---|---|")
    for run_dir in args.runs:
        probs, names = probabilities(run_dir, rows)
        labels = np.asarray([names.index(str(v)) if str(v) in names else int(v) for v in frame["label"]])
        choice = probs.argmax(axis=1)
        predicted.append(choice)
        summed = probs if summed is None else summed + probs
        print(f"| {run_dir} | {(choice == labels).mean():.4f} |")
    accuracies = [(p == labels).mean() for p in predicted]
    pairs = list(itertools.combinations(predicted, 2))
    disagreement = np.mean([(a != b).mean() for a, b in pairs]) if pairs else 0.0
    correct = np.asarray([p == labels for p in predicted])
    spread = np.std(accuracies, ddof=1) if len(accuracies) > 1 else 0.0
    # E[(acc_i - acc_j)^2] = 2 sd^2; rows drawn at random add about d / n to it even between equally good models.
    from_rows = (disagreement / (2 * len(labels))) ** 0.5
    beyond_rows = max(0.0, spread ** 2 - from_rows ** 2) ** 0.5
    print(f"\nruns: {len(predicted)}; accuracy mean {np.mean(accuracies):.4f}, sd {spread:.4f}, "
          f"lowest {min(accuracies):.4f}")
    print(f"two runs disagree on {disagreement:.1%} of rows; every run right on {correct.all(axis=0).mean():.1%}, "
          f"every run wrong on {(~correct).all(axis=0).mean():.1%}")
    print(f"sd the {len(labels)} rows alone explain: {from_rows:.4f}; sd between the models beyond that: "
          f"{beyond_rows:.4f}")
    print(f"ensemble (mean probability over the runs): accuracy {(summed.argmax(axis=1) == labels).mean():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
