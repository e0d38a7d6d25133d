"""Hand-written forward/backward pairs for training on the CPU, where autograd runs every element-wise op of a
Llama-style block as its own pass over memory: RMSNorm and the rotary embedding (causal LM), the SwiGLU MLP and
peft's LoRA Linear (any task), and a frozen layer's products on weights packed once. On a GPU the same norms and
the MLPs' SwiGLU run compiled instead (compile_rms_norms, compile_swiglu_mlps: compiled.py).

RMSNorm with a hand-written backward.

Llama-style RMSNorm (x in fp32, scaled by 1/rms, cast back, times the weight) is ~15 element-wise passes over the
hidden states forward and backward when autograd records it op by op, and a CPU runs each as its own loop: on the
SFT bench (bf16 with AMX, 17 norms a step over ~2000 x 512) a norm took 5.3-5.7 ms forward + backward, 3.0 ms
with a hand-written backward, which saves one normalised copy of the input and reads the input again instead. The
backward below is four passes (the mean of the product in one read, by einsum) and only reads its saved input: an
earlier one scaled `hidden.float()` in place, which for an fp32 input is the input itself. Same forward to the bit;
input gradients within one bf16 rounding. In fp32, where the package's C kernels run (native.py: x86 with AVX2 or
AVX-512, GCC), forward and input gradient are one pass each over the hidden states (csrc/elementwise.c): 0.22
against 0.55 ms forward, 0.29 against 0.58 backward (SFT bench's 1920 x 512, 2 cores), within 1e-6 of the torch
path (sums in another order); the SwiGLU backward likewise, 1.3-1.4 against 3.2-3.4 ms (1920 x 1408). Both ~3% of
the fp32 SFT bench's step (bench/README.md, #12, session 26). In bf16 the same kernels (and the rotary embedding's)
read and write bf16 and round where torch's ops round: at most one bf16 rounding step from torch's results, on a
few elements in 100,000; the SFT bench's bf16 step ~6% shorter (session 27).

Swapped in by instance (the module's class, weights and state dict are untouched, so a saved run is a plain model)
for the norm classes whose forward is exactly that computation (SWAPPABLE: tests/test_kernels.py compares each one's
outputs and gradients with and without the swap). Others (Gemma's 1 + weight, OLMo-2's weight before the cast, ...)
keep theirs.

The rotary embedding (q * cos + rotate_half(q) * sin, for q and k) is ~5 passes forward and as many backward, with a
zero-filled tensor per slice in the backward; written out it is one product and two in-place multiply-adds each way
(3.1 against 1.5 ms a layer forward + backward, fp32, 1900 tokens, 8 + 2 heads of 64); in fp32 and bf16 on the
package's C kernels one read and one write each way (csrc/elementwise.c; the SFT bench's fp32 step 10-20 ms shorter,
within 1e-6 of torch's ops). Its output is contiguous in (batch, heads, tokens, head_dim), the layout the attention
kernel reads fastest: packed SDPA over the projections' transposed views cost 1.6 ms more a layer. transformers calls
it as a global of each modeling module, so it is swapped in only while the Trainer computes a loss (rotary_swapped),
and only in the modules of ROTARY_SWAPPABLE, whose function is Llama's (tests/test_kernels.py compares logits and
gradients with and without).

A LoRA layer (peft's lora.Linear: base(x) + B(A(dropout(x))) * scaling) is recorded by autograd as separate products,
a scaling pass and an add over the layer's output, and in the backward the scaled gradient, a second input gradient
and its add. Written as one function (_LoraLinear) the adapter's output is accumulated into the base product's by
the matrix product itself (addmm_ with alpha = scaling), the scaling is applied to the rank-r tensors, and the input
gradient of A is accumulated into the base's the same way: per q_proj of the SFT bench (fp32, 1890 tokens, 512 x
512, r 8) 16.3 against 19.2 ms forward + backward. Swapped in by instance (swap_lora_linears, by the workflow for
every task training on the CPU) and used only for the plain case (one active adapter, no dropout, no DoRA or other
variant, an nn.Linear base, not merged); anything else runs peft's forward. Under autocast every operand is cast
to the autocast dtype before the function, as autocast itself casts them for each product, and the function runs in
that dtype.

A frozen nn.Linear (a LoRA base's k/o and MLP projections, the LM head) multiplies through oneDNN in bf16, which
reorders the weight into its blocked layout on every call, forward and for the input gradient, and through MKL in
fp32. With both layouts made once (_PackedFrozenLinear, swap_frozen_linears; made again if the weight is another
tensor or was written to) the bf16 products ran 2-11% faster alone (bench's shapes, 1920 rows) and the SFT bench's
step 4.2-4.7% faster (same-process A/B, AMD avx512_bf16), at the price of the two packed copies (~100 MB there);
oneDNN's fp32 products on packed weights ran 7-16% faster than MKL's (results within ~1e-6 relative, not bitwise).
In fp32 the LM head is left to MKL: its rows (the learned targets) change every step, and oneDNN's state for its
shapes cost ~100 MB of peak RSS for ~1% of the step. A weight that is still the safetensors file's own pages (fp32
checkpoints load memory-mapped) has those pages released once packed (_release_file_pages): training reads only the
packs, and anything that reads the weight again faults the file's pages back in. Packing is skipped when the packs
would take more than a quarter of the memory available (a large model on a small host). Only where the rows are
few shapes (kernels_keep_state_per_shape): oneDNN keeps state per shape.

Under torch.compile (base_config.torch_compile) none of them is swapped in (eager_kernels_wanted): inductor fuses
transformers' own element-wise ops, and these functions' in-place writes only give it less to fuse. On the SFT bench
in bf16 (2 cores, avx512_bf16) compiled layers without them ran as fast as eager ones with them (bench/README.md,
#12, session 21).
"""
from __future__ import annotations

