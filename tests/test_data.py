"""Raw splits from local folders and files: formats, num_row, the held-out eval split, and errors that name the file."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from llmfinetune.config import load_job
from llmfinetune.data import eval_split_name, load_raw_splits, require_columns, split_files
from llmfinetune.errors import UserError


def make_job(folder: Path, data: dict, task: str = "sequenceclassification", base: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    raw = {"model_config": {"model_id": "m"},
           "ft_config": {"ft_task": task, "data_config": data, "train_config": {"base_config": base or {}}}}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_job(path)


def rows(prefix: str, n: int) -> list[dict]:
    return [{"text": f"{prefix}{i}", "label": i % 2} for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records).to_parquet(path)
    return path


def write_csv(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records).to_csv(path, index=False)
    return path


def load_error(job) -> str:
    with pytest.raises(UserError) as info:
        load_raw_splits(job)
    return str(info.value)


@pytest.fixture
def mixed(tmp_path) -> Path:
    folder = tmp_path / "mixed"
    write_parquet(folder / "train.parquet", rows("t", 10))
    write_csv(folder / "validation.csv", rows("v", 4))
    (folder / "README.md").write_text("not a split")
    return folder


# ------------------------------------------------------------------ formats and sources


def test_local_folder_with_mixed_formats(tmp_path, mixed):
    splits = load_raw_splits(make_job(tmp_path, {"local_path": str(mixed)}))
    assert sorted(splits) == ["train", "validation"]
    assert list(splits["train"]["text"]) == [f"t{i}" for i in range(10)]
    assert list(splits["validation"]["text"]) == [f"v{i}" for i in range(4)]
    assert list(splits["validation"]["label"]) == [0, 1, 0, 1]


def test_json_lines_with_json_and_jsonl_suffixes(tmp_path):
    folder = tmp_path / "d"
    write_jsonl(folder / "train.json", rows("t", 5))
    write_jsonl(folder / "validation.jsonl", rows("v", 3))
    splits = load_raw_splits(make_job(tmp_path, {"local_path": str(folder)}))
    assert list(splits["train"]["text"]) == ["t0", "t1", "t2", "t3", "t4"]
    assert list(splits["validation"]["text"]) == ["v0", "v1", "v2"]


def test_json_array_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows("t", 4)), encoding="utf-8")
    job = make_job(tmp_path, {"train_file": str(path), "validation_fraction": 0.25})
    splits = load_raw_splits(job)
    assert len(splits["train"]) == 3 and len(splits["validation"]) == 1


def test_json_array_file_with_leading_whitespace(tmp_path):
    path = tmp_path / "train.json"
    path.write_text("\n" + json.dumps(rows("t", 4), indent=2), encoding="utf-8")
    splits = load_raw_splits(make_job(tmp_path, {"train_file": str(path), "validation_fraction": 0.25}))
    assert len(splits["train"]) + len(splits["validation"]) == 4


def test_json_lines_with_utf8_bom(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(("\ufeff" + "".join(json.dumps(r) + "\n" for r in rows("t", 4))).encode("utf-8"))
    splits = load_raw_splits(make_job(tmp_path, {"train_file": str(path), "validation_fraction": 0.25}))
    assert len(splits["train"]) + len(splits["validation"]) == 4


def test_train_and_validation_files(tmp_path):
    train = write_jsonl(tmp_path / "a" / "mine.jsonl", rows("t", 6))
    dev = write_csv(tmp_path / "b" / "dev.csv", rows("v", 2))
    job = make_job(tmp_path / "jobs", {"train_file": str(train), "validation_file": str(dev)})
    assert split_files(job) == {"train": train, "validation": dev}
    splits = load_raw_splits(job)
    assert list(splits["train"]["text"]) == [f"t{i}" for i in range(6)]
    assert list(splits["validation"]["text"]) == ["v0", "v1"]


def test_validation_file_goes_to_the_named_eval_split(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rows("t", 6))
    dev = write_jsonl(tmp_path / "dev.jsonl", rows("v", 2))
    job = make_job(tmp_path, {"train_file": str(train), "validation_file": str(dev), "validation_column": "dev"})
    assert eval_split_name(job) == "dev"
    assert sorted(load_raw_splits(job)) == ["dev", "train"]


def test_relative_files_are_found_beside_the_job_file(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "jobs" / "data" / "train.jsonl", rows("t", 4))
    write_jsonl(tmp_path / "jobs" / "data" / "validation.jsonl", rows("v", 2))
    job = make_job(tmp_path / "jobs", {"local_path": "data"})
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert split_files(job) == {"train": (tmp_path / "jobs" / "data" / "train.jsonl").resolve(),
                                "validation": (tmp_path / "jobs" / "data" / "validation.jsonl").resolve()}


def test_seed_layout_data_path_and_subset_folder(tmp_path, monkeypatch):
    """The seed's `data_path: glue, subset: mrpc` with the data in glue/mrpc/ is read locally, not from the hub."""
    write_parquet(tmp_path / "glue" / "mrpc" / "train.parquet", rows("t", 5))
    write_parquet(tmp_path / "glue" / "mrpc" / "validation.parquet", rows("v", 2))
    monkeypatch.chdir(tmp_path)
    job = make_job(tmp_path, {"data_path": "glue", "subset": "mrpc"})
    splits = load_raw_splits(job)
    assert {k: len(v) for k, v in splits.items()} == {"train": 5, "validation": 2}


