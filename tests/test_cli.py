"""The command line as users run it: help is instant (no torch), mistakes print one `error:` line and exit 2."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate")


def run_cli(*args: str, python_flags: tuple[str, ...] = (), script: str | None = None, timeout: int = 120):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONIOENCODING": "utf-8"}
    entry = [script] if script else ["-m", "llmfinetune"]
    return subprocess.run([sys.executable, *python_flags, *entry, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def imported_modules(importtime_stderr: str) -> set[str]:
    """Top-level module names from `python -X importtime` output (`import time: self | cumulative | name`)."""
    names = set()
    for line in importtime_stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", line)
        if match:
            names.add(match.group(1).split(".")[0])
    return names


def write_job(folder: Path, data_config: dict, model_id: str = "m", **extra_ft) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw = {"model_config": {"model_id": model_id},
           "ft_config": {"ft_task": "sequenceclassification", "data_config": data_config, **extra_ft}}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------ help


@pytest.mark.parametrize("args, expected", [
    (("--help",), ["run-ft", "check", "--version"]),
    (("run-ft", "--help"), ["--ft FILE", "--deepspeed JSON", "KEY.PATH=VALUE", "--debug"]),
    (("check", "--help"), ["--ft FILE", "--debug"]),
])
def test_help_exits_0_without_importing_torch(args, expected):
    result = run_cli(*args, python_flags=("-X", "importtime"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: llmfinetune")
    for fragment in expected:
        assert fragment in result.stdout
    modules = imported_modules(result.stderr)
    assert "argparse" in modules  # the parsing works: importtime output was really read
    assert not modules & set(HEAVY), f"help imported {sorted(modules & set(HEAVY))}"


def test_repo_root_script_help():
    result = run_cli("run-ft", "--help", script="llm_finetune.py")
    assert result.returncode == 0 and "--ft FILE" in result.stdout


def test_no_command_prints_help():
    result = run_cli()
    assert result.returncode == 0 and "run-ft" in result.stdout


def test_version():
    from llmfinetune import __version__

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == __version__


def test_config_errors_are_reported_before_torch_is_imported(tmp_path):
    path = write_job(tmp_path, {"locl_path": "x"})
    code = (
        "import sys, io, contextlib\n"
        "from llmfinetune.cli import main\n"
        "err = io.StringIO()\n"
        "with contextlib.redirect_stderr(err):\n"
        f"    rc = main(['check', '--ft', {str(path)!r}])\n"
        "print(rc, [m for m in " + repr(HEAVY) + " if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.strip() == "2 []", result.stderr[-2000:]


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("command", ["run-ft", "check"])
def test_unknown_key_exits_2_with_one_error_line(tmp_path, command):
    path = write_job(tmp_path, {"locl_path": "x"})
    result = run_cli(command, f"--ft={path}")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "unknown key 'ft_config.data_config.locl_path'" in result.stderr
    assert "Did you mean 'local_path'?" in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_debug_shows_the_traceback(tmp_path):
    path = write_job(tmp_path, {"locl_path": "x"})
    result = run_cli("run-ft", "--ft", str(path), "--debug")
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "llmfinetune.errors.UserError" in result.stderr
    assert "ft_config.data_config.locl_path" in result.stderr


def test_missing_job_file(tmp_path):
    result = run_cli("run-ft", f"--ft={tmp_path / 'absent.yaml'}")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --ft: job file '{tmp_path / 'absent.yaml'}' not found")
    assert "Traceback" not in result.stderr


def test_yaml_syntax_error_position(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model_config:\n  model_id: a: b\n", encoding="utf-8")
    result = run_cli("check", f"--ft={path}")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {path}:2:14: YAML syntax error")


def test_bad_override_on_the_command_line(tmp_path):
    path = write_job(tmp_path, {"local_path": "x"})
    result = run_cli("run-ft", f"--ft={path}", "model_config.model_id.revision=main")
    assert result.returncode == 2
    assert "'model_config.model_id' is a value, not a section" in result.stderr
    assert "Traceback" not in result.stderr


def test_override_value_is_validated(tmp_path):
    """Overrides are applied before validation, so a bad override value is reported like a bad file value."""
    path = write_job(tmp_path, {"local_path": "x"})
    result = run_cli("check", f"--ft={path}", "ft_config.data_config.num_row=lots")
    assert result.returncode == 2
    assert "key 'ft_config.data_config.num_row'" in result.stderr and "'lots'" in result.stderr


def test_check_on_missing_data_path_names_it(tmp_path):
    """Model resolution passes (a local folder with config.json), then the data path is the first problem."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    path = write_job(tmp_path / "jobs", {"local_path": "no/such/folder"}, model_id=str(model))
    result = run_cli("check", f"--ft={path}")
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1
    assert "ft_config.data_config.local_path" in error_lines[0]
    assert "path 'no/such/folder' does not exist" in error_lines[0]
    assert str(REPO / "no" / "such" / "folder") in error_lines[0]
    assert str(tmp_path / "jobs" / "no" / "such" / "folder") in error_lines[0]
    assert "Traceback" not in result.stderr
    assert "OK:" not in result.stdout
