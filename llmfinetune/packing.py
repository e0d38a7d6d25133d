"""Packing for causal-LM training: several examples share one row of at most max_length tokens, and still each
example sees only itself.

Positions restart at 0 for every example, and no attention mask is passed. How the examples then travel depends on
the attention implementation (packed_layout, the one decision):
- eager / flex: a batch of rows. transformers' masking_utils reads the example boundaries from the position ids of
  every row and builds a block-diagonal causal mask (its padding-free path).
- flash-attention (and hub flash kernels): one flattened row holding every example of the step, with the
  cu_seq_lens_q/k and max_length_q/k kwargs that DataCollatorWithFlattening produces. Flash attention builds no mask;
  it runs variable-length sequences from those kwargs, and reads boundaries from position ids only in a batch of one
  row (_is_packed_sequence), so rows would leak into each other.
- SDPA (the default): the same flattened row, and the model's attention is switched to SEGMENTED_SDPA, which runs
  SDPA's causal kernel once per example from cu_seq_lens. Over padded rows with a block-diagonal mask the kernel
  computes every (query, key) pair of a row and reads the mask; per example it computes only the causal half of each
  example's own square and reads no mask (fp32 SFT bench: attention 14% of a step before, +6% tokens/s after).
  On a GPU in half precision the row goes to torch's variable-length flash kernel instead, once per layer
  (_varlen_flash; H200, 0.5B full fine-tune: ~14x the tokens/s of one SDPA launch per example, bench/README.md).
  On the CPU in bf16/fp16, and in fp32 with the frozen layers packed (kernels_keep_state_per_shape), oneDNN and the
  half-precision flash kernel keep state per shape, so a row of a new length every step grew memory without end:
  there the flattened row is padded to a multiple of arguments.SHAPE_MULTIPLE tokens (a few shapes for every linear
  layer) and each example's attention runs in fp32, whose kernel keeps no state per shape (bf16 SFT bench with AMX:
  attention 12.5 against 17 ms a layer). Training on a CPU with AVX-512 or AVX2 at head_dim 64, that fp32 attention
  is the package's own kernel, one call a layer (cpu_attention: ~2x torch's flash kernel per example on the SFT
  bench).
The first label of every example is ignored, as it is when the example is alone: there it would be predicted from
the end of the previous example.

Only architectures whose isolation is tested (ISOLATING_MODEL_TYPES) may pack: others, remote code above all, may
never read the boundaries.
"""
from __future__ import annotations

import bisect
import functools
from typing import Any, Optional

from .errors import UserError

IGNORE = -100
PACKING_KEY = "ft_config.train_config.base_config.packing"
ROWS, FLATTENED = "rows", "flattened"

# Attention implementations whose masks come from masking_utils, which turns the per-row position ids into a
# block-diagonal mask (tests/test_packing_attention.py runs each of them).
MASKED_FROM_POSITIONS = ("eager", "sdpa", "flex_attention")
# Facts of a batch that the collator knows on the host and hands the Trainer beside the tensors (host_facts), so a
# GPU step need not read them back from the device (each read waits for the GPU: lm_head.CausalLMTrainer).
LEARNED_POSITIONS, NON_PAD_TOKENS = "llmfinetune_learned_positions", "llmfinetune_non_pad_tokens"
HOST_FACTS = (LEARNED_POSITIONS, NON_PAD_TOKENS)
# The attention a packed SDPA model trains with (registered with transformers by use_segmented_sdpa).
SEGMENTED_SDPA = "llmfinetune_sdpa_segments"
# Where it runs the whole flattened row in torch's variable-length flash kernel (half precision; CUDA only in torch).
VARLEN_FLASH_DEVICES = ("cuda",)
FLASH_MAX_HEAD_DIM = 256  # the flash kernel's limit

# transformers architectures (config.json model_type) whose packed examples are proven isolated: every one is built
# tiny and random in tests/test_packing_attention.py, and its packed logits must equal each example's logits alone,
# in both layouts. An allowlist, not a source scan for masking_utils: hybrid models (qwen3_next, jamba) build their
# attention masks there too, yet their recurrent/convolution layers carry state from one example into the next.
ISOLATING_MODEL_TYPES = frozenset({
    "cohere", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_neox", "granite", "llama", "mistral", "mixtral",
    "olmo2", "olmoe", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "stablelm", "starcoder2",
})


