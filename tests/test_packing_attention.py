"""Packing under every attention implementation: the layout each one gets, the architectures allowed to pack (each
proven isolated here), and the refusals for the rest."""
from __future__ import annotations

import contextlib
import json
import shutil

import pytest

from conftest import job_dict, make_dataset
from llmfinetune.config import parse_job
from llmfinetune.errors import UserError
from llmfinetune.packing import (FLATTENED, IGNORE, ISOLATING_MODEL_TYPES, MASKED_FROM_POSITIONS, ROWS, SEGMENTED_SDPA,
                                 PackedCollator, _unread_mask, packed_layout, use_segmented_sdpa)

LENGTHS = [[5, 9, 7], [11, 4]]  # two packed rows, the second shorter (so padded in the rows layout)


def _tiny_config(model_type: str):
    from transformers import AutoConfig

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, vocab_size=96, max_position_embeddings=128,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                 shared_expert_intermediate_size=32)
    config = AutoConfig.for_model(model_type, **sizes)
    if getattr(config, "sliding_window", None):
        config.sliding_window = 6  # shorter than some examples, so the windowed mask is exercised too
    return config


def _packed_rows(seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    examples, rows = [], []
    for lengths in LENGTHS:
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for length in lengths:
            ids = torch.randint(3, 96, (length,), generator=generator).tolist()
            examples.append(ids)
            row["input_ids"] += ids
            row["labels"] += [-100] + ids[1:]
            row["position_ids"] += list(range(length))
        rows.append(row)
    return examples, rows


def _spans(batch):
    """(row, start, end) of every example in the collated batch, in packing order (a row's padding comes last)."""
    flat = [length for lengths in LENGTHS for length in lengths]
    groups = [flat] if batch["input_ids"].shape[0] == 1 else LENGTHS
    spans = []
    for row, lengths in enumerate(groups):
        start = 0
        for length in lengths:
            spans.append((row, start, start + length))
            start += length
    return spans


def _load(model_type: str, attention: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    try:
        return AutoModelForCausalLM.from_config(_tiny_config(model_type), attn_implementation=attention).eval()
    except ValueError as exc:
        if "does not support" in str(exc):
            pytest.skip(f"{model_type} refuses {attention} at load time, so nobody trains it that way")
        raise


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", sorted(ISOLATING_MODEL_TYPES))
def test_every_architecture_allowed_to_pack_keeps_its_examples_apart(model_type, attention):
    """The allowlist's proof: for each architecture, tiny and random, every example's logits in a packed batch equal
    its logits alone (fp32, 1e-5), in both layouts the collator makes (rows with padding, one flattened row with
    cu_seq_lens), and one causal mask over a row (no per-example positions) differs."""
    import torch

    model = _load(model_type, attention)
    examples, rows = _packed_rows()
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids]), use_cache=False).logits[0] for ids in examples]
        for layout in (ROWS, FLATTENED):
            batch = PackedCollator(pad_token_id=0, layout=layout)(rows)
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            logits = model(**inputs).logits
            for (row, start, end), expected in zip(_spans(batch), alone):
                torch.testing.assert_close(logits[row, start:end], expected, atol=1e-5, rtol=0)
        naive = model(input_ids=batch["input_ids"], use_cache=False).logits
    row, start, end = _spans(batch)[1]
    assert not torch.allclose(naive[row, start:end], alone[1], atol=1e-3)


