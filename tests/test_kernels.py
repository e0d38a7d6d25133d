"""The hand-written RMSNorm backward (kernels.py): for every architecture whose norm class it may replace, the model's
logits are unchanged to the bit and its gradients equal autograd's, in fp32 and (within bf16 rounding) in bf16; other
norms are left alone; SFT on the CPU trains with it. The same for the rotary embedding and peft's LoRA Linear (which
hands every case but the plain one to peft)."""
from __future__ import annotations

import contextlib

import pytest

from llmfinetune.kernels import ROTARY_SWAPPABLE, SWAPPABLE, rotary_modules, swap_rms_norms
from test_packing_attention import _tiny_config

NORM_OF = {"llama": "LlamaRMSNorm", "mistral": "MistralRMSNorm", "mixtral": "MixtralRMSNorm",
           "qwen2": "Qwen2RMSNorm", "qwen2_moe": "Qwen2MoeRMSNorm", "qwen3": "Qwen3RMSNorm",
           "qwen3_moe": "Qwen3MoeRMSNorm", "phi3": "Phi3RMSNorm", "granite": "GraniteRMSNorm"}


def test_every_swappable_norm_is_proven_here():
    assert set(NORM_OF.values()) == SWAPPABLE


def _step(model, ids, dtype):
    import torch

    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        logits = model(input_ids=ids, use_cache=False).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(params=["torch", "c"])
def ops(request, monkeypatch):
    """The functions on torch's ops ("torch": no C kernels), or on the package's C kernels where they take the
    tensors (fp32; skipped where there are none)."""
    from llmfinetune import native

    if request.param == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    elif native.library() is None:
        pytest.skip("the package's C kernels are not used here")
    return request.param


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("model_type", sorted(NORM_OF))
def test_the_swapped_norm_computes_what_the_architectures_own_does(model_type, dtype, ops):
    """On torch's ops the same logits to the bit; on the C kernels (fp32) within 1e-6 of the largest logit (sums of
    squares in another order). Gradients within 1e-5 of the largest (fp32) or bf16 rounding."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(model_type))
    if dtype == "bf16":  # as LoRA holds a causal LM's base in bf16 (trained weights fp32), under autocast
        model.to(torch.bfloat16)
        model.model.norm.float()
    for module in model.modules():  # every norm has a non-trivial weight, so its gradient path is exercised
        if type(module).__name__ == NORM_OF[model_type]:
            module.weight.data.uniform_(0.5, 1.5)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, grads = _step(model, ids, dtype)
    norms = sum(type(m).__name__ == NORM_OF[model_type] for m in model.modules())
    assert swap_rms_norms(model) == norms > 0
    swapped_logits, swapped_grads = _step(model, ids, dtype)
    if ops == "torch" or dtype == "bf16":
        assert torch.equal(swapped_logits, logits)
    else:
        assert (swapped_logits - logits).abs().max() <= 1e-6 * logits.abs().max()
    assert swapped_grads.keys() == grads.keys()
    for name, grad in grads.items():
        scale = grad.abs().max().item() or 1.0
        tolerance = 1e-5 if dtype == "fp32" else 2e-2
        assert (swapped_grads[name] - grad).abs().max().item() <= tolerance * scale, name


def test_other_norms_keep_their_own_forward():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_tiny_config("gemma"))  # x * (1 + weight): not Llama-style
    assert swap_rms_norms(model) == 0


def test_sft_on_the_cpu_trains_with_it(tiny_models, tmp_path):
    from conftest import job_dict, make_dataset
    from llmfinetune.config import parse_job
    from llmfinetune.kernels import _forward, _mlp_forward
    from llmfinetune.workflow import run

    data = make_dataset(tmp_path / "data", "text-generation")
    model = run(parse_job(job_dict("text-generation", "lora", tiny_models["qwen2"], data, tmp_path / "run",
                                   max_steps=1, save_strategy="no"))).model
    norms = [m for m in model.modules() if type(m).__name__ == "Qwen2RMSNorm"]
    assert norms and all(getattr(m.forward, "__func__", None) is _forward for m in norms)
    mlps = [m for m in model.modules() if type(m).__name__ == "Qwen2MLP"]
    assert mlps and all(getattr(m.forward, "__func__", None) is _mlp_forward for m in mlps)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("module", ["Qwen2RMSNorm", "Qwen2MLP"])
def test_the_compiled_norm_and_swiglu_compute_what_the_architectures_own_do(module, dtype, monkeypatch):
    """The GPU's norm and SwiGLU (kernels.rms_norm, kernels.swiglu through compiled.py), compiled here by inductor's
    CPU backend: logits and gradients as the model's own modules give them, within float rounding (fp32) or one
    bf16 rounding (bf16)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmfinetune import compiled, kernels

    swap, function = {"Qwen2RMSNorm": (kernels.compile_rms_norms, kernels.rms_norm),
                      "Qwen2MLP": (kernels.compile_swiglu_mlps, kernels.swiglu)}[module]
    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_failed", set())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config("qwen2"))
    if dtype == "bf16":
        model.to(torch.bfloat16)
    for norm in model.modules():  # the compiled norms get non-trivial weights, so their gradient path is exercised
        if module == type(norm).__name__ == "Qwen2RMSNorm":
            norm.weight.data.uniform_(0.5, 1.5)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, grads = _step(model, ids, "fp32")
    assert swap(model) == sum(type(m).__name__ == module for m in model.modules()) > 0
    compiled_logits, compiled_grads = _step(model, ids, "fp32")
    assert set(compiled._compiled) == {function} and not compiled._failed
    tolerance = 1e-5 if dtype == "fp32" else 2e-2
    assert (compiled_logits - logits).abs().max() <= tolerance * logits.abs().max()
    assert compiled_grads.keys() == grads.keys()
    for name, grad in grads.items():
        scale = grad.abs().max().item() or 1.0
        assert (compiled_grads[name] - grad).abs().max().item() <= tolerance * scale, name