def packed_layout(attn_implementation: Optional[str]) -> str:
    """ROWS or FLATTENED: how packed examples must reach a model with this attention implementation (the model's
    config._attn_implementation) so that none attends to another."""
    if attn_implementation in MASKED_FROM_POSITIONS:
        return ROWS
    if attn_implementation == SEGMENTED_SDPA or (attn_implementation and "flash" in attn_implementation):
        return FLATTENED
    raise UserError(
        f"{PACKING_KEY}: attention implementation '{attn_implementation}' is not known to keep packed examples apart "
        f"(known: {', '.join(MASKED_FROM_POSITIONS)}, or any flash-attention kind); set "
        "model_config.initialization.initializer.from_pretrained_kwargs.attn_implementation to one of them, or set "
        "packing: false."
    )


def check_packing_isolates(job, model_path: str) -> None:
    """Refuse packing before anything trains when the model could let examples attend to each other. Reads
    config.json only (no weights, no remote code), so `llmfinetune check` sees the same refusal."""
    from transformers import PretrainedConfig

    from .models import hub_location_kwargs, trust_remote_code

    location = {key: value for key, value in hub_location_kwargs(job).items()
                if key not in ("trust_remote_code", "code_revision")}  # config.json as a dict: no code runs
    config, _ = PretrainedConfig.get_config_dict(model_path, **location)
    model_type = config.get("model_type")
    if trust_remote_code(job) and "AutoModelForCausalLM" in (config.get("auto_map") or {}):
        raise UserError(
            f"{PACKING_KEY}: {job.model.model_id} runs its own modeling code (trust_remote_code with an auto_map in "
            "config.json), which never reads the example boundaries of a packed row: its examples would attend to "
            "each other. Set packing: false, or use a transformers-native copy of the model without "
            "trust_remote_code."
        )
    if model_type not in ISOLATING_MODEL_TYPES:
        raise UserError(
            f"{PACKING_KEY}: architecture '{model_type}' of {job.model.model_id} is not among those whose packed "
            f"examples are proven isolated ({', '.join(sorted(ISOLATING_MODEL_TYPES))}); hybrid and recurrent "
            "layers, for one, carry state across examples. Set packing: false."
        )
    requested = job.model.initialization.initializer.from_pretrained_kwargs.get("attn_implementation")
    if requested is not None:
        packed_layout(requested)


