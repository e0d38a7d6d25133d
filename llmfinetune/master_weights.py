"""Full fine-tuning under bf16 with the model's weights in bf16 and an fp32 master copy of each in the optimizer
(the scheme of Megatron and DeepSpeed's bf16 optimizer). Under plain autocast the weights stay fp32: every product
casts its weight again each forward and backward, and the residual stream, norms and element-wise work run in fp32.
On an H200 (0.5B Qwen2-shaped model, 8 x 4096 packed tokens) that was ~155 ms of element-wise work and casts beside
~88 ms of matrix products in a 362 ms step; bf16 weights measured 1.08x the tokens/s there with 7 GB less memory,
and 1.01-1.16x on an avx512_bf16 CPU (bench/README.md, "On a GPU", session 20).

The optimizer is the one Trainer builds, stepping on fp32 masters instead of the model's weights: before each step
the bf16 gradients are fp32 ones on the masters, clipped there, after it the masters are rounded into the weights. The
masters travel in the optimizer's state dict (optimizer.pt of each checkpoint), so a resumed run continues from the
same fp32 values; at the end of training the model gets them back as fp32 weights, so the saved model is what the
optimizer trained, not its bf16 rounding. Under gradient accumulation each micro-batch's gradients are added to the
masters' fp32 ones after its backward (Trainer.training_step, wrapped on the instance), so the micro-batches never
add up in bf16. Otherwise only torch hooks: Trainer, accelerate and the LR scheduler see the optimizer they expect."""
from __future__ import annotations

import logging

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

MASTERS_KEY = "llmfinetune_fp32_master_weights"
# Optimizers built by torch itself from their parameter groups: stepping on other tensors than the model's is all
# they need. bitsandbytes, galore, schedule-free and the others keep their own state per model parameter.
TORCH_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop")


def unsupported_because(training_args) -> str | None:
    """Why this run cannot train bf16 weights with fp32 masters (None: it can)."""
    optim = getattr(training_args.optim, "value", training_args.optim)
    if optim not in TORCH_OPTIMIZERS:
        return f"optim {optim!r} keeps its own state per model weight (these work: {', '.join(TORCH_OPTIMIZERS)})"
    if training_args.gradient_accumulation_steps > 1 and training_args.world_size > 1:
        # The micro-batches' gradients move into fp32 after each backward, out of the reach of DDP, which
        # all-reduces what the weights hold at the last micro-batch.
        return "gradient_accumulation_steps > 1 under several processes would all-reduce the last micro-batch only"
    return None


def keep_fp32_masters(trainer) -> None:
    """Make `trainer` build its optimizer over fp32 masters of the model's bf16 trainable weights, and add each
    micro-batch's gradients up in fp32 on the masters."""
    create_optimizer = trainer.create_optimizer

    def create_optimizer_over_masters(*args, **kwargs):
        optimizer = create_optimizer(*args, **kwargs)
        if not getattr(optimizer, "_llmfinetune_masters", None):
            step_on_masters(optimizer, trainer.args.max_grad_norm)
        return optimizer

    training_step = trainer.training_step

    def training_step_then_gradients_to_masters(*args, **kwargs):
        loss = training_step(*args, **kwargs)
        masters = getattr(_optimizer_of(trainer), "_llmfinetune_masters", None)
        if masters:
            gradients_to_masters(*masters, last=trainer.accelerator.sync_gradients)
        return loss

    trainer.create_optimizer = create_optimizer_over_masters
    trainer.training_step = training_step_then_gradients_to_masters
    if hasattr(trainer, "_clip_grad_norm"):  # Trainer's clipping (and the norm it logs), transformers >= 5
        clip_model_gradients = trainer._clip_grad_norm

        def clip_what_the_optimizer_steps(model):
            optimizer = _optimizer_of(trainer)
            if not getattr(optimizer, "_llmfinetune_masters", None):
                return clip_model_gradients(model)
            return clip_stepped_gradients(optimizer, trainer.args.max_grad_norm)

        trainer._clip_grad_norm = clip_what_the_optimizer_steps
    trainer.add_callback(_MastersBackAtTheEnd(trainer))


def gradients_to_masters(weights, masters, last: bool) -> None:
    """After a micro-batch's backward: its bf16 gradients added to the masters' fp32 ones. Before the last
    micro-batch of a step the weights' gradients are emptied (the next backward brings only its own); at the last
    they hold the step's total again, in bf16, for what reads them (the norm Trainer logs where max_grad_norm is 0)."""
    for weight, master in zip(weights, masters):
        if weight.grad is None:
            continue
        if master.grad is None:
            master.grad = weight.grad.float()
        else:
            master.grad.add_(weight.grad)
            if last:
                weight.grad = master.grad.to(weight.dtype)
        if not last:
            weight.grad = None


