"""The package's C kernels (csrc/*.c: packed attention, element-wise passes of a Llama-style block), built on first
use into one shared library and loaded into torch's process, for training on x86 CPUs.

Built by GCC for the instruction set torch's own kernels run (the CPU's best, or what ATEN_CPU_CAPABILITY holds them
to): 16-float vectors with AVX-512, 8-float ones with AVX2; once per source, compiler, flags and CPU, into the
package's cache (cache.cache_root(): $LLMFINETUNE_CACHE, else ~/.cache/llmfinetune/tokenized) under kernels/. GCC's
-fopenmp links libgomp, the OpenMP runtime torch's threads already run on, so the kernels run on torch's threads
(a second runtime's threads spin beside them: the SFT bench's fp32 step took 1595 ms with clang's build against
1066 with GCC's, bench/README.md, session 25). Anywhere else (no GCC, another OpenMP runtime, neither AVX2 nor
AVX-512, LLMFINETUNE_C_KERNELS=0) there is no library, one info line says so, and torch's ops run instead.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .cache import cache_root

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("csrc")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
ISA_FLAGS = {"AVX512": [], "AVX2": ["-mno-avx512f"]}  # by torch's CPU capability

_POINTER, _LONG, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
_STRIDED = [_POINTER, _LONG, _LONG]  # a tensor's data, token stride, head stride
_LAYOUT = [_POINTER, _POINTER, _POINTER, _INT, _INT, _INT, _FLOAT]  # starts, lens, poff, examples, H, KV, scale
# Every function the sources export: (argument types, return type).
SIGNATURES = {
    "packed_attention_vector_width": ([], _INT),
    "packed_attention_bf16_pairs": ([], _INT),
    "packed_attention_layout": ([_POINTER, _INT, _INT, _POINTER, _POINTER], _LONG),
    "packed_attention_forward": ([*_STRIDED * 3, _POINTER, _POINTER, _POINTER, *_LAYOUT, _INT], None),
    "packed_attention_backward": ([*_STRIDED * 3, *[_POINTER] * 6, *_LAYOUT, _LONG, _INT], None),
    "swiglu_backward": ([_POINTER] * 5 + [_LONG], None),
    "swiglu_backward_bf16": ([_POINTER] * 5 + [_LONG], None),
    "rms_norm_forward": ([_POINTER, _POINTER, _FLOAT, _POINTER, _POINTER, _LONG, _INT], None),
    "rms_norm_backward": ([_POINTER] * 6 + [_LONG, _INT], None),
    "rms_norm_forward_bf16": ([_POINTER, _POINTER, _FLOAT, _POINTER, _POINTER, _LONG, _INT], None),
    "rms_norm_backward_bf16": ([_POINTER] * 6 + [_LONG, _INT], None),
    "softmax_rows": ([_POINTER, _LONG, _INT, _POINTER], None),
    "cross_entropy_forward": ([_POINTER, _LONG, _INT, _POINTER, _POINTER], None),
    "cross_entropy_forward_bf16": ([_POINTER, _LONG, _INT, _POINTER, _POINTER], None),
    "cross_entropy_backward": ([_POINTER] * 3 + [_FLOAT] * 3 + [_POINTER, _LONG, _INT], None),
    "cross_entropy_backward_bf16": ([_POINTER] * 3 + [_FLOAT] * 3 + [_POINTER, _LONG, _INT], None),
    "rotary": ([_POINTER, _LONG, _LONG, _LONG, _POINTER, _POINTER, _LONG, _POINTER, _LONG, _LONG, _LONG, _INT, _INT,
                _LONG, _INT, _INT], None),
    "rotary_bf16": ([_POINTER, _LONG, _LONG, _LONG, _POINTER, _POINTER, _LONG, _POINTER, _LONG, _LONG, _LONG, _INT,
                     _INT, _LONG, _INT, _INT], None),
}


def sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.c"))


@functools.lru_cache(maxsize=None)
def library():
    """The compiled kernels, or None where they cannot be built or may not run (said once)."""
    if os.environ.get("LLMFINETUNE_C_KERNELS", "1") == "0":
        return None
    capability = torch_capability()
    if capability not in ISA_FLAGS:
        # Written for AVX-512's and AVX2's vectors; other instruction sets (ARM's NEON and SVE, x86 before AVX2)
        # are unmeasured.
        logger.info("The package's C kernels are not used (they need AVX2 or AVX-512; torch runs %s): torch's ops "
                    "run instead.", capability)
        return None
    if not torch_runs_gnu_openmp():
        logger.info("The package's C kernels are not used (torch runs on an OpenMP runtime other than GCC's "
                    "libgomp): torch's ops run instead.")
        return None
    try:
        path = built(FLAGS + ISA_FLAGS[capability])
    except (OSError, subprocess.SubprocessError) as error:
        logger.info("The package's C kernels are not built (%s): torch's ops run instead.", error)
        return None
    loaded = ctypes.CDLL(str(path))
    for name, (arguments, result) in SIGNATURES.items():
        function = getattr(loaded, name)
        function.argtypes, function.restype = arguments, result
    logger.debug("C kernels: %d-float vectors (%s)", loaded.packed_attention_vector_width(), path)
    return loaded


def gnu_compiler() -> tuple[str, str]:
    """GCC ($CC where it is GCC, else gcc or cc) and its version: its -fopenmp links libgomp, torch's runtime."""
    for name in dict.fromkeys(filter(None, (os.environ.get("CC"), "gcc", "cc"))):
        compiler = shutil.which(name)
        if compiler is None:
            continue
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
        if "Free Software Foundation" in version:
            return compiler, version
    raise OSError("no GCC on PATH (the kernels run on GCC's OpenMP runtime, the one torch's threads run on)")


def torch_runs_gnu_openmp() -> bool:
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def built(flags: list[str]) -> Path:
    """The library built with `flags` (compiled now unless the cache has it)."""
    compiler, version = gnu_compiler()
    compiled = sources()
    files = compiled + sorted(SOURCE_DIR.glob("*.h"))
    key = hashlib.sha256("\0".join([*(f.read_text() for f in files), compiler, version, " ".join(flags),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    root = cache_root() / "kernels"
    path = root / f"llmfinetune-{key}.so"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        # Built beside its final name and renamed: processes of one job may build at once, and none may load a
        # half-written file.
        with tempfile.TemporaryDirectory(dir=root) as scratch:
            output = Path(scratch) / path.name
            result = subprocess.run([compiler, *flags, "-o", str(output), *map(str, compiled)],
                                    capture_output=True, text=True)
            if result.returncode:
                errors = [line for line in result.stderr.splitlines() if "error" in line] or [result.stderr.strip()]
                raise OSError(f"{compiler} failed: {errors[0][:300]}")
            os.replace(output, path)
    return path


def torch_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor()