def test_a_backward_that_cannot_be_compiled_fails_in_the_forward_call_and_runs_uncompiled(monkeypatch, caplog):
    """AOTAutograd builds a backward lazily, at the first loss.backward(): where only the backward's kernels cannot
    be built, the failure would come out of the training step as a traceback. compiled.py has it built with the
    forward, inside the call that falls back to the uncompiled function."""
    import torch
    from torch._dynamo.backends.common import aot_autograd

    from llmfinetune import compiled

    def no_backward(graph, example_inputs):
        raise RuntimeError("no kernels for this backward here\nsecond line")

    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_failed", set())
    monkeypatch.setattr(compiled, "_inductor", aot_autograd(fw_compiler=lambda graph, inputs: graph,
                                                            bw_compiler=no_backward))

    def gated(x, weight):  # a function of this test's own: dynamo keeps what it compiled per code object
        return torch.nn.functional.silu(x) * weight

    torch.manual_seed(0)
    inputs, grads = (torch.randn(4, 8), torch.randn(8)), []
    for how in (compiled.run, lambda function, *args: function(*args)):
        x, weight = (tensor.clone().requires_grad_() for tensor in inputs)
        how(gated, x, weight).square().sum().backward()
        grads.append((x.grad, weight.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert compiled._failed == {gated}
    warnings = [r.getMessage() for r in caplog.records if "could not be compiled" in r.getMessage()]
    assert len(warnings) == 1 and "no kernels for this backward here" in warnings[0], warnings


def test_on_a_gpu_sft_trains_with_the_compiled_norm_swiglu_and_rotary_and_their_losses(tiny_models, tmp_path,
                                                                                 monkeypatch):
    """COMPILED_KERNEL_DEVICES (the CPU standing in for a GPU, the CPU's own kernels off): the SFT run has every
    norm, SwiGLU and rotary embedding compiled, with the losses of the model's own; torch_compile (whole layers)
    leaves them alone."""
    import torch

    from conftest import job_dict, logged_losses, make_dataset
    from llmfinetune import compiled, kernels
    from llmfinetune.config import parse_job
    from llmfinetune.workflow import run

    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_failed", set())
    monkeypatch.setattr(kernels, "eager_kernels_wanted", lambda args: False)
    data = make_dataset(tmp_path / "data", "text-generation")

    def train(name, devices):
        monkeypatch.setattr(kernels, "COMPILED_KERNEL_DEVICES", devices)
        job = parse_job(job_dict("text-generation", "full", tiny_models["qwen2"], data, tmp_path / name, max_steps=3,
                                 save_strategy="no", logging_steps=1, eval_strategy="no"))
        model = run(job).model
        forwards = [getattr(m.forward, "__func__", None) for m in model.modules()
                    if type(m).__name__ in ("Qwen2RMSNorm", "Qwen2MLP")]
        return logged_losses(tmp_path / name), forwards

    own, own_forwards = train("own", ())
    fused, fused_forwards = train("compiled", ("cpu",))
    swapped = {kernels._compiled_forward, kernels._compiled_mlp_forward}
    assert not swapped & set(own_forwards)
    assert len(fused_forwards) == len(own_forwards) and set(fused_forwards) == swapped
    assert set(compiled._compiled) == {kernels.rms_norm, kernels.swiglu, kernels.rotate_pair}
    assert not compiled._failed
    assert fused == pytest.approx(own, rel=1e-5)
    assert not kernels.compiled_kernels_wanted(type("Args", (), {"device": torch.device("cpu"), "torch_compile": True,
                                                                 "use_liger_kernel": False})())


def test_the_norm_backward_leaves_its_fp32_input_as_it_was():
    """In fp32 `hidden.float()` is the saved input itself: a backward that wrote into it would hand the next reader
    (output_hidden_states, another op that saved the same tensor) a changed residual stream."""
    import torch

    from llmfinetune.kernels import _RMSNorm

    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 16, requires_grad=True)
    before = hidden.detach().clone()
    _RMSNorm.apply(hidden, torch.rand(16) + 0.5, 1e-6).square().sum().backward()
    assert torch.equal(hidden.detach(), before)


MLP_OF = {"llama": "LlamaMLP", "mistral": "MistralMLP", "ministral": "MinistralMLP", "qwen2": "Qwen2MLP",
          "qwen3": "Qwen3MLP", "qwen2_moe": "Qwen2MoeMLP", "qwen3_moe": "Qwen3MoeMLP", "granite": "GraniteMLP",
          "olmo": "OlmoMLP", "olmo2": "Olmo2MLP", "smollm3": "SmolLM3MLP"}


def test_every_swappable_mlp_is_proven_here():
    from llmfinetune.kernels import MLP_SWAPPABLE

    assert set(MLP_OF.values()) == MLP_SWAPPABLE


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("model_type", sorted(MLP_OF))
def test_the_swapped_mlp_computes_what_the_architectures_own_does(model_type, dtype, ops):
    """On torch's ops the same ops as autograd's, so logits and every gradient are the same to the bit, in fp32 and
    in bf16; with the C kernels' backward (fp32) the same logits and gradients within 1e-5 of the largest (SiLU's
    exp computed another way). The function keeps two of the three (tokens x intermediate) tensors autograd keeps."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmfinetune.kernels import swap_swiglu_mlps

    torch.manual_seed(0)
    config = _tiny_config(model_type)
    if model_type == "qwen3_moe":
        config.mlp_only_layers = [0]  # its dense MLP, in a layer without experts
    model = AutoModelForCausalLM.from_config(config)
    if dtype == "bf16":
        model.to(torch.bfloat16)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, grads = _step(model, ids, dtype)
    mlps = [m for m in model.modules() if type(m).__name__ == MLP_OF[model_type]]
    assert swap_swiglu_mlps(model) == len(mlps) > 0
    swapped_logits, swapped_grads = _step(model, ids, dtype)
    assert torch.equal(swapped_logits, logits)
    assert swapped_grads.keys() == grads.keys()
    for name, grad in grads.items():
        if ops == "torch" or dtype == "bf16":
            assert torch.equal(swapped_grads[name], grad), name
        else:
            assert (swapped_grads[name] - grad).abs().max() <= 1e-5 * (grad.abs().max() or 1.0), name

    def intermediate_tensors_saved(mlp):
        saved = set()

        def keep(tensor):
            if tensor.shape[-1] == mlp.up_proj.out_features and tensor.dim() == 3:
                saved.add(tensor.untyped_storage().data_ptr())
            return tensor

        hidden = torch.randn(2, 5, mlp.gate_proj.in_features, dtype=mlp.gate_proj.weight.dtype, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            mlp(hidden)
        return len(saved)

    assert intermediate_tensors_saved(mlps[0]) == 2
    assert intermediate_tensors_saved(type(mlps[0])(model.config)) == 3


def test_mlps_of_other_activations_keep_their_own_forward():
    from transformers import AutoModelForCausalLM

    from llmfinetune.kernels import swap_swiglu_mlps

    model = AutoModelForCausalLM.from_config(_tiny_config("gemma"))  # GemmaMLP: gelu, not SiLU
    assert swap_swiglu_mlps(model) == 0


ROTARY_OTHERS = {"phi3", "olmo2", "cohere", "stablelm", "gpt_neox"}  # their apply_rotary_pos_emb is not Llama's


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("model_type", sorted(ROTARY_SWAPPABLE))
def test_the_swapped_rotary_embedding_computes_what_the_architectures_own_does(model_type, dtype):
    """fp32: logits and gradients equal within 1e-5 of the largest value. bf16 (the whole model in bf16): the two
    round differently, and a gradient near zero can differ by more than its own size, so each is held to the fp32
    model's: the swapped one no farther from it than twice the architecture's own, plus one bf16 step."""
    _check_rotary(model_type, dtype)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_compiled_rotary_embedding_computes_what_the_architectures_own_does(dtype, monkeypatch):
    """The GPU's rotary embedding (kernels.rotate_pair through compiled.py), compiled here by inductor's CPU
    backend, held to the same bounds as the hand-written one."""
    from llmfinetune import compiled
    from llmfinetune.kernels import compiled_rotate_pair, rotate_pair

    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_failed", set())
    _check_rotary("qwen2", dtype, compiled_rotate_pair)
    assert set(compiled._compiled) == {rotate_pair} and not compiled._failed


def _check_rotary(model_type: str, dtype: str, *pair) -> None:
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from llmfinetune.kernels import rotary_modules, rotary_swapped

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(model_type))
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = _step(model, ids, "fp32")
    if dtype == "bf16":
        model = copy.deepcopy(model).to(torch.bfloat16)
    own = _step(model, ids, dtype)
    modules = rotary_modules(model)
    assert len(modules) == 1
    original = modules[0].apply_rotary_pos_emb
    with rotary_swapped(modules, *pair):
        assert modules[0].apply_rotary_pos_emb.original is original
        swapped = _step(model, ids, dtype)
    assert modules[0].apply_rotary_pos_emb is original
    assert swapped[1].keys() == own[1].keys()
    pairs = [("logits", swapped[0], own[0], reference[0])]
    pairs += [(name, swapped[1][name], own[1][name], reference[1][name]) for name in own[1]]
    for name, ours, theirs, truth in pairs:
        ours, theirs, truth = ours.float(), theirs.float(), truth.float()
        scale = truth.abs().max().item() or 1.0
        if dtype == "fp32":
            assert (ours - theirs).abs().max().item() <= 1e-5 * scale, name
        else:
            allowed = 2 * (theirs - truth).abs().max().item() + 2 ** -8 * scale
            assert (ours - truth).abs().max().item() <= allowed, name


@pytest.mark.parametrize("model_type", sorted(ROTARY_OTHERS))
def test_other_rotary_embeddings_are_left_alone(model_type):
    from transformers import AutoModelForCausalLM

    assert rotary_modules(AutoModelForCausalLM.from_config(_tiny_config(model_type))) == []


def _forwards_in_one_training_step(function, tiny_models, tmp_path, monkeypatch, task="text-generation",
                                   model="qwen2") -> int:
    """How many times the autograd function's forward ran in one LoRA training step on the CPU (by default SFT of
    the tiny Qwen2)."""
    from conftest import job_dict, make_dataset
    from llmfinetune.config import parse_job
    from llmfinetune.workflow import run

    calls = []
    forward = function.forward
    monkeypatch.setattr(function, "forward", staticmethod(lambda *args: calls.append(1) or forward(*args)))
    data = make_dataset(tmp_path / "data", task)
    run(parse_job(job_dict(task, "lora", tiny_models[model], data, tmp_path / "run", max_steps=1,
                           save_strategy="no")))
    return len(calls)


def test_sft_on_the_cpu_rotates_with_it_while_it_computes_the_loss(tiny_models, tmp_path, monkeypatch):
    from llmfinetune import kernels

    calls = _forwards_in_one_training_step(kernels._Rotary, tiny_models, tmp_path, monkeypatch)
    import transformers.models.qwen2.modeling_qwen2 as modeling

    assert calls  # q and k of every layer, in the step
    assert not hasattr(modeling.apply_rotary_pos_emb, "original")  # and put back after it


def test_the_swapped_rotary_function_hands_other_calls_to_transformers():
    """Layouts and arguments other than the model's own call: (batch, tokens, heads, dim) with unsqueeze_dim=2 is
    computed the same, by the hand-written function; cos that needs a gradient, or one that would widen q, goes to
    transformers' function (seen by the autograd node it leaves)."""
    import torch
    import transformers.models.llama.modeling_llama as modeling

    from llmfinetune.kernels import rotary_swapped

    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 4, 8, requires_grad=True), torch.randn(2, 6, 2, 8, requires_grad=True)
    cos, sin = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    original = modeling.apply_rotary_pos_emb
    with rotary_swapped([modeling]):
        swapped = modeling.apply_rotary_pos_emb
        got = swapped(q, k, cos, sin, unsqueeze_dim=2)
        assert type(got[0].grad_fn).__name__ == "_RotaryBackward"
        for a, b in zip(got, original(q, k, cos, sin, unsqueeze_dim=2)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        needs_grad = swapped(q, k, cos.clone().requires_grad_(), sin, unsqueeze_dim=2)
        widening = swapped(q[:1], k[:1], cos, sin, unsqueeze_dim=2)  # cos's batch of 2 would widen q's batch of 1
        assert type(needs_grad[0].grad_fn).__name__ == type(widening[0].grad_fn).__name__ == "AddBackward0"
        assert widening[0].shape == original(q[:1], k[:1], cos, sin, unsqueeze_dim=2)[0].shape
    assert modeling.apply_rotary_pos_emb is original


@pytest.mark.parametrize("written, expected", [({}, False), ({"use_kernels": True}, True)])
def test_hub_kernels_stay_off_unless_the_job_asks(written, expected, tiny_models, tmp_path, monkeypatch):
    """transformers 5.25 with its `kernels` dependency loads with hub kernels on and re-kernelizes at every
    train()/eval(), which dropped the swapped norms above: the package loads with use_kernels=False."""
    import transformers
    from conftest import job_dict
    from llmfinetune import models
    from llmfinetune.config import parse_job

    config = job_dict("text-generation", "lora", tiny_models["qwen2"], tmp_path, tmp_path / "run")
    config["model_config"]["initialization"] = {"initializer": {"from_pretrained_kwargs": written}}
    job = parse_job(config)
    captured = {}

    def from_pretrained(path, **kwargs):
        captured.update(kwargs)
        raise RuntimeError("captured")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    tokenizer = models.load_tokenizer(str(tiny_models["qwen2"]), job)
    with pytest.raises(RuntimeError, match="captured"):
        models.load_model(str(tiny_models["qwen2"]), job, "AutoModelForCausalLM", {}, tokenizer)
    assert captured["use_kernels"] is expected


def _lora_model(dtype="fp32", dropout=0.0, use_dora=False, target_modules=("q_proj", "v_proj", "gate_proj"),
                bias="none"):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config("qwen2"))  # q/v with a bias, gate_proj without
    if dtype == "bf16":  # as the LoRA method holds the base in bf16, adapters in fp32, under autocast
        model.to(torch.bfloat16)
    # "autocast": an fp32 base under bf16 autocast, as tasks other than causal LM train in bf16
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, use_dora=use_dora,
                                             target_modules=list(target_modules), bias=bias))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters an output and every gradient a path
            param.data.normal_(0, 0.2)
    return model