def pack_lengths(lengths: list[int], limit: int) -> list[list[int]]:
    """Best-fit decreasing: indices of the examples that go in each row. Few rows, little padding, O(n log n)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    # Rows that still have room, as (room left, row number), kept sorted for a binary search of the best fit.
    open_rows: list[tuple[int, int]] = []
    for index in order:
        size = min(lengths[index], limit)
        at = bisect.bisect_left(open_rows, (size, -1))
        if at < len(open_rows):
            room, row = open_rows.pop(at)
            rows[row].append(index)
            room -= size
        else:
            rows.append([index])
            row, room = len(rows) - 1, limit - size
        if room > 0:
            bisect.insort(open_rows, (room, row))
    # Within a row keep the data's own order, so a packed run reads examples in a familiar sequence.
    return sorted((sorted(row) for row in rows), key=lambda row: row[0])


def pack_dataset(dataset, limit: int, seed: int = 0):
    """A tokenized dataset (input_ids, labels) as packed rows with per-example position_ids."""
    from datasets import Dataset

    ids_column, labels_column = dataset["input_ids"], dataset["labels"]
    rows = pack_lengths([len(ids) for ids in ids_column], limit)
    packed: dict[str, list[Any]] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        ids, labels, positions = [], [], []
        for index in row:
            example_ids = ids_column[index][:limit]
            example_labels = list(labels_column[index][:limit])
            example_labels[0] = IGNORE
            ids += example_ids
            labels += example_labels
            positions += range(len(example_ids))
        packed["input_ids"].append(ids)
        packed["labels"].append(labels)
        packed["position_ids"].append(positions)
    return Dataset.from_dict(packed)


class PackedCollator:
    """Packed rows in the layout the model's attention needs (packed_layout): a batch of rows padded to the longest,
    or one flattened row. Which one is known only once the model is loaded, so the Trainer binds it (bind_to)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8, layout: Optional[str] = None,
                 flat_row_multiple: Optional[int] = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.layout = layout
        self.flat_row_multiple = flat_row_multiple
        self.host_facts = False

    def bind_to(self, model, n_gpu: int = 1, few_shapes: bool = False, host_facts: bool = False) -> None:
        """`host_facts`: each batch also carries HOST_FACTS, for a Trainer that takes them out before the model
        sees the batch (lm_head.CausalLMTrainer)."""
        self.layout = packed_layout(getattr(model.config, "_attn_implementation", None))
        from .arguments import SHAPE_MULTIPLE

        self.flat_row_multiple = SHAPE_MULTIPLE if few_shapes else None
        self.host_facts = host_facts
        if self.layout == FLATTENED and n_gpu > 1:
            # nn.DataParallel would hand the single row to one GPU and split the cu_seq_lens tensors across all.
            raise UserError(
                f"{PACKING_KEY}: with flash attention the step's examples travel as one flattened row, which "
                f"nn.DataParallel over {n_gpu} GPUs cannot split; start one process per GPU instead "
                f"(llmfinetune run-ft --ft=... --nproc {n_gpu})."
            )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if self.layout == ROWS:
            tensors = self._rows(features)
        elif self.layout == FLATTENED:
            tensors = self._flattened(features, self.pad_token_id, self.flat_row_multiple)
        else:
            raise RuntimeError("PackedCollator used before bind_to(model): the attention implementation decides "
                               "the layout.")
        # With a KV cache the models skip reading example boundaries from the position ids (that path is meant for
        # generation), and every example would attend to the ones before it.
        tensors["use_cache"] = False
        if self.host_facts:
            tensors[LEARNED_POSITIONS] = learned_positions(tensors["labels"])
            tensors[NON_PAD_TOKENS] = int((tensors["input_ids"] != self.pad_token_id).sum())
        return tensors

    def _rows(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """The padding is one more 'example' (positions from 0, labels ignored) that nothing attends to, so no
        attention mask is needed."""
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        multiple = self.pad_to_multiple_of
        width = -(-longest // multiple) * multiple if multiple else longest
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for feature in features:
            missing = width - len(feature["input_ids"])
            batch["input_ids"].append(list(feature["input_ids"]) + [self.pad_token_id] * missing)
            batch["labels"].append(list(feature["labels"]) + [IGNORE] * missing)
            batch["position_ids"].append(list(feature["position_ids"]) + list(range(missing)))
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}

    @staticmethod
    def _flattened(features: list[dict[str, Any]], pad_token_id: int = 0,
                   multiple: Optional[int] = None) -> dict[str, Any]:
        """Every example of every row, end to end in one row; the kwargs and dtypes are those of transformers'
        DataCollatorWithFlattening(return_flash_attn_kwargs=True). With `multiple`, the row ends in one padding
        example (positions from 0, labels ignored) that makes its length a multiple of it."""
        import numpy as np
        import torch

        # numpy, not Python lists: on a GPU the host builds this row while the device waits (the Trainer syncs every
        # step); a row of 32k tokens took 7.5 ms through lists and torch.tensor, 1.9 ms this way (one CPU, one run).
        def joined(key):
            return np.concatenate([np.asarray(feature[key], dtype=np.int64) for feature in features])

        ids, labels, positions = joined("input_ids"), joined("labels"), joined("position_ids")
        missing = -len(ids) % multiple if multiple else 0
        if missing:
            ids = np.concatenate([ids, np.full(missing, pad_token_id, dtype=np.int64)])
            labels = np.concatenate([labels, np.full(missing, IGNORE, dtype=np.int64)])
            positions = np.concatenate([positions, np.arange(missing, dtype=np.int64)])
        starts = np.flatnonzero(positions == 0)
        labels[starts] = IGNORE
        bounds = np.append(starts, len(ids))
        longest = int(np.diff(bounds).max())
        cu_seq_lens = torch.from_numpy(bounds.astype(np.int32))
        return {"input_ids": torch.from_numpy(ids)[None], "labels": torch.from_numpy(labels)[None],
                "position_ids": torch.from_numpy(positions)[None],
                "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
                "max_length_q": longest, "max_length_k": longest}


def learned_positions(labels):
    """The flat positions (over rows x tokens) whose next token is learned, in order: where the LM head projects."""
    import torch

    learned = torch.nn.functional.pad(labels[:, 1:] != IGNORE, (0, 1), value=False)
    return learned.flatten().nonzero().flatten()


def bind_packed_collator(trainer) -> None:
    """Give a PackedCollator (or a wrapper of one that forwards bind_to) the layout of the model this Trainer trains
    or evaluates, once the model has the attention it packs with (use_segmented_sdpa)."""
    bind_to = getattr(trainer.data_collator, "bind_to", None)
    if bind_to is not None:
        from .arguments import kernels_keep_state_per_shape

        use_segmented_sdpa(trainer.model)
        few_shapes = kernels_keep_state_per_shape(trainer.args, trainer.model)
        bind_to(trainer.model, trainer.args.n_gpu, few_shapes=few_shapes, host_facts=True)


def use_segmented_sdpa(model) -> str:
    """Switch a model that attends with SDPA to SEGMENTED_SDPA (the same kernel, once per packed example); return
    the attention implementation the model trains with. Idempotent; nothing is saved with the model (transformers
    keeps the implementation out of config.json), so a saved run loads with plain SDPA."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation != "sdpa":
        return implementation
    from .models import transformers_model

    _register_segmented_sdpa()
    base = transformers_model(model)
    base.set_attn_implementation(SEGMENTED_SDPA)
    if getattr(base.config, "model_type", None) not in BOUNDS_NOT_PASSED_TO_ATTENTION:
        base.register_forward_pre_hook(_note_bounds, with_kwargs=True)
        base.register_forward_hook(_forget_bounds, always_call=True)
    return SEGMENTED_SDPA


# Model types that do not hand cu_seq_lens on to their attention (tests/test_packing_attention.py): their packed
# examples are kept apart by the mask masking_utils builds from the position ids, which they must go on getting.
BOUNDS_NOT_PASSED_TO_ATTENTION = frozenset({"stablelm"})
# One entry per model call in progress (a model switched to SEGMENTED_SDPA): whether it runs on a flattened row's
# example bounds (cu_seq_lens_q). Its attention then reads the bounds and never the mask masking_utils would build
# from the position ids, (tokens x tokens) for the whole row: 3.6 MB and ~3.5 ms a step on the SFT bench's 1900
# tokens, 1 GiB at 32k tokens (8 x 4096 on a GPU). So no mask is built.
_ROW_BOUNDS_GIVEN: list = []


def _note_bounds(module, args, kwargs):
    bounded = kwargs.get("cu_seq_lens_q") is not None
    _ROW_BOUNDS_GIVEN.append(bounded)
    if bounded and kwargs.get("attention_mask") is None:
        # Without a mask, masking_utils reads the position ids for packed examples first (find_packed_sequence_
        # indices: a read back from the GPU every forward, which waits for it); a 4D mask it hands on as it is.
        return args, {**kwargs, "attention_mask": _unread_mask()}
    return None


@functools.lru_cache(maxsize=1)
def _unread_mask():
    """The 4D attention mask a flattened row's model call gets: never read (segmented_sdpa_forward attends from the
    bounds, and refuses to attend without them)."""
    import torch

    return torch.ones(1, 1, 1, 1, dtype=torch.bool)


def _forget_bounds(module, args, output):
    if _ROW_BOUNDS_GIVEN:
        _ROW_BOUNDS_GIVEN.pop()


def _segmented_sdpa_mask(*args, **kwargs):
    """SDPA's own mask, except for a call on a flattened row's bounds (no mask: segmented_sdpa_forward would not
    read it)."""
    from transformers.masking_utils import sdpa_mask

    if _ROW_BOUNDS_GIVEN and _ROW_BOUNDS_GIVEN[-1]:
        return None
    return sdpa_mask(*args, **kwargs)


def _register_segmented_sdpa() -> None:
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    global _per_example_uncompiled
    # Left out of torch.compile's graphs (regional compilation splits the decoder layer around it): it reads the
    # example bounds on the host and loops over them, a new graph for every count of examples. Made here, before any
    # forward: called from traced code, torch.compiler.disable itself would break the graph.
    _per_example_uncompiled = torch.compiler.disable(_per_example_sdpa)
    AttentionInterface.register(SEGMENTED_SDPA, segmented_sdpa_forward)
    # Calls without cu_seq_lens (generation, an unpacked evaluation) get SDPA's own masks and kernel.
    AttentionMaskInterface.register(SEGMENTED_SDPA, _segmented_sdpa_mask)


def segmented_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           is_causal=None, **kwargs):
    """transformers' SDPA attention, run per example of a flattened packed row (query/key/value of shape
    (1, heads, tokens, head_dim), examples bounded by cu_seq_lens_q). The mask masking_utils built for the row is
    not read: each example alone is causal (banded where a sliding window is shorter than it)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None and (attention_mask is None or attention_mask is _unread_mask()) and _ROW_BOUNDS_GIVEN \
            and _ROW_BOUNDS_GIVEN[-1]:
        # The model dropped the bounds on the way to its attention after its mask was skipped (_segmented_sdpa_mask):
        # causal attention over the whole row would let its examples see each other.
        raise RuntimeError(f"{type(module).__name__} got no cu_seq_lens_q for a flattened packed row, and no mask: "
                           "add its model type to packing.BOUNDS_NOT_PASSED_TO_ATTENTION")
    if bounds is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    window = kwargs.get("sliding_window")
    if query.device.type in VARLEN_FLASH_DEVICES and not dropout and kwargs.get("softcap") is None:
        output = _varlen_flash(query, key, value, kwargs, scaling, window)
        if output is not None:
            return output, None
    if kwargs.get("softcap") is not None:
        raise ValueError("SDPA does not support attention logit softcapping; use eager or flex attention.")
    return _per_example_uncompiled(module, query, key, value, bounds, window, dropout, scaling), None