import contextlib
import sys
import types
import weakref

import torch


def eager_kernels_wanted(args) -> bool:
    """Whether training with these TrainingArguments swaps in this module's functions: on the CPU, not compiled."""
    return args.device.type == "cpu" and not args.torch_compile


SWAPPABLE = frozenset({
    "LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm", "Qwen3RMSNorm",
    "Qwen3MoeRMSNorm", "Phi3RMSNorm", "GraniteRMSNorm",
})


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, eps):
        # the C kernels' layout: one weight per feature (decided here, read again by the backward)
        ctx.weight_per_feature = weight.shape == hidden.shape[-1:]
        forward = c_kernel("rms_norm_forward", hidden, weight) if ctx.weight_per_feature else None
        if forward is not None:  # one read and one write of the hidden states (csrc/elementwise.c)
            output = torch.empty_like(hidden)
            inverse_rms = hidden.new_empty(hidden.shape[:-1] + (1,), dtype=torch.float32)
            forward(hidden.data_ptr(), weight.data_ptr(), eps, output.data_ptr(), inverse_rms.data_ptr(),
                    inverse_rms.numel(), hidden.shape[-1])
        else:
            wide = hidden.float()
            inverse_rms = torch.rsqrt(wide.square().mean(-1, keepdim=True).add_(eps))
            output = weight * (wide * inverse_rms).to(hidden.dtype)
        ctx.save_for_backward(hidden, weight, inverse_rms)
        return output

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, inverse_rms = ctx.saved_tensors
        backward = (c_kernel("rms_norm_backward", hidden, weight, grad := grad.contiguous())
                    if ctx.weight_per_feature else None)
        if backward is not None:
            grad_hidden = torch.empty_like(hidden)
            # a trained weight's gradient (full fine-tuning), summed over the rows in fp32 and rounded once
            grad_weight = weight.new_zeros(weight.shape, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            backward(grad.data_ptr(), hidden.data_ptr(), weight.data_ptr(), inverse_rms.data_ptr(),
                     grad_hidden.data_ptr(), None if grad_weight is None else grad_weight.data_ptr(),
                     inverse_rms.numel(), hidden.shape[-1])
            return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None
        wide = hidden.float()  # for an fp32 input the saved input itself: only read below
        weighted = (grad * weight).float()
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # The forward multiplies the weight by the normalised input after its cast to the input dtype.
            grad_weight = (grad * (wide * inverse_rms).to(hidden.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        # d/dx of x * r * w, r = 1 / rms(x): r * weighted - x * r^3 * mean(weighted * x). Four passes over the
        # hidden states (the mean is one read, in einsum), where autograd's op-by-op backward took about ten.
        along = torch.einsum("...i,...i->...", weighted, wide).unsqueeze_(-1)
        along.mul_(inverse_rms.pow(3)).div_(-hidden.shape[-1])
        grad_hidden = weighted.mul_(inverse_rms).addcmul_(wide, along).to(hidden.dtype)
        return grad_hidden, grad_weight, None


def c_kernel(name: str, *tensors):
    """The package's C kernel `name` (native.library) for these tensors: on the CPU, contiguous, all fp32, or all
    bf16 where the library has the kernel's bf16 version (`name`_bf16); None otherwise (torch's ops then run)."""
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.bfloat16) or not all(
            t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors):
        return None
    from . import native

    library = native.library()
    return None if library is None else getattr(library, name if dtype == torch.float32 else f"{name}_bf16", None)


def _forward(self, hidden_states):
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def swap_rms_norms(model) -> int:
    """Give every Llama-style RMSNorm of `model` the hand-written backward; returns how many were swapped."""
    return _swap_norm_forwards(model, _forward)


def _swap_norm_forwards(model, forward) -> int:
    swapped = 0
    for module in model.modules():
        if type(module).__name__ in SWAPPABLE and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(forward, module)
            swapped += 1
    return swapped


# Devices where the SWAPPABLE norms and the MLP_SWAPPABLE MLPs' SwiGLU run compiled (compiled.py: rms_norm and
# swiglu, one kernel forward and one or two backward each). Eager, a GPU launches ~6 kernels forward over fp32 copies
# of the hidden states for each norm (~49 a step in a 24-layer model) and more backward, and the SwiGLU keeps its
# activation for the backward (32k tokens x 4864 in bf16: 311 MB a layer). The CPU has the hand-written pairs instead.
COMPILED_KERNEL_DEVICES = ("cuda",)


def compiled_kernels_wanted(args) -> bool:
    """Whether training with these TrainingArguments runs the norms and SwiGLUs compiled: on a GPU, where neither
    the whole layers are compiled (torch_compile) nor Liger's kernels replace them (use_liger_kernel)."""
    return (args.device.type in COMPILED_KERNEL_DEVICES and not args.torch_compile
            and not getattr(args, "use_liger_kernel", False))


def rms_norm(hidden, weight, eps: float):
    """Llama's RMSNorm as the SWAPPABLE classes compute it: in fp32, cast back, times the weight."""
    dtype = hidden.dtype
    hidden = hidden.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(dtype)


def _compiled_forward(self, hidden_states):
    from . import compiled

    return compiled.run(rms_norm, hidden_states, self.weight, self.variance_epsilon)


def compile_rms_norms(model) -> int:
    """Run every Llama-style RMSNorm of `model` compiled (compiled.py); returns how many."""
    return _swap_norm_forwards(model, _compiled_forward)


# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)) (tests/test_kernels.py compares
# each one's outputs and gradients with and without the swap); swapped only where act_fn is SiLU.
MLP_SWAPPABLE = frozenset({
    "LlamaMLP", "MistralMLP", "MinistralMLP", "Qwen2MLP", "Qwen3MLP", "Qwen2MoeMLP", "Qwen3MoeMLP", "GraniteMLP",
    "OlmoMLP", "Olmo2MLP", "SmolLM3MLP",
})


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up. Autograd keeps gate (for SiLU's backward), silu(gate) and up (for the product's): here gate
    and up only, and silu(gate) is computed again in the backward, one more pass over (tokens x intermediate) for one
    such tensor less per layer while the step's activations are held (~98 MB of peak RSS on the SFT bench in fp32,
    ~9% of the step's saved activations). Forward and gradients the same ops as autograd's, so the same to the bit;
    in fp32 and bf16 on the C kernels the backward is one pass (sigmoid(gate) computed once), within 1e-6 of torch's
    in fp32, at most one rounding step in bf16."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        # torch's silu and mul_: measured as fast as one C pass in fp32 and faster in bf16 (2048 x 1408, session 28)
        return torch.nn.functional.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        backward = (c_kernel("swiglu_backward", gate, up, grad := grad.contiguous()) if all(ctx.needs_input_grad)
                    else None)
        if backward is not None:  # one pass, sigmoid(gate) computed once (csrc/elementwise.c)
            grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
            backward(grad.data_ptr(), gate.data_ptr(), up.data_ptr(), grad_gate.data_ptr(), grad_up.data_ptr(),
                     gate.numel())
            return grad_gate, grad_up
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = torch.nn.functional.silu(gate).mul_(grad)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


def _mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.dtype != up.dtype or gate.shape != up.shape:
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(_SwiGLU.apply(gate, up))


def swap_swiglu_mlps(model) -> int:
    """Give every Llama-style SiLU MLP of `model` the SwiGLU function; returns how many were swapped."""
    return _swap_mlp_forwards(model, _mlp_forward)


def _swap_mlp_forwards(model, forward) -> int:
    swapped = 0
    for module in model.modules():
        if (type(module).__name__ in MLP_SWAPPABLE and type(getattr(module, "act_fn", None)).__name__ in ("SiLU",
                                                                                                     "SiLUActivation")):
            module.forward = types.MethodType(forward, module)
            swapped += 1
    return swapped


def swiglu(gate, up):
    """The MLP_SWAPPABLE MLPs' act_fn(gate) * up with SiLU."""
    return torch.nn.functional.silu(gate) * up


def _compiled_mlp_forward(self, x):
    from . import compiled

    return self.down_proj(compiled.run(swiglu, self.gate_proj(x), self.up_proj(x)))


def compile_swiglu_mlps(model) -> int:
    """Run every Llama-style SiLU MLP's SwiGLU of `model` compiled (compiled.py); returns how many."""
    return _swap_mlp_forwards(model, _compiled_mlp_forward)


# transformers model types whose modeling module's apply_rotary_pos_emb is Llama's (q * cos + rotate_half(q) * sin).
ROTARY_SWAPPABLE = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "granite", "gemma", "gemma2",
    "gemma3_text", "starcoder2", "olmoe", "phi",
})