def _lora_step(model, ids, dtype):
    import torch

    from llmfinetune.lm_head import _adapters_keep_input_dtype
    from peft.tuners.lora import LoraLayer

    model.zero_grad()
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != "fp32"), _adapters_keep_input_dtype(layers):
        logits = model(input_ids=ids, use_cache=False).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype, bias", [("fp32", "none"), ("bf16", "none"), ("autocast", "none"), ("fp32", "all"),
                                         ("autocast", "all")])
def test_the_swapped_lora_layer_computes_what_peft_does(dtype, bias):
    """Logits and every trained weight's gradient with and without the one-function LoRA layer (fp32; a bf16 base
    under autocast, where it rounds the adapter's sum once instead of three times; an fp32 base under autocast, as
    tasks other than causal LM train in bf16; base biases trained, bias: all),
    and the swapped layers leave an autograd node of their own (the function ran, not peft's fallback)."""
    import torch

    from llmfinetune.kernels import swap_lora_linears

    model = _lora_model(dtype, bias=bias)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, grads = _lora_step(model, ids, dtype)
    adapters = 2 * 3 * model.config.num_hidden_layers
    assert len(grads) == adapters if bias == "none" else len(grads) > adapters
    assert swap_lora_linears(model) == 3 * model.config.num_hidden_layers
    nodes = []
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda module, args, output: nodes.append(type(output.grad_fn).__name__))
    swapped_logits, swapped_grads = _lora_step(model, ids, dtype)
    assert nodes == ["_LoraLinearBackward"]
    assert swapped_grads.keys() == grads.keys()
    tolerance = 1e-5 if dtype == "fp32" else 2e-2
    torch.testing.assert_close(swapped_logits, logits, rtol=tolerance, atol=tolerance * logits.abs().max().item())
    for name, grad in grads.items():
        if name.endswith("k_proj.bias"):
            continue  # zero in exact arithmetic (softmax ignores a shift shared by all keys): only rounding is left
        scale = grad.abs().max().item() or 1.0
        assert (swapped_grads[name] - grad).abs().max().item() <= tolerance * scale, name


