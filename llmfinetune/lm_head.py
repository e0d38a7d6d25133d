"""Causal-LM loss with vocabulary logits only where a token is learned.

A plain causal-LM step multiplies every position's hidden state by the vocabulary matrix, then throws away the
logits of prompt and padding positions (their labels are -100). Here a pre-hook on the output layer keeps only the
positions whose next token is a target, so prompt tokens cost no LM-head work in either direction and the logits
tensor shrinks to (targets x vocabulary). The loss is the same sum over targets divided by the same count Trainer
passes (tested equal to the standard loss), label smoothing included.

Settings whose loss needs the full logits or the model's own loss step aside to Trainer's standard loss, each with
one info line (standard_loss_reason): a compute_loss_func, MoE router logits (their aux loss is added by the model
only when it gets the labels) and nn.DataParallel (several GPUs without a launcher: the pre-hook would index each
replica's slice with the whole batch's mask).
"""
from __future__ import annotations

import contextlib
import logging

import torch
from transformers import Trainer

from .models import output_layer, transformers_model

IGNORE = -100
logger = logging.getLogger(__name__)


class CausalLMTrainer(Trainer):
    """The SFT Trainer: a packing collator learns the layout the model's attention needs once the model is known."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from .packing import bind_packed_collator

        bind_packed_collator(self)
        self._lora_layers = None
        self._rotary_modules, self._rotary_pair = [], None
        from . import kernels

        if kernels.eager_kernels_wanted(self.args):
            kernels.swap_rms_norms(self.model)
            self._rotary_modules, self._rotary_pair = kernels.rotary_modules(self.model), kernels._hand_written_pair
        elif kernels.compiled_kernels_wanted(self.args):
            logger.info("On this %s the RMSNorm, SwiGLU and rotary embedding run compiled, each function alone "
                        "(torch_compile or use_liger_kernel replace them), as does the loss; the first steps include "
                        "their compilation.", self.args.device.type.upper())
            kernels.compile_rms_norms(self.model)
            self._rotary_modules = kernels.rotary_modules(self.model)
            self._rotary_pair = kernels.compiled_rotate_pair

    def _track_num_input_tokens(self, inputs):
        """Trainer's count of non-padding tokens, from the collator's count where it gave one: Trainer's own sums
        the batch on the device and reads the sum back, a wait for the GPU every step. Several processes still
        count through Trainer (it adds up every process's count)."""
        from .packing import NON_PAD_TOKENS

        counted = inputs.get(NON_PAD_TOKENS) if isinstance(inputs, dict) else None
        if counted is None or self.args.include_num_input_tokens_seen != "non_padding" or self.args.world_size > 1:
            return super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen += counted

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, without_host_facts(inputs)[0], return_outputs, num_items_in_batch)

    def compute_loss_context_manager(self):
        """The hand-written rotary embedding on the CPU, the compiled one on a GPU (kernels.rotary_swapped) while
        the loss is computed. Under autocast peft's adapters need not cast their input to their fp32 weights:
        autocast casts it back to bf16 for the matmul anyway (the same values), and with a bf16 base that was two
        copies of the layer's input each way, per adapted layer and step."""
        stack = contextlib.ExitStack()
        stack.enter_context(super().compute_loss_context_manager())
        if self._rotary_modules:
            from .kernels import rotary_swapped

            stack.enter_context(rotary_swapped(self._rotary_modules, self._rotary_pair))
        if self.args.bf16 or self.args.fp16:
            if self._lora_layers is None:
                from peft.tuners.lora import LoraLayer

                # Found once: the adapters do not change while training, and walking every module each step is waste.
                self._lora_layers = [module for module in self.model.modules() if isinstance(module, LoraLayer)]
            stack.enter_context(_adapters_keep_input_dtype(self._lora_layers))
        return stack


def without_host_facts(inputs) -> tuple:
    """(the batch without the collator's host facts, which the model takes no arguments for; the facts, {} where
    it brought none): packing.HOST_FACTS."""
    from .packing import HOST_FACTS

    if not any(key in inputs for key in HOST_FACTS):
        return inputs, {}
    return ({key: value for key, value in inputs.items() if key not in HOST_FACTS},
            {key: inputs[key] for key in HOST_FACTS if key in inputs})