class _Rotary(torch.autograd.Function):
    """One of q, k rotated: out = states * cos + rotate_half(states) * sin, for cos and sin that need no gradient."""

    @staticmethod
    def forward(ctx, states, cos, sin):
        half = states.shape[-1] // 2
        rotated = torch.empty(states.shape, dtype=torch.result_type(states, cos), device=states.device)
        if not _rotary_in_c(states, cos, sin, rotated, transpose=False):
            torch.mul(states, cos, out=rotated)
            rotated[..., :half].addcmul_(states[..., half:], sin[..., :half], value=-1)
            rotated[..., half:].addcmul_(states[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        # The gradient goes back in the input's own layout (a transposed view of its projection), so the projection's
        # backward reads it without a copy.
        ctx.layout = (states.shape, states.stride(), states.dtype)
        return rotated

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        shape, stride, dtype = ctx.layout
        half = shape[-1] // 2
        # The transpose of the rotation: rotate_half's transpose is cat(y2, -y1).
        grad_states = torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device)
        if not _rotary_in_c(grad, cos, sin, grad_states, transpose=True):
            torch.mul(grad, cos, out=grad_states)
            grad_states[..., :half].addcmul_(grad[..., half:], sin[..., half:])
            grad_states[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return grad_states.to(dtype), None, None


def _rotary_in_c(states, cos, sin, out, transpose: bool) -> bool:
    """The rotation (or its transpose) of fp32 or bf16 states (batch, heads, tokens, dim) into out by the package's C
    kernel (csrc/elementwise.c: one read and one write where torch's three ops make four passes); False where it does
    not take them (then nothing was written)."""
    if not (states.dim() == out.dim() == cos.dim() == 4 and cos.shape == sin.shape and cos.shape[1] == 1
            and cos.shape[2:] == states.shape[2:] and cos.shape[0] in (1, states.shape[0])
            and states.stride(-1) == out.stride(-1) == 1 and states.dtype == out.dtype == cos.dtype):
        return False
    rotary = c_kernel("rotary", cos, sin) if states.device.type == "cpu" else None
    if rotary is None:
        return False
    batch, heads, tokens, dim = states.shape
    rotary(states.data_ptr(), *(states.stride(i) for i in range(3)), cos.data_ptr(), sin.data_ptr(),
           cos.stride(0) if cos.shape[0] > 1 else 0, out.data_ptr(), *(out.stride(i) for i in range(3)),
           batch, heads, tokens, dim, transpose)
    return True


def rotate_pair(q, k, cos, sin):
    """Llama's rotary embedding of q and k, x * cos + rotate_half(x) * sin, with cos and sin broadcast to them."""
    def rotated(states):
        half = states.shape[-1] // 2
        return states * cos + torch.cat((-states[..., half:], states[..., :half]), dim=-1) * sin

    return rotated(q), rotated(k)


def _hand_written_pair(q, k, cos, sin):
    return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)


def compiled_rotate_pair(q, k, cos, sin):
    """rotate_pair compiled (compiled.py): on a GPU one kernel each way for q and k together, where eager launches
    ~6 a tensor forward (the half-rotation's slices, negation and concatenation among them) and more backward."""
    from . import compiled

    return compiled.run(rotate_pair, q, k, cos, sin)


def _fast_rotary(original, pair=_hand_written_pair):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        """transformers' function where its arguments are the plain case; the original itself otherwise."""
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[0] if args else 1)
        if (len(args) > 1 or set(kwargs) - {"unsqueeze_dim"} or cos.requires_grad or sin.requires_grad
                or q.shape[-1] != cos.shape[-1] or q.shape[-1] % 2):
            return original(q, k, cos, sin, *args, **kwargs)
        wide_cos, wide_sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        try:  # the output takes q's (k's) shape: cos and sin must broadcast to it, not widen it
            fits = all(torch.broadcast_shapes(states.shape, wide_cos.shape) == states.shape for states in (q, k))
        except RuntimeError:
            fits = False
        if not fits:
            return original(q, k, cos, sin, *args, **kwargs)
        return pair(q, k, wide_cos, wide_sin)
    apply_rotary_pos_emb.original = original
    return apply_rotary_pos_emb