@pytest.mark.parametrize("case", ["dropout", "dora", "disabled", "merged", "two adapters"])
def test_the_swapped_lora_layer_hands_other_cases_to_peft(case):
    """Dropout, DoRA, disabled or merged adapters, several active adapters: peft's own forward (its autograd nodes),
    with its own results."""
    import torch

    from llmfinetune.kernels import swap_lora_linears

    model = _lora_model(dropout=0.1 if case == "dropout" else 0.0, use_dora=case == "dora",
                        target_modules=("q_proj",))
    model.train()
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    def adapters_as_the_case_says():
        return model.disable_adapter() if case == "disabled" else contextlib.nullcontext()

    if case == "merged":
        model.merge_adapter()
    if case == "two adapters":
        from peft import LoraConfig

        model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
        model.base_model.set_adapter(["default", "other"])
    expected = []
    for swapped in (False, True):
        if swapped:
            swap_lora_linears(model)
        nodes = []
        hook = layer.register_forward_hook(lambda module, args, output: nodes.append(type(output.grad_fn).__name__))
        torch.manual_seed(2)
        with adapters_as_the_case_says():
            logits = model(input_ids=ids, use_cache=False).logits
        hook.remove()
        assert nodes and nodes != ["_LoraLinearBackward"], case
        expected.append(logits)
    torch.testing.assert_close(expected[1], expected[0], rtol=0, atol=0)


