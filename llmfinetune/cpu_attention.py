"""Causal attention of a packed row's examples on the CPU, fp32 or bf16 (computed in fp32; with avx512_bf16, bf16's
Q K^T and dO V^T on bf16 pairs), through the package's C kernel (csrc/packed_attention.c; why it exists is said
there), built and loaded by native.py.

SFT bench's shapes (27M Qwen2, 8 query / 2 key-value heads of 64, a 1900-token row of 20 examples of 15-130 tokens,
one layer, AMD avx512_bf16, 2 cores): forward 3.3 against 6.3 ms, backward 5.0 against 11.4 for torch's flash kernel
once per example (bench/README.md, #12, session 24). Used by packing's per-example attention in training (grad
enabled) for examples up to MAX_EXAMPLE_TOKENS long, head_dim 64, fp32 or bf16, no dropout and no sliding window
shorter than the example, wherever native.library() has the kernels (x86 with AVX-512 or AVX2, GCC, torch on libgomp);
anywhere else torch's kernel runs. Set LLMFINETUNE_CPU_ATTENTION=0 to keep torch's kernel.
"""
from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from . import native

HEAD_DIM = 64  # the kernel's HEAD_DIM
# Longer examples stay with torch's kernel: at 1024 tokens ours took 0.86x its time, at 2048 1.05x (0.43-0.51x up to
# 512), and the probabilities it saves grow with the square of the length (bench/README.md, session 25).
MAX_EXAMPLE_TOKENS = 512


def usable(query, key, value, dropout: float, window) -> bool:
    """Whether this call may run on the kernel: a training forward on the CPU in fp32 or bf16 (all three the same)
    with head_dim 64."""
    return (query.device.type == "cpu" and query.dtype == key.dtype == value.dtype
            and query.dtype in (torch.float32, torch.bfloat16)
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
        output, bf16 = query.new_empty(1, tokens, heads, HEAD_DIM), _is_bf16(query)
        # bf16: the output in fp32 too, for the backward (its dO . O as in fp32; fp32's output is this tensor itself)
        wide_output = torch.empty(output.shape, dtype=torch.float32) if bf16 else output
        _library().packed_attention_forward(
            *_strided(query), *_strided(key), *_strided(value), output.data_ptr(),
            wide_output.data_ptr() if bf16 else None, probabilities.data_ptr(),
            *(t.data_ptr() for t in layout), len(lengths), heads, kv_heads, scale, bf16)
        ctx.save_for_backward(query, key, value, wide_output, probabilities, *layout)
        ctx.scale = scale
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        query, key, value, output, probabilities, *layout = ctx.saved_tensors
        heads, tokens, kv_heads = query.shape[1], query.shape[2], key.shape[1]
        grad = grad.to(query.dtype).contiguous()
        grad_query = query.new_empty(1, tokens, heads, HEAD_DIM)
        grad_key, grad_value = (query.new_empty(1, kv_heads, tokens, HEAD_DIM) for _ in range(2))
        _library().packed_attention_backward(
            *_strided(query), *_strided(key), *_strided(value), output.data_ptr(), grad.data_ptr(),
            probabilities.data_ptr(), grad_query.data_ptr(), grad_key.data_ptr(), grad_value.data_ptr(),
            *(t.data_ptr() for t in layout), len(layout[1]), heads, kv_heads, ctx.scale, tokens, _is_bf16(query))
        return grad_query.transpose(1, 2), grad_key, grad_value, None, None


def _is_bf16(tensor) -> int:
    """The kernel's bf16 flag: its tensors bf16 (read and written as such, computed in fp32), else fp32."""
    return int(tensor.dtype == torch.bfloat16)


def _strided(tensor):
    return tensor.data_ptr(), tensor.stride(2), tensor.stride(1)


def _library():
    """The kernels where the attention kernel may run: None with LLMFINETUNE_CPU_ATTENTION=0."""
    if os.environ.get("LLMFINETUNE_CPU_ATTENTION", "1") == "0":
        return None
    return native.library()
