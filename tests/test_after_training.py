"""After training: `llmfinetune predict`, `eval` and `export` on tiny run directories of every task, full and LoRA.

Each run trains once per module (2 steps on a tiny random model); the commands then read it only through its
job.yaml, as a user would.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TASK_DATA, classification_rows, job_dict, make_dataset, write_jsonl
from llmfinetune.cli import main
from llmfinetune.config import load_job, parse_job
from llmfinetune.inference import group_entities, join_words, split_words

RUNS = [(task, method) for task in TASK_DATA for method in ("full", "lora")]
LORA_RUNS = [run for run in RUNS if run[1] == "lora"]
PAIR = ("sequenceclassification", "lora")  # this run is trained on two input columns (sentence1, sentence2)
LABELS = {"sequenceclassification": ["neg", "pos"], "tokenclassification": ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]}
PROBE = {
    "sequenceclassification": ["--text", "the film was great"],
    "tokenclassification": ["--text", "Anna Berg flew to New York."],
    "maskedlm": ["--text", "the film was [MASK] and the meal was [MASK]."],
    "text-generation": ["--text", "What is 3 plus 4?"],
}
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONIOENCODING": "utf-8", "TOKENIZERS_PARALLELISM": "false"}


def run_id(run) -> str:
    return "-".join(run)


def _pair_rows(n: int, seed: int) -> list[dict]:
    return [{"sentence1": row["text"], "sentence2": f"yes, it was {row['text'].split()[-1]}", "label": row["label"]}
            for row in classification_rows(n, seed)]


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """One tiny run directory per task x method, trained once for the whole module."""
    root = tmp_path_factory.mktemp("runs")
    made = {}
    with pytest.MonkeyPatch.context() as patch:
        # The run report (report.png/report.md, tested in test_report.py) is not what these tests read; skip drawing.
        patch.setattr("llmfinetune.workflow._write_report", lambda *args, **kwargs: None, raising=False)
        for task, method in RUNS:
            made[(task, method)] = _train(task, method, root, tiny_models)
    return made


def _train(task: str, method: str, root: Path, tiny_models) -> Path:
    from llmfinetune.workflow import run

    name = f"{task}-{method}"
    if (task, method) == PAIR:
        data = root / "data" / name
        write_jsonl(data / "train.jsonl", _pair_rows(32, 1))
        write_jsonl(data / "validation.jsonl", _pair_rows(16, 2))
    else:
        data = make_dataset(root / "data" / name, task, train_rows=32, eval_rows=16)
    raw = job_dict(task, method, tiny_models[TASK_DATA[task][1]], data, root / name, max_steps=2, save_strategy="no")
    if (task, method) == PAIR:
        raw["ft_config"]["data_config"]["input_columns"] = ["sentence1", "sentence2"]
    run(parse_job(raw))
    return root / name


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def labels_of(run_dir: Path) -> list[str]:
    """Label names as training saved them in labels.json; predict reads them from there for LoRA runs and from
    config.json for full runs, so this also checks the two agree."""
    return sorted(json.loads((run_dir / "labels.json").read_text())["id2label"].values())


def check_prediction(task: str, run_dir: Path, row: dict, text: str) -> None:
    prediction = row["prediction"]
    if task == "sequenceclassification":
        assert prediction["label"] in labels_of(run_dir)
        assert sorted(prediction["scores"]) == labels_of(run_dir) == LABELS[task]
        assert math.isclose(sum(prediction["scores"].values()), 1.0, rel_tol=1e-5)
        assert prediction["score"] == max(prediction["scores"].values())
    elif task == "tokenclassification":
        assert len(prediction["words"]) == len(prediction["tags"]) > 0
        assert set(prediction["tags"]) <= set(labels_of(run_dir))
        for entity in prediction["entities"]:
            assert text[entity["start"]:entity["end"]] == entity["text"] != ""
            assert entity["entity"] in {label.split("-", 1)[-1] for label in LABELS[task]}
            assert 0 <= entity["score"] <= 1
    elif task == "maskedlm":
        assert len(prediction["fills"]) == text.count("[MASK]")
        for candidates in prediction["fills"]:
            assert len(candidates) == 5
            assert all(isinstance(c["token"], str) and 0 <= c["score"] <= 1 for c in candidates)
            assert [c["score"] for c in candidates] == sorted((c["score"] for c in candidates), reverse=True)
        assert "[MASK]" not in prediction["sequence"]
    else:
        assert isinstance(prediction["generated_text"], str)
        assert prediction["finish_reason"] in ("eos", "length")
        assert "<|endoftext|>" not in prediction["generated_text"]


# ---------------------------------------------------------------- predict

@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_predict_text(run, runs, capsys):
    task, _ = run
    args = list(PROBE[task])
    if run == PAIR:
        args += ["--text-pair", "yes, it was great"]
    if task == "text-generation":
        args += ["--max-new-tokens", "6"]
    code, out, err = cli(capsys, "predict", "--model", runs[run], *args, "--device", "cpu")
    assert code == 0, err
    (line,) = out.splitlines()  # stdout holds the result line only; logs and progress go to stderr
    row = json.loads(line)
    assert row["text"] == args[1]
    check_prediction(task, runs[run], row, args[1])


def _input_rows(task: str, run, folder: Path) -> list[dict]:
    """Rows as a user would feed them: validation rows (the job's input column(s), extra keys echoed), and one row
    with a plain 'text' key."""
    rows = [json.loads(line) for line in (folder / "validation.jsonl").read_text().splitlines()[:4]]
    if task == "maskedlm":
        rows = [{"text": " ".join(["[MASK]"] + row["text"].split()[1:]), "id": i} for i, row in enumerate(rows)]
    rows.append({"text": PROBE[task][1], "text_pair": "yes, it was great"} if run == PAIR else {"text": PROBE[task][1]})
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_predict_file_streams_rows(run, runs, capsys, tmp_path):
    task, _ = run
    rows = _input_rows(task, run, Path(load_job(runs[run] / "job.yaml").data.local_path))
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    output = tmp_path / "out" / "predictions.jsonl"
    extra = ["--max-new-tokens", "4", "--do-sample", "--temperature", "0.7", "--top-p", "0.9"] \
        if task == "text-generation" else []
    code, out, err = cli(capsys, "predict", "--model", runs[run], "--input", source, "--output", output,
                         "--batch-size", "2", *extra)
    assert code == 0, err
    assert out == ""
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(results) == len(rows)
    for row, result in zip(rows, results):
        assert {k: v for k, v in result.items() if k != "prediction"} == row  # the input row, echoed
        if task == "tokenclassification" and isinstance(row.get("tokens"), list):
            text = " ".join(row["tokens"])
            assert result["prediction"]["words"] == row["tokens"]
        else:
            text = row.get("text") or row.get("sentence1") or row.get("prompt")
        check_prediction(task, runs[run], result, text)


@pytest.mark.slow
def test_predict_cli_end_to_end_in_a_subprocess(runs, tmp_path):
    """`python -m llmfinetune predict` as a user runs it: stdout is JSON lines only, exit 0."""
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "the film was great"}, {"text": "the meal was awful"}])
    result = subprocess.run([sys.executable, "-m", "llmfinetune", "predict", "--model",
                             str(runs[("sequenceclassification", "full")]), "--input", str(source)],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["the film was great", "the meal was awful"]
    assert all(r["prediction"]["label"] in ("neg", "pos") for r in rows)
    assert "predict" in result.stderr  # the progress bar


def test_predict_file_writes_each_batch_as_it_finishes(tmp_path):
    from llmfinetune.errors import UserError
    from llmfinetune.inference import predict_file

    output = tmp_path / "out.jsonl"
    lines_before_each_batch = []

    class Echo:  # a stand-in predictor: what matters here is when rows reach the file
        def read(self, row, where):
            return row["text"]

        def predict(self, inputs):
            lines_before_each_batch.append(len(output.read_text().splitlines()))
            return [{"length": len(text)} for text in inputs]

    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "a" * n} for n in range(1, 6)])
    with output.open("w") as out:
        assert predict_file(Echo(), source, out, batch_size=2) == 5
    assert lines_before_each_batch == [0, 2, 4]
    assert [json.loads(line)["prediction"]["length"] for line in output.read_text().splitlines()] == [1, 2, 3, 4, 5]
    source.write_text('{"text": "a"}\n\n{"text": \n', encoding="utf-8")
    with output.open("w") as out, pytest.raises(UserError, match=r"in\.jsonl:3: malformed JSON line"):
        predict_file(Echo(), source, out, batch_size=2)


@pytest.mark.slow
def test_lora_run_from_before_labels_json_and_with_a_moved_base_model(runs, capsys, caplog, tmp_path):
    """Label names are recomputed from the train data when labels.json is missing (runs made before it existed), and
    the base model falls back to the folder peft recorded when job.yaml's model_id no longer resolves."""
    import shutil

    old = tmp_path / "old-run"
    shutil.copytree(runs[("tokenclassification", "lora")], old, ignore=shutil.ignore_patterns("labels.json"))
    code, out, err = cli(capsys, "predict", "--model", old, *PROBE["tokenclassification"],
                         "model_config.model_id=/nowhere/tiny-bert")
    assert code == 0, err
    assert "no labels.json; recomputing the label names" in caplog.text
    assert "Base model from adapter_config.json" in caplog.text
    assert set(json.loads(out)["prediction"]["tags"]) <= set(LABELS["tokenclassification"])


def test_group_entities_spans_index_into_the_text():
    text = "Anna  Berg flew to New York, said Tom."
    words, spans = split_words(text)
    assert words == ["Anna", "Berg", "flew", "to", "New", "York", ",", "said", "Tom", "."]
    tags = ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O", "O", "I-PER", "O"]
    entities = group_entities(text, spans, tags, [0.5] * len(tags))
    assert [(e["entity"], e["text"], e["start"], e["end"]) for e in entities] == [
        ("PER", "Anna  Berg", 0, 10), ("LOC", "New York", 19, 27), ("PER", "Tom", 34, 37)]
    # B- starts a new entity even after one of the same type; another type's I- starts one too; None (past
    # max_length) ends one.
    entities = group_entities(text, spans, ["B-PER", "B-PER", "I-LOC", None, "I-LOC", "I-LOC", "O", "O", "O", "O"],
                              [1.0, 0.5, 0.25, None, 1.0, 0.5, 1, 1, 1, 1])
    assert [(e["entity"], e["text"], e["score"]) for e in entities] == [
        ("PER", "Anna", 1.0), ("PER", "Berg", 0.5), ("LOC", "flew", 0.25), ("LOC", "New York", 0.75)]
    joined, spans = join_words(["New", "York", "."])
    assert [joined[a:b] for a, b in spans] == ["New", "York", "."]


# ---------------------------------------------------------------- eval

@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_eval_reproduces_the_final_eval_of_training(run, runs, capsys):
    task, _ = run
    code, out, err = cli(capsys, "eval", "--model", runs[run])
    assert code == 0, err
    metrics = json.loads(out)
    trained = json.loads((runs[run] / "metrics.json").read_text())
    # maskedlm evaluates blocks of max_length tokens, not rows
    rows = {"maskedlm": trained["eval_examples"]}.get(task, 16)
    assert metrics["split"] == "validation" and metrics["eval_examples"] == trained["eval_examples"] == rows
    assert math.isclose(metrics["eval_loss"], trained["eval_loss"], rel_tol=1e-6)
    exact = [k for k in trained if k.startswith("eval_") and k.split("_", 1)[1] in
             ("accuracy", "f1", "precision", "recall")]
    assert len(exact) == {"sequenceclassification": 2, "tokenclassification": 4}.get(task, 0)
    for key in exact:
        assert metrics[key] == trained[key], key
    if task in ("text-generation", "maskedlm"):
        assert math.isclose(metrics["eval_perplexity"], trained["eval_perplexity"], rel_tol=1e-6)


@pytest.mark.slow
def test_eval_of_masked_lm_is_seeded(runs, capsys):
    """Masked-LM eval masks at random: `eval` seeds first, so it answers the same every time (and on --split)."""
    run_dir = runs[("maskedlm", "full")]
    first = json.loads(cli(capsys, "eval", "--model", run_dir)[1])
    second = json.loads(cli(capsys, "eval", "--model", run_dir)[1])
    assert first["eval_loss"] == second["eval_loss"] and math.isfinite(first["eval_loss"])
    assert first["eval_perplexity"] == pytest.approx(math.exp(first["eval_loss"]))
    on_train = json.loads(cli(capsys, "eval", "--model", run_dir, "--split", "train")[1])
    assert on_train["split"] == "train" and on_train["eval_loss"] != first["eval_loss"]


# ---------------------------------------------------------------- export

PROBE_SCRIPT = r"""
import json, sys, torch, transformers
out = {}
for folder, auto, batch_file in json.loads(sys.argv[1]):
    model = getattr(transformers, auto).from_pretrained(folder).eval()
    batch = torch.load(batch_file)
    with torch.no_grad():
        torch.save(model(**batch).logits, batch_file + ".logits")
    out[folder] = model.config.id2label if hasattr(model.config, "id2label") else None
print(json.dumps(out))
"""


def _probe_batch(tokenizer, task: str):
    if task == "tokenclassification":
        return tokenizer([["Anna", "Berg", "flew", "to", "Lima"]], is_split_into_words=True, return_tensors="pt")
    return tokenizer(["the film was great and the meal was awful", "What is 3 plus 4?"], padding=True,
                     return_tensors="pt")


@pytest.mark.slow
def test_export_merges_lora_into_a_standalone_model(runs, capsys, tmp_path):
    """Merged logits equal adapter logits (atol 1e-5); plain from_pretrained loads the export in a fresh process."""
    import torch
    import transformers

    from llmfinetune.inference import load_run
    from llmfinetune.registry import TASKS

    probes = []
    expected = {}
    for task, method in LORA_RUNS:
        run_dir, out = runs[(task, method)], tmp_path / f"{task}-merged"
        code, stdout, err = cli(capsys, "export", "--model", run_dir, "--out", out, "--merge")
        assert code == 0, err
        assert str(out) in stdout
        assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
        assert not (out / "adapter_config.json").exists()
        adapter = load_run(run_dir, device="cpu")
        auto = TASKS.get(task).model_class
        merged = getattr(transformers, auto).from_pretrained(out).eval()
        batch = _probe_batch(adapter.tokenizer, task)
        with torch.no_grad():
            expected[task] = adapter.model(**batch).logits
            torch.testing.assert_close(merged(**batch).logits, expected[task], rtol=0, atol=1e-5)
        batch_file = str(tmp_path / f"{task}.batch.pt")
        torch.save(dict(batch), batch_file)
        probes.append((str(out), auto, batch_file))
        # The export is itself a run directory (job.yaml says full): predict works on it.
        code, stdout, err = cli(capsys, "predict", "--model", out, *PROBE[task],
                                *(["--text-pair", "yes"] if (task, method) == PAIR else []),
                                *(["--max-new-tokens", "2"] if task == "text-generation" else []))
        assert code == 0, err
    result = subprocess.run([sys.executable, "-c", PROBE_SCRIPT, json.dumps(probes)], env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    configs = json.loads(result.stdout.splitlines()[-1])
    for (folder, _, batch_file), (task, _) in zip(probes, LORA_RUNS):
        torch.testing.assert_close(torch.load(batch_file + ".logits"), expected[task], rtol=0, atol=1e-5)
        if task in LABELS:
            assert sorted(configs[folder].values()) == LABELS[task]


@pytest.mark.slow
def test_export_of_a_full_run_copies_it(runs, capsys, tmp_path):
    import transformers

    run_dir, out = runs[("tokenclassification", "full")], tmp_path / "export"
    code, _, err = cli(capsys, "export", "--model", run_dir, "--out", out)
    assert code == 0, err
    assert (out / "model.safetensors").read_bytes() == (run_dir / "model.safetensors").read_bytes()
    assert (out / "tokenizer.json").is_file() and not (out / "training_args.bin").exists()
    model = transformers.AutoModelForTokenClassification.from_pretrained(out)
    assert sorted(model.config.id2label.values()) == LABELS["tokenclassification"]


# ---------------------------------------------------------------- mistakes: exit 2 and a message naming the problem

@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["predict", "--model", "{tmp}/nowhere", "--text", "x"], r"--model: run directory '.*nowhere' not found"),
    (["eval", "--model", "{tmp}/nowhere"], r"--model: run directory '.*nowhere' not found"),
    (["predict", "--model", "{tmp}/empty", "--text", "x"], r"empty has no job\.yaml, so it is not a run directory"),
    (["export", "--model", "{tmp}/empty", "--out", "{tmp}/x"], r"has no job\.yaml"),
    (["predict", "--model", "{seq_full}", "--text", "x", "--input", "{tmp}/in.jsonl"],
     r"exactly one of --text .* or --input FILE\.jsonl \(got both\)"),
    (["predict", "--model", "{seq_full}"], r"exactly one of --text .* \(got neither\)"),
    (["predict", "--model", "{seq_full}", "--input", "{tmp}/missing.jsonl"],
     r"--input: file '.*missing.jsonl' not found"),
    (["predict", "--model", "{seq_full}", "--text", "x", "--temperature", "0.5"],
     r"--temperature: only for text-generation runs; this run is sequenceclassification"),
    (["predict", "--model", "{gen_lora}", "--text", "x", "--temperature", "0.5"], r"add --do-sample"),
    (["predict", "--model", "{mlm_full}", "--text", "no mask here"],
     r"--text: the text has no mask token; write \[MASK\]"),
    (["predict", "--model", "{seq_lora}", "--text", "x"],
     r"trained on text pairs; expected keys 'sentence1' and 'sentence2'"),
    (["predict", "--model", "{seq_full}", "--input", "{tmp}/bad.jsonl"],
     r"bad\.jsonl:2: no input; expected a key named 'sentence' or 'text'.*keys found: words"),
    (["export", "--model", "{seq_lora}", "--out", "{tmp}/x"], r"holds a LoRA adapter.*add --merge"),
    (["export", "--model", "{seq_full}", "--out", "{seq_full}/sub"], r"--out: .* is inside the run directory"),
    (["eval", "--model", "{seq_full}", "--split", "test"],
     r"--split: no split 'test'.*splits found: train, validation"),
])
def test_mistakes_exit_2_with_a_message(args, message, runs, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "the film was great"}, {"words": "x"}])
    names = {"tmp": tmp_path, "seq_full": runs[("sequenceclassification", "full")],
             "seq_lora": runs[PAIR], "gen_lora": runs[("text-generation", "lora")],
             "mlm_full": runs[("maskedlm", "full")]}
    code, out, err = cli(capsys, *[a.format(**names) for a in args])
    assert code == 2, err
    assert re.search(message, err), err
    assert err.startswith("error: ") or "\nerror: " in err
    assert not (tmp_path / "x").exists()