@pytest.mark.parametrize("task, model", [("text-generation", "qwen2"), ("sequenceclassification", "bert")])
def test_lora_on_the_cpu_trains_with_it(task, model, tiny_models, tmp_path, monkeypatch):
    from llmfinetune import kernels

    assert _forwards_in_one_training_step(kernels._LoraLinear, tiny_models, tmp_path, monkeypatch, task, model)


bf16_packing = pytest.mark.skipif(
    not __import__("torch").ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 kernels on this CPU")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [64, 100])
@pytest.mark.parametrize("dtype", [pytest.param("bf16", marks=bf16_packing), "fp32"])
def test_the_packed_frozen_linear_computes_what_linear_does(dtype, rows, bias):
    """bf16: the same to the bit (oneDNN runs nn.Linear's bf16 product too). fp32: oneDNN's blocked product against
    MKL's, within fp32 rounding."""
    import torch

    from llmfinetune.kernels import swap_frozen_linears

    torch.manual_seed(0)
    dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    layer = torch.nn.Linear(48, 80, bias=bias).to(dtype).requires_grad_(False)
    x = torch.randn(2, rows, 48, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, rows, 80, dtype=dtype)
    expected = layer(x)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    assert swap_frozen_linears(torch.nn.Sequential(layer)) == 1
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_PackedFrozenLinearBackward"
    (out_grad,) = torch.autograd.grad(out, x, grad)
    tolerance = 0 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(out_grad, expected_grad, rtol=tolerance, atol=tolerance)


def test_an_fp32_frozen_layer_under_bf16_autocast_keeps_autocasts_product():
    """Autocast runs an fp32 layer's product in bf16: the packed fp32 product would silently run it in fp32."""
    import torch

    from llmfinetune.kernels import swap_frozen_linears

    layer = torch.nn.Linear(32, 16).requires_grad_(False)
    swap_frozen_linears(torch.nn.Sequential(layer))
    x = torch.randn(64, 32, requires_grad=True)
    assert layer(x).grad_fn.name() == "_PackedFrozenLinearBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and out.grad_fn.name() != "_PackedFrozenLinearBackward"


def test_no_layer_is_packed_where_the_packs_would_not_fit(monkeypatch, caplog):
    import logging

    import torch

    from llmfinetune import kernels

    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 8)).requires_grad_(False)
    packs = 2 * 4 * (32 * 16 + 16 * 8)
    monkeypatch.setattr(kernels, "_available_memory", lambda: packs * 4 - 1)
    with caplog.at_level(logging.INFO, logger="llmfinetune.kernels"):
        assert kernels.swap_frozen_linears(model) == 0
    assert "would take more than 25% of the memory available" in caplog.text
    monkeypatch.setattr(kernels, "_available_memory", lambda: packs * 4)
    assert kernels.swap_frozen_linears(model) == 2


