"""The hand-written RMSNorm backward (kernels.py): for every architecture whose norm class it may replace, the model's
logits are unchanged to the bit and its gradients equal autograd's, in fp32 and (within bf16 rounding) in bf16; other
norms are left alone; SFT on the CPU trains with it."""
from __future__ import annotations

import pytest

from llmfinetune.kernels import SWAPPABLE, swap_rms_norms
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


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("model_type", sorted(NORM_OF))
def test_the_swapped_norm_computes_what_the_architectures_own_does(model_type, dtype):
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
    assert torch.equal(swapped_logits, logits)
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
    from llmfinetune.kernels import _forward
    from llmfinetune.workflow import run

    data = make_dataset(tmp_path / "data", "text-generation")
    model = run(parse_job(job_dict("text-generation", "lora", tiny_models["qwen2"], data, tmp_path / "run",
                                   max_steps=1, save_strategy="no"))).model
    norms = [m for m in model.modules() if type(m).__name__ == "Qwen2RMSNorm"]
    assert norms and all(getattr(m.forward, "__func__", None) is _forward for m in norms)
