"""The LM head on learned positions only (lm_head_on_targets_only): every loss setting is either honoured (the loss
equals Trainer's standard loss with that setting) or the fast path steps aside to the standard loss, with one info
line."""
from __future__ import annotations

import logging

import pytest

from llmfinetune.lm_head import HEAD_OUTPUT_IS_LOGITS, LAST_MLP_ROWWISE

IGNORE = -100
INPUTS = [[1, 2, 3, 5, 6, 7, 9, 4], [1, 2, 8, 9, 4, 3, 0, 0]]
LABELS = [[IGNORE, IGNORE, IGNORE, 5, 6, 7, 9, 4], [IGNORE, IGNORE, 8, 9, 4, IGNORE, IGNORE, IGNORE]]
LEARNED = 8  # positions whose next token is a target


def _trainers(model, tmp_path, **arguments):
    """The fast Trainer and the standard one, on the same model and settings."""
    from transformers import Trainer, TrainingArguments

    from llmfinetune.lm_head import TargetsOnlyTrainer

    extra = {"compute_loss_func": arguments.pop("compute_loss_func")} if "compute_loss_func" in arguments else {}
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", **arguments)
    return TargetsOnlyTrainer(model=model, args=args, **extra), Trainer(model=model, args=args, **extra)


def _batch():
    import torch

    return {"input_ids": torch.tensor(INPUTS), "labels": torch.tensor(LABELS)}


def _logit_rows(model):
    """How many positions the output layer projects, per forward."""
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, output: seen.append(
        output.shape[0] if output.dim() == 2 else output.shape[0] * output.shape[1]))
    return seen


def _qwen2(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"]).eval()


@pytest.mark.parametrize("num_items_in_batch", [None, 6])
def test_label_smoothing_is_honoured_on_the_learned_positions(num_items_in_batch, tiny_models, tmp_path):
    """LabelSmoother (shifted labels, smoothing over the whole vocabulary, divided by the same item count) equals
    cross_entropy's label_smoothing over the targets; the fast path keeps computing only the learned logits."""
    import torch

    model = _qwen2(tiny_models)
    fast, standard = _trainers(model, tmp_path, label_smoothing_factor=0.2)
    seen = _logit_rows(model)
    with torch.no_grad():
        got = fast.compute_loss(model, _batch(), num_items_in_batch=num_items_in_batch)
        want = standard.compute_loss(model, _batch(), num_items_in_batch=num_items_in_batch)
        unsmoothed = _trainers(model, tmp_path / "plain")[0].compute_loss(model, _batch(),
                                                                            num_items_in_batch=num_items_in_batch)
    assert seen[0] == LEARNED
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert not torch.allclose(got, unsmoothed, rtol=1e-3)  # the smoothing is not a no-op here


def test_compute_loss_func_gets_the_full_outputs(tiny_models, tmp_path, caplog):
    import torch

    def squared_logits(outputs, labels, num_items_in_batch=None):
        return outputs["logits"].float().pow(2).mean() + (labels != IGNORE).sum() * 0.0

    model = _qwen2(tiny_models)
    fast, standard = _trainers(model, tmp_path, compute_loss_func=squared_logits)
    seen = _logit_rows(model)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="llmfinetune.lm_head"):
        got = fast.compute_loss(model, _batch())
        fast.compute_loss(model, _batch())
        want = standard.compute_loss(model, _batch())
    assert seen[0] == 2 * len(INPUTS[0])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    stepped_aside = [r.getMessage() for r in caplog.records if "steps aside" in r.getMessage()]
    assert stepped_aside == ["lm_head_on_targets_only steps aside (compute_loss_func reads the full logits): using "
                             "the standard loss."]  # once, not every step