def _per_example_sdpa(module, query, key, value, bounds, window, dropout, scaling):
    import torch

    # Reading the bounds on the host waits for the GPU (a sync per layer): only the per-example path needs them.
    bounds = bounds.tolist()
    lengths = [end - start for start, end in zip(bounds, bounds[1:])]
    dtype = query.dtype
    if query.device.type == "cpu" and (dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
        # The CPU's half-precision flash kernel keeps state per shape, and every example is a new shape: run it in
        # fp32, which keeps none (autocast would cast back to bf16). Under autocast with an fp32 base the rotary
        # embedding already made query fp32, hence the autocast check.
        with torch.autocast("cpu", enabled=False):
            return _examples_sdpa(module, query, key, value, lengths, window, dropout, scaling, torch_in_fp32=True
                                  ).to(dtype)
    return _examples_sdpa(module, query, key, value, lengths, window, dropout, scaling)


# The plain function until _register_segmented_sdpa wraps it (bench/packed_attention.py calls the forward unregistered).
_per_example_uncompiled = _per_example_sdpa


def _examples_sdpa(module, query, key, value, lengths, window, dropout, scaling, torch_in_fp32=False):
    import torch

    from . import cpu_attention

    # Training on the CPU in fp32 or bf16: each run of examples up to cpu_attention.MAX_EXAMPLE_TOKENS long in one
    # call of the package's kernel, ~2x torch's; longer examples in torch's, as fast there and saving no
    # probabilities. torch_in_fp32: torch's kernel gets fp32 tensors; the package's reads bf16 ones as they are.
    short = [length for length in lengths if length <= cpu_attention.MAX_EXAMPLE_TOKENS]
    kernel_window = window if window and short and window < max(short) else None

    def kernel_takes(*qkv) -> bool:
        return bool(short) and cpu_attention.usable(*qkv, dropout, kernel_window)

    takes = kernel_takes(query, key, value)
    if torch_in_fp32 and not takes:  # mixed dtypes, or a kernel that is not used
        query, key, value = query.float(), key.float(), value.float()
        takes = kernel_takes(query, key, value)
    if takes:
        runs = cpu_attention.runs(lengths)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        # One run is not split into one piece: a split's backward concatenates its pieces' gradients, a copy of each
        # of query, key and value per layer even for one piece (~0.4% of the SFT bench's fp32 step).
        pieces = ([(query, key, value)] if len(runs) == 1 else
                  zip(*(t.split([sum(run) for _, run in runs], dim=2) for t in (query, key, value))))
        outputs = [cpu_attention.attention(*qkv, run, scale) if kernel
                   else _torch_examples_sdpa(module, *(t.float() if torch_in_fp32 else t for t in qkv), run, window,
                                             dropout, scaling).to(query.dtype)
                   for (kernel, run), qkv in zip(runs, pieces)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    return _torch_examples_sdpa(module, query, key, value, lengths, window, dropout, scaling)


def _torch_examples_sdpa(module, query, key, value, lengths, window, dropout, scaling):
    import torch

    # torch's SDPA directly, not transformers' wrapper: the wrapper transposes and copies every example's output,
    # here the outputs are joined once, straight into the (1, tokens, heads, head_dim) layout the output projection
    # reads (a join along heads' tokens, then a transposed copy, was 1.7 ms more a layer forward + backward in fp32
    # on the SFT bench's shapes). GQA in the kernel (enable_gqa) instead of repeated key/value heads.
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    outputs = []
    # split, not slicing: the backward of a split is one concatenation, while each slice's backward would fill a
    # zero tensor the size of the whole row (once per example, for query, key and value).
    for length, *qkv in zip(lengths, *(tensor.split(lengths, dim=2) for tensor in (query, key, value))):
        mask = None
        if window is not None and length > window:
            # masking_utils' sliding window: key j is seen from query i when i - window < j <= i.
            offsets = torch.arange(length, device=query.device)
            distance = offsets[:, None] - offsets[None, :]
            mask = ((distance >= 0) & (distance < window))[None, None]
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            *qkv, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and length > 1, scale=scaling,
            enable_gqa=gqa).transpose(1, 2))
    return torch.cat(outputs, dim=1)


