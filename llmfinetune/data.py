"""Raw splits from a local folder, explicit files or a hub dataset; the task turns them into model inputs."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from .errors import UserError, first_line, root_cause

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from .config import Job

logger = logging.getLogger(__name__)

SPLIT_FILE_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
TRAIN_SPLIT = "train"


def response_from_validation_column(job: Job, split_names: Iterable[str] = ()) -> str | None:
    """The response column that `validation_column` names, if it names one. The seed's text-generation files put the
    response column there (when no response_column is given); a value that names an existing split names the eval
    split instead, as it does for every other task."""
    data = job.data
    if job.task != "text-generation" or data.response_column or not data.validation_column:
        return None
    return None if data.validation_column in split_names else data.validation_column


def eval_split_name(job: Job, split_names: Iterable[str] = ()) -> str:
    """The eval split: the one `validation_column` names, unless that names the response column (see above)."""
    named = job.data.validation_column
    if named and response_from_validation_column(job, split_names) is None:
        return named
    return "validation"


def split_files(job: Job) -> dict[str, Path]:
    """The files that hold each split; empty for a hub dataset."""
    data = job.data
    if data.train_file or data.validation_file:
        files = {}
        if data.train_file:
            files[TRAIN_SPLIT] = job.resolve_input_path(data.train_file, "ft_config.data_config.train_file")
        if data.validation_file:
            files[eval_split_name(job)] = job.resolve_input_path(data.validation_file, "ft_config.data_config.validation_file")
        return files
    folder_key, folder = ("local_path", data.local_path) if data.local_path else ("data_path", data.data_path)
    if folder is None:
        raise UserError(
            f"{job.source}: ft_config.data_config needs a data source: ft_config.data_config.local_path (a folder of "
            "split files), train_file/validation_file, or data_path (a hub dataset name)."
        )
    if folder_key == "data_path":
        local = _existing_path(job, folder)
        if local is None:
            return {}  # a hub dataset
        if data.subset and (local / data.subset).is_dir():
            local = local / data.subset
    else:
        local = job.resolve_input_path(folder, f"ft_config.data_config.{folder_key}")
    if local.is_file():
        return {TRAIN_SPLIT: local}
    files = {}
    for path in sorted(local.iterdir()):
        if path.suffix in SPLIT_FILE_FORMATS and path.is_file():
            if path.stem in files:
                raise UserError(f"{local}: two files for split '{path.stem}' ({files[path.stem].name}, {path.name}); keep one.")
            files[path.stem] = path
    if not files:
        raise UserError(
            f"ft_config.data_config.{folder_key}: folder {local} holds no split files. Expected files named by split, "
            f"e.g. train.parquet, validation.jsonl (formats: {', '.join(SPLIT_FILE_FORMATS)})."
        )
    return files


def _existing_path(job: Job, value: str) -> Path | None:
    try:
        return job.resolve_input_path(value, "ft_config.data_config.data_path")
    except UserError:
        return None


def load_raw_splits(job: Job) -> DatasetDict:
    from datasets import DatasetDict

    files = split_files(job)
    if files:
        splits = DatasetDict({name: _load_file(path) for name, path in files.items()})
    else:
        splits = _load_hub(job)
    if TRAIN_SPLIT not in splits:
        raise UserError(f"{_where(job)}: no '{TRAIN_SPLIT}' split; found splits: {', '.join(splits) or 'none'}.")
    if job.data.num_row and job.data.num_row > 0:
        splits = DatasetDict({k: d.select(range(min(job.data.num_row, len(d)))) for k, d in splits.items()})
    for name, split in splits.items():
        if len(split) == 0:
            raise UserError(f"{_where(job)}: split '{name}' is empty.")
    return _ensure_eval_split(job, splits)


def _ensure_eval_split(job: Job, splits: DatasetDict) -> DatasetDict:
    name = eval_split_name(job, splits)
    named = job.data.validation_column
    if job.task == "text-generation" and not job.data.response_column and named in splits \
            and named in splits[TRAIN_SPLIT].column_names:
        logger.warning("ft_config.data_config.validation_column: '%s' is both a split and a column of the train "
                       "split; taken as the eval split. To read the column as the response instead, set "
                       "response_column: %s.", named, named)
    if name in splits:
        return splits
    if named and name == named and name != "validation":
        raise UserError(
            f"ft_config.data_config.validation_column: eval split '{name}' not found; splits found: {', '.join(splits)}."
        )
    train = splits[TRAIN_SPLIT]
    if len(train) < 2:
        raise UserError(f"{_where(job)}: the train split has {len(train)} row; at least 2 are needed to hold one out for evaluation.")
    seed = int(job.base_config.get("seed", 42))
    held = train.train_test_split(test_size=job.data.validation_fraction, seed=seed)
    logger.info("No '%s' split: holding out %d of %d train rows (validation_fraction=%s, seed=%d).",
                name, len(held["test"]), len(train), job.data.validation_fraction, seed)
    splits[TRAIN_SPLIT] = held["train"]
    splits[name] = held["test"]
    return splits


def _where(job: Job) -> str:
    data = job.data
    return str(data.local_path or data.train_file or data.data_path or job.source)


def _load_file(path: Path) -> Dataset:
    from datasets import Dataset

    kind = SPLIT_FILE_FORMATS.get(path.suffix)
    if kind is None:
        raise UserError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(SPLIT_FILE_FORMATS)}.")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty.")
    if kind == "json":
        _check_json_file(path)
    elif kind == "csv":
        _check_utf8(path)
    if not _has_rows(path, kind):
        raise UserError(f"{path}: has no rows; a split needs at least one.")
    try:
        if kind == "parquet":
            return Dataset.from_parquet(str(path))
        if kind == "csv":
            return Dataset.from_csv(str(path))
        return Dataset.from_json(str(path))
    except Exception as exc:  # datasets/pyarrow raise many types for unreadable files
        cause = root_cause(exc)
        if isinstance(cause, UnicodeDecodeError):
            raise UserError(f"{path}: not UTF-8 text ({cause.reason} at byte {cause.start}).") from None
        raise UserError(f"{path}: could not read as {kind}: {type(cause).__name__}: "
                        f"{first_line(cause) if str(cause).strip() else ''}") from exc


def _has_rows(path: Path, kind: str) -> bool:
    if kind == "parquet":
        import pyarrow.parquet

        try:
            return pyarrow.parquet.ParquetFile(path).metadata.num_rows > 0
        except Exception:
            return True  # unreadable: let the loader name the problem
    with path.open("rb") as handle:
        lines = (line for line in handle if line.strip())
        if kind == "csv":
            next(lines, None)  # the header
        return next(lines, None) is not None


def _check_utf8(path: Path) -> None:
    """datasets logs a CSV's decode error and raises a generic one; say it plainly, with the byte offset."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {offset + exc.start}).") from None
            offset += len(chunk)


