"""torch_compile: true compiles the decoder layers (regional compilation), breaks their graph only around the packed
per-example attention, stops compiling once the token count is dynamic, and trains as the eager run does, in every
trainer family (SFT, plain Trainer, TRL). Backend aot_eager: Dynamo's graphs and AOTAutograd's backward without
inductor's C++ compilation (minutes on 2 cores)."""
import os

import pytest

from conftest import job_dict, logged_losses, make_dataset


@pytest.fixture
def regional_variable_restored():
    from llmfinetune.arguments import REGIONAL_COMPILATION_ENV

    before = os.environ.pop(REGIONAL_COMPILATION_ENV, None)
    yield REGIONAL_COMPILATION_ENV
    os.environ.pop(REGIONAL_COMPILATION_ENV, None)
    if before is not None:
        os.environ[REGIONAL_COMPILATION_ENV] = before


def test_compiled_packed_sft_breaks_only_at_the_attention_and_trains_as_eager(tiny_models, tmp_path, monkeypatch,
                                                                             regional_variable_restored):
    import torch
    import torch._dynamo.utils as dynamo_utils
    import transformers

    from llmfinetune import kernels
    from llmfinetune.config import parse_job
    from llmfinetune.workflow import run

    data = make_dataset(tmp_path / "data", "text-generation")

    def train(name, **base):
        job = job_dict("text-generation", "lora", tiny_models["qwen2"], data, tmp_path / name, max_steps=5,
                       save_strategy="no", packing=True, logging_steps=1, **base)
        # Eager fp32 pads the packed row for its packed frozen layers (kernels.py), compiled does not: dropout's
        # masks over rows of two lengths would differ.
        job["ft_config"]["train_config"]["lora_config"]["lora_dropout"] = 0.0
        run(parse_job(job))
        return logged_losses(tmp_path / name)

    eager = train("eager")
    graphs_after_step = []
    training_step = transformers.Trainer.training_step

    def counted(self, *args, **kwargs):
        loss = training_step(self, *args, **kwargs)
        graphs_after_step.append(dynamo_utils.counters["stats"]["unique_graphs"])
        return loss

    monkeypatch.setattr(transformers.Trainer, "training_step", counted)
    hand_written = []
    forward = kernels._LoraLinear.forward
    monkeypatch.setattr(kernels._LoraLinear, "forward",
                        staticmethod(lambda *args: hand_written.append(1) or forward(*args)))
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    # aot_eager: Dynamo's graphs and AOTAutograd's backward without inductor's C++ compilation (minutes on 2 cores).
    compiled = train("compiled", torch_compile=True, torch_compile_backend="aot_eager")

    assert os.environ[regional_variable_restored] == "true"
    breaks = dynamo_utils.counters["graph_break"]
    assert breaks and all("_per_example_sdpa" in reason for reason in breaks), list(breaks)
    # The first step compiles with its token count, the second once more with the count dynamic; then none.
    assert graphs_after_step[0] > 0 and graphs_after_step[1:] == [graphs_after_step[1]] * 4, graphs_after_step
    assert not hand_written  # inductor fuses transformers' own ops; the hand-written functions are for eager runs
    assert compiled == pytest.approx(eager, rel=1e-4)


def _varlen_custom_op():
    """A custom op standing in for torch's varlen flash kernel (itself a custom op, CUDA-only) on the CPU: opaque to
    torch.compile as the real one is, computed by test_packing_attention's reference written from its documentation."""
    from typing import Optional

    import torch

    from test_packing_attention import _documented_varlen_attn

    calls = []
    reference = _documented_varlen_attn("window_size", calls)

    @torch.library.custom_op("llmfinetune_tests::varlen_attn", mutates_args=())
    def varlen_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                  cu_seq_k: torch.Tensor, max_q: int, max_k: int, scale: Optional[float], left: int, right: int,
                  enable_gqa: bool) -> torch.Tensor:
        return reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=(left, right),
                         enable_gqa=enable_gqa)

    @varlen_op.register_fake
    def _(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, left, right, enable_gqa):
        return torch.empty_like(query)

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                    enable_gqa=False):
        return varlen_op(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, *window_size, enable_gqa)

    return varlen_attn, calls


def test_the_gpu_attention_stays_inside_the_compiled_decoder_layer(monkeypatch):
    """On a GPU in bf16 the flattened row's attention is torch's varlen flash kernel (packing._varlen_flash): under
    torch_compile the decoder layer's graph holds it whole, with no break and no read of the bounds on the host, and
    the logits are the eager ones."""
    import inspect
    import warnings

    import torch
    import torch._dynamo.utils as dynamo_utils

    from llmfinetune import packing
    from llmfinetune.packing import FLATTENED, PackedCollator, use_segmented_sdpa
    from test_packing_attention import _load, _packed_rows

    varlen_attn, calls = _varlen_custom_op()
    monkeypatch.setattr(packing, "VARLEN_FLASH_DEVICES", ("cpu",))
    monkeypatch.setattr(packing, "_varlen_attention",
                        lambda: (varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)))
    model = _load("qwen2", "sdpa")
    use_segmented_sdpa(model)
    _, rows = _packed_rows()
    batch = PackedCollator(pad_token_id=0, layout=FLATTENED)(rows)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(**inputs).logits
        for layer in model.model.layers:
            layer.compile(backend="eager")
        dynamo_utils.counters.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = model(**inputs).logits
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]
    assert dynamo_utils.counters["stats"]["unique_graphs"] > 0
    assert not dynamo_utils.counters["graph_break"], list(dynamo_utils.counters["graph_break"])
    assert len(calls) == 2 * len(model.model.layers)  # eager, then compiled: one call per layer each
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("task", ["sequenceclassification", "preference"])
def test_other_tasks_train_compiled_as_eager(task, tiny_models, tmp_path, regional_variable_restored):
    """The plain Trainer (an encoder's classification) and TRL's (DPO) compile their models' layers too, with the
    eager run's losses."""
    import torch
    import torch._dynamo.utils as dynamo_utils

    from llmfinetune.workflow import run
    from test_preference import make_data, preference_job

    def train(name, **base):
        settings = dict(max_steps=3, save_strategy="no", logging_steps=1, **base)
        if task == "preference":
            job = preference_job(tiny_models["qwen2"], make_data(tmp_path / "data"), tmp_path / name, **settings)
        else:
            from llmfinetune.config import parse_job

            job = parse_job(job_dict(task, "lora", tiny_models["bert"], make_dataset(tmp_path / "data", task),
                                     tmp_path / name, **settings))
        run(job)
        return logged_losses(tmp_path / name)

    eager = train("eager")
    torch._dynamo.reset()  # layers of the same class compiled by an earlier test would be reused, not counted
    dynamo_utils.counters.clear()
    compiled = train("compiled", torch_compile=True, torch_compile_backend="aot_eager")
    assert dynamo_utils.counters["stats"]["unique_graphs"] > 0
    assert not dynamo_utils.counters["graph_break"], list(dynamo_utils.counters["graph_break"])
    assert compiled == pytest.approx(eager, rel=1e-4)