def _varlen_flash(query, key, value, kwargs: dict, scaling, window):
    """On a GPU in half precision, the whole flattened row in one call of torch's variable-length flash kernel
    (torch.nn.attention.varlen, the flash-attention kernel torch ships: no flash-attn package), instead of a kernel
    launch per example and per layer. None where it cannot run (fp32 without autocast, a torch without it, a
    sliding window its signature cannot express, a GPU older than Ampere, heads over 256 wide): the caller then
    runs the examples one by one."""
    import torch

    device = query.device.type
    half = query.dtype in (torch.float16, torch.bfloat16)
    if not half and not torch.is_autocast_enabled(device):
        return None
    varlen, parameters = _varlen_attention()
    if varlen is None or (window is not None and "window_size" not in parameters) or not _flash_capable(query.device):
        return None
    if query.shape[-1] > FLASH_MAX_HEAD_DIM:
        return None
    # Under autocast with fp32 weights the rotary embedding hands over fp32 queries; SDPA would run them in the
    # autocast dtype, and so does this.
    dtype = query.dtype if half else torch.get_autocast_dtype(device)
    # (1, heads, tokens, head_dim) -> (tokens, heads, head_dim): the projections wrote (tokens, heads, head_dim), so
    # this is usually that memory again, not a copy.
    query, key, value = (tensor[0].transpose(0, 1).to(dtype).contiguous() for tensor in (query, key, value))
    options = {"scale": scaling}
    if "window_size" in parameters:
        # masking_utils' window: key j is seen from query i when i - window < j <= i, i.e. window - 1 keys back.
        options["window_size"] = (window - 1 if window is not None else -1, 0)
    else:
        options["is_causal"] = True
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in parameters:
            options["enable_gqa"] = True
        else:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    bounds_q, bounds_k = kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k", kwargs["cu_seq_lens_q"])
    longest_q = kwargs.get("max_length_q") or int((bounds_q[1:] - bounds_q[:-1]).max())
    longest_k = kwargs.get("max_length_k") or longest_q
    with torch.autocast(device, enabled=False):
        output = varlen(query, key, value, bounds_q.to(torch.int32), bounds_k.to(torch.int32), int(longest_q),
                        int(longest_k), **options)
    return output.unsqueeze(0)


def _remembered(function):
    """functools.cache in a plain dict: these run inside compiled decoder layers, where dynamo traces through an
    lru_cache and says so in a UserWarning for every layer it compiles; a dict it reads like any other."""
    known = {}

    @functools.wraps(function)
    def remembered(*args):
        if args not in known:
            known[args] = function(*args)
        return known[args]

    remembered.cache_clear = known.clear
    return remembered


@_remembered
def _flash_capable(device) -> bool:
    """Whether torch's flash kernel runs on this device: NVIDIA GPUs from Ampere (compute capability 8.0) on; a T4
    or V100 (fp16 there) raises inside the kernel, and ROCm builds are not proven here. Other device types are the
    tests' stand-in."""
    import torch

    if device.type != "cuda":
        return True
    if torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


@_remembered
def _varlen_attention():
    """torch's varlen_attn and the names of its parameters (they changed between torch 2.10 and 2.12), or None."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)
