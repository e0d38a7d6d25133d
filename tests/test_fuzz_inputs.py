"""Property-based: broken variants of valid job files and data files, fed to `llmfinetune check` in process.

Every variant must end with exit code 2 (a UserError, not a crash), one `error:` message naming the offending key,
file or row, and no traceback. `check` loads no model weights (only the tokenizer), so each case is fast. The
variants start from three valid jobs: sequence classification on JSON lines, the same on CSV, and causal-LM SFT on
JSON lines. Together the tests below run more than a thousand cases.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import classification_rows, job_dict, set_at, sft_rows, write_jsonl

BASE = "ft_config.train_config.base_config"
LORA = "ft_config.train_config.lora_config"
DATA = "ft_config.data_config"
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ the valid starting points


def _write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_models):
    """name -> (job dict, data folder, text columns, label column); each one passes `check`."""
    import datasets.config

    root = tmp_path_factory.mktemp("fuzz")
    # datasets caches every file it reads; keep the thousand variants out of the user's cache.
    saved_cache = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = root / "datasets-cache"
    seq_jsonl, seq_csv, sft = root / "seq_jsonl", root / "seq_csv", root / "sft"
    write_jsonl(seq_jsonl / "train.jsonl", classification_rows(24, 1))
    write_jsonl(seq_jsonl / "validation.jsonl", classification_rows(8, 2))
    _write_csv(seq_csv / "train.csv", classification_rows(24, 1))
    _write_csv(seq_csv / "validation.csv", classification_rows(8, 2))
    write_jsonl(sft / "train.jsonl", sft_rows(24, 1))
    write_jsonl(sft / "validation.jsonl", sft_rows(8, 2))
    out = root / "run"
    found = {
        "seq_jsonl": (job_dict("sequenceclassification", "lora", tiny_models["bert"], seq_jsonl, out),
                      seq_jsonl, ["text"], "label"),
        "seq_csv": (job_dict("sequenceclassification", "full", tiny_models["bert"], seq_csv, out),
                    seq_csv, ["text"], "label"),
        "sft": (job_dict("text-generation", "lora", tiny_models["qwen2"], sft, out), sft, ["prompt", "response"], None),
    }
    for name, (job, *_rest) in found.items():
        code, output = check_job_dict(job, root / name)
        assert code == 0, f"the valid {name} job does not pass check:\n{output}"
    yield found
    datasets.config.HF_DATASETS_CACHE = saved_cache


def check(path: Path) -> tuple[int, str]:
    """`llmfinetune check --ft PATH` in this process: (exit code, stdout + stderr)."""
    from llmfinetune import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["check", "--ft", str(path)])
    return code, out.getvalue() + err.getvalue()


def check_job_dict(job: dict, folder: Path, text: str | None = None) -> tuple[int, str]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return check(path)


def assert_user_error(code: int, output: str, *names: str) -> None:
    """Exit 2, an `error:` message, no traceback, and the message names one of `names` whole: a full dotted key, a
    file path or FILE:LINE, a `split 'S', row N`. Whole means not inside a longer key, path or number, so a name
    cannot be found by accident in other words (`r` in "error", `row 1` in "row 12")."""
    assert "Traceback" not in output, output
    assert code == 2, f"exit code {code}, expected 2 (a UserError):\n{output}"
    message = output[output.index("error: "):] if "error: " in output else ""
    assert message, f"no 'error:' message:\n{output}"
    assert any(names_whole(message, name) for name in names), f"none of {names} named in:\n{message}"


def names_whole(message: str, name: str) -> bool:
    return re.search(rf"(?<![\w./-]){re.escape(name)}(?![\w]|\.\w)", message) is not None


def test_names_whole_is_not_fooled_by_parts_of_words():
    assert names_whole("error: key 'ft_config.train_config.lora_config.r': must be positive", f"{LORA}.r")
    assert not names_whole("error: ft_config.train_config.lora_config.rank is unknown", f"{LORA}.r")
    assert not names_whole("error: something is wrong", "r")
    assert not names_whole("error: split 'train', row 12: column 'text' is empty", "split 'train', row 1")
    assert names_whole("error: /data/train.jsonl:4: malformed JSON line", "/data/train.jsonl:4")
    assert not names_whole("error: /data/train.jsonl:41: malformed JSON line", "/data/train.jsonl:4")
    assert not names_whole("error: ft_config.data_config.local_path: missing", "data_config.local_path")


def drop_at(raw: dict, dotted: str) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[part]
    del node[parts[-1]]


@contextlib.contextmanager
def scratch():
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------ job files

words = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)
junk_text = st.one_of(words, st.text(min_size=1, max_size=12).filter(lambda t: t.strip() and not _numeric(t)))
structures = st.one_of(st.lists(st.integers(), min_size=1, max_size=3), st.dictionaries(words, st.integers(),
                                                                                        min_size=1, max_size=2))
negative = st.one_of(st.integers(max_value=-1), st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False))
not_positive = st.one_of(st.just(0), negative)
fraction_float = st.floats(min_value=0.01, max_value=0.99).filter(lambda v: not float(v).is_integer())
non_bool = st.one_of(st.integers(min_value=2), junk_text.filter(lambda t: t.lower() not in
                                                               ("true", "false", "yes", "no", "1", "0", "on", "off")),
                     structures)


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _not_a_number():
    return st.one_of(junk_text, structures, st.booleans())


def _nonsense_choice(valid: set[str]):
    return st.one_of(junk_text.filter(lambda t: t not in valid), st.integers(), structures)


# key -> strategy of values that are wrong for it, whatever the rest of the job says.
BAD_VALUES = {
    f"{BASE}.per_device_train_batch_size": st.one_of(not_positive, fraction_float, _not_a_number()),
    f"{BASE}.per_device_eval_batch_size": st.one_of(not_positive, fraction_float, _not_a_number()),
    f"{BASE}.gradient_accumulation_steps": st.one_of(not_positive, fraction_float, _not_a_number()),
    f"{BASE}.learning_rate": st.one_of(negative, _not_a_number()),
    f"{BASE}.weight_decay": st.one_of(negative, _not_a_number()),
    f"{BASE}.num_train_epochs": st.one_of(negative, _not_a_number()),
    f"{BASE}.warmup_steps": st.one_of(st.integers(max_value=-1), _not_a_number()),
    f"{BASE}.max_steps": st.one_of(st.integers(max_value=-2), st.just(0), fraction_float, _not_a_number()),
    f"{BASE}.save_steps": st.one_of(not_positive, _not_a_number()),
    f"{BASE}.logging_steps": st.one_of(not_positive, _not_a_number()),
    f"{BASE}.max_length": st.one_of(not_positive, fraction_float, st.integers(min_value=1025, max_value=10**9),
                                    _not_a_number()),
    f"{BASE}.seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32), _not_a_number()),
    f"{BASE}.warmup_ratio": st.one_of(negative, st.floats(min_value=1.001, max_value=1e6), _not_a_number()),
    f"{BASE}.adam_beta1": st.one_of(negative, st.floats(min_value=1, max_value=1e6), _not_a_number()),
    f"{BASE}.save_total_limit": st.one_of(not_positive, _not_a_number()),
    f"{BASE}.eval_strategy": _nonsense_choice({"no", "steps", "epoch"}),
    f"{BASE}.evaluation_strategy": _nonsense_choice({"no", "steps", "epoch"}),
    f"{BASE}.save_strategy": _nonsense_choice({"no", "steps", "epoch", "best"}),
    f"{BASE}.lr_scheduler_type": _nonsense_choice(set()),
    f"{BASE}.optim": _nonsense_choice(set()),
    f"{BASE}.report_to": junk_text.filter(lambda t: t not in ("none", "all", "tensorboard", "wandb", "mlflow")),
    f"{BASE}.fp16": non_bool,
    f"{BASE}.gradient_checkpointing": non_bool,
    f"{BASE}.save_on_interrupt": non_bool,
    f"{BASE}.mlm_probability": st.one_of(not_positive, st.floats(min_value=1, max_value=1e6), junk_text),
    f"{BASE}.resume_from_checkpoint": st.one_of(words.map(lambda w: f"/nonexistent/{w}"), structures),
    f"{LORA}.r": st.one_of(not_positive, fraction_float, _not_a_number()),
    f"{LORA}.lora_alpha": st.one_of(not_positive, _not_a_number()),
    f"{LORA}.lora_dropout": st.one_of(negative, st.floats(min_value=1, max_value=1e6), _not_a_number()),
    f"{LORA}.bias": _nonsense_choice({"none", "all", "lora_only"}),
    f"{LORA}.task_type": _nonsense_choice(set()),
    f"{LORA}.use_rslora": non_bool,
    f"{DATA}.num_row": st.one_of(st.integers(max_value=-2), fraction_float, _not_a_number()),
    f"{DATA}.validation_fraction": st.one_of(not_positive, st.floats(min_value=1, max_value=1e6), _not_a_number()),
    f"{DATA}.input_columns": st.one_of(st.lists(words.map(lambda w: "no_" + w), min_size=1, max_size=2),
                                       st.integers(), st.dictionaries(words, words, min_size=1, max_size=1)),
    f"{DATA}.local_path": st.one_of(words.map(lambda w: f"/nonexistent/{w}"), structures),
    f"{DATA}.validation_column": words.map(lambda w: "no_" + w),
    "model_config.model_id": st.one_of(words.map(lambda w: f"./no_such_model_{w}"), structures, st.integers()),
    "model_config.max_input_words": st.one_of(not_positive, _not_a_number()),
    "model_config.quantization_bit": st.one_of(st.integers().filter(lambda v: v not in (4, 8)), junk_text),
    "model_config.add_special_tokens": st.one_of(junk_text, st.lists(words, min_size=1, max_size=2)),
    "model_config.initialization.initializer.dtype": _nonsense_choice({"float32", "float16", "bfloat16", "auto"}),
    "ft_config.ft_task": _nonsense_choice({"sequenceclassification", "tokenclassification", "maskedlm",
                                           "text-generation"}),
    "ft_config.ft_method": _nonsense_choice({"full", "lora"}).filter(lambda v: v not in (0, "")),
    "scaling_config.num_workers": st.one_of(not_positive, _not_a_number()),
    "scaling_config.num_cpus_per_worker": st.one_of(not_positive, _not_a_number()),
}


@settings(FUZZ, max_examples=450)
@given(base=st.sampled_from(["seq_jsonl", "seq_csv", "sft"]), key_and_value=st.sampled_from(sorted(BAD_VALUES))
       .flatmap(lambda key: st.tuples(st.just(key), BAD_VALUES[key])))
def test_wrong_value_names_the_key(bases, base, key_and_value):
    key, value = key_and_value
    job = copy.deepcopy(bases[base][0])
    if key.startswith(LORA) and job["ft_config"]["ft_method"] != "lora":
        job["ft_config"]["ft_method"] = "lora"
        job["ft_config"]["train_config"]["lora_config"] = {"r": 4}
    set_at(job, key, value)
    with scratch() as folder:
        code, output = check_job_dict(job, folder)
    assert_user_error(code, output, key)


REQUIRED = ["model_config", "ft_config", "model_config.model_id", "ft_config.ft_task", "ft_config.data_config",
            f"{DATA}.local_path"]


@settings(FUZZ, max_examples=60)
@given(base=st.sampled_from(["seq_jsonl", "seq_csv", "sft"]),
       keys=st.lists(st.sampled_from(REQUIRED), min_size=1, max_size=3, unique=True))
def test_dropped_required_key_is_named(bases, base, keys):
    job = copy.deepcopy(bases[base][0])
    dropped = []
    for key in keys:
        try:
            drop_at(job, key)
            dropped.append(key)
        except KeyError:  # its section went already
            pass
    with scratch() as folder:
        code, output = check_job_dict(job, folder)
    assert_user_error(code, output, *dropped)


def _valid_keys(section: str) -> set[str]:
    from llmfinetune import arguments, config
    from llmfinetune.methods.lora import lora_fields

    if section == BASE:
        return set(arguments.training_argument_fields()) | set(arguments.SEED_ALIASES) | set(arguments.OWN_KEYS)
    if section == LORA:
        return set(lora_fields())
    model = config.Job
    for part in [p for p in section.split(".") if p]:
        field = next(f for n, f in model.model_fields.items() if part in (n, f.alias))
        model = next((a for a in (field.annotation, *getattr(field.annotation, "__args__", ()))
                      if isinstance(a, type) and issubclass(a, config.BaseModel)), None)
    return {f.alias or n for n, f in model.model_fields.items()} | set(model.model_fields)


SECTIONS = ["", "model_config", "model_config.initialization", "model_config.initialization.initializer",
            "ft_config", DATA, "ft_config.train_config", BASE, LORA, "scaling_config"]


@settings(FUZZ, max_examples=200)
@given(base=st.sampled_from(["seq_jsonl", "seq_csv", "sft"]), section=st.sampled_from(SECTIONS),
       key=st.from_regex(r"[a-zA-Z][a-zA-Z0-9_]{0,20}", fullmatch=True),
       value=st.one_of(st.integers(), st.booleans(), words, st.none()))
def test_unknown_key_is_named(bases, base, section, key, value):
    job = copy.deepcopy(bases[base][0])
    if section == LORA and job["ft_config"]["ft_method"] != "lora":
        job["ft_config"]["ft_method"] = "lora"
        job["ft_config"]["train_config"]["lora_config"] = {"r": 4}
    assume(key not in _valid_keys(section))
    set_at(job, f"{section}.{key}" if section else key, value)
    with scratch() as folder:
        code, output = check_job_dict(job, folder)
    assert_user_error(code, output, f"{section}.{key}" if section else key)


@settings(FUZZ, max_examples=120)
@given(base=st.sampled_from(["seq_jsonl", "seq_csv", "sft"]), cut=st.floats(min_value=0, max_value=1,
                                                                          exclude_max=True))
def test_truncated_job_file(bases, base, cut):
    """Cut anywhere before the end of the last value: the data folder comes last, so no cut leaves a valid job."""
    job, data_folder, *_ = bases[base]
    with scratch() as folder:
        # local_path relative to the job file's folder (absent from the working directory), on the last line.
        shutil.copytree(data_folder, folder / "fuzzdata_splits")
        full = _with_local_path_last(job, "fuzzdata_splits")
        assert full.endswith("local_path: fuzzdata_splits\n")
        body = full.rstrip("\n")
        code, output = check_job_dict(job, folder, body[:int(cut * (len(body) - 1))])
    # The job file, or the key left unfinished (pydantic's messages start with the file too).
    assert_user_error(code, output, str(folder / "job.yaml"), f"{DATA}.local_path", DATA, "model_config", "ft_config")


def _with_local_path_last(job: dict, local_path: str) -> str:
    """The job as YAML with ft_config.data_config.local_path on the very last line."""
    job = copy.deepcopy(job)
    ft = job.pop("ft_config")
    data = ft.pop("data_config")
    data.pop("local_path", None)
    text = yaml.safe_dump(job, sort_keys=False)
    text += yaml.safe_dump({"ft_config": ft}, sort_keys=False)
    data_text = yaml.safe_dump({"data_config": {**data, "local_path": local_path}}, sort_keys=False)
    text += "".join("  " + line + "\n" for line in data_text.splitlines())
    return text


@settings(FUZZ, max_examples=60)
@given(base=st.sampled_from(["seq_jsonl", "seq_csv", "sft"]), where=st.floats(min_value=0, max_value=1),
       garbage=st.sampled_from([b"\xff", b"\xc3\x28", b"\x80abc", b"\xe2\x82", b"\xed\xa0\x80"]))
def test_job_file_with_bytes_that_are_not_utf8(bases, base, where, garbage):
    raw = yaml.safe_dump(bases[base][0], sort_keys=False).encode()
    at = int(where * len(raw))
    with scratch() as folder:
        path = folder / "job.yaml"
        path.write_bytes(raw[:at] + garbage + raw[at:])
        code, output = check(path)
    assert_user_error(code, output, str(path))
    assert "not UTF-8" in output


# ------------------------------------------------------------------ data files

MUTATIONS = ["non_utf8", "truncate_line", "malformed_line", "drop_column", "drop_column_in_row", "null_text",
             "empty_text", "null_label", "structured_label", "empty_file", "header_only", "blank_lines"]


def _rows_of(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_rows(path: Path, rows: list[dict], columns: list[str]) -> None:
    if path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@settings(FUZZ, max_examples=330)
@given(base=st.sampled_from(["seq_jsonl", "seq_csv", "sft"]), split=st.sampled_from(["train", "validation"]),
       mutation=st.sampled_from(MUTATIONS), data=st.data())
def test_broken_data_file(bases, base, split, mutation, data):
    job, source, text_columns, label_column = copy.deepcopy(bases[base])
    is_csv = base == "seq_csv"
    if is_csv and mutation in ("malformed_line", "structured_label", "drop_column_in_row", "truncate_line"):
        mutation = data.draw(st.sampled_from(["drop_column", "null_text", "empty_text", "null_label", "non_utf8",
                                              "header_only", "empty_file"]), label="csv mutation")
    if label_column is None and mutation in ("null_label", "structured_label"):
        mutation = "null_text"
    with scratch() as folder:
        data_folder = folder / "data"
        shutil.copytree(source, data_folder)
        job["ft_config"]["data_config"]["local_path"] = str(data_folder)
        path = data_folder / f"{split}.{'csv' if is_csv else 'jsonl'}"
        rows = _rows_of(path)
        columns = list(rows[0])
        row = data.draw(st.integers(min_value=0, max_value=len(rows) - 1), label="row")
        column = data.draw(st.sampled_from(text_columns), label="column")
        expected: tuple[str, ...] = (str(path),)

        if mutation == "non_utf8":
            raw = path.read_bytes()
            at = data.draw(st.integers(min_value=0, max_value=len(raw)), label="byte")
            path.write_bytes(raw[:at] + data.draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\x80", b"\xfe\xfe"]))
                             + raw[at:])
        elif mutation == "truncate_line":
            lines = path.read_text(encoding="utf-8").splitlines()
            cut = data.draw(st.integers(min_value=1, max_value=len(lines[row]) - 1), label="cut")
            path.write_text("\n".join(lines[:row] + [lines[row][:cut]]) + "\n", encoding="utf-8")
            expected = (f"{path}:{row + 1}",)
        elif mutation == "malformed_line":
            lines = path.read_text(encoding="utf-8").splitlines()
            lines[row] = data.draw(st.sampled_from([
                lines[row][:-1], lines[row] + "}", lines[row] + ",", lines[row].replace('"', "'"), "[1, 2]", "42",
                '"a string"', "null", "nul", "{", lines[row].replace(":", "=", 1), lines[row] + lines[row],
            ]), label="line")
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            expected = (f"{path}:{row + 1}",)
        elif mutation == "drop_column":
            gone = data.draw(st.sampled_from(text_columns + ([label_column] if label_column else [])), label="gone")
            _write_rows(path, [{k: v for k, v in r.items() if k != gone} for r in rows], [c for c in columns
                                                                                          if c != gone])
            # The column and split, or (a column of the train split gone) the key that would name it.
            expected = (f"column(s) {gone} not in split '{split}'", f"{DATA}.input_columns", f"{DATA}.format")
        elif mutation == "drop_column_in_row":
            gone = data.draw(st.sampled_from(text_columns + ([label_column] if label_column else [])), label="gone")
            del rows[row][gone]
            _write_rows(path, rows, columns)
            expected = (f"split '{split}', row {row}",)
        elif mutation in ("null_text", "empty_text"):
            rows[row][column] = None if mutation == "null_text" else data.draw(st.sampled_from(["", " ", "\t", "  \n"]))
            _write_rows(path, rows, columns)
            expected = (f"split '{split}', row {row}",)
        elif mutation == "null_label":
            rows[row][label_column] = None if not is_csv else ""
            _write_rows(path, rows, columns)
            expected = (f"split '{split}', row {row}",)
        elif mutation == "structured_label":
            rows[row][label_column] = data.draw(st.one_of(st.lists(st.integers(), max_size=2),
                                                          st.dictionaries(words, st.integers(), max_size=1)))
            _write_rows(path, rows, columns)
            expected = (str(path), f"split '{split}', row {row}")
        elif mutation == "empty_file":
            path.write_bytes(b"")
        elif mutation == "header_only":
            path.write_text(",".join(columns) + "\n" if is_csv else "\n\n", encoding="utf-8")
        elif mutation == "blank_lines":
            path.write_text("\n" * data.draw(st.integers(min_value=1, max_value=5)), encoding="utf-8")
        code, output = check_job_dict(job, folder)
    assert_user_error(code, output, *expected)


# ------------------------------------------------------------------ what the fuzzer found, kept as plain tests
# Before the fixes each of these passed `check` (exit 0) or crashed with a bare exception (exit 1).


@pytest.mark.parametrize("key, value, named", [
    (f"{BASE}.eval_strategy", "sometimes", f"{BASE}.eval_strategy: expected one of: no, steps, epoch, got 'sometimes'"),
    (f"{BASE}.report_to", "nowhere", f"{BASE}.report_to: unknown integration 'nowhere'"),
    (f"{BASE}.max_length", "long", f"{BASE}.max_length: expected a whole number, got 'long'"),
    (f"{BASE}.seed", -1, f"{BASE}.seed: must be a number from 0 to"),
    (f"{BASE}.max_steps", 0, f"{BASE}.max_steps: must be -1 (train num_train_epochs epochs) or at least 1, got 0"),
    (f"{BASE}.resume_from_checkpoint", "/nonexistent/ckpt", f"{BASE}.resume_from_checkpoint: checkpoint folder"),
    (f"{LORA}.lora_dropout", 2, f"{LORA}.lora_dropout: must be a number from 0 to 1 (excluded), got 2"),
    (f"{LORA}.bias", "some", f"{LORA}.bias: expected one of: none, all, lora_only, got 'some'"),
    (f"{DATA}.num_row", True, "key 'ft_config.data_config.num_row': Value error, expected a number, not true/false"),
    (f"{DATA}.label_column", "stars",
     f"{DATA}.label_column: column(s) stars not in split 'train'; columns found: text, label"),
])
def test_found_by_fuzzing_job_values(bases, tmp_path, key, value, named):
    job = copy.deepcopy(bases["seq_jsonl"][0])
    set_at(job, key, value)
    code, output = check_job_dict(job, tmp_path)
    assert_user_error(code, output, named)


def test_found_by_fuzzing_a_list_label_names_the_row(bases, tmp_path):
    job, source, *_ = copy.deepcopy(bases["seq_jsonl"])
    shutil.copytree(source, tmp_path / "data")
    rows = _rows_of(tmp_path / "data" / "train.jsonl")
    rows[3]["label"] = []
    _write_rows(tmp_path / "data" / "train.jsonl", rows, ["text", "label"])
    job["ft_config"]["data_config"]["local_path"] = str(tmp_path / "data")
    code, output = check_job_dict(job, tmp_path)
    assert_user_error(code, output, "split 'train', row 3: label [] in column 'label' is a list")


def test_found_by_fuzzing_seed_response_column_missing(bases, tmp_path):
    job = copy.deepcopy(bases["sft"][0])
    set_at(job, f"{DATA}.validation_column", "summary")
    code, output = check_job_dict(job, tmp_path)
    assert_user_error(code, output, f"{DATA}.validation_column names the response column 'summary'")
