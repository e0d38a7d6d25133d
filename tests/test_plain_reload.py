"""Every task x method run directory loads the way the README says ("Methods"), in a fresh process with plain
transformers/peft and no llmfinetune, and gives the logits the trained model gave in memory. The BERT runs start
from an encoder-only checkpoint (as all-MiniLM-L6-v2 and most sentence encoders are), so every task head is new:
that is where a masked-LM LoRA adapter used to list the embedding-tied decoder and fail to load."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import TASK_DATA, job_dict, make_dataset
from llmfinetune.config import parse_job
from llmfinetune.registry import TASKS as REGISTRY
from llmfinetune.workflow import run

pytestmark = pytest.mark.slow

NEW_TOKEN = {"text-generation": ("eos_token", "<|end|>"), "maskedlm": ("mask_token", "[MASK2]")}

# What the README's "Methods" section tells a user to write; nothing here may import llmfinetune.
PLAIN_RELOAD = textwrap.dedent('''
    import json, sys, traceback
    from pathlib import Path

    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoTokenizer

    failures = []
    for case in json.loads(Path(sys.argv[1]).read_text()):
        try:
            auto = getattr(transformers, case["auto_class"])
            run_dir = case["run_dir"]
            if case["method"] == "full":
                model = auto.from_pretrained(run_dir)
            else:
                kwargs = {}
                labels = Path(run_dir, "labels.json")
                if labels.exists():
                    id2label = {int(k): v for k, v in json.loads(labels.read_text())["id2label"].items()}
                    kwargs = {"num_labels": len(id2label), "id2label": id2label}
                base = auto.from_pretrained(case["base"], **kwargs)
                tokenizer = AutoTokenizer.from_pretrained(run_dir)
                if len(tokenizer) > base.get_input_embeddings().num_embeddings:  # the run added tokens
                    base.resize_token_embeddings(len(tokenizer))
                model = PeftModel.from_pretrained(base, run_dir)
            saved = torch.load(case["probe"])
            with torch.no_grad():
                logits = model.eval()(**saved["inputs"]).logits
            torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-5)
        except Exception:
            failures.append(case["name"] + ": " + traceback.format_exc(limit=3))
    assert "llmfinetune" not in sys.modules
    print("\\n".join(failures) or "all reloaded")
    sys.exit(1 if failures else 0)
''')


def _probe(tokenizer, task: str, extra: str = ""):
    if task == "tokenclassification":
        return tokenizer([["Anna", "Berg", "flew", "to", "Lima"]], is_split_into_words=True, return_tensors="pt")
    return tokenizer([f"the film was great {extra} and the meal was awful"], return_tensors="pt")


@pytest.fixture(scope="module")
def trained_runs(tiny_models, encoder_only_bert, tmp_path_factory):
    """Two steps of every task x method, plus LoRA runs that add a token and one of the default job's LoRA shape;
    name -> (task, method, base, new token, RunResult)."""
    root = tmp_path_factory.mktemp("plain-reload")
    cases = [(task, method, None, None) for task in TASK_DATA for method in ("full", "lora")]
    cases += [(task, "lora", NEW_TOKEN[task], None) for task in NEW_TOKEN]
    # The default job's shape: every bias and the pooler train beside the adapters, and are saved with them.
    cases += [("sequenceclassification", "lora", None, {"bias": "all", "modules_to_save": ["pooler"]})]
    runs = {}
    patch = pytest.MonkeyPatch()
    # report.png/report.md (test_report.py) are not what this test reads; skip drawing them.
    patch.setattr("llmfinetune.workflow._write_report", lambda *args, **kwargs: None, raising=False)
    for task, method, new_token, lora in cases:
        name = f"{task}-{method}" + ("-new-token" if new_token else "") + ("-biases-and-pooler" if lora else "")
        base = encoder_only_bert if TASK_DATA[task][1] == "bert" else tiny_models["qwen2"]
        raw = job_dict(task, method, base, make_dataset(root / name / "data", task), root / name / "run",
                       max_steps=2, save_steps=2, logging_steps=1)
        if lora:
            raw["ft_config"]["train_config"]["lora_config"].update(lora)
        if new_token:
            raw["model_config"]["add_special_tokens"] = dict([new_token])
        runs[name] = (task, method, base, new_token, run(parse_job(raw)))
    patch.undo()
    return runs


def test_every_run_directory_reloads_with_plain_transformers_and_peft(trained_runs, tmp_path):
    cases = []
    for name, (task, method, base, new_token, result) in trained_runs.items():
        inputs = dict(_probe(result.tokenizer, task, new_token[1] if new_token else ""))
        if new_token:
            assert result.tokenizer.convert_tokens_to_ids(new_token[1]) in inputs["input_ids"][0].tolist()
        with torch.no_grad():
            logits = result.model.eval()(**inputs).logits
        probe = tmp_path / f"{name}.pt"
        torch.save({"inputs": inputs, "logits": logits}, probe)
        cases.append({"name": name, "method": method, "run_dir": str(result.output_dir), "base": str(base),
                      "auto_class": REGISTRY.get(task).model_class, "probe": str(probe)})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "reload.py").write_text(PLAIN_RELOAD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(tmp_path / "reload.py"), str(tmp_path / "cases.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "all reloaded" in done.stdout


def test_masked_lm_lora_trains_the_new_head_but_not_a_copy_of_the_embedding(trained_runs):
    from safetensors import safe_open

    result = trained_runs["maskedlm-lora"][-1]
    assert result.model.peft_config["default"].modules_to_save == ["cls.predictions.transform"]
    with safe_open(str(result.output_dir / "adapter_model.safetensors"), "pt") as saved:
        head = sorted(key for key in saved.keys() if "cls." in key)
    assert head and all(".transform." in key for key in head), head


@pytest.mark.parametrize("name", list(f"{task}-lora-new-token" for task in NEW_TOKEN))
def test_lora_trains_the_rows_of_added_tokens_and_leaves_the_others(trained_runs, name):
    from safetensors.torch import load_file

    task, _, base, (_, token), result = trained_runs[name]
    model = result.model
    new_id = result.tokenizer.convert_tokens_to_ids(token)
    original = load_file(str(base / "model.safetensors"))
    embedding_key = next(k for k in original if k.endswith(("embed_tokens.weight", "word_embeddings.weight")))
    before = original[embedding_key]
    assert new_id == before.shape[0], "the token should be new, in a row the resize added"

    with torch.no_grad():
        rows = model.get_input_embeddings()(torch.arange(new_id + 1))
    embedding = model.get_input_embeddings()
    # The frozen matrix under peft's row adapter (if any) still holds the values the resize gave the new row.
    frozen = embedding.token_adapter.base_layer if hasattr(embedding, "token_adapter") else embedding
    initial = frozen.weight[new_id]
    assert not torch.allclose(rows[new_id], initial), "the new token's embedding row did not train"
    torch.testing.assert_close(rows[:new_id], before, rtol=0, atol=0)
    # Both tiny models tie the output embedding to the input one: the head must score with the trained rows too.
    output = model.get_base_model().get_output_embeddings()
    hidden = rows.shape[1]
    with torch.no_grad():
        scored = (output(torch.eye(hidden)) - output(torch.zeros(1, hidden))).T  # row i: token i's output weights
    torch.testing.assert_close(scored, rows, rtol=1e-6, atol=1e-6)
    adapter = result.output_dir / "adapter_model.safetensors"
    assert adapter.stat().st_size < before.numel() * 4, "the adapter holds a whole embedding matrix"


def test_lora_with_bias_all_trains_and_saves_every_encoder_bias(trained_runs):
    """The default job trains every bias beside the adapters (lora_config.bias: all): they must change in training
    and be in the adapter file, or a reload gets the base model's biases back."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    _, _, base, _, result = trained_runs["sequenceclassification-lora-biases-and-pooler"]
    with safe_open(str(result.output_dir / "adapter_model.safetensors"), "pt") as saved:
        biases = {key: saved.get_tensor(key) for key in saved.keys() if key.endswith(".bias")}
    layer_biases = {key.split("bert.", 1)[-1].replace(".base_layer", ""): value for key, value in biases.items()
                    if ".encoder.layer." in key}
    expected = {key: value for key, value in load_file(str(base / "model.safetensors")).items()
                if key.startswith("encoder.layer.") and key.endswith(".bias")}
    assert expected and set(layer_biases) == set(expected)
    changed = [key for key in expected if not torch.equal(layer_biases[key], expected[key])]
    assert len(changed) == len(expected), f"biases that did not train: {sorted(set(expected) - set(changed))}"
