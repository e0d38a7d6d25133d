"""The package's C kernels as a library (native.py): both builds compile wherever they may run, and where they may
not (no GCC, clang, another OpenMP runtime, no AVX2, switched off) there is no library and one info line; the
element-wise kernels (csrc/elementwise.c) compute what the torch ops they replace do."""
from __future__ import annotations

import contextlib
import logging

import pytest

torch = pytest.importorskip("torch")

from llmfinetune import cpu_attention, native  # noqa: E402


@pytest.fixture
def refused(monkeypatch, caplog):
    """The library looked up afresh under the test's patches (and again afterwards): returns the log it wrote."""
    native.library.cache_clear()
    yield caplog
    native.library.cache_clear()


def _refusal_logged(caplog) -> str:
    with caplog.at_level(logging.INFO, logger="llmfinetune.native"):
        assert native.library() is None
    inputs = [torch.randn(1, 4, 11, 64, requires_grad=True), *(torch.randn(1, 2, 11, 64) for _ in range(2))]
    assert not cpu_attention.usable(*inputs, 0.0, None)  # and packed attention keeps torch's kernel
    return caplog.text


def test_it_builds_wherever_it_may_run(monkeypatch, tmp_path):
    """With GCC, torch on libgomp and AVX2 or AVX-512, both builds compile (into a fresh cache): a source that no
    longer compiles fails here, where the kernels' own tests would only skip."""
    try:
        native.gnu_compiler()
    except OSError:
        pytest.skip("no GCC on PATH")
    if native.torch_capability() not in native.ISA_FLAGS or not native.torch_runs_gnu_openmp():
        pytest.skip("torch runs neither AVX2 nor AVX-512 code here, or not on libgomp")
    monkeypatch.setenv("LLMFINETUNE_CACHE", str(tmp_path))
    for isa in ("AVX512", "AVX2") if native.torch_capability() == "AVX512" else ("AVX2",):
        built = native.built(native.FLAGS + native.ISA_FLAGS[isa])
        assert built.is_file() and built.parent == tmp_path / "kernels"  # the package's cache (cache.cache_root)


