"""torch_compile: true compiles the decoder layers (regional compilation), breaks their graph only around the packed
per-example attention, stops compiling once the token count is dynamic, and trains as the eager run does."""
import os

import pytest

from conftest import job_dict, make_dataset


@pytest.fixture
def regional_variable_restored():
    from llmfinetune.arguments import REGIONAL_COMPILATION_ENV

    before = os.environ.pop(REGIONAL_COMPILATION_ENV, None)
    yield REGIONAL_COMPILATION_ENV
    os.environ.pop(REGIONAL_COMPILATION_ENV, None)
    if before is not None:
        os.environ[REGIONAL_COMPILATION_ENV] = before


def _losses(result_dir):
    import json

    state = json.loads((result_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_compiled_packed_sft_breaks_only_at_the_attention_and_trains_as_eager(tiny_models, tmp_path, monkeypatch,
                                                                             regional_variable_restored):
    import torch._dynamo.utils as dynamo_utils
    import transformers

    from llmfinetune import kernels
    from llmfinetune.config import parse_job
    from llmfinetune.workflow import run

    data = make_dataset(tmp_path / "data", "text-generation")

    def train(name, **base):
        run(parse_job(job_dict("text-generation", "lora", tiny_models["qwen2"], data, tmp_path / name, max_steps=5,
                               save_strategy="no", packing=True, logging_steps=1, **base)))
        return _losses(tmp_path / name)

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