@pytest.mark.parametrize("model_type", sorted(ISOLATING_MODEL_TYPES))
def test_segmented_sdpa_runs_each_packed_example_alone(model_type):
    """What a packed SDPA model trains with: the flattened row, attention once per example from cu_seq_lens. Every
    example's logits equal its logits alone under plain SDPA (1e-5), sliding windows shorter than an example included;
    without cu_seq_lens (generation, unpacked evaluation) the model is plain SDPA, padding mask and all."""
    import torch

    model = _load(model_type, "sdpa")
    examples, rows = _packed_rows()
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids]), use_cache=False).logits[0] for ids in examples]
        padded = torch.tensor([examples[0] + [0] * 4, examples[1][:9]])
        mask = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
        plain_padded = model(input_ids=padded, attention_mask=mask, use_cache=False).logits
        assert use_segmented_sdpa(model) == SEGMENTED_SDPA and model.config._attn_implementation == SEGMENTED_SDPA
        batch = PackedCollator(pad_token_id=0, layout=packed_layout(SEGMENTED_SDPA))(rows)
        assert batch["input_ids"].shape[0] == 1
        with _attention_calls() as calls:
            logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
        # Per example where the model hands the flash kwargs to its attention (stablelm drops them: it then gets
        # masking_utils' block-diagonal mask from the position ids, which the equality below proves isolated too).
        # Where the kwargs reach the attention, no (tokens x tokens) mask is built for the row (it is never read):
        # the model gets a 1-element 4D one, so that masking_utils does not read the position ids back either.
        per_example = [segments is not None for segments, _ in calls]
        assert (all(per_example) and all(mask is _unread_mask() for _, mask in calls)) or (
            model_type == "stablelm" and not any(per_example)
            and all(mask is not None and mask.dim() == 4 for _, mask in calls))
        for (row, start, end), expected in zip(_spans(batch), alone):
            torch.testing.assert_close(logits[row, start:end], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(input_ids=padded, attention_mask=mask, use_cache=False).logits[:, :5],
                                   plain_padded[:, :5], atol=1e-5, rtol=0)
    assert "llmfinetune" not in model.config.to_json_string()  # a saved run loads with plain SDPA


@contextlib.contextmanager
def _attention_calls():
    """(cu_seq_lens_q, attention_mask) of every call of the segmented attention inside the block."""
    from transformers import AttentionInterface

    inner = AttentionInterface._global_mapping[SEGMENTED_SDPA]
    calls = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append((kwargs.get("cu_seq_lens_q"), attention_mask))
        return inner(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface._global_mapping[SEGMENTED_SDPA] = spy
    try:
        yield calls
    finally:
        AttentionInterface._global_mapping[SEGMENTED_SDPA] = inner


def test_flex_attention_keeps_packed_examples_apart_too():
    import torch

    model = _load("qwen2", "flex_attention")
    examples, rows = _packed_rows()
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids]), use_cache=False).logits[0] for ids in examples]
        batch = PackedCollator(pad_token_id=0, layout=packed_layout("flex_attention"))(rows)
        logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    for (row, start, end), expected in zip(_spans(batch), alone):
        torch.testing.assert_close(logits[row, start:end], expected, atol=1e-5, rtol=0)


def test_a_hybrid_architecture_leaks_through_its_recurrent_layers():
    """Why the allowlist is not 'builds its mask with masking_utils': jamba does, and its Mamba layers still carry
    state from one packed example into the next."""
    import torch

    model_type = "jamba"
    model = _load(model_type, "sdpa")
    examples, rows = _packed_rows()
    with torch.no_grad():
        batch = PackedCollator(pad_token_id=0, layout=FLATTENED)(rows)
        logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
        second = model(input_ids=torch.tensor([examples[1]]), use_cache=False).logits[0]
    row, start, end = _spans(batch)[1]
    assert not torch.allclose(logits[row, start:end], second, atol=1e-5)
    assert model_type not in ISOLATING_MODEL_TYPES


def test_layout_follows_the_attention_implementation():
    assert [packed_layout(name) for name in MASKED_FROM_POSITIONS] == [ROWS] * len(MASKED_FROM_POSITIONS)
    for name in (SEGMENTED_SDPA, "flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2",
                 "paged|flash_attention_2"):
        assert packed_layout(name) == FLATTENED
    for name in ("paged|sdpa", "kernels-community/sage-attention", None):
        with pytest.raises(UserError, match=r"ft_config.train_config.base_config.packing: attention implementation"):
            packed_layout(name)


