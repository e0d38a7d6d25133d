"""Host memory for training on the CPU: keep the step's large tensors in malloc's heap instead of fresh mappings.

glibc serves every allocation above its mmap threshold (dynamic, at most 32 MiB by default) with a new mapping and
unmaps it on free, and gives freed heap memory back beyond a trim threshold. A training step on the CPU allocates
and frees the same large tensors every step (the SFT bench's LM-head logits are ~35 MB in fp32), so each step paid a
page fault per 4 KiB page of each of them again (tests/test_allocator.py: ~160,000 faults over five steps of such
sizes, ~17,000 with the thresholds raised). With both thresholds raised they come from the heap and stay mapped
from step to step: on the SFT peer bench (CPU with AMX; runs one after the other) fp32 ~2100 against 1423
tokens/s (peak RSS ~1615 against 1257 MiB, below LLaMA-Factory's ~1650), bf16 +5-10%.

Only for training on the CPU (GPU runs keep their host memory returnable), only with glibc, and never when the user
set MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (glibc then follows those) or preloads another allocator
(jemalloc, tcmalloc).
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

# Allocations below MMAP_THRESHOLD come from the heap; freed memory at the heap's top goes back to the system beyond
# TRIM_THRESHOLD. Measured on the SFT bench (one run each): the default trim threshold (128 KiB) gave back what the
# next bf16 step maps again (4090 against 4507-4613 tokens/s); 1 GiB kept ~85 MiB more resident in fp32 than
# 256 MiB (1676 against 1615 MiB) at the same speed.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


def keep_step_memory_mapped() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when they were set."""
    import ctypes
    import ctypes.util
    import platform

    if any(os.environ.get(name) for name in USER_SETTINGS) or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    except (OSError, AttributeError):
        return False
    if done:
        logger.debug("glibc malloc for CPU training: mmap threshold %d, trim threshold %d bytes", MMAP_THRESHOLD,
                     TRIM_THRESHOLD)
    return done