def test_an_fp32_heads_packs_count_toward_the_memory_they_may_take(monkeypatch):
    """The fp32 head keeps its own forward but is packed for the blocked head loss (lm_head.head_cross_entropy), so
    the room the packs may take is planned with its packs too."""
    import platform

    import torch
    from transformers import AutoModelForCausalLM

    from llmfinetune import kernels
    from test_packing_attention import _tiny_config

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    model = AutoModelForCausalLM.from_config(_tiny_config("qwen2")).requires_grad_(False)
    head = model.get_output_embeddings()
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear and m is not head]
    without_head = 2 * sum(layer.weight.nbytes for layer in layers)
    monkeypatch.setattr(kernels, "_available_memory", lambda: without_head * 4)
    assert kernels.swap_frozen_linears(model) == 0
    monkeypatch.setattr(kernels, "_available_memory", lambda: (without_head + 2 * head.weight.nbytes) * 4)
    assert kernels.swap_frozen_linears(model) == len(layers)
    assert "forward" not in head.__dict__ and kernels.output_layer_packs(head, model) is not None


def test_fp32_layers_are_packed_on_x86_only(monkeypatch):
    import platform

    import torch

    from llmfinetune.kernels import swap_frozen_linears

    model = torch.nn.Sequential(torch.nn.Linear(32, 16)).requires_grad_(False)
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert swap_frozen_linears(model) == 0
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert swap_frozen_linears(model) == 1


