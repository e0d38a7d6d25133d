"""Causal-LM SFT throughput: llmfinetune vs a plain transformers Trainer + peft script on the same job, in one run.

    python bench/sft_throughput.py [--steps 50] [--data ../shared/datasets/AdvertiseGen] [--bf16-steps N]
                                   [--device auto|cpu|cuda]

The job (issue #4): a random-init Qwen2-shaped model of ~27M parameters (hidden 512, 8 layers, 8 heads, 2 KV heads,
intermediate 1408, byte-level BPE vocabulary of ~8000 trained here on the data), AdvertiseGen as prompt -> response
(generated text when ../shared is absent), LoRA r=8 on q/v, batch 8, max_length 256. Each contender runs in its own
process (clean peak RSS) and reports non-pad tokens/s of its training loop (Trainer's train_runtime), peak RSS, its
last-10-step train loss and the loss of the trained model on the same 128 held-out examples.

Contenders: the plain baseline in fp32 and in bf16 (autocast); ours (packing without cross-example attention, LM head
on learned positions only) with 8 packed rows per step, and ours-accum2 with the same 8 rows per optimizer step as
2 micro-batches of 4 (half the activation memory).
Every contender trains on the same device: --device auto (the default) picks CUDA when present, else the CPU.
On a CPU without native bf16 (no avx512_bf16/AMX) a bf16 step is ~100x slower; the bf16 baseline then runs
--bf16-steps steps only (a rate, not a final loss). The last lines printed are the ratios ours / each baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from devices import choose_device, native_bf16  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED = REPO.parent / "shared" / "datasets" / "AdvertiseGen"
BATCH, MAX_LENGTH, LORA_R, LEARNING_RATE, EVAL_EXAMPLES = 8, 256, 8, 1e-3, 128
# ours-accum2: the same 8 packed rows per optimizer step, as 2 micro-batches of 4 (half the activation memory).
# ours-bf16: ours at the precision the bf16 baseline uses; run by default only where the CPU has native bf16.
CONTENDERS = ["baseline-fp32", "baseline-bf16", "ours", "ours-accum2", "ours-bf16"]


# ---------------------------------------------------------------- the job: data, tokenizer, model

def build(workdir: Path, data: Path | None) -> None:
    rows = _rows(data)
    random.Random(0).shuffle(rows)
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[EVAL_EXAMPLES:]), ("validation", rows[:EVAL_EXAMPLES])):
        with open(workdir / "data" / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in part)
    _tokenizer(rows).save_pretrained(workdir / "model")
    _model(workdir / "model")


def _rows(data: Path | None) -> list[dict]:
    if data is not None and data.is_dir():
        rows = []
        for path in sorted(data.glob("*.json*")):
            rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [{"prompt": row["content"], "response": row["summary"]} for row in rows]
    # No shared data: attribute lists and descriptions of similar lengths, made up from a fixed vocabulary.
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    return [{"prompt": "*".join(f"{rng.choice(words)}#{rng.choice(words)}" for _ in range(rng.randint(3, 10))),
             "response": " ".join(rng.choice(words) for _ in range(rng.randint(40, 120)))} for _ in range(1500)]


def _tokenizer(rows):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator((text for row in rows for text in (row["prompt"], row["response"])), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=1024)


def _model(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=2, intermediate_size=1408, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)


# ---------------------------------------------------------------- contenders (each in its own process)

def encode_plain(tokenizer, row) -> dict:
    """Prompt, newline, response, EOS; loss on the response and EOS (what ours does with its plain template)."""
    prompt = tokenizer(row["prompt"] + "\n")["input_ids"]
    response = tokenizer(row["response"])["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + response)[:MAX_LENGTH]
    labels = ([-100] * len(prompt) + response)[:MAX_LENGTH]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


class CountingCollator:
    """Counts real (non-pad) tokens the same way for every contender: the unpadded length of each feature, per
    batch. The first `steps` batches are the ones trained on (the data loader may fetch one more ahead, and the
    final evaluation reuses the collator)."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, features):
        self.batches.append(sum(len(f["input_ids"]) for f in features))
        return self.inner(features)

    def bind_to(self, model, n_gpu: int = 1) -> None:
        """Our packing collator learns its layout (rows or one flattened row) from the model's attention."""
        self.inner.bind_to(model, n_gpu)

    def trained_tokens(self, steps: int) -> int:
        return sum(self.batches[:steps])


def held_out_loss(model, tokenizer, workdir: Path) -> float:
    """Token-weighted mean loss of the trained model on the same held-out examples, unpacked, for every side."""
    import torch

    rows = [json.loads(line) for line in (workdir / "data" / "validation.jsonl").read_text().splitlines()]
    total, count = 0.0, 0
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for row in rows:
            example = encode_plain(tokenizer, row)
            labels = torch.tensor([example["labels"]], device=device)
            logits = model(input_ids=torch.tensor([example["input_ids"]], device=device)).logits.float()
            losses = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100,
                                                       reduction="sum")
            total += float(losses)
            count += int((labels[0, 1:] != -100).sum())
    return total / count