def _flash_trainer(tiny_models, tmp_path, attention="flash_attention_2", **base):
    """The Trainer of a packed SFT job for a model configured for flash attention (the config attribute only: no
    flash kernel runs on CPU), or for another attention implementation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmfinetune.arguments import build_training_arguments
    from llmfinetune.registry import TASKS
    from llmfinetune.workflow import _prepare

    data = make_dataset(tmp_path / "data", "text-generation", train_rows=24, eval_rows=8)
    job = parse_job(job_dict("text-generation", "full", tiny_models["qwen2"], data, tmp_path / "run", packing=True,
                             max_length=64, per_device_train_batch_size=3, **base))
    task = TASKS.get("text-generation")
    task.check(job)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen2"])
    from llmfinetune import data as data_module

    splits = data_module.load_raw_splits(job)
    prepared = _prepare(task, splits, data_module.eval_split_name(job), tokenizer, job)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
    model.config._attn_implementation = attention
    args = build_training_arguments(job, task, tmp_path / "run")
    trainer = task.trainer_class(job)(model=model, args=args, train_dataset=prepared.train,
                                      eval_dataset=prepared.eval, processing_class=tokenizer,
                                      **task.trainer_hooks(tokenizer, job, prepared.model_kwargs))
    return trainer, prepared


def test_a_flash_attention_model_gets_one_flattened_row_as_transformers_flattens_it(tiny_models, tmp_path):
    import torch
    from transformers import DataCollatorWithFlattening

    trainer, prepared = _flash_trainer(tiny_models, tmp_path)
    assert trainer.data_collator.layout == FLATTENED
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch and batch["use_cache"] is False
    # The same tensors transformers' own padding-free collator makes from the examples one by one.
    rows = [prepared.train[i] for i in range(3)]
    examples = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        examples += [{"input_ids": row["input_ids"][a:b], "labels": row["labels"][a:b]}
                     for a, b in zip(starts, starts[1:])]
    assert len(examples) > 3  # several examples per packed row
    expected = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(examples)
    ours = trainer.data_collator(rows)
    assert set(expected) <= set(ours)
    for key, value in expected.items():
        if torch.is_tensor(value):
            assert ours[key].dtype == value.dtype, key
            assert torch.equal(ours[key], value), key
        else:
            assert ours[key] == value, key
    assert ours["cu_seq_lens_q"].tolist()[-1] == ours["input_ids"].shape[1]


def test_the_flattened_row_is_refused_under_data_parallel(tiny_models, tmp_path, monkeypatch):
    from transformers import TrainingArguments

    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(UserError, match=r"packing: with flash attention .* nn.DataParallel over 2 GPUs .*--nproc 2"):
        _flash_trainer(tiny_models, tmp_path)


def _model_folder(tiny_models, tmp_path, **config_changes):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["qwen2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _check(tmp_path, model, **kwargs):
    from llmfinetune.workflow import check_job

    data = make_dataset(tmp_path / "data", "text-generation", train_rows=8, eval_rows=4)
    config = job_dict("text-generation", "lora", model, data, tmp_path / "run", packing=True)
    config["model_config"]["initialization"] = {"initializer": {"from_pretrained_kwargs": kwargs}}
    return check_job(parse_job(config), load_data=False)


def test_check_refuses_packing_for_remote_code_models(tiny_models, tmp_path):
    folder = _model_folder(tiny_models, tmp_path, auto_map={"AutoConfig": "configuration_qwen.QWenConfig",
                                                            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"})
    with pytest.raises(UserError, match=r"^ft_config.train_config.base_config.packing: .* runs its own modeling code "
                                        r"\(trust_remote_code .*\).*Set packing: false"):
        _check(tmp_path, folder, trust_remote_code=True)
    # Without trust_remote_code transformers loads its own qwen2 class, which is proven: accepted.
    _check(tmp_path, folder)


def test_check_refuses_packing_for_architectures_not_proven_isolated(tiny_models, tmp_path):
    folder = _model_folder(tiny_models, tmp_path, model_type="jamba")
    with pytest.raises(UserError, match=r"^ft_config.train_config.base_config.packing: architecture 'jamba' .* not "
                                        r"among those whose packed examples are proven isolated"):
        _check(tmp_path, folder)


def test_check_refuses_packing_with_an_attention_implementation_not_known_to_isolate(tiny_models, tmp_path):
    with pytest.raises(UserError, match=r"packing: attention implementation 'paged\|sdpa' is not known"):
        _check(tmp_path, tiny_models["qwen2"], attn_implementation="paged|sdpa")
    assert _check(tmp_path, tiny_models["qwen2"], attn_implementation="flash_attention_2")["task"] == "text-generation"


@pytest.mark.parametrize("bf16", [False, True])
def test_a_packed_sdpa_model_trains_per_example_in_one_flattened_row(tiny_models, tmp_path, bf16):
    """In fp32 the row is the examples end to end; on the CPU in bf16, where kernels keep state per shape, it ends in
    one padding example that makes its length a multiple of SHAPE_MULTIPLE (a few shapes for every layer)."""
    from llmfinetune.arguments import SHAPE_MULTIPLE
    from llmfinetune.packing import IGNORE

    trainer, _ = _flash_trainer(tiny_models, tmp_path, attention="sdpa", bf16=bf16)
    assert (trainer.model.config._attn_implementation, trainer.data_collator.layout) == (SEGMENTED_SDPA, FLATTENED)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in batch
    bounds = batch["cu_seq_lens_q"].tolist()
    length = batch["input_ids"].shape[1]
    assert bounds[-1] == length
    if bf16:
        assert length % SHAPE_MULTIPLE == 0
        padding = slice(bounds[-2], length)  # the padding example: positions from 0, nothing learned
        assert batch["position_ids"][0, padding].tolist() == list(range(length - bounds[-2]))
        assert set(batch["labels"][0, padding].tolist()) == {IGNORE}
    else:
        assert batch["labels"][0, bounds[-2]:].ne(IGNORE).any()  # the last example is a real one
    trainer.save_model(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "config.json").read_text()).get("attn_implementation") in (None, "sdpa")


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "fp32-weights-under-autocast"])
def test_on_the_cpu_in_half_precision_each_packed_example_attends_in_fp32(autocast):
    """The half-precision CPU flash kernel keeps state per shape and every example is a new shape, so the segmented
    attention runs each example in fp32 there, with a bf16 base as with an fp32 base under autocast (whose rotary
    embedding hands the attention fp32 queries). Each example's logits still equal its logits alone."""
    import torch

    model = _load("qwen2", "sdpa")
    examples, rows = _packed_rows()
    with torch.no_grad():
        reference = [model(input_ids=torch.tensor([ids]), use_cache=False).logits[0] for ids in examples]
        if not autocast:
            model.to(torch.bfloat16)
        use_segmented_sdpa(model)
        batch = PackedCollator(pad_token_id=0, layout=FLATTENED, flat_row_multiple=16)(rows)
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        seen = []
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def spy(query, *args, **kwargs):
            seen.append((query.dtype, torch.is_autocast_enabled("cpu")))
            return sdpa(query, *args, **kwargs)

        torch.nn.functional.scaled_dot_product_attention = spy
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(**inputs).logits.float()
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
    assert batch["input_ids"].shape[1] % 16 == 0 and len(seen) == 2 * (len(examples) + 1)  # 2 layers, + padding
    assert set(seen) == {(torch.float32, False)}
    for (row, start, end), expected in zip(_spans(batch), reference):
        torch.testing.assert_close(logits[row, start:end], expected, atol=0.05, rtol=0.05)