@contextlib.contextmanager
def _adapters_keep_input_dtype(layers):
    """peft's disable_input_dtype_casting for LoRA layers only: it also sets the flag on layers that lack it
    (TrainableTokensLayer, for added tokens), which then fail reading it back."""
    saved = [getattr(module, "cast_input_dtype_enabled", True) for module in layers]
    for module in layers:
        module.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for module, value in zip(layers, saved):
            module.cast_input_dtype_enabled = value


class TargetsOnlyTrainer(CausalLMTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs, facts = without_host_facts(inputs)
        head = output_layer(self.accelerator.unwrap_model(model))
        labels = inputs.get("labels")
        if head is None or labels is None or self._steps_aside(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from .packing import LEARNED_POSITIONS, learned_positions

        # Position t predicts the token at t + 1: the positions whose next token is learned, counted by the
        # collator on the host where it could (reading a count or the positions back waits for the GPU).
        # Flat indices and index_select rather than a boolean mask: the mask's backward is an index_put with
        # accumulation (7.6 ms a step on the SFT bench, bf16 on a CPU with AMX), index_select's an index_add.
        positions = facts.get(LEARNED_POSITIONS)
        if positions is None:
            positions = learned_positions(labels)
        count = len(positions)
        projected = self._bounded(positions, labels)
        # Training steps where the loss may multiply by the head's weight itself (head_cross_entropy): the model's
        # "logits" are then the head's input rows. Decided before the hooks below are on the head.
        packs = self._head_packs(model, head) if not return_outputs and torch.is_grad_enabled() else None
        handles = [head.register_forward_pre_hook(
            lambda module, args: (args[0].flatten(0, 1).index_select(0, projected), *args[1:]))]
        mlp = self._last_mlp(model)
        if mlp is not None:
            handles += _mlp_at(mlp, projected)
        try:
            with _returns_its_input(head) if packs is not None else contextlib.nullcontext():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        finally:
            for handle in handles:
                handle.remove()
        logits = outputs["logits"]
        width = head.in_features if packs is not None else None
        if logits.dim() != 2 or logits.shape[0] != len(projected) or (width and logits.shape[1] != width):
            # A model that reshapes its logits after the output layer: use the standard loss from now on.
            logger.warning("This model's logits cannot be limited to learned positions; using the full LM head.")
            self._targets_only_off = True
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if len(projected) != count and packs is None:
            outputs["logits"] = logits[:count]  # callers see the learned positions only
        chosen = labels.flatten().index_select(0, positions + 1)  # position p predicts the token at p + 1
        # LabelSmoother's (1 - e) * nll + e * mean over the vocabulary of -log p, summed over the targets: the same
        # per-target term as cross_entropy's label_smoothing (tested equal).
        smoothing = self.label_smoother.epsilon if self.label_smoother is not None else 0.0
        if packs is not None:
            total = head_cross_entropy(logits, head.weight, chosen, smoothing, packs)
        else:
            total = targets_cross_entropy(logits, chosen, smoothing, may_overwrite=not return_outputs)
        if num_items_in_batch is None:
            loss = total / count if count else logits.sum() * 0.0
        else:
            loss = total / torch.as_tensor(num_items_in_batch, device=total.device)
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs:
                # As Trainer.compute_loss: num_items_in_batch counts every process's targets, and DDP averages
                # gradients over processes, so the sum is scaled back up by the process count.
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss

    def _bounded(self, positions, labels):
        """The flat positions the head projects: the learned ones in order, then, where kernels keep state per
        shape (on the CPU), as many of the first positions not learned as make the row count a multiple of
        arguments.SHAPE_MULTIPLE (as far as the batch has them; their logits are not read)."""
        from . import arguments

        missing = -len(positions) % arguments.SHAPE_MULTIPLE
        if not hasattr(self, "_few_shapes"):  # found once: walking the modules each step is waste
            self._few_shapes = arguments.kernels_keep_state_per_shape(self.args, self.model)
        if not missing or not self._few_shapes:
            return positions
        learned = torch.zeros(labels.numel(), dtype=torch.bool, device=labels.device)
        learned[positions] = True
        spare = (~learned).nonzero().flatten()[:missing]
        return torch.cat([positions, spare])

    def _last_mlp(self, model):
        """The last block's MLP, where it may run at learned positions only (last_block; found once), unless
        that block is checkpointed: it would run its forward again in the backward, after the hooks are gone."""
        if not hasattr(self, "_last_block"):
            self._last_block = last_block(self.accelerator.unwrap_model(model))
        block = self._last_block
        if (block is None or self.args.gradient_checkpointing or getattr(block, "gradient_checkpointing", False)
                or type(block).__name__ == "CheckpointWrapper"):
            return None
        return block.mlp

    def _head_packs(self, model, head):
        """The head's packed weights where the loss multiplies by them itself (head_cross_entropy), or None. Decided
        once: on the CPU, for a model type whose logits are the head's output unchanged (HEAD_OUTPUT_IS_LOGITS), a
        frozen fp32 head with no bias whose model runs its frozen fp32 layers packed (kernels.output_layer_packs),
        and nothing else running around the head (kernels._intercepted). fp32 only: there it was measured faster
        (same-process A/B of the SFT bench's step: 1.012x and 1.024x); a bf16 head's own product is packed already,
        and the blocked loss measured no faster (0.986x, 1.007x)."""
        from . import kernels

        if not hasattr(self, "_blocked_head"):
            base = transformers_model(self.accelerator.unwrap_model(model))
            model_type = getattr(getattr(base, "config", None), "model_type", None)
            self._blocked_head = (model_type in HEAD_OUTPUT_IS_LOGITS and kernels.eager_kernels_wanted(self.args)
                                  and getattr(head, "weight", None) is not None
                                  and head.weight.dtype == torch.float32 and not kernels._intercepted(head)
                                  and kernels.output_layer_packs(head, model) is not None)
        return kernels.output_layer_packs(head) if self._blocked_head else None

    def _steps_aside(self, model) -> bool:
        if not hasattr(self, "_targets_only_off"):
            reason = standard_loss_reason(self, self.accelerator.unwrap_model(model))
            if reason:
                logger.info("lm_head_on_targets_only steps aside (%s): using the standard loss.", reason)
            self._targets_only_off = reason is not None
        return self._targets_only_off


# Rows of logits handled at a time by targets_cross_entropy: its temporaries are 256 x vocabulary fp32 (8 MB at the
# SFT bench's 8000), the same sizes every step.
CROSS_ENTROPY_ROWS = 256


def targets_cross_entropy(logits, targets, smoothing: float = 0.0, may_overwrite: bool = False):
    """The sum over the first len(targets) rows of cross_entropy(logits, targets, label_smoothing=smoothing),
    computed in fp32, with less memory than cross_entropy: its forward keeps only each row's log-sum-exp (not the
    log-probabilities), and its backward writes the gradient into the logits themselves when nothing else reads them
    (_overwritable; the caller says whether it hands them out). Rows past the targets (the head's extra rows where
    kernels keep state per shape) get a zero gradient, in place too, where slicing them off would have made a
    zero-filled gradient of all rows. On the CPU each fresh (rows x vocabulary) tensor is new memory to page-fault in
    whenever the row count grows: cross_entropy made three per step (log-probabilities, the zero-filled gradient of
    the loss, the gradient of the logits)."""
    if type(logits) is not torch.Tensor:
        # A DTensor (tensor parallelism, sharded over the vocabulary) or another subclass: its own cross_entropy.
        return torch.nn.functional.cross_entropy(logits[:len(targets)].float(), targets, reduction="sum",
                                                 label_smoothing=smoothing)
    return _TargetsCrossEntropy.apply(logits, targets, smoothing, may_overwrite and _overwritable(logits))


# Autograd nodes that do not keep their output for their own backward: a logits tensor they produced may be
# overwritten by the loss's backward (a tanh, for one, keeps its output; so may anything not listed). The caller
# vouches that nothing but the loss reads the logits after the forward.
_OUTPUT_NOT_SAVED = frozenset({"MmBackward0", "AddmmBackward0", "AddBackward0", "MulBackward0", "DivBackward0",
                               "ToCopyBackward0"})
_VIEWS = frozenset({"ViewBackward0", "UnsafeViewBackward0", "SliceBackward0", "ReshapeAliasBackward0"})


def _overwritable(logits) -> bool:
    node = logits.grad_fn
    while node is not None and node.name() in _VIEWS:
        node = node.next_functions[0][0]
    return node is not None and node.name() in _OUTPUT_NOT_SAVED


class _TargetsCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, smoothing, overwrite):
        from . import compiled
        from .kernels import c_kernel

        fused = (compiled.call(_fused_total_and_lse, logits, targets, smoothing)
                 if logits.device.type in FUSED_LOSS_DEVICES else compiled.NOT_COMPILED)
        if fused is not compiled.NOT_COMPILED:  # one kernel, one read of the logits
            total, lse = fused
            ctx.save_for_backward(logits, targets, lse)
            ctx.smoothing, ctx.overwrite, ctx.fused = smoothing, overwrite, True
            return total
        lse = torch.empty(len(targets), dtype=torch.float32, device=logits.device)
        row_sums = torch.empty_like(lse) if smoothing else None
        forward = c_kernel("cross_entropy_forward", logits)
        if forward is not None:  # one read of the logits, in fp32 (csrc/elementwise.c)
            forward(logits.data_ptr(), len(targets), logits.shape[-1], lse.data_ptr(),
                    None if row_sums is None else row_sums.data_ptr())
        else:
            for rows in _row_blocks(len(targets)):
                block = logits[rows].float()
                lse[rows] = torch.logsumexp(block, dim=-1)
                if smoothing:
                    row_sums[rows] = block.sum(dim=-1)
        picked = logits[:len(targets)].gather(1, targets[:, None]).squeeze(1).float()
        # Per row: lse - (1 - e) * x_target - (e / V) * sum_j x_j
        total = lse.sum() - (1.0 - smoothing) * picked.sum()
        if smoothing:
            total = total - smoothing / logits.shape[-1] * row_sums.sum()
        ctx.save_for_backward(logits, targets, lse)
        ctx.smoothing, ctx.overwrite, ctx.fused = smoothing, overwrite, False
        return total

    @staticmethod
    def backward(ctx, grad_total):
        from .kernels import c_kernel

        logits, targets, lse = ctx.saved_tensors
        smoothing, scale = ctx.smoothing, grad_total.float()
        grad = logits if ctx.overwrite else torch.empty_like(logits)
        if ctx.fused:
            from . import compiled

            if compiled.call(_fused_gradient_into, logits, grad, targets, lse, scale, smoothing) is None:
                return grad, None, None, None  # written into grad; NOT_COMPILED: the eager blocks below
        grad[len(targets):] = 0
        backward = c_kernel("cross_entropy_backward", logits, grad) if targets.dtype == torch.int64 else None
        if backward is not None:  # one pass, in fp32 and rounded once (csrc/elementwise.c)
            factor = float(scale)
            backward(logits.data_ptr(), lse.data_ptr(), targets.contiguous().data_ptr(), factor,
                     -(1.0 - smoothing) * factor, smoothing / logits.shape[-1] * factor, grad.data_ptr(),
                     len(targets), logits.shape[-1])
            return grad, None, None, None
        positive = bool(scale > 0)
        # scale * softmax = exp(x - lse + log(scale)): the scale costs no pass of its own when it is positive
        shift = lse - scale.log() if positive else lse
        in_place = ctx.overwrite and logits.dtype == torch.float32
        for rows in _row_blocks(len(targets)):
            # in fp32 whatever the logits' dtype, as cross_entropy computes its gradient
            block = logits[rows].sub_(shift[rows, None]) if in_place else logits[rows].float() - shift[rows, None]
            block.exp_()
            if not positive:
                block.mul_(scale)
            block.scatter_add_(1, targets[rows, None], (-(1.0 - smoothing) * scale).expand(block.shape[0], 1))
            if smoothing:
                block.sub_(smoothing / logits.shape[-1] * scale)
            if not in_place:
                grad[rows] = block
        return grad, None, None, None


# Devices where targets_cross_entropy runs as two compiled kernels (compiled.py). On a GPU the row blocks' eager ops
# made ~7 passes over the logits each way (casts, logsumexp's max / subtract / exp / sum, the gradient's cast back):
# at 16k learned rows x 151936 (Qwen2's vocabulary) in bf16 that is ~150 GB of memory traffic a step, the
# compiled pair ~15 GB. The CPU has its own C kernels (csrc/elementwise.c), and inductor's CPU compile takes seconds.
FUSED_LOSS_DEVICES = ("cuda",)


def _fused_total_and_lse(logits, targets, smoothing: float):
    """targets_cross_entropy's forward: its total and each learned row's log-sum-exp, in fp32."""
    rows = logits[:targets.shape[0]].float()
    lse = torch.logsumexp(rows, dim=-1)
    total = lse.sum() - (1.0 - smoothing) * rows.gather(1, targets[:, None]).sum()
    if smoothing:
        total = total - smoothing / rows.shape[-1] * rows.sum()
    return total, lse


def _fused_gradient_into(logits, grad, targets, lse, scale, smoothing: float):
    """targets_cross_entropy's backward into `grad` (which may be `logits` itself): scale x (softmax - (1 - e) x
    onehot - e / V) on the learned rows, computed in fp32 and rounded once, zero on the rows past them."""
    count, vocabulary = targets.shape[0], logits.shape[-1]
    rows = torch.exp(logits[:count].float() - lse[:, None]) * scale
    chosen = torch.arange(vocabulary, device=logits.device)[None, :] == targets[:, None]
    rows = rows - torch.where(chosen, (1.0 - smoothing) * scale, 0.0)
    if smoothing:
        rows = rows - smoothing / vocabulary * scale
    grad[:count] = rows.to(grad.dtype)
    grad[count:] = 0


# Model types whose causal-LM forward returns the output layer's result as the logits, unchanged (no scale or softcap
# after it): there the loss may take the head's input rows and multiply them by its weight itself
# (head_cross_entropy). tests/test_lm_head.py proves each one's loss and gradients unchanged.
HEAD_OUTPUT_IS_LOGITS = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _identity(rows):
    return rows


@contextlib.contextmanager
def _returns_its_input(head):
    """The output layer hands back its (already row-selected) input instead of multiplying it, for the block."""
    own = head.__dict__.get("forward")  # the packed forward kernels.swap_frozen_linears may have given it
    head.forward = _identity
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def head_cross_entropy(rows, weight, targets, smoothing: float, packs):
    """targets_cross_entropy(rows @ weight.T, targets, smoothing) for an fp32 weight, with the product through its
    packed layouts (kernels.output_layer_packs) and the logits never whole: see _BlockedHead."""
    return _BlockedHead.apply(rows, weight, targets, smoothing, packs)


class _BlockedHead(torch.autograd.Function):
    """The fp32 LM head and its loss together, CROSS_ENTROPY_ROWS rows at a time: each block's logits are made,
    reduced and turned into their gradient while they are in cache, and that gradient goes back through the weight in
    the forward already; the backward only scales the rows' gradient (rows x hidden). No (rows x vocabulary) tensor
    outlives its block, the rows past the targets (the head's extra rows where kernels keep state per shape) get a
    zero gradient, and every block has one of a few row counts (the rows come in multiples of SHAPE_MULTIPLE), so
    the fp32 head's products may go through its packed weight, which the head's own forward may not (its row count
    changes every step). Alone, at the SFT bench's shapes (fp32, 1088 rows, vocabulary 8000): 96-100 against
    113-122 ms for the head's products and the loss both ways; the same blocks through MKL's unpacked products
    127-133: hence packed only. Each block's softmax is one exp per logit where the package's C kernels run
    (softmax_rows in csrc/elementwise.c; torch's logsumexp and then exp took two, over more passes: the fp32 step
    10-35 ms shorter, bench/README.md, session 26)."""

    @staticmethod
    def forward(ctx, rows, weight, targets, smoothing, packs):
        from .kernels import c_kernel

        forward_pack, backward_pack = packs
        vocabulary, count = weight.shape[0], len(targets)
        grad_rows = torch.zeros_like(rows)
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for block_rows in _row_blocks(len(rows)):
            learned = max(0, min(block_rows.stop, count) - block_rows.start)
            if not learned:
                break  # past the targets: only extra rows, whose gradient is zero
            logits = torch.ops.mkldnn._linear_pointwise(rows[block_rows], forward_pack, None, "none", [], "")
            chosen = targets[block_rows.start:block_rows.start + learned, None]
            total -= (1.0 - smoothing) * logits[:learned].gather(1, chosen).sum()
            if smoothing:
                total -= smoothing / vocabulary * logits[:learned].sum()
            # d total / d logits, in the logits themselves: softmax - (1 - e) * onehot - e / V on the learned rows,
            # zero on the others
            grad = logits[:learned]
            softmax_rows = c_kernel("softmax_rows", logits)
            if softmax_rows is not None:  # one exp per logit (csrc/elementwise.c), where the two lines below take two
                lse = logits.new_empty(learned)
                softmax_rows(logits.data_ptr(), learned, vocabulary, lse.data_ptr())
            else:
                lse = torch.logsumexp(grad, dim=-1)
                grad.sub_(lse[:, None]).exp_()
            total += lse.sum()
            grad.scatter_add_(1, chosen, torch.full_like(chosen, -(1.0 - smoothing), dtype=grad.dtype))
            if smoothing:
                grad.sub_(smoothing / vocabulary)
            logits[learned:] = 0
            grad_rows[block_rows] = torch.ops.mkldnn._linear_pointwise(logits, backward_pack, None, "none", [], "")
        ctx.save_for_backward(grad_rows)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_rows,) = ctx.saved_tensors
        # not in place: a second backward through the graph (retain_graph) reads the saved gradient again
        return grad_rows * grad_total, None, None, None, None