def rotary_modules(model) -> list:
    """The modeling modules of `model` whose rotary embedding may be swapped (found once; the model does not change)."""
    modules = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "model_type", None) in ROTARY_SWAPPABLE:
            owner = sys.modules.get(type(module).__module__)
            if owner is not None and callable(getattr(owner, "apply_rotary_pos_emb", None)):
                modules[owner.__name__] = owner
    return list(modules.values())


@contextlib.contextmanager
def rotary_swapped(modules, pair=_hand_written_pair):
    """The hand-written rotary embedding (or `pair`: compiled_rotate_pair on a GPU) in these modeling modules for
    the duration of the block."""
    installed = [owner for owner in modules if not hasattr(owner.apply_rotary_pos_emb, "original")]
    for owner in installed:
        owner.apply_rotary_pos_emb = _fast_rotary(owner.apply_rotary_pos_emb, pair)
    try:
        yield
    finally:
        for owner in installed:  # a block inside another leaves the outer one's swap in place
            owner.apply_rotary_pos_emb = owner.apply_rotary_pos_emb.original


class _LoraLinear(torch.autograd.Function):
    """x @ weight.T + bias + scaling * (x @ lora_a.T) @ lora_b.T, for weight (out, in), lora_a (r, in), lora_b (out, r),
    all of one dtype; with `packs` (a frozen weight's two packed layouts, _packs) the base products go through them."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, packs=None):
        flat = x.reshape(-1, x.shape[-1])
        down = flat @ lora_a.t()
        if packs is not None:
            out = torch.ops.mkldnn._linear_pointwise(flat, packs[0], bias, "none", [], "")
        else:
            out = torch.addmm(bias, flat, weight.t()) if bias is not None else flat @ weight.t()
        out.addmm_(down, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(flat, weight, lora_a, lora_b, down)
        ctx.scaling, ctx.input_shape, ctx.packs = scaling, x.shape, packs
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat, weight, lora_a, lora_b, down = ctx.saved_tensors
        needs_x, needs_weight, needs_bias, needs_a, needs_b, *_ = ctx.needs_input_grad
        grad = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = grad_bias = grad_a = grad_b = None
        if needs_b:
            # (r x tokens) @ (tokens x out), transposed: the (out x tokens) @ (tokens x r) orientation ran 2-4x slower
            # with r 8 (bench/README.md, session 17).
            grad_b = torch.mm(down.t(), grad).t().mul_(ctx.scaling)
        if needs_a or needs_x:
            # Computed transposed, as (r x out) @ (out x tokens): grad @ lora_b with lora_b (out x r) row-major took
            # MKL's slow path, 2.7x the time at the SFT bench's q_proj (0.57 against 0.21 ms, 1920 tokens, r 8).
            grad_down = torch.mm(lora_b.t(), grad.t()).t().mul_(ctx.scaling)
            if needs_a:
                grad_a = torch.mm(grad_down.t(), flat)
            if needs_x:
                grad_x = (torch.ops.mkldnn._linear_pointwise(grad, ctx.packs[1], None, "none", [], "")
                          if ctx.packs is not None else torch.mm(grad, weight))
                grad_x = grad_x.addmm_(grad_down, lora_a).view(ctx.input_shape)
        if needs_weight:
            grad_weight = torch.mm(grad.t(), flat)
        if needs_bias:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias, grad_a, grad_b, None, None


def _plain_lora(layer, x, args, kwargs):
    """(x, weight, bias, lora_a, lora_b, scaling, packs), all of one dtype, when `layer` computes plain LoRA on `x`
    now; None otherwise. packs: the base's packed weight where swap_frozen_linears gave it the packed forward."""
    if (x.device.type != "cpu" or args or kwargs or layer.disable_adapters or layer.merged
            or getattr(layer, "fan_in_fan_out", False)):
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    dropout = layer.lora_dropout[name]
    if not (isinstance(dropout, torch.nn.Identity) or not dropout.training
            or (isinstance(dropout, torch.nn.Dropout) and dropout.p == 0)):
        return None
    base, lora_a, lora_b = layer.get_base_layer(), layer.lora_A[name], layer.lora_B[name]
    modules = (base, lora_a, lora_b)
    if (any(type(module) is not torch.nn.Linear or _intercepted(module) for module in modules)
            or lora_a.bias is not None or lora_b.bias is not None):
        return None
    operands = (x, base.weight, base.bias, lora_a.weight, lora_b.weight)
    if torch.is_autocast_enabled("cpu"):
        # Every operand in autocast's dtype, as autocast casts them for each of the layer's products (x once here,
        # where peft's two products of x cast it twice).
        dtype = torch.get_autocast_dtype("cpu")
        if any(t is not None and t.dtype not in (dtype, torch.float32) for t in operands):
            return None
        operands = tuple(t if t is None else t.to(dtype) for t in operands)
    elif any(t is not None and t.dtype != x.dtype for t in operands):
        return None  # peft would cast x to the adapters' dtype: its own path
    packed = _runs_packed(base) and _packable(base, operands[0])
    return (*operands, layer.scaling[name], _packs(base) if packed else None)