def _tiny_moe(model_type: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=32,
                                  num_experts=4, num_local_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                  output_router_logits=True, router_aux_loss_coef=0.5, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral"])
def test_moe_router_aux_loss_is_kept(model_type, tmp_path):
    import torch

    model = _tiny_moe(model_type)
    fast, standard = _trainers(model, tmp_path)
    with torch.no_grad():
        got = fast.compute_loss(model, _batch(), num_items_in_batch=7)
        want = standard.compute_loss(model, _batch(), num_items_in_batch=7)
        outputs = model(**_batch(), num_items_in_batch=7)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # The aux loss is really in there: the cross-entropy alone is clearly lower.
    assert outputs.aux_loss is not None
    assert float(want) > float(outputs.loss - 0.5 * outputs.aux_loss) + 1e-3


def test_several_gpus_without_a_launcher_use_the_standard_loss(tiny_models, tmp_path, monkeypatch):
    """Trainer wraps the model in nn.DataParallel when args.n_gpu > 1: the pre-hook would index each replica's slice
    with the whole batch's mask. Faked here through n_gpu, the condition Trainer wraps on."""
    import torch
    from transformers import TrainingArguments

    model = _qwen2(tiny_models)
    fast, standard = _trainers(model, tmp_path)
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    seen = _logit_rows(model)
    with torch.no_grad():
        got = fast.compute_loss(model, _batch())
        want = standard.compute_loss(model, _batch())
    assert seen[0] == 2 * len(INPUTS[0])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_flattened_row_gives_the_standard_loss(tiny_models, tmp_path):
    """The one-row layout flash attention gets: an example's last position predicts the next example's first token,
    whose label the collator ignores, so the learned mask skips it as the standard loss does."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmfinetune.packing import FLATTENED, PackedCollator

    # Every token learned (train_on_prompt): the collator must ignore each example's first label.
    rows = [{"input_ids": ids, "labels": ids, "position_ids": list(range(len(ids)))} for ids in INPUTS]
    batch = PackedCollator(pad_token_id=0, layout=FLATTENED)(rows)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], attn_implementation="sdpa").eval()
    fast, standard = _trainers(model, tmp_path)
    seen = _logit_rows(model)
    count = int((batch["labels"][:, 1:] != IGNORE).sum())
    with torch.no_grad():
        got = fast.compute_loss(model, dict(batch), num_items_in_batch=count)
        want = standard.compute_loss(model, dict(batch), num_items_in_batch=count)
    assert seen[0] == count == sum(len(ids) - 1 for ids in INPUTS)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", ["rows", "flattened"])
def test_the_collators_host_facts_give_the_same_loss_and_token_count(layout, tiny_models, tmp_path, monkeypatch):
    """A bound collator counts on the host what the step would otherwise read back from the device (packing.
    HOST_FACTS): the learned positions (the same loss, the facts never reaching the model) and the non-padding
    tokens (Trainer's own count)."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM, Trainer

    from llmfinetune.packing import HOST_FACTS, LEARNED_POSITIONS, NON_PAD_TOKENS, PackedCollator

    rows = [{"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids)))}
            for ids, labels in zip(INPUTS, LABELS)]
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], attn_implementation="sdpa").eval()
    fast, _ = _trainers(model, tmp_path, include_num_input_tokens_seen="non_padding")
    fast.processing_class = SimpleNamespace(pad_token_id=0)  # Trainer's count reads the pad id from the tokenizer
    collator = PackedCollator(pad_token_id=0, layout=layout)
    plain = collator(rows)
    collator.host_facts = True
    with_facts = collator(rows)
    assert set(with_facts) - set(plain) == set(HOST_FACTS)
    assert len(with_facts[LEARNED_POSITIONS]) == LEARNED
    seen_keys = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen_keys.append(set(kwargs)), with_kwargs=True)
    monkeypatch.setattr("llmfinetune.packing.learned_positions",
                        lambda labels: pytest.fail("the positions were read from the device batch"))
    with torch.no_grad():
        got = fast.compute_loss(model, fast._prepare_inputs(dict(with_facts)), num_items_in_batch=5)
    monkeypatch.undo()
    with torch.no_grad():
        want = fast.compute_loss(model, fast._prepare_inputs(dict(plain)), num_items_in_batch=5)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not set(HOST_FACTS) & set.union(*seen_keys)

    counts = []
    for batch in (with_facts, plain):
        fast.state.num_input_tokens_seen = 0
        fast._track_num_input_tokens(batch)
        counts.append(fast.state.num_input_tokens_seen)
    fast.state.num_input_tokens_seen = 0
    Trainer._track_num_input_tokens(fast, plain)
    assert counts == [with_facts[NON_PAD_TOKENS]] * 2 == [fast.state.num_input_tokens_seen] * 2