def _row_blocks(count: int):
    return [slice(start, min(start + CROSS_ENTROPY_ROWS, count)) for start in range(0, count, CROSS_ENTROPY_ROWS)]


# Model types whose decoder layers end in `hidden = residual + mlp(norm(hidden))` (a scale or a norm after the MLP
# included), with an MLP that treats every position alone (no MoE router, whose aux loss counts every token): the
# last layer's MLP output is read only by the final norm and the LM head, position by position.
# tests/test_lm_head.py proves each one's loss and gradients unchanged.
LAST_MLP_ROWWISE = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "granite", "phi3", "gemma", "gemma2", "gemma3_text", "olmo2", "starcoder2",
})


def last_block(model):
    """The last decoder layer when its MLP's output matters only at the positions the LM head projects, so the MLP
    may run on those rows alone (_mlp_at): the other rows' values reach nothing the loss reads. On the SFT bench
    (~58% of positions learned) that is ~40% of one layer's MLP, both ways. None where that is not proven."""
    base = transformers_model(model)
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in LAST_MLP_ROWWISE:
        return None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers[-1] if layers and isinstance(getattr(layers[-1], "mlp", None), torch.nn.Module) else None


def _mlp_at(mlp, rows):
    """Hooks that run `mlp` on the flat `rows` of its input only and put its output back in the input's shape, with
    zeros elsewhere (those rows are read by nothing the loss depends on)."""
    shape = []

    def select(module, args):
        shape[:] = [args[0].shape]
        return (args[0].flatten(0, -2).index_select(0, rows), *args[1:])

    def put_back(module, args, output):
        leading = shape[0][:-1]
        full = output.new_zeros(leading.numel(), output.shape[-1])
        return full.index_copy(0, rows, output).view(*leading, output.shape[-1])

    return [mlp.register_forward_pre_hook(select), mlp.register_forward_hook(put_back)]


def standard_loss_reason(trainer, model):
    """Why this run needs Trainer's standard loss instead of logits at learned positions only; None when it does
    not."""
    if trainer.compute_loss_func is not None:
        return "compute_loss_func reads the full logits"
    config = getattr(model, "config", None)
    configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
    if any(getattr(c, "output_router_logits", False) for c in configs):
        return "output_router_logits: the model adds its router aux loss only when it computes the loss itself"
    if trainer.args.n_gpu > 1:
        return f"nn.DataParallel over {trainer.args.n_gpu} GPUs splits the batch after the learned positions are chosen"
    return None