def _intercepted(module) -> bool:
    """Whether something runs around or instead of the module's forward (DeepSpeed ZeRO-3 gathers weights in hooks,
    accelerate's offload replaces the forward): the function would skip it."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or ("forward" in module.__dict__ and not _runs_packed(module)) or hasattr(module, "_hf_hook"))


def _runs_packed(module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is _frozen_linear_forward


def _lora_forward(self, x, *args, **kwargs):
    plain = _plain_lora(self, x, args, kwargs)
    if plain is None:
        return type(self).forward(self, x, *args, **kwargs)
    with torch.autocast("cpu", enabled=False):
        return _LoraLinear.apply(*plain)


def swap_lora_linears(model) -> int:
    """Give every peft LoRA Linear layer of `model` the one-function forward for the plain case (_LoraLinear);
    returns how many were swapped."""
    try:
        from peft.tuners.lora import Linear
    except ImportError:
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is Linear:
            module.forward = types.MethodType(_lora_forward, module)
            swapped += 1
    return swapped


class _PackedFrozenLinear(torch.autograd.Function):
    """x @ weight.T + bias for a frozen weight, through oneDNN with the weight already in its blocked layout: forward
    by `forward_pack` (the weight's), the input gradient by `backward_pack` (its transpose's)."""

    @staticmethod
    def forward(ctx, x, bias, forward_pack, backward_pack):
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, forward_pack, bias, "none", [], "")
        ctx.backward_pack, ctx.input_shape = backward_pack, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat = grad.reshape(-1, grad.shape[-1])
        grad_x = torch.ops.mkldnn._linear_pointwise(flat, ctx.backward_pack, None, "none", [], "")
        return grad_x.view(ctx.input_shape), None, None, None


# The row count oneDNN is told to expect when it chooses the packed layout: the SFT bench's flattened row (~2000).
_PACK_ROWS_HINT = 2048
PACKED_DTYPES = (torch.bfloat16, torch.float32)
# The packs (two copies of each weight) may take at most this share of the memory available when they are planned.
PACKS_SHARE_OF_AVAILABLE = 0.25


# Per layer, beside it rather than in it: a packed tensor has no storage, so a deepcopy or pickle of a module holding
# one fails (a copy of the layer packs its own weight at its first call).
_PACKS = weakref.WeakKeyDictionary()


def _packs(layer):
    """The weight's two packed layouts, made again whenever the weight is another tensor or was written to."""
    weight = layer.weight
    key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
    cached = _PACKS.get(layer)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS_HINT),
                      torch.ops.mkldnn._reorder_linear_weight(weight.detach().t().contiguous(), _PACK_ROWS_HINT))
        _PACKS[layer] = cached
        _release_file_pages(weight)
    return cached[1], cached[2]