def baseline(workdir: Path, steps: int, bf16: bool, device: str) -> dict:
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    train = load_dataset("json", data_files=str(workdir / "data" / "train.jsonl"), split="train")
    train = train.map(lambda row: encode_plain(tokenizer, row), remove_columns=train.column_names)
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    args = TrainingArguments(output_dir=str(workdir / f"baseline-{'bf16' if bf16 else 'fp32'}"), max_steps=steps,
                             per_device_train_batch_size=BATCH, learning_rate=LEARNING_RATE, logging_steps=1,
                             save_strategy="no", report_to="none", use_cpu=device == "cpu", bf16=bf16, seed=42,
                             remove_unused_columns=False, dataloader_drop_last=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    result = trainer.train()
    return _summary(result.metrics["train_runtime"], collator.trained_tokens(steps), trainer.state.log_history,
                    held_out_loss(trainer.model, tokenizer, workdir) if not bf16 or steps >= 10 else None)


def ours(workdir: Path, steps: int, device: str, rows: int = BATCH, accumulation: int = 1,
         bf16: bool = False) -> dict:
    from llmfinetune.config import parse_job
    from llmfinetune.tasks.causal_lm import CausalLM
    from llmfinetune.workflow import run

    counters = []
    original = CausalLM.collator

    def counted(self, tokenizer, job):
        counters.append(CountingCollator(original(self, tokenizer, job)))
        return counters[-1]

    CausalLM.collator = counted
    job = parse_job({
        "model_config": {"model_id": str(workdir / "model")},
        "ft_config": {
            "ft_task": "text-generation", "ft_method": "lora",
            "data_config": {"local_path": str(workdir / "data"), "template": "plain"},
            "train_config": {
                "lora_config": {"r": LORA_R, "lora_alpha": 2 * LORA_R, "lora_dropout": 0.0,
                                "target_modules": ["q_proj", "v_proj"]},
                "base_config": {"output_dir": str(workdir / "ours"), "max_steps": steps,
                                "per_device_train_batch_size": rows, "gradient_accumulation_steps": accumulation,
                                "learning_rate": LEARNING_RATE,
                                "max_length": MAX_LENGTH, "packing": True, "logging_steps": 1,
                                "save_strategy": "no", "eval_strategy": "no", "seed": 42, "bf16": bf16,
                                "dataloader_drop_last": True, "use_cpu": device == "cpu"},
            },
        },
    })
    result = run(job)
    from transformers import AutoTokenizer

    state = json.loads((workdir / "ours" / "trainer_state.json").read_text())
    return _summary(result.metrics["train_runtime"], counters[0].trained_tokens(steps * accumulation),
                    state["log_history"],
                    held_out_loss(result.model, AutoTokenizer.from_pretrained(workdir / "model"), workdir))


def _summary(runtime: float, tokens: int, history: list[dict], eval_loss) -> dict:
    from llmfinetune.report import peak_rss_mib

    losses = [entry["loss"] for entry in history if "loss" in entry]
    return {"tokens_per_second": tokens / runtime, "tokens": tokens, "seconds": runtime,
            "peak_rss_mib": peak_rss_mib(), "last_train_loss": sum(losses[-10:]) / len(losses[-10:]),
            "held_out_loss": eval_loss}


# ---------------------------------------------------------------- driver

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--data", type=Path, default=SHARED if SHARED.is_dir() else None)
    parser.add_argument("--bf16-steps", type=int, default=None,
                        help="steps of the bf16 baseline (default: --steps with native bf16, else 3)")
    parser.add_argument("--only", choices=CONTENDERS, action="append")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where every contender trains (auto: CUDA when present, else the CPU)")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:  # a child process: run one contender, print its JSON summary last
        steps, device = args.steps, args.device  # the driver's decision, passed to every contender
        if args.contender == "ours":
            summary = ours(args.workdir, steps, device)
        elif args.contender == "ours-bf16":
            summary = ours(args.workdir, steps, device, bf16=True)
        elif args.contender == "ours-accum2":
            summary = ours(args.workdir, steps, device, rows=BATCH // 2, accumulation=2)
        else:
            summary = baseline(args.workdir, steps, bf16=args.contender == "baseline-bf16", device=device)
        print("RESULT " + json.dumps(summary), flush=True)
        return

    device = choose_device(args.device)
    bf16_steps = args.bf16_steps or (args.steps if native_bf16(device) else 3)
    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp:
        workdir = Path(tmp)
        build(workdir, args.data)
        print(f"data: {args.data or 'generated text'}; model and tokenizer built in {workdir}; every contender "
              f"on {device}", flush=True)
        results = {}
        default = [n for n in CONTENDERS if n != "ours-bf16" or native_bf16(device)]
        for name in args.only or default:
            steps = bf16_steps if name.endswith("bf16") else args.steps
            output = subprocess.run([sys.executable, __file__, "--contender", name, "--workdir", str(workdir),
                                     "--steps", str(steps), "--device", device], capture_output=True, text=True,
                                    env={**os.environ, "LLMFINETUNE_CACHE": str(workdir / "cache")})
            line = next((l for l in output.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{name} failed:\n{output.stdout[-3000:]}\n{output.stderr[-3000:]}")
            results[name] = {**json.loads(line[len("RESULT "):]), "steps": steps}
            print(f"{name}: {json.dumps(results[name])}", flush=True)

    print(f"\n{'contender':<16} {'steps':>5} {'tokens/s':>9} {'peak RSS MiB':>12} {'train loss':>10} "
          f"{'held-out loss':>13}")
    for name, r in results.items():
        held = f"{r['held_out_loss']:.4f}" if r["held_out_loss"] is not None else "-"
        print(f"{name:<16} {r['steps']:>5} {r['tokens_per_second']:>9.1f} {r['peak_rss_mib']:>12.0f} "
              f"{r['last_train_loss']:>10.4f} {held:>13}")
    baselines = {n: r for n, r in results.items() if n.startswith("baseline")}
    for mine in (n for n in results if n.startswith("ours")):
        for name, base in baselines.items():
            print(f"ratio {mine} / {name}: {results[mine]['tokens_per_second'] / base['tokens_per_second']:.2f}x")
    for mine in (n for n in results if n.startswith("ours")):
        if baselines:
            best = max(r["tokens_per_second"] for r in baselines.values())
            print(f"ratio {mine} / best baseline: {results[mine]['tokens_per_second'] / best:.2f}x")


if __name__ == "__main__":
    main()
