"""The device every contender of a bench runs on, decided once: a GPU run against a CPU run measures hardware."""
from __future__ import annotations

import sys


def choose_device(wanted: str) -> str:
    import torch

    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible.")
    return wanted