_PAGE_IS_FILE = 1 << 61  # /proc/self/pagemap: the page is the mapped file's own (not a private copy)


def _release_file_pages(tensor) -> int:
    """Drop this process's resident pages of `tensor` that are still the mapped file's own, and return how many
    bytes: a weight loaded memory-mapped from a safetensors file and never written is the file's page cache, so
    reading it again after MADV_DONTNEED faults the same bytes back in. A page that was ever written is a private
    copy (not a file page in pagemap) and is left alone, as is every page not wholly inside the tensor's own bytes
    (a contiguous tensor's: a strided one is left alone). Linux only; elsewhere (or without /proc) nothing is released."""
    import ctypes
    import mmap
    import os

    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return 0
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    first, end = -(-start // page), (start + tensor.nbytes) // page
    if end <= first:
        return 0
    try:
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            entries = os.pread(pagemap, (end - first) * 8, first * 8)
        finally:
            os.close(pagemap)
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    flags = memoryview(entries).cast("Q")
    released, run = 0, None
    for index in range(len(flags) + 1):
        is_file = index < len(flags) and flags[index] & _PAGE_IS_FILE
        if is_file and run is None:
            run = index
        elif not is_file and run is not None:
            length = (index - run) * page
            if libc.madvise(ctypes.c_void_p((first + run) * page), ctypes.c_size_t(length), mmap.MADV_DONTNEED) == 0:
                released += length
            run = None
    return released


def _packable_weight(layer) -> bool:
    """A frozen bf16 or fp32 nn.Linear weight (and bias) on the CPU. DeepSpeed ZeRO-3 (ds_id) gathers the weight into
    fresh memory for each forward: a pack would go stale."""
    if type(layer) is not torch.nn.Linear:
        return False
    weight, bias = layer.weight, layer.bias
    return (weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES and not weight.requires_grad
            and not hasattr(weight, "ds_id")
            and (bias is None or (not bias.requires_grad and bias.dtype == weight.dtype)))


def _packable(layer, x) -> bool:
    """Whether `layer`'s product with `x` may go through its packed weight now: _packable_weight, x of its dtype on
    the CPU, and no autocast that would run the product in another dtype."""
    weight = layer.weight
    return (x.device.type == "cpu" and x.dtype == weight.dtype and _packable_weight(layer)
            and not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != weight.dtype))


