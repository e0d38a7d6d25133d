"""The package's CPU attention kernel for packed rows (cpu_attention, csrc/packed_attention.c): the same outputs and
gradients as torch's SDPA run once per example, NaN kept, torch's kernel where the kernel may not run, and a packed
model's training step unchanged by it."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from llmfinetune import cpu_attention  # noqa: E402
from llmfinetune.packing import PackedCollator, FLATTENED, use_segmented_sdpa  # noqa: E402

needs_kernel = pytest.mark.skipif(cpu_attention._library() is None, reason="the CPU attention kernel is not used "
                                  "here (no AVX2, or no GCC): torch's SDPA runs packed attention")
# Every tile edge: one token, a partial 4-row block, exactly one and just over one 16- and 32-key tile, a long example.
LENGTHS = [1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 64, 100, 250]


def _per_example_sdpa(query, key, value, lengths, scale):
    outputs = []
    for length, *qkv in zip(lengths, *(t.split(lengths, dim=2) for t in (query, key, value))):
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            *qkv, is_causal=length > 1, scale=scale, enable_gqa=query.shape[1] != key.shape[1]).transpose(1, 2))
    return torch.cat(outputs, dim=1)


def _inputs(lengths, heads, kv_heads, seed=0):
    """query as the rotary embedding leaves it (heads, tokens, 64); key in (tokens, heads, 64) memory and value as
    the projection leaves it, both viewed (heads, tokens, 64): strided layouts the kernel must read as they are."""
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    query = torch.randn(1, heads, tokens, 64, generator=generator)
    key = torch.randn(1, tokens, kv_heads, 64, generator=generator).transpose(1, 2)
    value = torch.randn(1, tokens, kv_heads, 64, generator=generator).transpose(1, 2)
    return [t.requires_grad_() for t in (query, key, value)]


def _run(attend, inputs, lengths, grad):
    for t in inputs:
        t.grad = None
    output = attend(*inputs, lengths, 0.125)
    output.backward(grad)
    return [output.detach()] + [t.grad.clone() for t in inputs]


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def test_the_kernel_matches_sdpa_per_example(c_kernels, heads, kv_heads):
    """Outputs and the gradients of query, key and value within 1e-5 of the largest value (fp32 sums in another
    order), for grouped-query and plain multi-head attention."""
    inputs = _inputs(LENGTHS, heads, kv_heads)
    assert cpu_attention.usable(*inputs, 0.0, None)
    grad = torch.randn(1, sum(LENGTHS), heads, 64, generator=torch.Generator().manual_seed(1))
    expected = _run(_per_example_sdpa, inputs, LENGTHS, grad)
    ours = _run(cpu_attention.attention, inputs, LENGTHS, grad)
    assert ours[0].shape == expected[0].shape and ours[0].is_contiguous()
    for name, mine, reference in zip(("output", "query", "key", "value"), ours, expected):
        error = (mine - reference).abs().max() / reference.abs().max()
        assert error < 1e-5, (name, float(error))


def test_the_same_to_the_bit_on_any_thread_count(c_kernels):
    """Each task (example, key/value head) is summed by one thread in one order and writes rows no other task
    writes: one thread or several, the same bits (a resumed or re-run job does not drift with the machine's cores)."""
    threads = torch.get_num_threads()
    inputs = _inputs(LENGTHS, 8, 2)
    grad = torch.randn(1, sum(LENGTHS), 8, 64, generator=torch.Generator().manual_seed(1))
    try:
        torch.set_num_threads(1)
        alone = _run(cpu_attention.attention, inputs, LENGTHS, grad)
        torch.set_num_threads(max(threads, 2))
        shared = _run(cpu_attention.attention, inputs, LENGTHS, grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(alone, shared))


def _in_eighths(tensor):
    """Multiples of 1/8 in [-2, 2]: their products' sums over a head (64 terms) are exact in fp32 in any order."""
    return (tensor * 8).round().clamp(-16, 16) / 8


def _bf16_and_fp32_runs(exact: bool):
    """The bf16 kernel's output and gradients on bf16 inputs, and the fp32 kernel's on the same values."""
    halves = [t.detach().bfloat16().requires_grad_() for t in _inputs(LENGTHS, 8, 2)]
    grad = torch.randn(1, sum(LENGTHS), 8, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    if exact:
        halves = [_in_eighths(t).detach().requires_grad_() for t in halves]
        grad = _in_eighths(grad)
    wide = _run(cpu_attention.attention, [t.detach().float().requires_grad_() for t in halves], LENGTHS, grad.float())
    return halves, grad, wide


def test_in_bf16_it_is_the_fp32_kernel_rounded_with_no_casts(c_kernels):
    """bf16 query, key and value (as a bf16 model's layers make them) are read and written by the kernel itself: the
    output and gradients are the fp32 kernel's on the same values, rounded to bf16, to the bit, where Q K^T and
    dO V^T sum exactly (the bf16-pairs build sums them in pairs: another order); and the packed attention of a bf16
    model runs it with no cast of its own (one kernel call, no _to_copy either way)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from llmfinetune.packing import _per_example_sdpa

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            seen.append(op.overloadpacket.__name__)
            return op(*args, **(kwargs or {}))

    halves, grad, wide = _bf16_and_fp32_runs(exact=True)
    assert cpu_attention.usable(*halves, 0.0, None)
    seen, calls = [], []
    kernel = cpu_attention.attention
    cpu_attention.attention = lambda *args: calls.append(1) or kernel(*args)
    module = type("Attention", (), {"num_key_value_groups": 4})()
    bounds = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    try:
        with Ops():
            ours = _run(lambda q, k, v, lengths, scale: _per_example_sdpa(module, q, k, v, bounds, None, 0.0, scale),
                        halves, LENGTHS, grad)
    finally:
        cpu_attention.attention = kernel
    assert calls == [1] and "_to_copy" not in seen, seen
    for name, mine, reference in zip(("output", "query", "key", "value"), ours, wide):
        assert mine.dtype == torch.bfloat16 and torch.equal(mine, reference.bfloat16()), name


def test_in_bf16_on_bf16_pairs_where_the_cpu_has_them_within_a_rounding_of_fp32(c_kernels):
    """Where the CPU has avx512_bf16, the AVX-512 build computes Q K^T and dO V^T on bf16 pairs (vdpbf16ps: exact
    products, fp32 sums in pairs; the c_kernels fixture checks which build does); on any values its output and
    gradients are then within one bf16 rounding step of each element of the fp32 kernel's, or 1e-5 of the largest,
    and nearly all equal."""
    halves, grad, wide = _bf16_and_fp32_runs(exact=False)
    ours = _run(cpu_attention.attention, halves, LENGTHS, grad)
    for name, mine, reference in zip(("output", "query", "key", "value"), ours, wide):
        mine = mine.float()
        bound = reference.abs() * 2.0 ** -8 + 1e-5 * reference.abs().max()
        assert ((mine - reference).abs() <= bound).all(), name
        assert (mine != reference.bfloat16().float()).float().mean() < 5e-3, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_nan_reaches_the_rows_that_see_it_and_no_other(c_kernels, dtype):
    """A NaN in one key reaches the output rows of its example's queries from that position on, and nothing before
    it or in another example (a NaN guard reads it in the loss: the kernel must not swallow it)."""
    lengths = [7, 9]
    query, key, value = (t.detach().to(dtype) for t in _inputs(lengths, 2, 1))
    with torch.no_grad():
        key[0, 0, 10, 5] = float("nan")  # the second example's fourth key
    output = cpu_attention.attention(query, key, value, lengths, 0.125)
    assert output[0, 10:].isnan().all()
    assert not output[0, :10].isnan().any()


def test_examples_over_512_tokens_stay_with_torch(c_kernels, monkeypatch):
    """A packed row's runs of examples up to 512 tokens go to the kernel, one call a run, and longer examples to
    torch's kernel (as fast there, and no quadratic probabilities kept): the row's outputs and gradients are those of
    SDPA per example all the same."""
    from llmfinetune.packing import _examples_sdpa

    lengths = [30, 600, 700, 5, 7, 513, 512]
    inputs = _inputs(lengths, 4, 2)
    grad = torch.randn(1, sum(lengths), 4, 64, generator=torch.Generator().manual_seed(1))
    calls = []
    kernel = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *args: calls.append(args[3]) or kernel(*args))
    module = type("Attention", (), {"num_key_value_groups": 2})()
    ours = _run(lambda q, k, v, lengths, scale: _examples_sdpa(module, q, k, v, lengths, None, 0.0, scale),
                inputs, lengths, grad)
    assert calls == [[30], [5, 7], [512]]
    expected = _run(_per_example_sdpa, inputs, lengths, grad)
    for name, mine, reference in zip(("output", "query", "key", "value"), ours, expected):
        error = (mine - reference).abs().max() / reference.abs().max()
        assert error < 1e-5, (name, float(error))


def test_a_row_of_short_examples_is_one_kernel_call_with_no_copies(c_kernels):
    """Every example of the row in the kernel's reach: one call for the whole row, and no concatenation of query,
    key or value gradients in the backward (a split of the row into one piece makes one per tensor)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from llmfinetune.packing import _examples_sdpa

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            seen.append(op.overloadpacket.__name__)
            return op(*args, **(kwargs or {}))

    seen = []
    inputs = _inputs(LENGTHS, 4, 2)
    grad = torch.randn(1, sum(LENGTHS), 4, 64, generator=torch.Generator().manual_seed(1))
    module = type("Attention", (), {"num_key_value_groups": 2})()
    with Ops():
        ours = _run(lambda q, k, v, lengths, scale: _examples_sdpa(module, q, k, v, lengths, None, 0.0, scale),
                    inputs, LENGTHS, grad)
    assert "cat" not in seen and "split_with_sizes" not in seen, seen
    expected = _run(_per_example_sdpa, inputs, LENGTHS, grad)
    for name, mine, reference in zip(("output", "query", "key", "value"), ours, expected):
        error = (mine - reference).abs().max() / reference.abs().max()
        assert error < 1e-5, (name, float(error))


@needs_kernel
def test_it_runs_only_where_it_is_the_same_computation():
    inputs = _inputs([5, 6], 4, 2)
    assert cpu_attention.usable(*inputs, 0.0, None)
    assert not cpu_attention.usable(*inputs, 0.1, None)  # dropout
    assert not cpu_attention.usable(*inputs, 0.0, 4)  # a sliding window shorter than an example
    with torch.no_grad():  # evaluation and generation keep torch's kernel (nothing to save for a backward)
        assert not cpu_attention.usable(*inputs, 0.0, None)
    assert not cpu_attention.usable(*(t.detach().half().requires_grad_() for t in inputs), 0.0, None)
    assert not cpu_attention.usable(inputs[0], *(t.detach().bfloat16().requires_grad_() for t in inputs[1:]), 0.0,
                                    None)  # mixed dtypes (autocast over an fp32 base): cast to fp32 first
    with pytest.raises(ValueError, match="examples of 10 tokens in a row of 11"):
        cpu_attention.attention(*inputs, [4, 6], 0.125)
    wide = [torch.randn(1, 2, 11, 128, requires_grad=True) for _ in range(3)]
    assert not cpu_attention.usable(*wide, 0.0, None)  # head_dim other than the kernel's


def test_it_can_be_switched_off(monkeypatch):
    """LLMFINETUNE_CPU_ATTENTION=0: torch's kernel runs packed attention (the package's other C kernels stay)."""
    monkeypatch.setenv("LLMFINETUNE_CPU_ATTENTION", "0")
    assert cpu_attention._library() is None
    assert not cpu_attention.usable(*_inputs([5, 6], 4, 2), 0.0, None)


def test_a_packed_models_training_step_is_unchanged_by_the_kernel(c_kernels, monkeypatch):
    """A Qwen2 with head_dim 64 trained on a flattened packed row: the loss and every weight's gradient with the kernel
    equal those with torch's per-example SDPA (1e-5), and the kernel ran in every layer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=96,
                                  max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    use_segmented_sdpa(model)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for lengths in ([40, 3, 70], [33, 90]):
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for length in lengths:
            ids = torch.randint(3, 96, (length,), generator=generator).tolist()
            row["input_ids"] += ids
            row["labels"] += [-100] + ids[1:]
            row["position_ids"] += list(range(length))
        rows.append(row)
    batch = PackedCollator(pad_token_id=0, layout=FLATTENED)(rows)

    def step():
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    calls = []
    kernel = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *args: calls.append(1) or kernel(*args))
    loss, grads = step()
    assert len(calls) == config.num_hidden_layers
    monkeypatch.setattr(cpu_attention, "usable", lambda *args: False)
    expected_loss, expected_grads = step()
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)