def test_on_the_cpu_in_half_precision_the_head_projects_a_bounded_row_count_with_the_same_loss(
        tiny_models, tmp_path, monkeypatch):
    """oneDNN keeps a compiled matmul per shape there, so the head's row count is rounded up (extra positions whose
    logits no loss reads); loss and gradients stay the standard ones. Compared in fp32 for exactness."""
    import torch

    from llmfinetune import arguments

    monkeypatch.setattr(arguments, "SHAPE_MULTIPLE", 12)  # the batch has 16 positions, 8 learned
    model = _qwen2(tiny_models)
    results = []
    for trainer in _trainers(model, tmp_path, bf16=True):
        seen = _logit_rows(model)
        loss = trainer.compute_loss(model, _batch(), num_items_in_batch=6)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()], seen[0]))
        model.zero_grad()
    (got, got_grads, rows), (want, want_grads, _) = results
    assert rows == 12
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        _, outputs = _trainers(model, tmp_path, bf16=True)[0].compute_loss(model, _batch(), return_outputs=True)
    assert outputs["logits"].shape[0] == LEARNED  # callers see the learned positions' logits only
    projected = _trainers(model, tmp_path / "fp32")[0]._bounded(torch.tensor([0]), torch.tensor([[-100, 5, -100]]))
    assert projected.tolist() == [0]  # fp32: no kernel state per shape, nothing extra


def _mlp_rows(mlp):
    """How many rows the MLP computes, per forward: its own output, before any later hook reshapes it."""
    seen = []
    mlp.register_forward_hook(lambda module, args, output: seen.append(output.flatten(0, -2).shape[0]))
    return seen


