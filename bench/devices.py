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


def native_bf16(device: str) -> bool:
    """Whether bf16 is native on this device (the project's own rule for its default precision)."""
    import torch

    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    from llmfinetune.arguments import cpu_supports_bf16

    return cpu_supports_bf16()


def cpu_flags() -> str:
    """The lscpu flags every CPU figure names (AVX2 only, avx512_bf16, AMX), space-separated."""
    import subprocess

    found = subprocess.run("lscpu | grep -o 'avx512_bf16\\|amx[a-z0-9_]*\\|avx2' | sort -u | tr '\\n' ' '", shell=True,
                           capture_output=True, text=True).stdout.strip()
    return found or "none of avx2/avx512_bf16/amx"