def _check_json_file(path: Path) -> None:
    """Name the exact line of a malformed JSON-lines file; pyarrow only says 'JSON parse error'."""
    with path.open("rb") as handle:
        head = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()[:1]
    if head == b"[" and _one_json_array(path):
        return  # pyarrow reports a broken array well enough
    for _ in read_jsonl(path):
        pass


def _one_json_array(path: Path) -> bool:
    """Whether a file starting with '[' holds one JSON array: its first line opens one that goes on, or is the
    file's only line. A first line that is a whole value with more lines after it is a row of JSON lines."""
    with path.open("r", encoding="utf-8-sig", errors="replace") as handle:
        lines = (line for line in handle if line.strip())
        first, after = next(lines, ""), next(lines, None)
    if after is None:
        return True  # not parsed here: an array on one line may be the whole (large) file, which datasets parses
    try:
        json.loads(first)
    except ValueError:
        return True
    return False


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for every non-blank line; a malformed line is an error naming it."""
    with path.open("r", encoding="utf-8-sig") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{number}: malformed JSON line ({exc.msg} at column {exc.colno}).") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}.")
                yield number, row
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None


def _load_hub(job: Job) -> DatasetDict:
    from datasets import load_dataset

    data = job.data
    try:
        return load_dataset(data.data_path, data.subset)
    except Exception as exc:
        raise UserError(
            f"ft_config.data_config.data_path: could not load dataset '{data.data_path}'"
            f"{' subset ' + repr(data.subset) if data.subset else ''} from a local folder or the Hugging Face hub "
            f"({type(exc).__name__}: {first_line(exc, 200)}). Offline, point local_path at a folder of split "
            "files (train.parquet, validation.jsonl, ...) or set train_file/validation_file."
        ) from exc


def require_columns(split: Dataset, columns: list[str], key: str, split_name: str) -> None:
    missing = [c for c in columns if c not in split.column_names]
    if missing:
        raise UserError(
            f"ft_config.data_config.{key}: column(s) {', '.join(missing)} not in split '{split_name}'; "
            f"columns found: {', '.join(split.column_names)}."
        )
