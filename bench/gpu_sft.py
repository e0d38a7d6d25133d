"""SFT on a GPU: tokens/s and MFU of llmfinetune on a ~0.5B Qwen2-shaped model, full and LoRA, per attention path.

    python bench/gpu_sft.py [--steps 40] [--data ../shared/datasets/AdvertiseGen] [--only NAME,NAME]
                            [--peak-tflops 790] [--size 0.5b|27m|tiny] [--skip-check] [--contender-timeout 300]

The job (issue #12, GPU part): the SFT peer bench's job (bench/peer_llamafactory.py: AdvertiseGen as alpaca rows in
ChatML, byte-level BPE of 8000 tokens trained on the data, packing, lr 5e-4 cosine, seed 42) on a random-init model
of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocabulary 151936, tied
embeddings: 494M parameters), in bf16 (full: bf16 weights with fp32 masters in the optimizer, master_weights.py;
LoRA: bf16 base, fp32 adapters). Contenders, each in its own process:
- full / LoRA (r 8 on q_proj,v_proj) with the default attention: the packed row in torch's variable-length flash
  kernel (packing.py's _varlen_flash), 8 rows of 4096 tokens a step (~27.5k non-pad tokens) and the issue's 8 x 256;
- full with fp32 weights under bf16 autocast (the path before master_weights.py), with 12 and 16 rows of 4096, and
  with base_config.torch_compile (TrainingArguments' whole-model torch.compile);
- full with the same data through SDPA once per example (the path before the varlen kernel; bench-only switch).
Before them, the packed row's logits under the varlen kernel are compared with every example run alone.

Reported: non-pad tokens/s after the first 10 steps (compilation and warm-up left out), MFU = 6 x parameters x
tokens/s over --peak-tflops (790: the bf16 matrix rate measured on this workplace's H200; the issue's formula, which
counts the LM head at every position although ours runs it at learned positions only, and counts weight gradients
that LoRA does not compute), peak GPU memory, train losses. Needs CUDA for the 0.5B model; --size 27m (the CPU peer bench's model) and tiny run on a CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from peer_llamafactory import OURS_DRIVER, QWEN2_27M, SHARED, build_assets, our_job, run_contender  # noqa: E402

SHAPES = {
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
             "rope_theta": 1000000.0},
    "27m": QWEN2_27M,  # the CPU peer bench's model: --size 27m measures the same contenders on a CPU
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 4096},
}
# The bench-only switch back to SDPA once per example (the flattened row's attention before the varlen kernel).
PER_EXAMPLE_SWITCH = '''
import os
if os.environ.get("BENCH_SDPA_PER_EXAMPLE") == "1":
    import llmfinetune.packing
    llmfinetune.packing.VARLEN_FLASH_DEVICES = ()
'''
BASE = "ft_config.train_config.base_config."
FP32_WEIGHTS = ["model_config.initialization.initializer.dtype=float32"]
COMPILED = [f"{BASE}torch_compile=true"]
LIGER = [f"{BASE}use_liger_kernel=true"]  # Liger's Triton RMSNorm, SwiGLU and rotary kernels (pip liger-kernel)
WORKERS = [f"{BASE}dataloader_num_workers=2"]  # the batches read and packed in 2 processes ahead of the step
# name: (method, rows a step, row length, attention once per example, job overrides), in the order they run.
CONTENDERS = {
    "full varlen 8x4096": ("full", 8, 4096, False, []),
    "full fp32-weights 8x4096": ("full", 8, 4096, False, FP32_WEIGHTS),
    "full varlen 12x4096": ("full", 12, 4096, False, []),
    "full varlen 16x4096": ("full", 16, 4096, False, []),
    "full compiled 8x4096": ("full", 8, 4096, False, COMPILED),
    "full compiled 12x4096": ("full", 12, 4096, False, COMPILED),
    "full liger 8x4096": ("full", 8, 4096, False, LIGER),
    "full workers 8x4096": ("full", 8, 4096, False, WORKERS),
    "lora varlen 8x4096": ("lora", 8, 4096, False, []),
    "full per-example-sdpa 8x4096": ("full", 8, 4096, True, []),
    "full varlen 8x256": ("full", 8, 256, False, []),
    "full fp32-weights 8x256": ("full", 8, 256, False, FP32_WEIGHTS),
    "lora varlen 8x256": ("lora", 8, 256, False, []),
}


def isolation_check(work: Path, device: str = "cuda") -> str:
    """Every example's logits in one packed row under the varlen kernel against the example alone (plain SDPA), on
    the bench model in bf16: the largest difference over the logits' scale."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmfinetune import packing
    from llmfinetune.packing import FLATTENED, PackedCollator, use_segmented_sdpa

    kernel, parameters = packing._varlen_attention()
    calls = []
    if kernel is not None:  # count the kernel's calls: a silent fallback to SDPA per example would pass the check too
        packing._varlen_attention = lambda: ((lambda *a, **k: calls.append(1) or kernel(*a, **k)), parameters)

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").to(device).eval()
    rows = json.loads((work / "data" / "train.json").read_text(encoding="utf-8"))[:12]
    examples = [tokenizer(row["instruction"] + row["output"])["input_ids"] for row in rows]
    packed = {"input_ids": [t for ids in examples for t in ids], "labels": [t for ids in examples for t in ids],
              "position_ids": [p for ids in examples for p in range(len(ids))]}
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float()
                 for ids in examples]
        use_segmented_sdpa(model)
        batch = PackedCollator(pad_token_id=tokenizer.pad_token_id, layout=FLATTENED)([packed])
        batch = {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()
                 if key != "labels"}
        logits = model(**batch).logits[0].float()
    worst, start = 0.0, 0
    for expected in alone:
        got = logits[start:start + len(expected)]
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
        start += len(expected)
    layers = model.config.num_hidden_layers
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return (f"isolation check: {len(examples)} examples ({sum(map(len, examples))} tokens) in one packed row, "
            f"{len(calls)} varlen kernel calls for {layers} layers, vs each example alone: "
            f"largest logit difference {worst:.2e} of the logits' scale (bf16)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmfinetune-gpu-bench"))
    parser.add_argument("--size", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--only", default=None, help="comma-separated contender names (default: all)")
    parser.add_argument("--skip-check", action="store_true", help="no isolation check")
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--contender-timeout", type=float, default=300.0, help="seconds before one is stopped")
    args = parser.parse_args()
    names = [name.strip() for name in args.only.split(",")] if args.only else list(CONTENDERS)
    unknown = [name for name in names if name not in CONTENDERS]
    if unknown:  # before the model is built: a device's minutes are few
        parser.error(f"--only: no contender named {', '.join(map(repr, unknown))}; the contenders are: "
                     f"{', '.join(CONTENDERS)}")

    import torch

    if args.size == "0.5b" and not torch.cuda.is_available():
        print("skipped: no CUDA device (the 0.5B model needs a GPU; --size 27m or tiny run on the CPU)")
        return
    if not (args.data / "train.json").is_file():
        print(f"skipped: AdvertiseGen not found at {args.data} (train.json, validation.json; pass --data)")
        return
    work = args.workdir
    build_assets(work, args.data, SHAPES[args.size])
    from safetensors import safe_open

    with safe_open(str(work / "model" / "model.safetensors"), "pt") as weights:
        parameters = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device}; torch {torch.__version__}; model {parameters / 1e6:.0f}M parameters; "
          f"{args.steps} steps; peak {args.peak_tflops:.0f} TFLOP/s", flush=True)
    try:
        if not args.skip_check:
            print(isolation_check(work) if torch.cuda.is_available() else "isolation check skipped: no CUDA",
                  flush=True)
    except Exception as exc:  # the throughput contenders still tell something
        print(f"isolation check failed: {type(exc).__name__}: {exc}", flush=True)

    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "gpu_driver.py").write_text(PER_EXAMPLE_SWITCH + OURS_DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "LLMFINETUNE_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    results = {}
    for name in names:
        method, rows, length, per_example, overrides = CONTENDERS[name]
        slug = name.replace(" ", "_")
        # A full job is the peer bench's LoRA job with lora_config null (full fine-tuning refuses one that is set).
        job_path = our_job(work, slug, args.steps, True, [
            f"ft_config.ft_method={method}", f"{BASE}per_device_train_batch_size={rows}", f"{BASE}max_length={length}",
            *(["ft_config.train_config.lora_config=null"] if method == "full" else []), *overrides])
        command = [sys.executable, str(work / "gpu_driver.py"), "run-ft", f"--ft={job_path}"]
        try:
            result = run_contender(name, command, {**env, "BENCH_SDPA_PER_EXAMPLE": "1" if per_example else "0"},
                                   work / "logs" / f"{slug}.log", timeout=args.contender_timeout)
        except SystemExit as failed:  # one contender failing must not cost the others
            print(f"{name}: {failed}", flush=True)
            continue
        rate = result.get("steady_tokens_per_second") or result["tokens_per_second"]
        result["rate"], result["mfu"] = rate, 6 * parameters * rate / (args.peak_tflops * 1e12)
        results[name] = result
        print(f"{name}: {rate:.0f} tokens/s after the first 10 steps ({result['tokens_per_second']:.0f} overall), "
              f"MFU {result['mfu']:.1%}, GPU peak {result.get('gpu_peak_mib') or 0:.0f} MiB, "
              f"losses {[round(loss, 4) for _, loss in result['losses']]}", flush=True)

    print(f"\n{'contender':<30} {'tokens/s':>10} {'MFU':>7} {'GPU peak MiB':>13}")
    for name, result in results.items():
        print(f"{name:<30} {result['rate']:>10.0f} {result['mfu']:>7.1%} {result.get('gpu_peak_mib') or 0:>13.0f}")
    compare(results, "full varlen 8x4096", "full per-example-sdpa 8x4096",
            "varlen kernel / SDPA per example (full, 8x4096)")
    for shape in ("8x4096", "8x256"):
        compare(results, f"full varlen {shape}", f"full fp32-weights {shape}",
                f"bf16 weights + fp32 masters / fp32 weights under autocast (full, {shape})")
    for name, result in results.items():
        if name.startswith("full") and "varlen" in name:
            print(f"MFU {name}: {result['mfu']:.1%} (goal >= 50% for full fine-tuning)")


def compare(results: dict, ours: str, other: str, label: str) -> None:
    """One line: the tokens/s ratio of two contenders and how far apart their train losses came."""
    if ours in results and other in results:
        first, second = results[ours], results[other]
        gap = max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(first["losses"], second["losses"]))
        print(f"{label}: {first['rate'] / second['rate']:.2f}x tokens/s; train losses at most {gap:.2%} apart")


if __name__ == "__main__":
    main()
