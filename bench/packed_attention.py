"""Attention of one flattened packed row, forward + backward of one layer: the project's per-example SDPA against the
other layouts that compute the same thing, in one invocation.

    python bench/packed_attention.py [--dtype fp32|bf16] [--tokens 1900] [--heads 8] [--kv-heads 2] [--head-dim 64]
                                     [--isa avx2]

The row holds examples of 40 to 200 tokens (seeded) up to --tokens, as the SFT bench's AdvertiseGen rows do. The
contenders, each checked equal to the first (outputs and gradients):
- `package` is `llmfinetune.packing.segmented_sdpa_forward`, what packed SFT runs: in fp32 with head_dim 64 the
  package's C kernel (`llmfinetune/cpu_attention.py`), one call for the row; otherwise torch's flash kernel once per
  example;
- `per example` is that function with the C kernel off: torch's flash kernel once per example, causal (the
  reference, and what packed SFT ran before session 24);
- `block mask` is one SDPA call over the whole row with a block-diagonal causal mask (what a padded packed row with
  a 4D mask costs);
- `math per example` is the same per-example split with the product, mask and softmax written out;
- `N buckets` sorts the examples by length, right-pads each bucket to its longest example and calls the flash kernel
  once per bucket with is_causal. Right padding needs no mask: a real query never reaches the padding keys after it.
Times are the best of 5 x 5 calls; the last lines are each contender's time over the per-example one.

`--isa avx2` on an AVX-512 machine is a stand-in for an AVX2-only one: torch's kernels run their AVX2 code
(ATEN_CPU_CAPABILITY=avx2) and so does the package's kernel, which follows torch's capability (8-float vectors,
16-key tiles). The cores stay the same, so it compares the two codes, not the machines.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from devices import cpu_flags  # noqa: E402
from matmul_ceiling import best_seconds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--tokens", type=int, default=1900)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--isa", choices=["native", "avx2"], default="native")
    args = parser.parse_args()
    if args.isa == "avx2":
        os.environ["ATEN_CPU_CAPABILITY"] = "avx2"  # read once, when torch is imported

    import torch
    import torch.nn.functional as F

    from llmfinetune import cpu_attention
    from llmfinetune.packing import segmented_sdpa_forward

    torch.manual_seed(0)
    chooser = random.Random(0)
    lengths = []
    while sum(lengths) < args.tokens - 40:
        lengths.append(min(chooser.randint(40, 200), args.tokens - sum(lengths)))
    total = sum(lengths)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    heads, groups, dim = args.heads, args.heads // args.kv_heads, args.head_dim
    query = torch.randn(1, heads, total, dim, dtype=dtype, requires_grad=True)
    key = torch.randn(1, args.kv_heads, total, dim, dtype=dtype, requires_grad=True)
    value = torch.randn(1, args.kv_heads, total, dim, dtype=dtype, requires_grad=True)
    grad = torch.randn(1, heads, total, dim, dtype=dtype)
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    bounds = torch.tensor(starts)
    module = type("Attention", (), {"num_key_value_groups": groups})()

    def package(q, k, v):
        output, _ = segmented_sdpa_forward(module, q, k, v, None, scaling=dim ** -0.5, cu_seq_lens_q=bounds,
                                           cu_seq_lens_k=bounds)
        return output  # (1, tokens, heads, dim)

    def per_example(q, k, v):
        usable, cpu_attention.usable = cpu_attention.usable, lambda *args: False
        try:
            return package(q, k, v)
        finally:
            cpu_attention.usable = usable

    example_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    position = torch.arange(total)
    block_causal = (example_of[:, None] == example_of[None, :]) & (position[:, None] >= position[None, :])

    def block_mask(q, k, v):
        output = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal, enable_gqa=True)
        return output.transpose(1, 2)

    def math_per_example(q, k, v):
        outputs = []
        for length, qe, ke, ve in zip(lengths, *(t.split(lengths, dim=2) for t in (q, k, v))):
            ke, ve = ke.repeat_interleave(groups, dim=1), ve.repeat_interleave(groups, dim=1)
            scores = (qe @ ke.transpose(-1, -2)) * dim ** -0.5
            future = torch.ones(length, length, dtype=torch.bool).triu(1)
            outputs.append(scores.masked_fill(future, float("-inf")).softmax(-1) @ ve)
        return torch.cat(outputs, dim=2).transpose(1, 2)

    def bucketed(count):
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        plans, back, offset = [], torch.empty(total, dtype=torch.long), 0
        for part in range(count):
            members = order[part * len(order) // count:(part + 1) * len(order) // count]
            longest = max(lengths[i] for i in members)
            # Padding positions repeat the example's last token: only padding queries ever see them.
            gather = torch.tensor([starts[i] + min(j, lengths[i] - 1) for i in members for j in range(longest)])
            for row, i in enumerate(members):
                back[starts[i]:starts[i + 1]] = offset + row * longest + torch.arange(lengths[i])
            plans.append((len(members), longest, gather))
            offset += len(members) * longest

        def run(q, k, v):
            outputs = []
            for rows, longest, gather in plans:
                qb, kb, vb = (t.index_select(2, gather).unflatten(2, (rows, longest)).permute(2, 1, 3, 4, 0)
                              .squeeze(-1) for t in (q, k, v))
                output = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
                outputs.append(output.permute(1, 0, 2, 3).reshape(1, heads, rows * longest, dim))
            return torch.cat(outputs, dim=2).index_select(2, back).transpose(1, 2)
        return run

    contenders = {"per example": per_example, "package": package, "block mask": block_mask,
                  "math per example": math_per_example,
                  **{f"{n} bucket{'s' if n > 1 else ''}": bucketed(n) for n in (1, 2, 4)}}

    def forward_backward(function):
        for tensor in (query, key, value):
            tensor.grad = None
        function(query, key, value).backward(grad.transpose(1, 2))

    def gradients(function):
        forward_backward(function)
        return [tensor.grad for tensor in (query, key, value)]

    reference = per_example(query, key, value).detach()
    reference_grads = gradients(per_example)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    library = cpu_attention._library()
    kernel = f"{library.packed_attention_vector_width()}-float vectors" if library else "off"
    print(f"{args.dtype}: {len(lengths)} examples, {total} tokens, {heads} heads ({args.kv_heads} key/value), "
          f"head dim {dim}; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU flags {cpu_flags()}, "
          f"torch's kernels {torch.backends.cpu.get_cpu_capability()}, the package's kernel {kernel}")
    times = {}
    for name, function in contenders.items():
        output = function(query, key, value).detach()
        grads = gradients(function)
        # Relative to the largest reference value: bf16 rounds each contender's sums differently.
        worst = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                    for a, b in zip([output, *grads], [reference, *reference_grads]))
        if worst > tolerance:
            sys.exit(f"{name} differs from per example by {worst:.2e} (tolerance {tolerance:.0e})")
        times[name] = best_seconds(lambda function=function: forward_backward(function)) * 1e3
        print(f"{name:>18}: {times[name]:7.2f} ms forward + backward (largest difference {worst:.1e} of the largest value)")
    for name, ms in times.items():
        if name != "per example":
            print(f"ratio {name} / per example: {ms / times['per example']:.2f}x")


if __name__ == "__main__":
    main()