def test_a_packed_weights_file_pages_are_released_and_read_back_the_same(tmp_path):
    """A weight memory-mapped from a file (as safetensors loads fp32 checkpoints) and never written: once packed, its
    pages leave this process's memory, and reading the weight again gives the file's bytes. A page written since
    the load (a private copy) keeps the writing; memory that is no file's is left alone."""
    import mmap

    import numpy
    import torch

    from llmfinetune.kernels import _release_file_pages, swap_frozen_linears

    page_floats = mmap.PAGESIZE // 4
    values = numpy.random.default_rng(0).standard_normal(64 * page_floats, dtype=numpy.float32)
    values.tofile(tmp_path / "weight.bin")
    mapped = numpy.memmap(tmp_path / "weight.bin", dtype=numpy.float32, mode="c")  # private, copy-on-write
    weight = torch.from_numpy(mapped).view(64 * page_floats // 256, 256)
    weight[3, 0] = 7.0  # page 0 becomes a private copy
    expected = weight.clone()

    def present_pages():  # in this process's page table (/proc/self/pagemap bit 63), not merely in page cache
        import os

        descriptor = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            entries = os.pread(descriptor, 64 * 8, weight.data_ptr() // mmap.PAGESIZE * 8)
        finally:
            os.close(descriptor)
        return [entry >> 63 for entry in memoryview(entries).cast("Q")]

    assert weight.data_ptr() % mmap.PAGESIZE == 0 and present_pages() == [1] * 64
    layer = torch.nn.Linear(256, weight.shape[0], bias=False)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    swap_frozen_linears(torch.nn.Sequential(layer))
    x = torch.randn(8, 256)
    torch.testing.assert_close(layer(x), x @ expected.t(), rtol=1e-5, atol=1e-5)
    assert present_pages() == [1] + [0] * 63
    assert torch.equal(weight, expected)  # the file's bytes come back, and the written page kept its writing
    assert present_pages() == [1] * 64
    # Only the tensor's own bytes: a tensor over the first half of a mapped storage leaves the second half's pages.
    assert _release_file_pages(weight.flatten()[:32 * page_floats]) == 31 * mmap.PAGESIZE  # page 0 is private
    assert present_pages() == [1] + [0] * 31 + [1] * 32
    assert _release_file_pages(torch.randn(64 * page_floats)) == 0


@bf16_packing
def test_the_packed_weight_is_made_again_when_the_weight_changes():
    import torch

    from llmfinetune.kernels import swap_frozen_linears

    layer = torch.nn.Linear(32, 16, bias=False).to(torch.bfloat16).requires_grad_(False)
    swap_frozen_linears(torch.nn.Sequential(layer))
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: the same tensor, a new version
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight), rtol=0, atol=0)
    layer.weight = torch.nn.Parameter(torch.randn(16, 32, dtype=torch.bfloat16), requires_grad=False)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight), rtol=0, atol=0)
    layer.weight.requires_grad_(True)  # trained weights keep Linear's own forward (no pack of a moving weight)
    assert layer(x).grad_fn.name() != "_PackedFrozenLinearBackward"
    layer.weight.requires_grad_(False)
    x.requires_grad_(True)
    assert layer(x).grad_fn.name() == "_PackedFrozenLinearBackward"
    layer.weight.ds_id = 0  # DeepSpeed ZeRO-3 gathers the weight anew for each forward: Linear's own forward
    assert layer(x).grad_fn.name() != "_PackedFrozenLinearBackward"


