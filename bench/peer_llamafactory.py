"""LoRA SFT throughput: llmfinetune vs LLaMA-Factory on the same job, the same machine, in one invocation.

    python bench/peer_llamafactory.py [--rounds 2] [--steps 50] [--data ../shared/datasets/AdvertiseGen]
                                      [--lf-venv /tmp/bench/lf-venv] [--setup] [--precisions fp32,bf16]
                                      [--cutoff 256] [--lora-target q_proj,v_proj | all] [--method full]
                                      [--op-split FIRST:LAST]

The job (issue #12): a random-init Qwen2-shaped model of 27M parameters (hidden 512, 8 layers, 8 heads, 2 KV heads,
intermediate 1408, byte-level BPE vocabulary of 8000 trained here on the data, tied embeddings), AdvertiseGen as
alpaca rows in a ChatML template, LoRA r 8 / alpha 16 / dropout 0 on q_proj,v_proj, batch 8, cutoff 256, packing,
lr 5e-4 cosine, no warmup, seed 42, 50 steps (--cutoff, --lora-target and --method change the job on both sides).
Contenders, interleaved round by round, each in its own process: LLaMA-Factory `packing: true` and `neat_packing:
true` (its two packings; plain packing lets examples attend to each other, neat packing does not), and llmfinetune
`packing: true`, all on the CPU, at each precision it runs natively (bf16 only where it has avx512_bf16/AMX).

Every side is measured by the same code: non-pad tokens (input_ids != pad, counted in the Trainer, since
LLaMA-Factory's own count includes pack padding) over the Trainer's train_runtime, peak RSS of the process, minor
page faults (new memory mapped) in the first 10 steps and after, and the train loss every 10 steps. LLaMA-Factory
runs in its own venv (--lf-venv; --setup creates it: torch 2.13.0 CPU and llamafactory from the registry, with the
two workarounds that LLaMA-Factory 0.9.5 needs beside the CPU torch). Without that venv the bench prints one line
saying so and exits 0. The last lines printed are the ratios. --op-split 8:18 also splits each side's step by
where its time goes (matrix products, attention, other aten ops, our C kernels, the rest), by a clock read around
every aten op and C kernel call.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from devices import cpu_flags, native_bf16  # noqa: E402
SHARED = REPO.parent / "shared" / "datasets" / "AdvertiseGen"
SPECIALS = ["<|endoftext|>", "<|startoftext|>", "<|im_end|>", "<|im_start|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
JOB = {"rank": 8, "alpha": 16, "batch": 8, "cutoff": 256, "lr": 5e-4, "seed": 42, "method": "lora",
       "lora_target": ["q_proj", "v_proj"]}
# The CPU model: Qwen2-shaped, 27M parameters with the 8000-token vocabulary.
QWEN2_27M = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
             "num_key_value_heads": 2, "max_position_embeddings": 2048}

# Run inside each contender's own interpreter: the same token count, loss record and RSS report on both sides.
MEASURE = textwrap.dedent('''
    import json, os, resource, sys, time
    import torch, transformers
    from torch.utils._python_dispatch import TorchDispatchMode

    LOSSES = []
    MARKS = []  # (time, tokens seen) at every loss log: the rate after the first log leaves compilation out
    # Minor page faults (new memory touched) when training starts and at every loss log: on this VM kind a fault
    # has cost 1-30 us, so memory a side maps afresh every step is time that follows the host's load.
    FAULTS = []
    _training_step = transformers.Trainer.training_step

    # --op-split FIRST:LAST: every aten op of those steps timed (a clock read each, as bench/step_ops.py does), to
    # split each side's step into matrix products, attention, other aten ops, the package's C kernels (our side) and
    # the rest (Python, the autograd engine, the optimizer, data).
    SPLIT = tuple(int(part) for part in os.environ["LLMFT_OP_SPLIT"].split(":")) if os.environ.get(
        "LLMFT_OP_SPLIT") else None
    PRODUCTS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "_linear_pointwise", "linear", "matmul"}
    OP_SECONDS = {"products": 0.0, "attention": 0.0, "other aten": 0.0, "C kernels": 0.0}
    STEP_STARTS = {}
    TIMING = [False]  # inside a timed step

    class _OpTimer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            elapsed = time.perf_counter() - start
            name = func.overloadpacket.__name__
            kind = "products" if name in PRODUCTS else "attention" if "attention" in name else "other aten"
            OP_SECONDS[kind] += elapsed
            return out

    def _stepped(self, *args, **kwargs):
        if not FAULTS:
            FAULTS.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        step = self.state.global_step
        STEP_STARTS.setdefault(step, time.perf_counter())
        if SPLIT and SPLIT[0] <= step < SPLIT[1]:
            TIMING[0] = True
            try:
                with _OpTimer():
                    return _training_step(self, *args, **kwargs)
            finally:
                TIMING[0] = False
        return _training_step(self, *args, **kwargs)

    def op_split():
        if not SPLIT or SPLIT[1] not in STEP_STARTS:
            return None
        steps = SPLIT[1] - SPLIT[0]
        split = {kind: seconds / steps * 1e3 for kind, seconds in OP_SECONDS.items()}
        split["step"] = (STEP_STARTS[SPLIT[1]] - STEP_STARTS[SPLIT[0]]) / steps * 1e3
        split["the rest"] = split["step"] - sum(OP_SECONDS.values()) / steps * 1e3
        return split

    transformers.Trainer.training_step = _stepped

    def _count(self, inputs):
        if self.args.include_num_input_tokens_seen == "no" or "input_ids" not in inputs:
            return
        tokenizer = self.processing_class
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None and hasattr(tokenizer, "tokenizer"):
            pad = tokenizer.tokenizer.pad_token_id
        n = torch.as_tensor((inputs["input_ids"] != pad).sum(), dtype=torch.int64)
        self.state.num_input_tokens_seen += int(n)

    assert hasattr(transformers.Trainer, "_track_num_input_tokens"), "transformers moved its token count"
    transformers.Trainer._track_num_input_tokens = _count
    _log = transformers.Trainer.log

    def _logged(self, logs, *args, **kwargs):
        if "loss" in logs:
            LOSSES.append((self.state.global_step, float(logs["loss"])))
            MARKS.append((time.perf_counter(), int(self.state.num_input_tokens_seen)))
            FAULTS.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        if "train_runtime" in logs:
            LOSSES.append(("end", float(logs["train_runtime"]), int(self.state.num_input_tokens_seen)))
        return _log(self, logs, *args, **kwargs)

    transformers.Trainer.log = _logged

    def report():
        ends = [entry for entry in LOSSES if entry[0] == "end"]
        if not ends:
            return
        end = ends[-1]
        steady = ((MARKS[-1][1] - MARKS[0][1]) / (MARKS[-1][0] - MARKS[0][0])) if len(MARKS) > 1 else None
        print("BENCH " + json.dumps({"seconds": end[1], "tokens": end[2], "steady_tokens_per_second": steady,
                                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                    "gpu_peak_mib": (torch.cuda.max_memory_allocated() / 2**20
                                                     if torch.cuda.is_available() else None),
                                    "losses": [entry for entry in LOSSES if entry[0] != "end"],
                                    "faults_first_log": FAULTS[1] - FAULTS[0] if len(FAULTS) > 1 else None,
                                    "faults_after_first_log": FAULTS[-1] - FAULTS[1] if len(FAULTS) > 2 else None,
                                    "op_split_ms": op_split()}),
              flush=True)
''')
LF_DRIVER = MEASURE + textwrap.dedent('''
    # After a full fine-tuning run LLaMA-Factory 0.9.5 writes a model card through a method that transformers 5.6's
    # models no longer have (AttributeError, after training and saving): the card is skipped, nothing measured is.
    transformers.Trainer.create_model_card = lambda *args, **kwargs: None
    from llamafactory.cli import main
    sys.argv = ["llamafactory-cli", "train", *sys.argv[1:]]
    try:
        main()
    finally:
        report()
''')
OURS_DRIVER = MEASURE + textwrap.dedent('''
    if SPLIT:  # the package's C kernels (ctypes calls, outside aten) timed too
        from llmfinetune import native

        _library = native.library()

        class _TimedLibrary:
            def __getattr__(self, name):
                function = getattr(_library, name)

                def timed(*args):
                    start = time.perf_counter()
                    try:
                        return function(*args)
                    finally:
                        if TIMING[0]:
                            OP_SECONDS["C kernels"] += time.perf_counter() - start
                return timed

        if _library is not None:
            _timed_library = _TimedLibrary()
            native.library = lambda: _timed_library
    from llmfinetune.cli import main
    try:
        code = main(sys.argv[1:])
    finally:
        report()
    sys.exit(code)
''')


# ---------------------------------------------------------------- the job's assets

def build_assets(out: Path, data: Path, shape: dict = QWEN2_27M) -> None:
    """Model (a random-init Qwen2 of this shape), tokenizer and alpaca data, built once per workdir (seeded: the
    same every time)."""
    if (out / "model" / "model.safetensors").is_file():
        return
    splits = {name: [json.loads(line) for line in (data / f"{name}.json").read_text(encoding="utf-8").splitlines()
                     if line.strip()] for name in ("train", "validation")}
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        alpaca = [{"instruction": row["content"], "input": "", "output": row["summary"]} for row in rows]
        (out / "data" / f"{name}.json").write_text(json.dumps(alpaca, ensure_ascii=False), encoding="utf-8")
    (out / "data" / "dataset_info.json").write_text(json.dumps({"advertisegen": {
        "file_name": "train.json", "formatting": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}))
    texts = [row["content"] for row in splits["train"]] + [row["summary"] for row in splits["train"]]
    tokenizer = _tokenizer(texts, shape["max_position_embeddings"])
    tokenizer.save_pretrained(out / "model")
    _model(tokenizer, out / "model", shape)


def _tokenizer(texts, model_max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, min_frequency=2, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|startoftext|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"],
                                        model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHATML
    return tokenizer


def _model(tokenizer, folder: Path, shape: dict) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**{"vocab_size": len(tokenizer), **shape},
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(folder)


# ---------------------------------------------------------------- contenders

def lf_config(work: Path, name: str, steps: int, bf16: bool, neat: bool) -> Path:
    targets = "all" if JOB["lora_target"] == "all" else ",".join(JOB["lora_target"])
    config = {
        "model_name_or_path": str(work / "model"), "trust_remote_code": False, "disable_gradient_checkpointing": True,
        "stage": "sft", "do_train": True, "finetuning_type": JOB["method"], "lora_rank": JOB["rank"],
        "lora_alpha": JOB["alpha"], "lora_dropout": 0.0, "lora_target": targets,
        "dataset": "advertisegen", "dataset_dir": str(work / "data"), "template": "chatml",
        "cutoff_len": JOB["cutoff"], "packing": True, "neat_packing": neat, "overwrite_cache": True,
        "dataloader_num_workers": 0, "output_dir": str(work / "out" / name), "logging_steps": 10,
        "save_strategy": "no", "plot_loss": False, "overwrite_output_dir": True, "report_to": "none",
        "per_device_train_batch_size": JOB["batch"], "gradient_accumulation_steps": 1, "max_steps": steps,
        "learning_rate": JOB["lr"], "lr_scheduler_type": "cosine", "warmup_steps": 0, "weight_decay": 0.0,
        "seed": JOB["seed"], "data_seed": JOB["seed"], "bf16": bf16, "fp16": False, "use_cpu": True,
        "include_num_input_tokens_seen": "non_padding", "disable_tqdm": True,
    }
    if JOB["method"] != "lora":
        config = {key: value for key, value in config.items() if not key.startswith("lora_")}
    path = work / f"{name}.yaml"  # JSON is YAML; LLaMA-Factory 0.9.5 fails to read a .json config (json.load(Path))
    path.write_text(json.dumps(config, indent=1))
    return path


def our_job(work: Path, name: str, steps: int, bf16: bool, overrides: list[str]) -> Path:
    job = {
        "model_config": {"model_id": str(work / "model")},
        "ft_config": {
            "ft_task": "text-generation", "ft_method": JOB["method"],
            "data_config": {"local_path": str(work / "data"), "format": "alpaca", "template": "chatml",
                            "validation_column": "validation", "num_row": 0, "cache_tokenized": False},
            "train_config": {
                "lora_config": {"r": JOB["rank"], "lora_alpha": JOB["alpha"], "lora_dropout": 0.0,
                                "target_modules": "all-linear" if JOB["lora_target"] == "all" else JOB["lora_target"]},
                "base_config": {
                    "output_dir": str(work / "out" / name), "per_device_train_batch_size": JOB["batch"],
                    "max_steps": steps, "learning_rate": JOB["lr"], "lr_scheduler_type": "cosine",
                    "warmup_steps": 0, "weight_decay": 0.0, "seed": JOB["seed"], "data_seed": JOB["seed"],
                    "max_length": JOB["cutoff"], "packing": True, "bf16": bf16, "logging_steps": 10,
                    "save_strategy": "no", "eval_strategy": "no", "report_to": "none",
                    "dataloader_num_workers": 0, "disable_tqdm": True,
                },
            },
        },
    }
    if JOB["method"] != "lora":
        del job["ft_config"]["train_config"]["lora_config"]
    import yaml

    for override in overrides:  # KEY.PATH=VALUE, the value read as YAML (as run-ft's own overrides)
        dotted, _, value = override.partition("=")
        node, *path = job, *dotted.split(".")
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(value)
    path = work / f"{name}.json"
    path.write_text(json.dumps(job, indent=1))
    return path


def run_contender(name: str, command: list[str], env: dict, log: Path, timeout: float | None = None) -> dict:
    _wait_for_quiet()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as late:
        log.write_text("\n".join(part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                                 for part in (late.stdout, late.stderr)))
        sys.exit(f"{name} ran past {timeout:.0f} s and was stopped; its output is in {log}")
    log.write_text(done.stdout + "\n" + done.stderr)
    line = next((l for l in reversed(done.stdout.splitlines()) if l.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        sys.exit(f"{name} failed (exit {done.returncode}); its output is in {log}:\n{done.stderr[-2000:]}")
    result = json.loads(line[len("BENCH "):])
    result["tokens_per_second"] = result["tokens"] / result["seconds"]
    return result


def print_op_split(results: dict, steps: str, total_steps: int) -> None:
    """Each contender's step split by where its time goes (medians over rounds), and per 1000 non-pad tokens, since
    the two sides' packs hold different token counts. "C kernels": the package's (our side only); "the rest": Python,
    the autograd engine, the optimizer, data."""
    kinds = ("step", "products", "attention", "other aten", "C kernels", "the rest")
    print(f"\nsteps {steps}, ms a step (ms per 1000 non-pad tokens), medians over rounds")
    print(f"{'contender':<34} " + " ".join(f"{kind:>18}" for kind in kinds))
    for name, runs in results.items():
        splits = [r["op_split_ms"] for r in runs if r.get("op_split_ms")]
        if not splits:
            print(f"{name:<34} (steps {steps} not reached)")
            continue
        per_step_tokens = statistics.median(r["tokens"] for r in runs) / total_steps
        cells = []
        for kind in kinds:
            ms = statistics.median(split[kind] for split in splits)
            cells.append(f"{ms:>8.1f} ({ms / per_step_tokens * 1000:>7.1f})")
        print(f"{name:<34} " + " ".join(f"{cell:>18}" for cell in cells))


def _wait_for_quiet(limit_s: float = 120.0) -> None:
    """Timing runs need the machine to themselves: wait (up to limit_s) until other processes take under 10% of the
    CPUs over 2 seconds (the load average would still count the previous contender for a minute)."""
    start = time.time()
    while time.time() - start < limit_s and _busy_share(2.0) > 0.10:
        time.sleep(3)


def _busy_share(seconds: float) -> float:
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    total, idle = sample()
    time.sleep(seconds)
    total2, idle2 = sample()
    return 1.0 - (idle2 - idle) / max(total2 - total, 1)


def _thousands(count) -> str:
    return "?" if count is None else f"{count / 1000:.0f}k"


def setup_venv(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0", "llamafactory"], check=True)
    # torchvision from the registry fails beside the CPU torch ("operator torchvision::nms does not exist"), and
    # transformers then fails to import; LLaMA-Factory imports torchaudio at module level, whose newest registry
    # build is for CUDA: remove both, and let a stub without dist-info stand in for torchaudio.
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio"])
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    stub = Path(site) / "torchaudio"
    stub.mkdir(exist_ok=True)
    (stub / "__init__.py").write_text("def __getattr__(name):\n    raise ImportError('torchaudio stub (CPU bench)')\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--lf-venv", type=Path, default=Path("/tmp/bench/lf-venv"))
    parser.add_argument("--setup", action="store_true", help="create --lf-venv when it is missing (~6 min)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmfinetune-peer-bench"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of our job (e.g. ft_config.train_config.base_config.torch_compile=true)")
    parser.add_argument("--cutoff", type=int, default=JOB["cutoff"],
                        help="tokens a packed row holds, both sides (LLaMA-Factory's cutoff_len, our max_length)")
    parser.add_argument("--method", choices=("lora", "full"), default=JOB["method"],
                        help="LoRA (the issue's job) or full fine-tuning, both sides")
    parser.add_argument("--lora-target", default=",".join(JOB["lora_target"]),
                        help="comma-separated module names, or `all` (every linear layer but the LM head: "
                             "LLaMA-Factory's `all`, peft's `all-linear`), both sides")
    parser.add_argument("--only-ours", action="store_true", help="skip the LLaMA-Factory contenders")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated fp32,bf16 (default: fp32, and bf16 where native)")
    parser.add_argument("--op-split", metavar="FIRST:LAST", default=None,
                        help="time every aten op and C kernel call of steps FIRST..LAST-1 on each side and print "
                             "each step split into matrix products, attention, other aten ops, our C kernels and the "
                             "rest (a clock read per call: take the ratios from a run without it)")
    args = parser.parse_args()
    JOB["cutoff"], JOB["method"] = args.cutoff, args.method
    JOB["lora_target"] = "all" if args.lora_target == "all" else args.lora_target.split(",")

    lf_python = args.lf_venv / "bin" / "python"
    if not lf_python.is_file() and args.setup:
        setup_venv(args.lf_venv)
    if not lf_python.is_file() or subprocess.run([str(lf_python), "-c", "import llamafactory"],
                                                 capture_output=True).returncode != 0:
        print(f"skipped: no LLaMA-Factory venv at {args.lf_venv} (run with --setup to create it: pip install "
              "torch==2.13.0 llamafactory, ~6 minutes, registry access needed)")
        return
    if not (args.data / "train.json").is_file():
        print(f"skipped: AdvertiseGen not found at {args.data} (train.json, validation.json; pass --data)")
        return
    precisions = (args.precisions.split(",") if args.precisions else
                  ["fp32"] + (["bf16"] if native_bf16("cpu") else []))
    work = args.workdir
    build_assets(work, args.data)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "lf_driver.py").write_text(LF_DRIVER)
    (work / "ours_driver.py").write_text(OURS_DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "DISABLE_VERSION_CHECK": "1",
           # Both sides on the CPU (LLaMA-Factory's config says use_cpu): a GPU for one side would measure hardware.
           "CUDA_VISIBLE_DEVICES": "",
           "LLMFINETUNE_CACHE": str(work / "cache")}
    if args.op_split:
        env["LLMFT_OP_SPLIT"] = args.op_split
    ours_env = {**env, "PYTHONPATH": str(REPO)}
    contenders = []
    for precision in precisions:
        bf16 = precision == "bf16"
        if not args.only_ours:
            contenders.append((f"LLaMA-Factory packing {precision}", "lf", bf16, False))
            if bf16:
                contenders.append((f"LLaMA-Factory neat_packing {precision}", "lf", bf16, True))
        contenders.append((f"llmfinetune packing {precision}", "ours", bf16, False))
    method = f"LoRA on {args.lora_target}" if args.method == "lora" else "full fine-tuning"
    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} CPUs; {args.rounds} rounds of {args.steps} steps; "
          f"cutoff {args.cutoff}; {method}; workdir {work}", flush=True)
    results: dict[str, list[dict]] = {name: [] for name, *_ in contenders}
    for round_number in range(1, args.rounds + 1):
        for name, side, bf16, neat in contenders:
            slug = name.replace(" ", "_") + f"_r{round_number}"
            if side == "lf":
                command = [str(lf_python), str(work / "lf_driver.py"),
                           str(lf_config(work, slug, args.steps, bf16, neat))]
                result = run_contender(name, command, env, work / "logs" / f"{slug}.log")
            else:
                command = [sys.executable, str(work / "ours_driver.py"), "run-ft",
                           f"--ft={our_job(work, slug, args.steps, bf16, args.set)}"]
                result = run_contender(name, command, ours_env, work / "logs" / f"{slug}.log")
            results[name].append(result)
            steady = result.get("steady_tokens_per_second")
            print(f"round {round_number} {name}: {result['tokens_per_second']:.0f} tokens/s "
                  f"({steady or 0:.0f} after the first 10 steps), "
                  f"{result['tokens']} tokens in {result['seconds']:.1f} s, peak RSS {result['peak_rss_mib']:.0f} "
                  f"MiB, page faults {_thousands(result.get('faults_first_log'))} in the first 10 steps and "
                  f"{_thousands(result.get('faults_after_first_log'))} after, "
                  f"losses {[round(loss, 4) for _, loss in result['losses']]}", flush=True)

    print(f"\n{'contender':<34} {'tokens/s (median)':>17} {'peak RSS MiB':>12}  train loss at steps 10..{args.steps}")
    medians = {}
    for name, runs in results.items():
        medians[name] = statistics.median(r["tokens_per_second"] for r in runs)
        rss = statistics.median(r["peak_rss_mib"] for r in runs)
        print(f"{name:<34} {medians[name]:>17.0f} {rss:>12.0f}  {[round(l, 4) for _, l in runs[-1]['losses']]}")
    if args.op_split:
        print_op_split(results, args.op_split, args.steps)
    for precision in precisions:
        ours = results[f"llmfinetune packing {precision}"]
        fp32 = results.get("llmfinetune packing fp32")
        if fp32 and precision != "fp32":
            gap = max((abs(a - b) / b for (_, a), (_, b) in zip(ours[-1]["losses"], fp32[-1]["losses"])), default=0.0)
            print(f"llmfinetune {precision} loss vs its fp32 loss: at most {gap:.2%} apart")
    for precision in precisions:
        peers = {n: m for n, m in medians.items() if n.startswith("LLaMA-Factory") and n.endswith(precision)}
        if not peers:
            continue
        best = max(peers, key=peers.get)
        print(f"ratio llmfinetune / {best} (LLaMA-Factory's best at {precision}): "
              f"{medians[f'llmfinetune packing {precision}'] / peers[best]:.2f}x")


if __name__ == "__main__":
    main()