def step_on_masters(optimizer, max_grad_norm: float = 0.0) -> None:
    """Swap each bf16 parameter of `optimizer`'s groups for an fp32 copy, and hook its step and state dict. The step
    clips the masters' fp32 gradients to `max_grad_norm` itself: what Trainer clipped was their bf16 copy."""
    import torch

    weights, masters = [], []
    for group in optimizer.param_groups:
        swapped = []
        for weight in group["params"]:
            if weight.dtype in (torch.bfloat16, torch.float16):
                master = weight.detach().float()  # a new fp32 tensor: the weight is bf16/fp16
                weights.append(weight)
                masters.append(master)
                swapped.append(master)
            else:
                swapped.append(weight)
        group["params"] = swapped
    optimizer._llmfinetune_masters = (weights, masters)
    optimizer._llmfinetune_clipped = False

    def grads_to_masters(optimizer, args, kwargs):
        if max_grad_norm and max_grad_norm > 0 and not optimizer._llmfinetune_clipped:
            clip_stepped_gradients(optimizer, max_grad_norm)  # a step that Trainer's clipping did not go through
        else:
            _masters_take_gradients(weights, masters)

    def masters_to_weights(optimizer, args, kwargs):
        with torch.no_grad():
            torch._foreach_copy_(weights, masters)
        for master in masters:
            master.grad = None
        optimizer._llmfinetune_clipped = False

    def save_masters(optimizer, state_dict):
        state_dict[MASTERS_KEY] = masters

    def load_masters(optimizer, state_dict):
        saved = state_dict.pop(MASTERS_KEY, None)
        if saved is None:
            logger.warning("The checkpoint's optimizer state has no fp32 master weights (written by another setup): "
                           "they start again from the checkpoint's bf16 weights.")
            with torch.no_grad():
                torch._foreach_copy_(masters, weights)
            return state_dict
        if len(saved) != len(masters) or any(s.shape != m.shape for s, m in zip(saved, masters)):
            from .errors import UserError

            raise UserError(f"The checkpoint's optimizer.pt holds {len(saved)} fp32 master weights that do not match "
                            f"the {len(masters)} weights this job trains: resume from a checkpoint of this job.")
        with torch.no_grad():
            torch._foreach_copy_(masters, [s.to(m.device) for s, m in zip(saved, masters)])
        return state_dict

    optimizer.register_step_pre_hook(grads_to_masters)
    optimizer.register_step_post_hook(masters_to_weights)
    optimizer.register_state_dict_post_hook(save_masters)
    optimizer.register_load_state_dict_pre_hook(load_masters)


def _masters_take_gradients(weights, masters) -> None:
    """The weights' gradients on the masters that have none yet (a step that no training_step prepared)."""
    for weight, master in zip(weights, masters):
        if master.grad is None and weight.grad is not None:
            master.grad = weight.grad.float()


def clip_stepped_gradients(optimizer, max_grad_norm: float):
    """Clip the gradients `optimizer` steps on (the masters' fp32 ones, and those of weights that were fp32 already)
    to `max_grad_norm`, once for the step; their norm, which Trainer logs. Trainer's own clipping went over the
    model's bf16 gradients, which the masters' step does not read: a second pass over them, and per-tensor
    multiplies of bf16 gradients by an fp32 factor (290 of them a step on the H200's 0.5B model, by the profile's
    count, session 20)."""
    import torch

    _masters_take_gradients(*optimizer._llmfinetune_masters)
    stepped = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    optimizer._llmfinetune_clipped = True
    return torch.nn.utils.clip_grad_norm_(stepped, max_grad_norm if max_grad_norm > 0 else float("inf"))


def masters_into_model(optimizer) -> bool:
    """Make the weights that trained with masters fp32 again, with the masters' values where the model still holds
    their rounding (False where it holds other values, from the best checkpoint: they stay as they are)."""
    import torch

    weights, masters = optimizer._llmfinetune_masters
    with torch.no_grad():
        current = all(torch.equal(w, m.to(w.dtype)) for w, m in zip(weights, masters))
        for weight, master in zip(weights, masters):
            weight.data = master.clone() if current else weight.data.float()
    return current


def _optimizer_of(trainer):
    optimizer = trainer.optimizer
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch one


class _MastersBackAtTheEnd(TrainerCallback):
    """Puts the masters into the model when training ends, before the workflow saves it."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        optimizer = _optimizer_of(self.trainer)
        if optimizer is None or not getattr(optimizer, "_llmfinetune_masters", None):
            return
        if masters_into_model(optimizer):
            logger.info("Training ended: the fp32 master weights are the model's weights again.")
        else:
            logger.info("Training ended on the best checkpoint's weights (load_best_model_at_end): kept as that "
                        "checkpoint holds them, bf16 values now in fp32.")