def test_without_a_compiler_torch_runs_instead(monkeypatch, tmp_path, refused):
    monkeypatch.setenv("LLMFINETUNE_CACHE", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.setattr(native, "torch_capability", lambda: "AVX2")
    monkeypatch.setattr(native, "torch_runs_gnu_openmp", lambda: True)
    assert "no GCC" in _refusal_logged(refused)


def _fake_compiler(directory, name, version):
    path = directory / name
    path.write_text(f"#!/bin/sh\nprintf '{version}\\n'\n")
    path.chmod(0o755)
    return str(path)


def test_only_gcc_builds_them(monkeypatch, tmp_path, refused):
    """clang's -fopenmp links LLVM's libomp, a second thread pool spinning beside torch's (the SFT bench's step took
    1.42x the time it takes with torch's attention): $CC is passed over unless it is GCC, and with no GCC on PATH
    torch's ops run."""
    monkeypatch.setenv("LLMFINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", _fake_compiler(tmp_path, "clang", "Debian clang version 14.0.6"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(native, "torch_capability", lambda: "AVX2")
    monkeypatch.setattr(native, "torch_runs_gnu_openmp", lambda: True)
    assert "no GCC" in _refusal_logged(refused)
    gcc = _fake_compiler(tmp_path, "gcc",
                         "gcc (Debian 12.2.0-14) 12.2.0\\nCopyright (C) 2022 Free Software Foundation, Inc.")
    assert native.gnu_compiler()[0] == gcc


def test_on_another_openmp_runtime_torch_runs_instead(monkeypatch, refused):
    monkeypatch.setattr(native, "torch_capability", lambda: "AVX2")
    monkeypatch.setattr(native, "torch_runs_gnu_openmp", lambda: False)
    assert "OpenMP runtime other than GCC's" in _refusal_logged(refused)


@pytest.mark.parametrize("capability", ["DEFAULT", "SVE256", "ZVECTOR"])
def test_without_avx2_torch_runs_instead(monkeypatch, refused, capability):
    """x86 before AVX2 (or torch held to it), and other architectures, are unmeasured."""
    monkeypatch.setattr(native, "torch_capability", lambda: capability)
    assert "AVX2 or AVX-512" in _refusal_logged(refused)


def test_they_can_be_switched_off(monkeypatch, refused):
    monkeypatch.setenv("LLMFINETUNE_C_KERNELS", "0")
    _refusal_logged(refused)


@contextlib.contextmanager
def _library(library):
    """native.library() is `library` (None: no C kernels, torch's ops) inside the block."""
    real = native.library
    native.library = lambda: library
    try:
        yield
    finally:
        native.library = real


def _relative_error(mine, reference):
    return float((mine - reference).abs().max() / reference.abs().max())


def _bf16_steps_apart(mine, reference):
    """The most bf16 rounding steps between two bf16 tensors' elements (their bit patterns as integers: adjacent
    bf16 values of one sign differ by 1; -0 made +0 first, the same value)."""
    mine, reference = mine + 0.0, reference + 0.0
    return int((mine.view(torch.int16).int() - reference.view(torch.int16).int()).abs().max())


in_fp32_and_bf16 = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _as_torchs(pairs, dtype):
    """Each (kernel's result, torch's) pair of `dtype`: in fp32 within 1e-6 of the largest value (sums in another
    order, an exp computed another way); in bf16, where the kernel rounds where torch's ops round, at most one
    rounding step apart and nearly all equal."""
    for mine, reference in pairs:
        assert mine.dtype == reference.dtype == dtype
        if dtype == torch.float32:
            assert _relative_error(mine, reference) < 1e-6
        else:
            assert _bf16_steps_apart(mine, reference) <= 1 and (mine != reference).float().mean() < 1e-3


@in_fp32_and_bf16
@pytest.mark.parametrize("weight_trains", [False, True], ids=["frozen", "trained"])
def test_rms_norm_computes_what_torchs_ops_do(c_kernels, dtype, weight_trains):
    """Forward, input gradient and a trained weight's gradient (a sum over rows, here 111 of them, more than a
    thread's share) as the torch path's (_as_torchs), rows of a width that is no multiple of either vector width
    included; a NaN stays in its own row."""
    from llmfinetune.kernels import _RMSNorm

    generator = torch.Generator().manual_seed(0)
    for width in (512, 100, 7):
        hidden = torch.randn(3, 37, width, generator=generator).to(dtype).requires_grad_()
        weight = (torch.rand(width, generator=generator) + 0.5).to(dtype).requires_grad_(weight_trains)
        grad = torch.randn(3, 37, width, generator=generator).to(dtype)
        results = []
        for library in (c_kernels, None):
            with _library(library):
                hidden.grad = weight.grad = None
                output = _RMSNorm.apply(hidden, weight, 1e-6)
                output.backward(grad)
                results.append((output.detach(), hidden.grad.clone(),
                                *([weight.grad.clone()] if weight_trains else [])))
        _as_torchs(zip(*results), dtype)
    with _library(c_kernels), torch.no_grad():
        hidden = torch.randn(4, 512, dtype=dtype)
        hidden[1, 3] = float("nan")
        output = _RMSNorm.apply(hidden, torch.ones(512, dtype=dtype), 1e-6)
        assert output[1].isnan().all() and not output[[0, 2, 3]].isnan().any()


@in_fp32_and_bf16
def test_the_swiglu_backward_computes_what_torchs_ops_do(c_kernels, dtype):
    """Gate and up gradients as torch's (_as_torchs; SiLU by another exp) over the whole range of gates (large
    positive and negative ones, where a sigmoid written naively overflows), a length that is no multiple of a vector
    or of a task's chunk; a NaN gate gives NaN at its own element only."""
    from llmfinetune.kernels import _SwiGLU

    generator = torch.Generator().manual_seed(0)
    gate = (torch.randn(5, 1001, generator=generator) * 20).to(dtype).requires_grad_()
    up = torch.randn(5, 1001, generator=generator).to(dtype).requires_grad_()
    grad = torch.randn(5, 1001, generator=generator).to(dtype)
    results = []
    for library in (c_kernels, None):
        with _library(library):
            gate.grad = up.grad = None
            _SwiGLU.apply(gate, up).backward(grad)
            results.append((gate.grad.clone(), up.grad.clone()))
    _as_torchs(zip(*results), dtype)
    with _library(c_kernels):
        nan_gate = gate.detach().clone()
        nan_gate[2, 7] = float("nan")
        nan_gate.requires_grad_()
        _SwiGLU.apply(nan_gate, up).backward(grad)
        assert nan_gate.grad.isnan().sum() == 1 and nan_gate.grad[2, 7].isnan()


@in_fp32_and_bf16
@pytest.mark.parametrize("dim", [64, 40])
@pytest.mark.parametrize("cos_batch", [1, 2])
def test_the_rotary_embedding_computes_what_torchs_ops_do(c_kernels, dim, cos_batch, dtype):
    """The rotation and its backward on the C kernel as torch's ops (_as_torchs), for query heads as the projection
    leaves them (a transposed view), a batch of two rows with cos/sin per row or one for both, head dims whose half
    is and is not a multiple of a vector; the gradient comes back in the input's own layout."""
    from llmfinetune.kernels import _Rotary

    generator = torch.Generator().manual_seed(0)
    states = torch.randn(2, 37, 3, dim, generator=generator).to(dtype).transpose(1, 2).requires_grad_()
    angles = torch.randn(cos_batch, 1, 37, dim, generator=generator)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    grad = torch.randn(2, 3, 37, dim, generator=generator).to(dtype)
    results = []
    for library in (c_kernels, None):
        with _library(library):
            states.grad = None
            output = _Rotary.apply(states, cos, sin)
            output.backward(grad)
            results.append((output.detach(), states.grad.clone()))
    _as_torchs(zip(*results), dtype)
    assert results[0][1].stride() == states.stride()


@pytest.mark.parametrize("width", [8000, 37])
def test_the_softmax_of_the_heads_logits_is_torchs(c_kernels, width):
    """Each row's softmax in place and its log-sum-exp (the fp32 LM head's loss, lm_head._BlockedHead) within 1e-6
    of torch's, for logits far from 0, a row with -inf logits, one of -inf only (a NaN softmax and a log-sum-exp of
    -inf, as torch's) and one with a NaN (all NaN, so the step's loss is NaN and the run stops on it)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, width, generator=generator) * 30 + 100
    logits[1, ::3] = float("-inf")
    logits[4] = float("-inf")
    logits[5, width // 2] = float("nan")
    expected, expected_lse = logits[:4].softmax(-1), logits[:4].logsumexp(-1)
    lse = torch.empty(6)
    c_kernels.softmax_rows(logits.data_ptr(), 6, width, lse.data_ptr())
    assert _relative_error(logits[:4], expected) < 1e-6 and _relative_error(lse[:4], expected_lse) < 1e-6
    assert logits[4].isnan().all() and lse[4] == float("-inf")
    assert logits[5].isnan().all() and lse[5].isnan()


@in_fp32_and_bf16
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_cross_entropy_computes_what_torchs_ops_do(c_kernels, dtype, smoothing):
    """The LM head's loss (lm_head._TargetsCrossEntropy) on the C kernels as on torch's ops: the loss within 1e-6, the
    logits' gradient within 1e-5 in fp32 and as _as_torchs says in bf16, written over the logits or into a tensor of
    its own, for logits far from 0, a vocabulary that is no multiple of either vector width, -inf logits, rows past
    the targets (zero gradient), upstream gradients above 1, below and zero; a NaN logit makes the loss NaN and its
    own row's gradient NaN only."""
    from llmfinetune.lm_head import _TargetsCrossEntropy

    generator = torch.Generator().manual_seed(0)
    for vocabulary in (8000, 37):
        logits = (torch.randn(29, vocabulary, generator=generator) * 8 + 30).to(dtype)
        targets = torch.randint(0, vocabulary, (25,), generator=generator)  # 4 rows past the targets
        if not smoothing:  # (smoothing's mean over the vocabulary makes -inf logits an infinite loss)
            logits[3, ::5] = float("-inf")
            targets[3] = 1
        for scale, overwrite in ((0.01, True), (3.0, False), (0.0, False), (-0.5, True)):
            results = []
            for library in (c_kernels, None):
                with _library(library):
                    given = logits.clone().requires_grad_()
                    loss = _TargetsCrossEntropy.apply(given * 1, targets, smoothing, overwrite)
                    (loss * scale).backward()
                    results.append((loss.detach(), given.grad))
            (loss, grad), (torch_loss, torch_grad) = results
            assert abs(float(loss - torch_loss)) <= 1e-6 * abs(float(torch_loss))
            assert not grad[25:].any()
            if dtype == torch.float32:  # both round x - lse, ~4e-6 absolute at logits ~50 (torch's path x - (lse - log s))
                assert (grad - torch_grad).abs().max() <= 1e-5 * torch_grad.abs().max()
            else:
                _as_torchs([(grad, torch_grad)], dtype)
    with _library(c_kernels):
        logits[5, 11] = float("nan")
        given = logits.clone().requires_grad_()
        loss = _TargetsCrossEntropy.apply(given * 1, targets, smoothing, True)
        loss.backward()
        assert loss.isnan() and given.grad[5].isnan().all() and not given.grad[[4, 6]].isnan().any()
