"""glibc's thresholds raised for CPU training (allocator.py): done where it can be, never over the user's own malloc
settings or another allocator, and asked for by every CPU run."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from llmfinetune import allocator


@pytest.mark.parametrize("name", allocator.USER_SETTINGS)
def test_the_users_own_malloc_settings_or_allocator_are_left_alone(monkeypatch, name):
    monkeypatch.setenv(name, "1" if name != "LD_PRELOAD" else "libjemalloc.so.2")
    assert allocator.keep_step_memory_mapped() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_large_step_tensors_stay_mapped_between_steps():
    """What the setting buys, seen from the process: tensors of a step's sizes (1-64 MiB), allocated, touched and
    freed step after step, page-fault far less once the freed memory stays mapped."""
    script = """
import resource, sys
import torch
from llmfinetune.allocator import keep_step_memory_mapped
if sys.argv[1] == "1":
    assert keep_step_memory_mapped()
def step():
    for mib in (1, 4, 16, 31, 40, 64):
        torch.empty(mib << 18).fill_(1.0)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    env = {key: value for key, value in os.environ.items() if key not in allocator.USER_SETTINGS}
    faults = {}
    for setting in ("0", "1"):
        done = subprocess.run([sys.executable, "-c", script, setting], capture_output=True, text=True, env=env,
                              check=True)
        faults[setting] = int(done.stdout.split()[-1])
    # Measured: ~160,000 faults without (a fault per 4 KiB page of most tensors), ~17,000 with.
    assert faults["1"] * 3 < faults["0"], faults


def test_a_cpu_run_asks_for_it(tiny_models, tmp_path, monkeypatch):
    from conftest import job_dict, make_dataset
    from llmfinetune.config import parse_job
    from llmfinetune.workflow import run

    calls = []
    monkeypatch.setattr(allocator, "keep_step_memory_mapped", lambda: calls.append(1) or True)
    data = make_dataset(tmp_path / "data", "sequenceclassification")
    run(parse_job(job_dict("sequenceclassification", "lora", tiny_models["bert"], data, tmp_path / "run",
                           max_steps=1, save_strategy="no")))
    assert calls == [1]