def test_device_cuda_without_a_gpu_is_a_user_error(runs, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = cli(capsys, "eval", "--model", runs[("sequenceclassification", "full")], "--device", "cuda")
    assert code == 2 and "--device cuda: torch sees no CUDA GPU" in err


def test_checkpoint_folder_gets_a_hint(tmp_path, capsys):
    (tmp_path / "run" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "run" / "job.yaml").write_text("{}")
    code, _, err = cli(capsys, "predict", "--model", tmp_path / "run" / "checkpoint-2", "--text", "x")
    assert code == 2 and "looks like a checkpoint folder: add --ft=" in err


@pytest.mark.parametrize("command", ["predict", "eval", "export"])
def test_help_does_not_import_torch(command):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmfinetune", command, "--help"], cwd=REPO,
                            env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--model RUN_DIR" in result.stdout and "--device" in result.stdout
    imported = {m.group(1).split(".")[0] for m in re.finditer(r"import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", result.stderr)}
    assert "argparse" in imported and not imported & {"torch", "transformers", "peft", "datasets"}


# ---------------------------------------------------------------- text generation: the prompt training saw, the answer it learned

@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_text_generation_predict_prompts_with_the_training_rendering(method, runs):
    """The run directory records the trained format (sft_format.json, written by run-ft); the ids predict feeds the
    model for a validation row are those training put before its answer."""
    from llmfinetune import data
    from llmfinetune.inference import PREDICTORS, Options, load_run
    from llmfinetune.tasks.chat import FORMAT_FILE, IGNORE

    run_dir = runs[("text-generation", method)]
    assert json.loads((run_dir / FORMAT_FILE).read_text()) == {
        "format": "prompt_response", "prompt": "prompt", "response": "response", "conversation": None,
        "template": "tokenizer", "system_prompt": None}
    run = load_run(run_dir, device="cpu")
    splits = data.load_raw_splits(run.job)
    example = run.task.prepare(splits, "validation", run.tokenizer, run.job).eval[0]
    answer_at = next(i for i, label in enumerate(example["labels"]) if label != IGNORE)
    predictor = PREDICTORS["text-generation"](run, Options())
    row = splits["validation"][0]
    for given in (row, {"text": row["prompt"]}):  # a data row, and what --text makes
        (ids,), _ = predictor.prompts([predictor.read(given, "row 0")])
        assert ids == example["input_ids"][:answer_at]
    assert run.tokenizer.decode(ids) == f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_a_model_trained_on_one_reply_predicts_it(tiny_models, tmp_path, capsys, monkeypatch):
    """Greedy predict after training on one fixed prompt -> reply pair gives back that reply, and stops at EOS."""
    from llmfinetune.workflow import run

    monkeypatch.setattr("llmfinetune.workflow._write_report", lambda *args, **kwargs: None, raising=False)
    prompt, reply = "What is the capital of France?", "Paris is the capital."
    rows = [{"prompt": prompt, "response": reply}] * 8
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "validation.jsonl", rows[:2])
    raw = job_dict("text-generation", "full", tiny_models["qwen2"], tmp_path / "data", tmp_path / "run",
                   max_steps=120, per_device_train_batch_size=2, learning_rate=3e-3, save_strategy="no",
                   logging_steps=50)
    run(parse_job(raw))
    code, out, err = cli(capsys, "predict", "--model", tmp_path / "run", "--text", prompt, "--max-new-tokens", "24",
                         "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)["prediction"] == {"generated_text": reply, "finish_reason": "eos"}
