"""Shared fixtures: tiny random models and small datasets made on the spot, so tests need no hub and no ../shared."""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# fp32 unless a test asks for bf16: exact comparisons must not depend on the CPU kind (test_precision.py covers the
# default's decision and the bf16 loss trajectories).
os.environ["LLMFINETUNE_AUTO_PRECISION"] = "0"


@pytest.fixture(scope="session", autouse=True)
def tokenized_cache(tmp_path_factory) -> Path:
    """Tests never read or fill the user's tokenization cache; subprocess runs inherit the variable."""
    folder = tmp_path_factory.mktemp("tokenized-cache")
    os.environ["LLMFINETUNE_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from scripts.make_tiny_models import make_tiny_bert, make_tiny_causal_lm

    root = tmp_path_factory.mktemp("tiny")
    return {"bert": make_tiny_bert(root / "bert"), "qwen2": make_tiny_causal_lm(root / "qwen2")}


@pytest.fixture(scope="session")
def encoder_only_bert(tiny_models, tmp_path_factory) -> Path:
    """The tiny BERT saved without its task heads, as sentence encoders (MiniLM) are published."""
    from transformers import AutoModel, AutoTokenizer

    folder = tmp_path_factory.mktemp("bert-encoder")
    AutoModel.from_pretrained(tiny_models["bert"]).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_models["bert"]).save_pretrained(folder)
    return folder


def set_at(raw: dict, dotted: str, value) -> dict:
    """raw['a']['b']['c'] = value for 'a.b.c', making sections on the way; returns raw."""
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return raw


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = ["great", "lovely", "excellent", "superb", "wonderful"]
BAD = ["awful", "terrible", "boring", "horrible", "dreadful"]
NOUNS = ["film", "meal", "hotel", "phone", "book", "concert"]


def classification_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        word = rng.choice(GOOD if positive else BAD)
        rows.append({"text": f"the {rng.choice(NOUNS)} was {word}", "label": "pos" if positive else "neg"})
    return rows


def tagging_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    people, places = ["Anna Berg", "Tom Okafor", "Lea Park"], ["Paris", "New York", "Lima"]
    rows = []
    for _ in range(n):
        person, place = rng.choice(people).split(), rng.choice(places).split()
        tokens = person + ["flew", "to"] + place + ["."]
        tags = ["B-PER"] + ["I-PER"] * (len(person) - 1) + ["O", "O", "B-LOC"] + ["I-LOC"] * (len(place) - 1) + ["O"]
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


def text_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(NOUNS + GOOD + BAD) for _ in range(rng.randint(8, 30)))} for _ in range(n)]


def sft_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        rows.append({"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."})
    return rows


TASK_DATA = {
    "sequenceclassification": (classification_rows, "bert"),
    "tokenclassification": (tagging_rows, "bert"),
    "maskedlm": (text_rows, "bert"),
    "text-generation": (sft_rows, "qwen2"),
}


def make_dataset(folder: Path, task: str, train_rows: int = 48, eval_rows: int = 16) -> Path:
    rows = TASK_DATA[task][0]
    write_jsonl(folder / "train.jsonl", rows(train_rows, 1))
    write_jsonl(folder / "validation.jsonl", rows(eval_rows, 2))
    return folder


def logged_losses(run_dir: Path) -> list[float]:
    """The train losses a run logged (its trainer_state.json), in order."""
    state = json.loads((Path(run_dir) / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def job_dict(task: str, method: str, model: Path, data: Path, output_dir: Path, **base) -> dict:
    config = {
        "model_config": {"model_id": str(model)},
        "ft_config": {
            "ft_task": task,
            "ft_method": method,
            "data_config": {"local_path": str(data)},
            "train_config": {
                "base_config": {
                    "output_dir": str(output_dir),
                    "max_steps": 4,
                    "per_device_train_batch_size": 4,
                    "per_device_eval_batch_size": 8,
                    "learning_rate": 5e-3,
                    "max_length": 64,
                    "save_steps": 2,
                    **base,
                }
            },
        },
    }
    if method == "lora":
        config["ft_config"]["train_config"]["lora_config"] = {"r": 4, "lora_alpha": 8}
    return config


@pytest.fixture(params=["native", "avx2", "avx512-without-bf16"])
def c_kernels(request, monkeypatch):
    """The package's C kernels (native.library) as this machine builds them, their AVX2 build (8-float vectors: what
    an AVX2-only machine runs) and, on an AVX-512 CPU with avx512_bf16, their build without it (what an AVX-512 CPU
    without bf16 dot products runs: bf16 attention widened to fp32), each checked to be the build it names; skipped
    where there are none."""
    from llmfinetune import native

    if native.library() is None:
        pytest.skip("the package's C kernels are not used here (no AVX2, no GCC, or torch not on libgomp)")
    best = native.torch_capability()
    has_bf16_pairs = best == "AVX512" and " avx512_bf16" in native._cpu_flags()
    if request.param == "avx2":  # as ATEN_CPU_CAPABILITY=avx2 holds torch's kernels to it
        monkeypatch.setattr(native, "torch_capability", lambda: "AVX2")
    if request.param == "avx512-without-bf16":
        if not has_bf16_pairs:
            pytest.skip("the native build is the AVX-512 build without bf16 pairs here (or there is none)")
        monkeypatch.setitem(native.ISA_FLAGS, "AVX512", [*native.ISA_FLAGS["AVX512"], "-mno-avx512bf16"])
    native.library.cache_clear()
    library = native.library()
    assert library.packed_attention_vector_width() == (16 if best == "AVX512" and request.param != "avx2" else 8)
    assert library.packed_attention_bf16_pairs() == int(has_bf16_pairs and request.param == "native")
    yield library
    monkeypatch.undo()
    native.library.cache_clear()