def test_local_path_pointing_at_one_file_is_the_train_split(tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", rows("t", 10))
    job = make_job(tmp_path, {"local_path": str(path)})
    assert split_files(job) == {"train": path}


def test_no_data_source_at_all(tmp_path):
    job = make_job(tmp_path, {"num_row": 5})
    with pytest.raises(UserError, match=r"job\.yaml: ft_config\.data_config needs a data source: "
                                         r"ft_config\.data_config\.local_path .*train_file/validation_file, or data_path"):
        split_files(job)


# ------------------------------------------------------------------ num_row


def test_num_row_takes_first_rows_of_each_split(tmp_path, mixed):
    splits = load_raw_splits(make_job(tmp_path, {"local_path": str(mixed), "num_row": 3}))
    assert list(splits["train"]["text"]) == ["t0", "t1", "t2"]
    assert list(splits["validation"]["text"]) == ["v0", "v1", "v2"]


def test_num_row_larger_than_split(tmp_path, mixed):
    splits = load_raw_splits(make_job(tmp_path, {"local_path": str(mixed), "num_row": 6}))
    assert (len(splits["train"]), len(splits["validation"])) == (6, 4)


@pytest.mark.parametrize("num_row", [0, -1])
def test_num_row_zero_or_minus_one_means_all(tmp_path, mixed, num_row):
    splits = load_raw_splits(make_job(tmp_path, {"local_path": str(mixed), "num_row": num_row}))
    assert (len(splits["train"]), len(splits["validation"])) == (10, 4)


# ------------------------------------------------------------------ held-out eval split


def test_missing_validation_split_is_held_out_reproducibly(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", rows("t", 20))
    job = make_job(tmp_path, {"local_path": str(tmp_path / "d"), "validation_fraction": 0.25})
    first, second = load_raw_splits(job), load_raw_splits(job)
    assert (len(first["train"]), len(first["validation"])) == (15, 5)
    assert list(first["validation"]["text"]) == list(second["validation"]["text"])
    assert list(first["train"]["text"]) == list(second["train"]["text"])
    together = list(first["train"]["text"]) + list(first["validation"]["text"])
    assert sorted(together) == sorted(f"t{i}" for i in range(20))


def test_held_out_rows_follow_the_seed(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", rows("t", 40))
    held = {}
    for seed in (1, 2):
        job = make_job(tmp_path / f"s{seed}", {"local_path": str(tmp_path / "d")}, base={"seed": seed})
        held[seed] = load_raw_splits(job)["validation"]["text"]
    assert len(held[1]) == len(held[2]) == 4
    assert held[1] != held[2]


def test_too_few_rows_to_hold_out(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", rows("t", 1))
    message = load_error(make_job(tmp_path, {"local_path": str(tmp_path / "d")}))
    assert "the train split has 1 row; at least 2 are needed" in message


def test_validation_column_naming_a_missing_split(tmp_path, mixed):
    message = load_error(make_job(tmp_path, {"local_path": str(mixed), "validation_column": "dev"}))
    assert message == ("ft_config.data_config.validation_column: eval split 'dev' not found; "
                       "splits found: train, validation.")


def _sft_folder(folder: Path, splits: dict[str, int], extra_column: str | None = None) -> Path:
    for name, count in splits.items():
        write_jsonl(folder / f"{name}.jsonl", [{"prompt": f"{name}{i}", "response": f"r{i}",
                                                 **({extra_column: f"s{i}"} if extra_column else {})}
                                                for i in range(count)])
    return folder


def test_text_generation_validation_column_naming_a_split_is_the_eval_split(tmp_path, caplog):
    """The seed's text-generation files name the response column in validation_column; a value naming an existing
    split is the eval split instead (not 10% of train held out)."""
    from llmfinetune.data import response_from_validation_column
    from llmfinetune.tasks.chat import format_columns

    folder = _sft_folder(tmp_path / "d", {"train": 10, "test": 3})
    job = make_job(tmp_path, {"local_path": str(folder), "validation_column": "test"}, task="text-generation")
    splits = load_raw_splits(job)
    assert {k: len(v) for k, v in splits.items()} == {"train": 10, "test": 3}
    assert eval_split_name(job, splits) == "test" and response_from_validation_column(job, splits) is None
    # The response column is then found as usual, not taken from validation_column.
    assert format_columns(job, splits["train"].column_names, splits).response == "response"
    assert "validation_column" not in caplog.text  # not ambiguous: nothing to say


def test_text_generation_validation_column_naming_a_column_is_the_response(tmp_path):
    from llmfinetune.data import response_from_validation_column
    from llmfinetune.tasks.chat import format_columns

    folder = _sft_folder(tmp_path / "d", {"train": 10}, extra_column="summary")
    job = make_job(tmp_path, {"local_path": str(folder), "validation_column": "summary"}, task="text-generation")
    splits = load_raw_splits(job)
    assert {k: len(v) for k, v in splits.items()} == {"train": 9, "validation": 1}  # held out, as in the seed
    assert eval_split_name(job, splits) == "validation"
    assert response_from_validation_column(job, splits) == "summary"
    assert format_columns(job, splits["train"].column_names, splits).response == "summary"


def test_text_generation_validation_column_naming_a_split_and_a_column_says_which(tmp_path, caplog):
    folder = _sft_folder(tmp_path / "d", {"train": 6, "summary": 2}, extra_column="summary")
    job = make_job(tmp_path, {"local_path": str(folder), "validation_column": "summary"}, task="text-generation")
    with caplog.at_level("WARNING"):
        splits = load_raw_splits(job)
    assert eval_split_name(job, splits) == "summary" and sorted(splits) == ["summary", "train"]
    lines = [r.getMessage() for r in caplog.records if "validation_column" in r.getMessage()]
    assert lines == ["ft_config.data_config.validation_column: 'summary' is both a split and a column of the train "
                     "split; taken as the eval split. To read the column as the response instead, set "
                     "response_column: summary."]


def test_validation_column_naming_an_existing_split(tmp_path):
    folder = tmp_path / "d"
    write_jsonl(folder / "train.jsonl", rows("t", 4))
    write_jsonl(folder / "test.jsonl", rows("x", 2))
    splits = load_raw_splits(make_job(tmp_path, {"local_path": str(folder), "validation_column": "test"}))
    assert sorted(splits) == ["test", "train"] and list(splits["test"]["text"]) == ["x0", "x1"]


# ------------------------------------------------------------------ errors


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": 1}\n{"text": "c", "label": \n',
                    encoding="utf-8")
    message = load_error(make_job(tmp_path, {"train_file": str(path)}))
    assert message.startswith(f"{path}:4: malformed JSON line")


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"text": "a"}\n["b"]\n', encoding="utf-8")
    message = load_error(make_job(tmp_path, {"train_file": str(path)}))
    assert message == f"{path}:2: expected a JSON object per line, got list."


def test_json_lines_whose_first_line_is_an_array(tmp_path):
    """A first line starting with '[' is not always a JSON array file: here it is a whole row of its own (found by
    tests/test_fuzz_inputs.py), and the error names it as for any other line."""
    path = tmp_path / "train.jsonl"
    path.write_text('[1, 2]\n{"text": "a"}\n', encoding="utf-8")
    message = load_error(make_job(tmp_path, {"train_file": str(path)}))
    assert message == f"{path}:1: expected a JSON object per line, got list."


@pytest.mark.parametrize("name", ["train.jsonl", "train.csv", "train.parquet", "train.json"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    assert load_error(make_job(tmp_path, {"train_file": str(path)})) == f"{path}: file is empty."


@pytest.mark.parametrize("name, content", [("train.csv", "text,label\n"), ("train.jsonl", "\n\n"), ("train.parquet", None)])
def test_file_without_rows_says_so(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        pd.DataFrame({"text": pd.Series([], dtype=str), "label": pd.Series([], dtype=int)}).to_parquet(path)
    else:
        path.write_text(content, encoding="utf-8")
    message = load_error(make_job(tmp_path, {"train_file": str(path)}))
    assert str(path) in message
    assert "no rows" in message or "empty" in message


def test_folder_without_split_files(tmp_path):
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "readme.txt").write_text("x")
    (folder / "train.txt").write_text("x")
    message = load_error(make_job(tmp_path, {"local_path": str(folder)}))
    assert message.startswith(f"ft_config.data_config.local_path: folder {folder} holds no split files.")
    assert "train.parquet" in message and ".parquet, .json, .jsonl, .csv" in message


def test_missing_train_split(tmp_path):
    folder = tmp_path / "d"
    write_jsonl(folder / "validation.jsonl", rows("v", 3))
    write_jsonl(folder / "test.jsonl", rows("x", 3))
    assert load_error(make_job(tmp_path, {"local_path": str(folder)})) == (
        f"{folder}: no 'train' split; found splits: test, validation.")


def test_only_validation_file_given(tmp_path):
    dev = write_jsonl(tmp_path / "dev.jsonl", rows("v", 3))
    message = load_error(make_job(tmp_path, {"validation_file": str(dev)}))
    assert "no 'train' split; found splits: validation." in message


def test_two_files_for_one_split(tmp_path):
    folder = tmp_path / "d"
    write_jsonl(folder / "train.jsonl", rows("t", 3))
    write_csv(folder / "train.csv", rows("t", 3))
    message = load_error(make_job(tmp_path, {"local_path": str(folder)}))
    assert message == f"{folder}: two files for split 'train' (train.csv, train.jsonl); keep one."


def test_missing_local_path_names_both_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = make_job(tmp_path / "jobs", {"local_path": "no/such/dir"})
    message = load_error(job)
    assert "ft_config.data_config.local_path" in message and "path 'no/such/dir' does not exist" in message
    assert str(tmp_path / "no" / "such" / "dir") in message
    assert str(tmp_path / "jobs" / "no" / "such" / "dir") in message


def test_non_utf8_json_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes('{"text": "caf\u00e9", "label": 0}\n'.encode("latin-1"))
    message = load_error(make_job(tmp_path, {"train_file": str(path)}))
    assert message.startswith(f"{path}: not UTF-8 text")
    assert "at byte 13" in message


def test_non_utf8_csv_names_the_file_and_the_byte(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("text,label\ncaf\u00e9,0\nbar,1\n".encode("latin-1"))
    # The é (0xe9) is byte 14: the header is 11 bytes, then "caf".
    assert load_error(make_job(tmp_path, {"train_file": str(path)})) == (
        f"{path}: not UTF-8 text (invalid continuation byte at byte 14).")


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_text("this is not parquet")
    message = load_error(make_job(tmp_path, {"train_file": str(path)}))
    assert message.startswith(f"{path}: could not read as parquet: ArrowInvalid")


def test_unsupported_train_file_suffix(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello\n")
    message = load_error(make_job(tmp_path, {"train_file": str(path)}))
    assert message == f"{path}: unsupported file type '.txt'; use one of .parquet, .json, .jsonl, .csv."


def test_require_columns_lists_columns_found():
    from datasets import Dataset

    split = Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "label": [0]})
    require_columns(split, ["sentence1", "label"], "input_columns", "train")  # present: no error
    with pytest.raises(UserError) as info:
        require_columns(split, ["sentence", "label", "idx"], "input_columns", "validation")
    assert str(info.value) == ("ft_config.data_config.input_columns: column(s) sentence, idx not in split "
                               "'validation'; columns found: sentence1, sentence2, label.")
