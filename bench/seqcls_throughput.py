"""Training throughput of the default job vs a plain transformers + peft script doing the same work, in one run.

    python bench/seqcls_throughput.py [--steps 30] [--data data/demo/reviews] [--columns text] [--device auto]
    python bench/seqcls_throughput.py --data ../shared/datasets/glue/mrpc --columns sentence1 sentence2

Both sides train all-MiniLM-L6-v2 with the same LoRA settings, batch size, learning rate, max_length, step count and
training rows. Baseline A is what a user writes from the transformers examples (run_glue.py pads every example to
max_length by default) with Trainer + peft; baseline B is the same with dynamic padding; ours is
`llmfinetune.workflow.run` on the default job file (dynamic padding to a multiple of 8, length-grouped batches).
Every side trains on the same device: --device auto (the default) picks CUDA when present, else the CPU.
The last lines printed are samples/s of each and the ratios ours / baseline.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from devices import choose_device  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEFAULT_JOB = REPO / "models" / "ft--sequenceclassification--all-MiniLM-L6-v2-lora.yaml"



def ours(args, out: Path) -> tuple[float, float]:
    from llmfinetune.config import load_job
    from llmfinetune.workflow import run

    base = "ft_config.train_config.base_config"
    job = load_job(DEFAULT_JOB, [
        f"ft_config.data_config.local_path={args.data}",
        f"ft_config.data_config.input_columns=[{', '.join(args.columns)}]",
        f"{base}.max_steps={args.steps}", f"{base}.output_dir={out}",
        f"{base}.eval_strategy=no", f"{base}.save_strategy=no", f"{base}.use_cpu={args.device == 'cpu'}",
    ])
    result = run(job)
    return result.metrics["train_samples_per_second"], result.metrics["train_loss"]


def baseline(args, out: Path, dynamic_padding: bool) -> tuple[float, float]:
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from llmfinetune.data import load_raw_splits
    from llmfinetune.config import load_job
    from llmfinetune.models import packaged_model_dir

    recipe = yaml.safe_load(DEFAULT_JOB.read_text())["ft_config"]["train_config"]
    base, lora = recipe["base_config"], recipe["lora_config"]
    # The same rows as ours (same files, same hold-out rule), loaded once.
    job = load_job(DEFAULT_JOB, [f"ft_config.data_config.local_path={args.data}"])
    train = load_raw_splits(job)["train"]
    labels = sorted(set(train["label"]))
    path = packaged_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(path)

    def encode(batch):
        encoded = tokenizer(*[batch[c] for c in args.columns], truncation=True,
                            padding=False if dynamic_padding else "max_length", max_length=int(base["max_length"]))
        encoded["labels"] = [labels.index(v) for v in batch["label"]]
        return encoded

    train = train.map(encode, batched=True, remove_columns=train.column_names)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=lora["r"], lora_alpha=lora["lora_alpha"],
                                             lora_dropout=lora["lora_dropout"], target_modules=lora["target_modules"]))
    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=base["per_device_train_batch_size"],
        learning_rate=float(base["learning_rate"]), max_steps=args.steps, weight_decay=base["weight_decay"],
        warmup_steps=base["warmup_steps"], save_strategy="no", eval_strategy="no", report_to="none",
        use_cpu=args.device == "cpu", logging_steps=10, seed=base["seed"],
    )
    collator = DataCollatorWithPadding(tokenizer) if dynamic_padding else None
    result = Trainer(model=model, args=training_args, train_dataset=train, data_collator=collator).train()
    return result.metrics["train_samples_per_second"], result.metrics["train_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--data", default=str(REPO / "data" / "demo" / "reviews"))
    parser.add_argument("--columns", nargs="+", default=["text"])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args()
    args.device = choose_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        padded_sps, padded_loss = baseline(args, Path(tmp) / "padded", dynamic_padding=False)
        dynamic_sps, dynamic_loss = baseline(args, Path(tmp) / "dynamic", dynamic_padding=True)
        ours_sps, ours_loss = ours(args, Path(tmp) / "ours")
        elapsed = time.time() - started
    print(f"\nseqcls throughput, {args.steps} steps on {args.data}, every side on {args.device} "
          f"({elapsed:.0f} s in all)")
    print(f"baseline A (transformers + peft, padding=max_length as run_glue.py): {padded_sps:.2f} samples/s, "
          f"mean train loss {padded_loss:.4f}")
    print(f"baseline B (transformers + peft, dynamic padding):                  {dynamic_sps:.2f} samples/s, "
          f"mean train loss {dynamic_loss:.4f}")
    print(f"llmfinetune (default job):                                          {ours_sps:.2f} samples/s, "
          f"mean train loss {ours_loss:.4f}")
    print(f"ratio ours / baseline A: {ours_sps / padded_sps:.2f}x")
    print(f"ratio ours / baseline B: {ours_sps / dynamic_sps:.2f}x")


if __name__ == "__main__":
    main()