@pytest.mark.parametrize("model_type", sorted(LAST_MLP_ROWWISE))
def test_the_last_layers_mlp_runs_on_the_learned_positions_with_the_standard_loss(model_type, tmp_path):
    """Its output is read, position by position, only by the final norm and the LM head: loss and every gradient
    stay the standard ones while it computes LEARNED rows of 16 (the layer before it computes all 16)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmfinetune.lm_head import last_block
    from test_packing_attention import _tiny_config

    torch.manual_seed(0)
    config = _tiny_config(model_type)
    config.vocab_size = 16
    model = AutoModelForCausalLM.from_config(config)
    for parameter in model.parameters():  # Gemma's and OLMo-2's zero-initialised norms would hide a wrong row
        parameter.data.add_(torch.randn_like(parameter) * 0.1)
    last = last_block(model).mlp
    assert last is model.get_decoder().layers[-1].mlp
    last_rows, first_rows = _mlp_rows(last), _mlp_rows(model.get_decoder().layers[0].mlp)
    results = []
    for trainer in _trainers(model, tmp_path):
        loss = trainer.compute_loss(model, _batch(), num_items_in_batch=6)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad()
    assert (last_rows, first_rows) == ([LEARNED, 16], [16, 16])  # the fast trainer first, then the standard one
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for name, grad in want_grads.items():
        # The loss sums log-sum-exps, the standard one log-softmax values: fp32 rounding, scaled to the gradient
        # (Gemma-2's softcap differs by 3e-7 on an embedding gradient of 1.7, the same with or without overwriting).
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()), msg=name)


@pytest.mark.parametrize("by_argument", [True, False])
def test_with_gradient_checkpointing_the_last_mlp_runs_on_every_position(by_argument, tiny_models, tmp_path):
    """The checkpointed layer runs its forward again in the backward, after the hooks are gone. Trainer enables it
    from the argument; a model can also come with it enabled."""
    model = _qwen2(tiny_models).train()
    model.gradient_checkpointing_enable()
    fast, _ = _trainers(model, tmp_path, gradient_checkpointing=by_argument)
    seen = _mlp_rows(model.get_decoder().layers[-1].mlp)
    fast.compute_loss(model, _batch(), num_items_in_batch=6).backward()
    assert seen[0] == 16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("may_overwrite", [True, False])
def test_targets_cross_entropy_equals_cross_entropy(dtype, smoothing, may_overwrite, monkeypatch):
    """The loss's own sum of cross-entropies: the same value and gradient as cross_entropy in fp32 (the standard
    loss's .float()), over several row blocks, with a negative and a zero upstream gradient too; the head's extra
    rows past the targets are not in the loss."""
    from llmfinetune import lm_head

    monkeypatch.setattr(lm_head, "CROSS_ENTROPY_ROWS", 7)
    _equals_cross_entropy(dtype, smoothing, may_overwrite)


@pytest.mark.parametrize("dtype, smoothing, may_overwrite", [("float32", 0.0, True), ("bfloat16", 0.3, False),
                                                             ("bfloat16", 0.0, True)])
def test_the_compiled_loss_equals_cross_entropy(dtype, smoothing, may_overwrite, monkeypatch):
    """The GPU's loss (two compiled kernels, FUSED_LOSS_DEVICES), compiled here by inductor's CPU backend from the
    same functions: the value and gradient of cross_entropy in fp32, with a negative and a zero upstream gradient,
    the rows past the targets zero; neither the C kernels nor the eager row blocks run."""
    from llmfinetune import compiled, kernels, lm_head

    monkeypatch.setattr(lm_head, "FUSED_LOSS_DEVICES", ("cpu",))
    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_failed", set())
    monkeypatch.setattr(kernels, "c_kernel", lambda *args: pytest.fail("a C kernel ran"))
    monkeypatch.setattr(lm_head, "_row_blocks", lambda *args: pytest.fail("the eager row blocks ran"))
    _equals_cross_entropy(dtype, smoothing, may_overwrite)
    assert not compiled._failed
    assert set(compiled._compiled) == {lm_head._fused_total_and_lse, lm_head._fused_gradient_into}


def _equals_cross_entropy(dtype: str, smoothing: float, may_overwrite: bool) -> None:
    """targets_cross_entropy against cross_entropy in fp32 on 26 targets of 30 logit rows (4 extra rows, whose
    gradient must be zero), under upstream gradients 0.25, -2 and 0."""
    import torch

    from llmfinetune import lm_head

    torch.manual_seed(0)
    hidden = torch.randn(30, 16).to(getattr(torch, dtype))
    targets = torch.randint(0, 50, (26,))
    for scale in (0.25, -2.0, 0.0):
        grads = []
        for ours in (True, False):
            weight = torch.randn(16, 50, generator=torch.Generator().manual_seed(1)).to(hidden.dtype)
            weight.requires_grad_(True)
            logits = hidden @ weight
            seen = []
            logits.register_hook(lambda grad: seen.append(grad.clone()))
            if ours:
                loss = lm_head.targets_cross_entropy(logits, targets, smoothing, may_overwrite=may_overwrite)
            else:
                loss = torch.nn.functional.cross_entropy(logits[:26].float(), targets, reduction="sum",
                                                         label_smoothing=smoothing)
            (loss * scale).backward()
            grads.append((loss.detach(), weight.grad, seen[0]))
        (got, got_grad, got_rows), (want, want_grad, _) = grads
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == "float32" else {"rtol": 1e-2, "atol": 1e-2}
        torch.testing.assert_close(got_grad, want_grad, **tolerance)
        assert not got_rows[26:].any()


def test_a_loss_that_fails_to_compile_runs_in_eager_row_blocks_with_one_warning(monkeypatch, caplog):
    import torch

    from llmfinetune import compiled, lm_head

    def broken(*args, **kwargs):
        raise RuntimeError("no working Triton here\nsecond line")

    monkeypatch.setattr(lm_head, "FUSED_LOSS_DEVICES", ("cpu",))
    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_failed", set())
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: broken)
    torch.manual_seed(0)
    targets = torch.randint(0, 20, (9,))
    results = []
    for fused in (True, True, False):
        logits = torch.randn(9, 20, generator=torch.Generator().manual_seed(2), requires_grad=True)
        if fused:
            loss = lm_head.targets_cross_entropy(logits, targets)
        else:
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        loss.backward()
        results.append((loss.detach(), logits.grad))
    for got, got_grad in results[:2]:
        torch.testing.assert_close(got, results[2][0])
        torch.testing.assert_close(got_grad, results[2][1])
    warnings = [r.getMessage() for r in caplog.records if "could not be compiled" in r.getMessage()]
    assert warnings == ["_fused_total_and_lse could not be compiled (RuntimeError: no working Triton here); it runs "
                        "uncompiled, slower."]


def test_a_loss_out_of_memory_in_its_compiled_form_is_raised_not_taken_for_a_compile_failure(monkeypatch, caplog):
    """The uncompiled row blocks need more memory than the compiled kernel: running them after an OOM would fail
    again or, worse, leave the rest of the run on the slow path under a warning that blames the compiler."""
    import pytest
    import torch

    from llmfinetune import compiled, lm_head

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.27 GiB")

    monkeypatch.setattr(lm_head, "FUSED_LOSS_DEVICES", ("cpu",))
    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_failed", set())
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: out_of_memory)
    logits = torch.randn(9, 20, requires_grad=True)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
        lm_head.targets_cross_entropy(logits, torch.randint(0, 20, (9,)))
    assert not compiled._failed
    assert not [r for r in caplog.records if "could not be compiled" in r.getMessage()]


def test_the_gradient_is_written_into_the_heads_logits_but_not_into_a_tensor_another_node_keeps():
    """A head's output (a matrix product) is read by nothing after the loss: its memory takes the gradient. A tanh's
    output is kept by the tanh for its own backward: overwriting it would give wrong gradients."""
    import torch

    from llmfinetune.lm_head import targets_cross_entropy

    torch.manual_seed(0)
    hidden, targets = torch.randn(12, 8), torch.randint(0, 20, (12,))
    weight = torch.randn(8, 20, requires_grad=True)
    logits = hidden @ weight
    where = []
    logits.register_hook(lambda grad: where.append(grad.data_ptr()))
    targets_cross_entropy(logits, targets, may_overwrite=True).backward()
    assert where == [logits.data_ptr()]

    results = []
    for may_overwrite in (True, False):
        weight.grad = None
        targets_cross_entropy(torch.tanh(hidden @ weight), targets, may_overwrite=may_overwrite).backward()
        results.append(weight.grad.clone())
    weight.grad = None
    torch.nn.functional.cross_entropy(torch.tanh(hidden @ weight), targets, reduction="sum").backward()
    for got in results:
        torch.testing.assert_close(got, weight.grad, rtol=1e-5, atol=1e-6)


def test_a_tensor_subclass_gets_its_own_cross_entropy(monkeypatch):
    """A DTensor's vocabulary may be sharded: the row blocks and in-place gradient assume one plain tensor."""
    import torch

    from llmfinetune import lm_head

    class Sharded(torch.Tensor):
        pass

    monkeypatch.setattr(lm_head._TargetsCrossEntropy, "apply", lambda *args: pytest.fail("plain-tensor path taken"))
    logits = torch.randn(5, 11).as_subclass(Sharded)
    targets = torch.tensor([1, 2, 3])
    got = lm_head.targets_cross_entropy(logits, targets, 0.1, may_overwrite=True)
    want = torch.nn.functional.cross_entropy(logits[:3].as_subclass(torch.Tensor), targets, reduction="sum",
                                             label_smoothing=0.1)
    torch.testing.assert_close(got.as_subclass(torch.Tensor), want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("model_type", sorted(HEAD_OUTPUT_IS_LOGITS | {"gemma2", "granite"}))
def test_the_blocked_head_gives_the_same_loss_and_gradients(model_type, smoothing, dtype, tmp_path, monkeypatch):
    """Where the frozen fp32 layers run packed, a training step's loss multiplies the head's input rows by its packed
    weight itself, block by block (head_cross_entropy; blocks of 5 rows here, the second partly the head's extra
    rows, the third all extra): loss and every trainable gradient stay the standard ones. Gemma-2 (softcap) and
    Granite (logits scaled) change the head's output, and a bf16 head multiplies packed already: they keep the
    head's own product (in bf16 compared with the fast trainer's head product: the standard loss's bf16
    log-softmax differs from both)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmfinetune import arguments, kernels, lm_head
    from test_packing_attention import _tiny_config

    monkeypatch.setattr(arguments, "SHAPE_MULTIPLE", 12)  # 16 positions, 8 learned: the head projects 12
    monkeypatch.setattr(lm_head, "CROSS_ENTROPY_ROWS", 5)
    torch.manual_seed(0)
    config = _tiny_config(model_type)
    config.vocab_size = 16
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    for name, parameter in model.named_parameters():  # a frozen head and embeddings, as under LoRA
        parameter.data.add_(torch.randn_like(parameter) * 0.1)
        parameter.requires_grad_("q_proj" in name or "mlp" in name)
    if not kernels.swap_frozen_linears(model):
        pytest.skip(f"oneDNN does not pack {dtype} weights on this machine")
    head = model.get_output_embeddings()
    own_forward = head.__dict__.get("forward")  # bf16: the packed forward swap_frozen_linears gave it
    blocked = []
    real = lm_head.head_cross_entropy
    monkeypatch.setattr(lm_head, "head_cross_entropy", lambda rows, *rest: blocked.append(rows.shape) or real(rows,
                                                                                                           *rest))
    fast, standard = _trainers(model, tmp_path, label_smoothing_factor=smoothing, bf16=dtype == "bfloat16")
    if dtype == "bfloat16":
        standard = _trainers(model, tmp_path, label_smoothing_factor=smoothing, bf16=True)[0]
        standard._blocked_head = False  # the head's own product
    results = []
    for trainer in (fast, standard):
        loss = trainer.compute_loss(model, _batch(), num_items_in_batch=6)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad()
    # the fast trainer's step only, on the head's input rows
    blocks = model_type in HEAD_OUTPUT_IS_LOGITS and dtype == "float32"
    assert blocked == ([torch.Size([12, config.hidden_size])] if blocks else [])
    assert head.__dict__.get("forward") is own_forward  # the head's own forward is back
    (got, got_grads), (want, want_grads) = results
    assert got_grads.keys() == want_grads.keys() and got_grads
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for name, grad in want_grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_outside_a_training_step_the_head_multiplies_as_before(tiny_models, tmp_path, monkeypatch):
    """Evaluation (return_outputs) and forwards without gradients keep the head's own product, so callers see the
    learned positions' vocabulary logits; the blocked loss is a training step's."""
    import torch

    from llmfinetune import kernels, lm_head

    model = _qwen2(tiny_models).requires_grad_(False)
    if not kernels.swap_frozen_linears(model):
        pytest.skip("oneDNN does not pack fp32 weights on this machine")
    monkeypatch.setattr(lm_head, "head_cross_entropy", lambda *args: pytest.fail("blocked loss outside training"))
    fast = _trainers(model, tmp_path)[0]
    _, outputs = fast.compute_loss(model, _batch(), return_outputs=True)
    assert outputs["logits"].shape == (LEARNED, model.config.vocab_size)
    with torch.no_grad():
        fast.compute_loss(model, _batch())


def test_the_blocked_heads_gradient_survives_a_second_backward():
    """The rows' gradient is made in the forward and only scaled in the backward: a graph kept for a second backward
    (retain_graph) gives the same gradient again."""
    import torch

    from llmfinetune import kernels
    from llmfinetune.lm_head import head_cross_entropy

    head = torch.nn.Linear(8, 12, bias=False).requires_grad_(False)
    if not kernels._packable_weight(head) or not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN packs here")
    rows = torch.randn(6, 8, requires_grad=True)
    total = head_cross_entropy(rows, head.weight, torch.tensor([1, 5, 7, 11]), 0.0, kernels.output_layer_packs(head))
    (total * 0.5).backward(retain_graph=True)
    first = rows.grad.clone()
    rows.grad = None
    (total * 0.5).backward()
    torch.testing.assert_close(rows.grad, first, rtol=0, atol=0)
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(rows[:4] @ head.weight.t(), torch.tensor(
        [1, 5, 7, 11]), reduction="sum") * 0.5, rows)[0]
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)