@pytest.mark.parametrize("bf16,packing", [pytest.param(True, False, marks=bf16_packing), (False, True),
                                           (False, False)])
def test_lora_sft_on_the_cpu_runs_the_frozen_layers_packed(bf16, packing, tiny_models, tmp_path, monkeypatch):
    """A frozen bf16 base (k, o, MLP projections and the LM head) runs packed, and in fp32 so does every frozen layer
    but the LM head where the rows are packed: then they come in multiples of SHAPE_MULTIPLE tokens. fp32 rows of
    every length (padded batches) keep MKL's products, which keep no state per shape."""
    import torch

    from conftest import job_dict, make_dataset
    from llmfinetune import arguments, kernels
    from llmfinetune.config import parse_job
    from llmfinetune.workflow import run

    calls, rows = [], []
    forward = kernels._PackedFrozenLinear.forward
    monkeypatch.setattr(kernels._PackedFrozenLinear, "forward",
                        staticmethod(lambda ctx, x, *args: calls.append((x.dtype, x.shape[-1])) or forward(ctx, x, *args)))
    head_forward = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward",
                        lambda self, x: rows.append(x.flatten(0, -2).shape[0]) or head_forward(self, x))
    data = make_dataset(tmp_path / "data", "text-generation")
    model = run(parse_job(job_dict("text-generation", "lora", tiny_models["qwen2"], data, tmp_path / "run",
                                   max_steps=2, save_strategy="no", packing=packing, bf16=bf16))).model
    hidden = model.config.hidden_size
    if not (bf16 or packing):
        assert not calls
        return
    assert {dtype for dtype, _ in calls} == {torch.bfloat16 if bf16 else torch.float32}
    packed = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if kernels._runs_packed(module)}
    assert packed == ({"k_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "base_layer"}
                      | ({"lm_head"} if bf16 else set()))
    if not bf16:
        # every unpacked layer's rows: the LM head's (MKL) and, with dropout, peft's adapters'
        assert rows and all(count % arguments.SHAPE_MULTIPLE == 0 for count in rows)
    assert any(width == hidden for _, width in calls)


@bf16_packing
@pytest.mark.parametrize("bias", ["none", "all"])
def test_the_lora_layer_on_a_packed_base_computes_what_peft_does(bias, monkeypatch):
    """A bf16 base under autocast whose frozen layers run packed: the one-function LoRA layer multiplies through its
    base layer's packed weight too (not peft's fallback, which a swapped forward would otherwise trigger), with
    peft's logits and gradients; a trained base bias keeps the unpacked product."""
    import torch

    from llmfinetune import kernels

    model = _lora_model("bf16", bias=bias)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, grads = _lora_step(model, ids, "bf16")
    kernels.swap_lora_linears(model)
    assert kernels.swap_frozen_linears(model) > 0
    packed_bases = []
    packs = kernels._packs
    monkeypatch.setattr(kernels, "_packs", lambda layer: packed_bases.append(layer) or packs(layer))
    nodes = []
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda module, args, output: nodes.append(type(output.grad_fn).__name__))
    swapped_logits, swapped_grads = _lora_step(model, ids, "bf16")
    assert nodes == ["_LoraLinearBackward"]
    assert (layer.base_layer in packed_bases) == (bias == "none")
    torch.testing.assert_close(swapped_logits, logits, rtol=2e-2, atol=2e-2 * logits.abs().max().item())
    for name, grad in grads.items():
        if name.endswith("k_proj.bias"):
            continue  # zero in exact arithmetic: only rounding is left
        assert (swapped_grads[name] - grad).abs().max().item() <= 2e-2 * (grad.abs().max().item() or 1.0), name


@bf16_packing
def test_a_model_with_packed_layers_can_be_copied():
    """A packed tensor has no storage: kept inside the layer it made deepcopy (TRL copies reference models) fail."""
    import copy

    import torch

    from llmfinetune.kernels import swap_frozen_linears

    model = torch.nn.Sequential(torch.nn.Linear(32, 16)).to(torch.bfloat16).requires_grad_(False)
    swap_frozen_linears(model)
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    expected = model(x)
    copied = copy.deepcopy(model)
    torch.testing.assert_close(copied(x), expected, rtol=0, atol=0)