def _frozen_linear_forward(self, x):
    if not _packable(self, x):
        return torch.nn.Linear.forward(self, x)
    return _PackedFrozenLinear.apply(x, self.bias, *_packs(self))


def swap_frozen_linears(model, half_precision: bool = True, fp32: bool = True) -> int:
    """Give the frozen nn.Linear layers of `model` (a LoRA base's layers other than the adapted ones; the LM head in
    bf16) the pre-packed forward: bf16 weights with `half_precision`, fp32 ones with `fp32`. Returns how many were
    swapped: none where the packs would not fit (PACKS_SHARE_OF_AVAILABLE) or oneDNN is missing."""
    import logging
    import platform

    if not torch.backends.mkldnn.is_available():
        return 0
    from .models import output_layer

    head = output_layer(model)
    bf16 = half_precision and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    # fp32 through oneDNN was measured on x86 only (AVX-512 and AVX2); on ARM oneDNN runs other kernels.
    fp32 = fp32 and platform.machine().lower() in ("x86_64", "amd64")
    layers = [module for module in model.modules()
              if type(module) is torch.nn.Linear and not module.weight.requires_grad and not _intercepted(module)
              and (fp32 and module.weight.dtype == torch.float32 and module is not head
                   or bf16 and module.weight.dtype == torch.bfloat16)]
    # An fp32 head keeps its own forward (its row count changes every step) but is packed for the blocked head loss
    # (output_layer_packs): its packs count here too.
    fp32_head = fp32 and _packable_weight(head) and head.weight.dtype == torch.float32
    planned = layers + [head] if layers and fp32_head else layers
    packs_bytes = 2 * sum(layer.weight.nbytes for layer in planned)
    if layers and packs_bytes > PACKS_SHARE_OF_AVAILABLE * _available_memory():
        logging.getLogger(__name__).info(
            "Frozen layers keep their unpacked products: their packed weights (%.1f GB) would take more than %d%% of "
            "the memory available.", packs_bytes / 1e9, PACKS_SHARE_OF_AVAILABLE * 100)
        return 0
    for layer in layers:
        layer.forward = types.MethodType(_frozen_linear_forward, layer)
    return len(layers)


def _available_memory() -> int:
    import psutil

    return psutil.virtual_memory().available


def runs_packed_layers(model, dtype=None) -> bool:
    """Whether any frozen layer of `model` (of `dtype`, where given) multiplies through its packs."""
    return any(_runs_packed(module) and (dtype is None or module.weight.dtype == dtype) for module in model.modules())


def output_layer_packs(head, model=None):
    """The output layer's two packed layouts for a loss that multiplies by its weight itself
    (lm_head.head_cross_entropy), or None. They exist where the head is a frozen nn.Linear without bias and, checked
    when `model` is given (once, by the caller: it walks the modules), the model's frozen layers of the head's dtype
    run packed (swap_frozen_linears found room for the head's packs too, on a CPU it measured). Made once, as the
    layers' own (_packs)."""
    if not _packable_weight(head) or head.bias is not None:
        return None
    if model is not None and not runs_packed_layers(model, head.weight.dtype):
        return None
    return _packs(head)
