"""Tokenized data, made once and reused: keyed by a hash of the raw data's content, the tokenizer, the settings that
shape tokenization and the code that tokenizes. Under several processes on one machine a file lock lets one process
tokenize while the others wait for it without a timeout (a barrier would time out on a large dataset), then read
its result.

The cache lives in $LLMFINETUNE_CACHE, else ~/.cache/llmfinetune/tokenized; deleting it is always safe.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import DatasetDict

    from .config import Job
    from .tasks.base import Prepared, Task

logger = logging.getLogger(__name__)

CACHE_LAYOUT = 1  # bump when the saved layout changes
# Our own base_config keys (arguments.OWN_KEYS) that do not change what tokenizing produces. Every other own key is
# part of the cache key (max_length, packing, whole_word_mask's offsets, and any key added later): a needless miss
# costs a re-tokenization, a wrong hit trains on the wrong data. TrainingArguments fields never reach tokenization.
NOT_TOKENIZATION_KEYS = ("checkpoints_output_dir", "resume_from_checkpoint", "save_on_interrupt",
                         "mlm_probability", "lm_head_on_targets_only", "last_layer_cls_only")
# Libraries whose version can change the tokens made from the same text, or how the saved datasets read back.
VERSIONED = ("transformers", "tokenizers", "datasets")
DONE = "complete.json"


def cache_root() -> Path:
    configured = os.environ.get("LLMFINETUNE_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmfinetune" / "tokenized"


def prepare_cached(task: "Task", splits: "DatasetDict", eval_split: str, tokenizer, job: "Job") -> "Prepared":
    from filelock import FileLock

    key = cache_key(task, splits, eval_split, tokenizer, job)
    folder = cache_root() / key
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / DONE).is_file():
            logger.info("Tokenized data: reusing the cache %s", folder)
            return _load(folder)
        prepared = task.prepare(splits, eval_split, tokenizer, job)
        try:
            _save(prepared, folder)
            logger.info("Tokenized data cached in %s", folder)
        except (OSError, TypeError, ValueError) as exc:  # a cache that cannot be written must not stop training
            shutil.rmtree(folder, ignore_errors=True)
            logger.warning("Could not cache the tokenized data in %s (%s); continuing without the cache.", folder,
                           exc)
        return prepared


def cache_key(task: "Task", splits: "DatasetDict", eval_split: str, tokenizer, job: "Job") -> str:
    digest = hashlib.sha256()
    for label, value in key_material(task, eval_split, tokenizer, job):
        digest.update(label.encode())
        digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    for name in sorted(splits):
        digest.update(f"split:{name}".encode())
        digest.update(_content_fingerprint(splits[name]).encode())
    return digest.hexdigest()[:32]


def key_material(task: "Task", eval_split: str, tokenizer, job: "Job") -> list[tuple[str, Any]]:
    """Everything but the data's content that the cache key covers: what tokenizes, with which settings, by which
    code and library versions."""
    import importlib

    from . import __version__
    from .arguments import OWN_KEYS

    data = {k: v for k, v in job.data.model_dump().items() if k != "cache_tokenized"}
    base = {k: job.base_config.get(k) for k in sorted(OWN_KEYS) if k not in NOT_TOKENIZATION_KEYS}
    return [
        ("layout", [CACHE_LAYOUT, __version__, task.name, eval_split]),
        ("versions", {name: importlib.import_module(name).__version__ for name in VERSIONED}),
        ("code", _code_fingerprint()),
        ("settings", {"data": data, "model": {"max_input_words": job.model.max_input_words,
                                              "add_special_tokens": job.model.add_special_tokens},
                      "base": base}),
        ("tokenizer", _tokenizer_fingerprint(tokenizer)),
    ]


def _code_fingerprint() -> str:
    """The tokenizing code itself: a changed task file must not reuse data tokenized by the old one."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted([*(here / "tasks").glob("*.py"), here / "packing.py"]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([type(tokenizer).__name__, tokenizer.special_tokens_map, tokenizer.model_max_length,
                              getattr(tokenizer, "chat_template", None)], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _content_fingerprint(split) -> str:
    """The split's rows, serialised batch by batch (Arrow IPC): the same content always gives the same bytes."""
    import pyarrow as pa

    digest = hashlib.sha256()
    for table in split.with_format("arrow").iter(batch_size=10_000):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.combine_chunks())
        digest.update(sink.getvalue())
    digest.update(str(len(split)).encode())
    return digest.hexdigest()


def _save(prepared: "Prepared", folder: Path) -> None:
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    prepared.train.save_to_disk(str(partial / "train"))
    prepared.eval.save_to_disk(str(partial / "eval"))
    (partial / "model_kwargs.json").write_text(json.dumps(prepared.model_kwargs), encoding="utf-8")
    (partial / DONE).write_text(json.dumps({"train": len(prepared.train), "eval": len(prepared.eval)}),
                                encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def _load(folder: Path) -> "Prepared":
    from datasets import load_from_disk

    from .tasks.base import Prepared

    kwargs = json.loads((folder / "model_kwargs.json").read_text(encoding="utf-8"))
    if "id2label" in kwargs:  # JSON keys are strings; transformers wants the class ids as ints
        kwargs["id2label"] = {int(k): v for k, v in kwargs["id2label"].items()}
    return Prepared(load_from_disk(str(folder / "train")), load_from_disk(str(folder / "eval")), kwargs)
