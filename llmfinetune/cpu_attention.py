"""Causal attention of a packed row's examples on the CPU, fp32, through a small C kernel compiled on first use
(csrc/packed_attention.c; why it exists is said there).

SFT bench's shapes (27M Qwen2, 8 query / 2 key-value heads of 64, a 1900-token row of 20 examples of 15-130 tokens,
one layer, AMD avx512_bf16, 2 cores): forward 3.3 against 6.3 ms, backward 5.0 against 11.4 for torch's flash kernel
once per example (bench/README.md, #12, session 24). Used by packing's per-example attention in training (grad
enabled) for examples up to MAX_EXAMPLE_TOKENS long, head_dim 64, fp32, no dropout and no sliding window shorter
than the example, on x86 CPUs with AVX-512 or AVX2; anything else, and any machine where the kernel does not build
(no GCC: one info line), keeps torch's kernel.

The kernel is built for the instruction set torch's own kernels run (the CPU's best, or ATEN_CPU_CAPABILITY's):
16-float vectors with AVX-512, 8-float ones with AVX2, once per source, compiler, flags and CPU, into the package's
cache (cache.cache_root(): $LLMFINETUNE_CACHE, else ~/.cache/llmfinetune/tokenized) under kernels/, and loaded after
torch so that it runs on torch's OpenMP threads. Set LLMFINETUNE_CPU_ATTENTION=0 to keep torch's kernel.
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
from torch.autograd.function import once_differentiable

from .cache import cache_root

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "packed_attention.c"
HEAD_DIM = 64  # the kernel's HEAD_DIM
_POINTER, _LONG, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
_STRIDED = [_POINTER, _LONG, _LONG]  # a tensor's data, token stride, head stride
_LAYOUT = [_POINTER, _POINTER, _POINTER, _INT, _INT, _INT, _FLOAT]  # starts, lens, poff, examples, H, KV, scale
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
# Longer examples stay with torch's kernel: at 1024 tokens ours took 0.86x its time, at 2048 1.05x (0.43-0.51x up to
# 512), and the probabilities it saves grow with the square of the length (bench/README.md, session 25).
MAX_EXAMPLE_TOKENS = 512
ISA_FLAGS = {"AVX512": [], "AVX2": ["-mno-avx512f"]}  # by torch's CPU capability


def usable(query, key, value, dropout: float, window) -> bool:
    """Whether this call may run on the kernel: a training forward on the CPU in fp32 with head_dim 64."""
    return (query.device.type == "cpu" and query.dtype == key.dtype == value.dtype == torch.float32
            and query.shape[-1] == HEAD_DIM and query.shape[0] == 1 and query.shape[1] % key.shape[1] == 0
            and not dropout and window is None and torch.is_grad_enabled()
            and any(t.requires_grad for t in (query, key, value)) and _library() is not None)


def runs(lengths: list[int]) -> list[tuple[bool, list[int]]]:
    """The row's examples in runs of consecutive ones, each marked whether the kernel takes it (every example at most
    MAX_EXAMPLE_TOKENS long) or torch's kernel does."""
    grouped = []
    for length in lengths:
        kernel = length <= MAX_EXAMPLE_TOKENS
        if grouped and grouped[-1][0] == kernel:
            grouped[-1][1].append(length)
        else:
            grouped.append((kernel, [length]))
    return grouped


def attention(query, key, value, lengths: list[int], scale: float):
    """Each example's causal attention: query (1, H, T, 64), key and value (1, KV, T, 64), examples of `lengths`
    tokens one after the other; the output is (1, T, H, 64), contiguous."""
    return _PackedAttention.apply(query, key, value, lengths, scale)


class _PackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, lengths, scale):
        query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
        heads, tokens, kv_heads = query.shape[1], query.shape[2], key.shape[1]
        if sum(lengths) != tokens:  # rows the kernel never wrote would be read as attention outputs
            raise ValueError(f"packed examples of {sum(lengths)} tokens in a row of {tokens}")
        lens = torch.tensor(lengths, dtype=torch.int32)
        layout = (torch.empty_like(lens), lens, torch.empty(len(lengths), dtype=torch.int64))  # starts, lens, poff
        probabilities = torch.empty(_library().packed_attention_layout(
            lens.data_ptr(), len(lengths), heads, layout[0].data_ptr(), layout[2].data_ptr()))
        output = torch.empty(1, tokens, heads, HEAD_DIM)
        _library().packed_attention_forward(
            *_strided(query), *_strided(key), *_strided(value), output.data_ptr(), probabilities.data_ptr(),
            *(t.data_ptr() for t in layout), len(lengths), heads, kv_heads, scale)
        ctx.save_for_backward(query, key, value, output, probabilities, *layout)
        ctx.scale = scale
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        query, key, value, output, probabilities, *layout = ctx.saved_tensors
        heads, tokens, kv_heads = query.shape[1], query.shape[2], key.shape[1]
        grad = grad.contiguous()
        grad_query = torch.empty(1, tokens, heads, HEAD_DIM)
        grad_key, grad_value = torch.empty(1, kv_heads, tokens, HEAD_DIM), torch.empty(1, kv_heads, tokens, HEAD_DIM)
        _library().packed_attention_backward(
            *_strided(query), *_strided(key), *_strided(value), output.data_ptr(), grad.data_ptr(),
            probabilities.data_ptr(), grad_query.data_ptr(), grad_key.data_ptr(), grad_value.data_ptr(),
            *(t.data_ptr() for t in layout), len(layout[1]), heads, kv_heads, ctx.scale, tokens)
        return grad_query.transpose(1, 2), grad_key, grad_value, None, None


