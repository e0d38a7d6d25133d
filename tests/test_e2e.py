"""Every task x method trains for a few steps on a tiny random model, changes its weights, and saves a run directory
whose model plain transformers/peft load back with the same logits."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TASK_DATA, job_dict, make_dataset
from llmfinetune.config import parse_job
from llmfinetune.workflow import run

pytestmark = pytest.mark.slow
TASKS = list(TASK_DATA)


def _auto_class(task: str):
    import transformers

    from llmfinetune.registry import TASKS as REGISTRY

    return getattr(transformers, REGISTRY.get(task).model_class)


def _reload(task: str, method: str, run_dir, base_path):
    """Load the run directory the way a user would, with nothing from llmfinetune."""
    auto = _auto_class(task)
    if method == "full":
        return auto.from_pretrained(run_dir)
    from peft import PeftModel

    kwargs = {}
    labels_file = run_dir / "labels.json"
    if labels_file.exists():
        labels = json.loads(labels_file.read_text())
        kwargs = {"num_labels": len(labels["id2label"]),
                  "id2label": {int(k): v for k, v in labels["id2label"].items()}}
    return PeftModel.from_pretrained(auto.from_pretrained(base_path, **kwargs), run_dir)


def _probe_batch(tokenizer, task):
    if task == "tokenclassification":
        return tokenizer([["Anna", "Berg", "flew", "to", "Lima"]], is_split_into_words=True, return_tensors="pt")
    return tokenizer(["the film was great and the meal was awful"], return_tensors="pt")


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("task", TASKS)
def test_task_method_trains_and_reloads(task, method, tiny_models, tmp_path):
    from safetensors.torch import load_file

    base_path = tiny_models[TASK_DATA[task][1]]
    data = make_dataset(tmp_path / "data", task)
    out = tmp_path / "run"
    job = parse_job(job_dict(task, method, base_path, data, out))
    initial = load_file(str(base_path / "model.safetensors"))

    result = run(job)

    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert metrics["world_size"] == 1 and metrics["global_batch_size"] == 4
    for name in ("job.yaml", "trainer_state.json", "checkpoint-2", "checkpoint-4", "report.png", "report.md"):
        assert (out / name).exists(), name
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4

    trained = {n: p.detach() for n, p in result.model.named_parameters()}
    if method == "lora":
        lora_b = [p for n, p in trained.items() if "lora_B" in n]
        assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "LoRA B matrices start at zero and must move"
        assert (out / "adapter_model.safetensors").exists()
    else:
        # The tiny checkpoints are saved with the same module paths the task classes use (bert.*, model.*).
        shared = [k for k in initial if k in trained]
        assert shared, "no pretrained weight found in the trained model"
        assert any(not torch.equal(initial[k], trained[k]) for k in shared), "full fine-tuning changed no weight"
        assert (out / "model.safetensors").exists()

    reloaded = _reload(task, method, out, base_path).eval()
    model = result.model.eval()
    batch = _probe_batch(result.tokenizer, task)
    with torch.no_grad():
        expected = model(**batch).logits
        actual = reloaded(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    if task in ("sequenceclassification", "tokenclassification"):
        labels = json.loads((out / "labels.json").read_text())["id2label"]
        assert sorted(labels.values()) == (["neg", "pos"] if task == "sequenceclassification"
                                           else ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"])


def test_non_finite_loss_stops_the_run_and_names_the_step(tiny_models, tmp_path):
    from llmfinetune.errors import UserError

    data = make_dataset(tmp_path / "data", "sequenceclassification")
    out = tmp_path / "run"
    # Adam moves every weight by ~lr per step: at 1e30 the logits overflow within a few steps.
    job = parse_job(job_dict("sequenceclassification", "full", tiny_models["bert"], data, out, max_steps=20,
                             learning_rate=1e30, logging_steps=1, save_steps=1))
    with pytest.raises(UserError, match=r"training diverged: the loss became (nan|inf) at step \d+.*Last good checkpoint: "):
        run(job)
    assert not (out / "model.safetensors").exists(), "a diverged model must not be saved as the result"
    assert not (out / "metrics.json").exists()


def test_tensorboard_logs_when_report_to_asks(tiny_models, tmp_path):
    pytest.importorskip("tensorboard")
    data = make_dataset(tmp_path / "data", "sequenceclassification")
    out = tmp_path / "run"
    run(parse_job(job_dict("sequenceclassification", "lora", tiny_models["bert"], data, out, report_to="tensorboard",
                           logging_steps=1)))
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {out}"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert "train/loss" in tags, tags