def _documented_varlen_attn(signature: str, calls: list):
    """A stand-in for torch.nn.attention.varlen.varlen_attn (CUDA-only in torch), written from its documentation:
    (tokens, heads, head_dim) inputs, sequences bounded by cu_seq_q/k, window_size (left, right) keys around each
    query (torch >= 2.11) or is_causal (torch 2.10), GQA only with enable_gqa (the 2.10 variant has none)."""
    import torch

    def window_size_variant(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                            window_size=(-1, -1), enable_gqa=False):
        calls.append({"max_q": max_q, "window_size": window_size, "enable_gqa": enable_gqa, "dtype": query.dtype})
        outputs = []
        bounds = [int(bound) for bound in cu_seq_q]  # the kernel reads them on the device, not through tolist
        for start, end in zip(bounds, bounds[1:]):
            q, k, v = (tensor[start:end].transpose(0, 1).float() for tensor in (query, key, value))
            if k.shape[0] != q.shape[0]:
                assert enable_gqa, "fewer key/value heads than query heads without enable_gqa"
                k, v = (t.repeat_interleave(q.shape[0] // t.shape[0], dim=0) for t in (k, v))
            offsets = torch.arange(end - start)
            distance = offsets[:, None] - offsets[None, :]  # query index - key index
            left, right = window_size
            allowed = torch.ones_like(distance, dtype=torch.bool)
            if left >= 0:
                allowed &= distance <= left
            if right >= 0:
                allowed &= -distance <= right
            outputs.append(torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=scale).transpose(0, 1).to(query.dtype))
        return torch.cat(outputs)

    def is_causal_variant(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None):
        assert key.shape[1] == query.shape[1], "the 2.10 signature has no enable_gqa"
        return window_size_variant(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                   window_size=(-1, 0) if is_causal else (-1, -1))

    return window_size_variant if signature == "window_size" else is_causal_variant


def _install_stand_in_kernel(monkeypatch, signature: str = "window_size") -> list:
    """The documented stand-in in place of torch's varlen kernel, and the CPU taken for a device that runs it; the
    list of its calls."""
    import inspect

    from llmfinetune import packing

    calls = []
    stand_in = _documented_varlen_attn(signature, calls)
    monkeypatch.setattr(packing, "VARLEN_FLASH_DEVICES", ("cpu",))
    monkeypatch.setattr(packing, "_varlen_attention",
                        lambda: (stand_in, frozenset(inspect.signature(stand_in).parameters)))
    return calls


def _assert_packed_bf16_logits_equal_alone(model_type: str, during_packed_forward=contextlib.nullcontext):
    """Every example's logits in the flattened row (bf16 autocast) against the example alone, within bf16 rounding."""
    import torch

    model = _load(model_type, "sdpa")
    examples, rows = _packed_rows()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        alone = [model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float() for ids in examples]
        use_segmented_sdpa(model)
        batch = PackedCollator(pad_token_id=0, layout=FLATTENED)(rows)
        with during_packed_forward():
            logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits.float()
    for (row, start, end), expected in zip(_spans(batch), alone):
        torch.testing.assert_close(logits[row, start:end], expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("signature", ["window_size", "is_causal"])
@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_on_a_gpu_the_flattened_row_is_one_varlen_flash_call(model_type, signature, monkeypatch):
    """On a GPU in half precision the segmented attention hands the whole flattened row to torch's variable-length
    flash kernel in one call per layer. That kernel is CUDA-only, so here a stand-in written from its documentation
    takes its place on the CPU: the layout, bounds, causal window (mistral's sliding window of 6 is shorter than
    some examples), GQA and dtype the call receives keep every example's logits equal to the example alone, and
    no layer reads the bounds on the host (on a GPU, a wait for the device in every layer). With the
    torch 2.10 signature (no window, no GQA flag) key/value heads are repeated and a sliding window falls back to
    the per-example path."""
    import torch

    calls = _install_stand_in_kernel(monkeypatch, signature)
    host_reads = []  # tolist() on a GPU tensor waits for the GPU: none may happen per layer on the kernel's path

    @contextlib.contextmanager
    def reads_on_the_host():
        tolist = torch.Tensor.tolist
        torch.Tensor.tolist = lambda tensor: host_reads.append(tensor.shape) or tolist(tensor)
        try:
            yield
        finally:
            torch.Tensor.tolist = tolist

    _assert_packed_bf16_logits_equal_alone(model_type, reads_on_the_host)
    windowed = model_type == "mistral"
    if signature == "is_causal" and windowed:
        assert calls == []
    else:
        assert host_reads == []
        longest = max(length for lengths in LENGTHS for length in lengths)
        assert len(calls) == 2 and all(call["max_q"] == longest and call["dtype"] == torch.bfloat16 for call in calls)
        assert {call["window_size"] for call in calls} == {(5, 0) if windowed else (-1, 0)}


@pytest.mark.parametrize("multiple", [None, 16])
def test_the_flattened_row_ignores_every_examples_first_label(multiple):
    """In one row the label at an example's start would be predicted from the previous example's last token: the
    collator ignores it even where the rows it is given still carry it, and the padding example is ignored whole."""
    _, rows = _packed_rows()
    for row in rows:
        row["labels"] = list(row["input_ids"])
    batch = PackedCollator(pad_token_id=0, layout=FLATTENED, flat_row_multiple=multiple)(rows)
    labels, ids = batch["labels"][0].tolist(), batch["input_ids"][0].tolist()
    bounds = batch["cu_seq_lens_q"].tolist()
    real = sum(len(row["input_ids"]) for row in rows)
    assert bounds[-1] == len(ids) and (len(ids) % multiple == 0 if multiple else len(ids) == real)
    for start, end in zip(bounds, bounds[1:]):
        if start >= real:
            assert labels[start:end] == [IGNORE] * (end - start)
        else:
            assert labels[start] == IGNORE and labels[start + 1:end] == ids[start + 1:end]


def test_gpus_the_flash_kernel_cannot_run_on_keep_the_per_example_path(monkeypatch):
    """torch's flash kernel needs an NVIDIA GPU from Ampere on: a T4 or V100 (fp16 there) would raise inside it, so
    there, and on ROCm builds, the flattened row keeps SDPA once per example; its logits still equal each example
    alone."""
    import torch

    from llmfinetune import packing

    cuda = torch.device("cuda", 0)
    for capability, hip, expected in (((7, 5), None, False), ((7, 0), None, False), ((8, 0), None, True),
                                      ((9, 0), None, True), ((9, 0), "6.2", False)):
        packing._flash_capable.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        monkeypatch.setattr(torch.version, "hip", hip)
        assert packing._flash_capable(cuda) is expected, (capability, hip)
    packing._flash_capable.cache_clear()

    calls = _install_stand_in_kernel(monkeypatch)
    monkeypatch.setattr(packing, "_flash_capable", lambda device: False)
    _assert_packed_bf16_logits_equal_alone("qwen2")
    assert calls == []


def test_heads_wider_than_the_flash_kernel_takes_keep_the_per_example_path(monkeypatch):
    import torch

    from llmfinetune import packing

    calls = _install_stand_in_kernel(monkeypatch)
    bounds = torch.tensor([0, 3, 8], dtype=torch.int32)
    kwargs = {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": 5, "max_length_k": 5}
    for width, runs in ((packing.FLASH_MAX_HEAD_DIM, True), (packing.FLASH_MAX_HEAD_DIM + 64, False)):
        query = torch.randn(1, 2, 8, width, dtype=torch.bfloat16)
        output = packing._varlen_flash(query, query, query, kwargs, None, None)
        assert (output is not None) is runs and len(calls) == int(runs)
        calls.clear()