def _strided(tensor):
    return tensor.data_ptr(), tensor.stride(2), tensor.stride(1)


@functools.lru_cache(maxsize=None)
def _library():
    """The compiled kernel, or None where it cannot be built (said once)."""
    if os.environ.get("LLMFINETUNE_CPU_ATTENTION", "1") == "0":
        return None
    # The instruction set torch's own kernels run: the CPU's best, or what ATEN_CPU_CAPABILITY holds them to.
    capability = _torch_capability()
    if capability not in ISA_FLAGS:
        # Its register tiles are written for AVX-512's and AVX2's vectors; other instruction sets (ARM's NEON and SVE,
        # x86 before AVX2) are unmeasured.
        logger.info("CPU attention kernel not used (it needs AVX2 or AVX-512; torch runs %s): torch's SDPA runs "
                    "packed attention.", capability)
        return None
    if not _torch_runs_gnu_openmp():
        # The kernel's threads must be torch's own (see _gnu_compiler); other runtimes are unmeasured.
        logger.info("CPU attention kernel not used (torch runs on an OpenMP runtime other than GCC's libgomp): "
                    "torch's SDPA runs packed attention.")
        return None
    try:
        path = _built(FLAGS + ISA_FLAGS[capability])
    except (OSError, subprocess.SubprocessError) as error:
        logger.info("CPU attention kernel not built (%s): torch's SDPA runs packed attention.", error)
        return None
    library = ctypes.CDLL(str(path))
    logger.debug("CPU attention kernel: %d-float vectors (%s)", library.packed_attention_vector_width(), path)
    library.packed_attention_forward.argtypes = [*_STRIDED * 3, _POINTER, _POINTER, *_LAYOUT]
    library.packed_attention_backward.argtypes = [*_STRIDED * 3, *[_POINTER] * 6, *_LAYOUT, _LONG]
    library.packed_attention_layout.argtypes = [_POINTER, _INT, _INT, _POINTER, _POINTER]
    library.packed_attention_layout.restype = _LONG
    return library


def _gnu_compiler() -> tuple[str, str]:
    """GCC ($CC where it is GCC, else gcc or cc) and its version. GCC's -fopenmp links libgomp, the runtime torch's
    threads already run on, so the kernel shares them; clang's links LLVM's libomp, a second pool whose threads spin
    after each call beside torch's: the SFT bench's fp32 step took 1595 ms against 1066 with GCC's build and 1123 with
    torch's attention (bench/README.md, session 25)."""
    for name in dict.fromkeys(filter(None, (os.environ.get("CC"), "gcc", "cc"))):
        compiler = shutil.which(name)
        if compiler is None:
            continue
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
        if "Free Software Foundation" in version:
            return compiler, version
    raise OSError("no GCC on PATH (the kernel runs on GCC's OpenMP runtime, the one torch's threads run on)")


def _torch_runs_gnu_openmp() -> bool:
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _built(flags: list[str]) -> Path:
    compiler, version = _gnu_compiler()
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, " ".join(flags), _cpu_flags()])
                         .encode()).hexdigest()[:16]
    root = cache_root() / "kernels"
    path = root / f"packed_attention-{key}.so"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        # Built beside its final name and renamed: processes of one job may build at once, and none may load a
        # half-written file.
        with tempfile.TemporaryDirectory(dir=root) as scratch:
            built = Path(scratch) / path.name
            result = subprocess.run([compiler, *flags, "-o", str(built), str(SOURCE)], capture_output=True, text=True)
            if result.returncode:
                errors = [line for line in result.stderr.splitlines() if "error" in line] or [result.stderr.strip()]
                raise OSError(f"{compiler} failed: {errors[0][:300]}")
            os.replace(built, path)
    return path


def _torch_capability() -> str:
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
