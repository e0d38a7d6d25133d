"""report.py: report.png and report.md from a run directory alone, with and without the live-run facts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmfinetune.errors import UserError
from llmfinetune.report import peak_rss_mib, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, job: dict, log_history: list[dict], metrics: dict | None) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    steps = [e["step"] for e in log_history if "step" in e]
    state = {"best_metric": None, "epoch": log_history[-1].get("epoch", 1.0) if log_history else 0.0,
             "global_step": max(steps) if steps else 0, "log_history": log_history, "logging_steps": 10,
             "max_steps": max(steps) if steps else 0, "num_input_tokens_seen": 0, "num_train_epochs": 3,
             "train_batch_size": job["ft_config"]["train_config"]["base_config"].get("per_device_train_batch_size", 8)}
    (run_dir / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return run_dir


def job_dict(task: str, method: str, base: dict, lora: dict | None = None) -> dict:
    train_config = {"base_config": {"checkpoints_output_dir": "finetune_models/", **base}}
    if lora:
        train_config["lora_config"] = lora
    return {
        "model_config": {"model_id": "sentence-transformers/all-MiniLM-L6-v2",
                         "initialization": {"initializer": {"type": "Finetune", "dtype": "float32"}}},
        "ft_config": {"ft_task": task, "ft_method": method,
                      "data_config": {"local_path": "/data/demo/reviews", "input_columns": ["text"],
                                      "label_column": "label", "num_row": 0},
                      "train_config": train_config},
        "scaling_config": {"num_workers": 1},
    }


def classification_run(root: Path) -> Path:
    log = []
    lrs = [1e-3, 8.3e-4, 6.6e-4, 5e-4, 3.3e-4, 1.6e-4]
    losses = [0.6931, 0.5120, 0.3012, 0.1204, 0.0811, 0.0632]
    for i, (lr, loss) in enumerate(zip(lrs, losses), start=1):
        log.append({"epoch": i * 0.5, "grad_norm": 1.5 / i, "learning_rate": lr, "loss": loss, "step": i * 10})
        if i % 2 == 0:
            acc = [0.8650, 0.9000, 0.9125][i // 2 - 1]
            log.append({"epoch": i * 0.5, "eval_accuracy": acc, "eval_f1": acc - 0.0038, "eval_loss": 0.40 - 0.05 * i,
                        "eval_runtime": 1.2, "eval_samples_per_second": 333.3, "eval_steps_per_second": 5.8,
                        "step": i * 10})
    summary = {"epoch": 3.0, "step": 60, "total_flos": 1.2e12, "train_loss": 0.2843, "train_runtime": 48.5,
               "train_samples_per_second": 39.59, "train_steps_per_second": 1.237}
    final = {"epoch": 3.0, "eval_accuracy": 0.9125, "eval_f1": 0.9087, "eval_loss": 0.2411, "eval_runtime": 1.21,
             "eval_samples_per_second": 330.6, "eval_steps_per_second": 5.79, "step": 60}
    log += [summary, final]
    metrics = {**{k: v for k, v in summary.items() if k != "step"}, **{k: v for k, v in final.items() if k != "step"},
               "world_size": 2, "global_batch_size": 64, "train_examples": 640, "eval_examples": 400,
               "wall_seconds": 61.7}
    job = job_dict("sequenceclassification", "lora",
                   {"per_device_train_batch_size": 32, "learning_rate": "1e-3", "num_train_epochs": 3,
                    "max_length": 128, "warmup_steps": 0.06, "eval_strategy": "epoch"},
                   {"r": 16, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["query", "value"]})
    return make_run(root, "minilm-finetuned-sequenceclassification-reviews", job, log, metrics)


def maskedlm_run(root: Path) -> Path:
    log = [{"epoch": 0.5, "grad_norm": 9.1, "learning_rate": 1e-4, "loss": 4.812, "step": 10},
           {"epoch": 1.0, "grad_norm": 7.4, "learning_rate": 7.5e-5, "loss": 3.905, "step": 20},
           {"epoch": 1.0, "eval_loss": 3.412, "eval_runtime": 2.0, "eval_samples_per_second": 50.0,
            "eval_steps_per_second": 6.5, "step": 20},
           {"epoch": 1.5, "grad_norm": 6.8, "learning_rate": 5e-5, "loss": 3.301, "step": 30},
           {"epoch": 2.0, "grad_norm": 6.1, "learning_rate": 2.5e-5, "loss": 3.020, "step": 40},
           {"epoch": 2.0, "eval_loss": 2.930, "eval_runtime": 2.0, "eval_samples_per_second": 50.0,
            "eval_steps_per_second": 6.5, "step": 40},
           {"epoch": 2.0, "step": 40, "total_flos": 3.4e12, "train_loss": 3.7595, "train_runtime": 95.25,
            "train_samples_per_second": 6.72, "train_steps_per_second": 0.42},
           {"epoch": 2.0, "eval_loss": 2.930, "eval_runtime": 2.0, "eval_samples_per_second": 50.0,
            "eval_steps_per_second": 6.5, "step": 40}]
    metrics = {"train_runtime": 95.25, "train_samples_per_second": 6.72, "train_steps_per_second": 0.42,
               "train_loss": 3.7595, "epoch": 2.0, "eval_loss": 2.930, "eval_perplexity": 18.73,
               "eval_runtime": 2.0, "world_size": 1, "global_batch_size": 16, "train_examples": 320,
               "eval_examples": 100, "wall_seconds": 104.9}
    job = job_dict("maskedlm", "full", {"per_device_train_batch_size": 16, "learning_rate": 1e-4,
                                        "num_train_epochs": 2, "max_length": 128, "mlm_probability": 0.15})
    return make_run(root, "minilm-finetuned-maskedlm-wiki", job, log, metrics)


def single_point_run(root: Path) -> Path:
    log = [{"epoch": 1.0, "grad_norm": 2.2, "learning_rate": 5e-5, "loss": 0.7012, "step": 5},
           {"epoch": 1.0, "step": 5, "total_flos": 1.0e9, "train_loss": 0.7012, "train_runtime": 3.21,
            "train_samples_per_second": 12.46, "train_steps_per_second": 1.558}]
    metrics = {"train_runtime": 3.21, "train_samples_per_second": 12.46, "train_loss": 0.7012, "epoch": 1.0,
               "world_size": 1, "global_batch_size": 8, "train_examples": 40, "eval_examples": 0,
               "wall_seconds": 9.8}
    job = job_dict("sequenceclassification", "full", {"max_steps": 5, "eval_strategy": "no"})
    return make_run(root, "single-point", job, log, metrics)


def check_png(path: Path) -> None:
    import matplotlib.image

    assert path.is_file() and path.name == "report.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert width > 800 and height > 500
    assert image.std() > 0.01  # not a blank canvas


def test_classification_run_with_everything(tmp_path):
    run_dir = classification_run(tmp_path)
    extra = {"trainable_parameters": 676_610, "total_parameters": 23_390_210, "peak_rss_mib": 1536.4,
             "train_tokens": 97_000, "command": "llmfinetune run-ft --ft=models/job.yaml seed=1"}
    png, md = write_report(run_dir, extra)
    assert (png, md) == (run_dir / "report.png", run_dir / "report.md")
    check_png(png)
    text = md.read_text(encoding="utf-8")
    for value in ("0.9125", "0.9087", "0.2411", "0.2843", "48.5", "61.7", "39.59"):  # final metrics, time, samples/s
        assert value in text, value
    assert "676,610 of 23,390,210 (2.89 %)" in text
    assert "1,536 MiB" in text
    assert "2,000" in text  # tokens/s = 97,000 / 48.5
    assert "llmfinetune run-ft --ft=models/job.yaml seed=1" in text
    assert "16 / 32 / 0.1" in text and "query, value" in text  # LoRA r / alpha / dropout, targets
    assert "| learning rate | 0.001 |" in text
    assert "| world size (processes) | 2 |" in text and "| 64 |" in text
    assert "](report.png)" in text
    assert "n/a" not in text


def test_maskedlm_run_reports_perplexity(tmp_path):
    run_dir = maskedlm_run(tmp_path)
    png, md = write_report(run_dir, {"peak_rss_mib": 900.0})
    check_png(png)
    text = md.read_text(encoding="utf-8")
    assert "eval_perplexity" in text and "18.73" in text and "2.93" in text
    assert "| trainable / total parameters | n/a |" in text
    assert "| train tokens/s | n/a |" in text
    assert f"llmfinetune run-ft --ft={run_dir / 'job.yaml'}" in text


def test_single_point_run_without_eval_or_extra(tmp_path):
    run_dir = single_point_run(tmp_path)
    png, md = write_report(run_dir)
    check_png(png)
    text = md.read_text(encoding="utf-8")
    assert "0.7012" in text and "3.2" in text
    assert "no evaluation recorded" in text
    for row in ("trainable / total parameters", "peak memory (RSS, rank 0)", "train tokens/s"):
        assert f"| {row} | n/a |" in text
    assert f"llmfinetune run-ft --ft={run_dir / 'job.yaml'}" in text
    assert "| max_steps | 5 |" in text


def test_old_run_perplexity_derived_and_missing_files(tmp_path):
    """An old maskedlm run: no metrics.json, no job.yaml task info beyond the task, perplexity only as a loss."""
    run_dir = maskedlm_run(tmp_path)
    (run_dir / "metrics.json").unlink()
    png, md = write_report(run_dir)
    check_png(png)
    text = md.read_text(encoding="utf-8")
    assert "exp of eval_loss" in text and "18.73" in text  # exp(2.93) = 18.73
    assert "metrics.json not found" in text
    assert "| world size (processes) | n/a |" in text


def test_not_a_run_directory(tmp_path):
    with pytest.raises(UserError, match="run directory"):
        write_report(tmp_path)
    with pytest.raises(UserError, match="not a directory"):
        write_report(tmp_path / "missing")


def test_peak_rss_mib():
    assert 1.0 < peak_rss_mib() < 1024 * 1024


def test_per_step_logs_with_token_counts_are_curves_not_the_summary(tmp_path):
    """With include_num_input_tokens_seen every per-step log carries train_runtime too (as the real workflow logs)."""
    from llmfinetune.report import curves, load_run

    run_dir = classification_run(tmp_path)
    state_file = run_dir / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for entry in state["log_history"]:
        if "loss" in entry:
            entry.update({"num_input_tokens_seen": 1000 * entry["step"], "train_runtime": entry["step"] / 2,
                          "train_tokens_per_second": 2000.0})
    state_file.write_text(json.dumps(state))
    c = curves(load_run(run_dir))
    assert len(c.train_loss.steps) == 6 and len(c.learning_rate.steps) == 6
    assert len(c.eval_loss.steps) == 3
