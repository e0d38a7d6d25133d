"""On a GPU the host queues a step's kernels and goes on while they run, unless it reads a value back from the
device: that read waits for every kernel queued before it, and the GPU then idles while the host prepares what comes
next. A training step of the GPU's code path (flattened packed row in the variable-length attention, the compiled
loss, no C kernels, no per-shape padding) must read nothing back outside logging steps and the run's end. Proven on
the CPU by the ops that do such a read (.item(), nonzero, a tensor's truth value), seen through a dispatch mode."""
import collections
import inspect
import os
import traceback

import pytest

from conftest import job_dict, make_dataset

# The aten ops behind every read of a device value on the host (int()/float()/.item()/bool() and index-by-mask).
READS_BACK = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal"}
# Where a read is expected: logging steps (loss and grad-norm), the end of training, and accelerate's data loader
# once per epoch; the stand-in attention below reads its bounds on the host (torch's kernel reads them on the GPU).
ALLOWED = ("_maybe_log_save_evaluate", "_finalize_training", "on_train_end", "window_size_variant")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_gpu_training_step_reads_nothing_back_from_the_device(method, tiny_models, tmp_path, monkeypatch):
    import transformers
    from torch.utils._python_dispatch import TorchDispatchMode

    from llmfinetune import arguments, checkpoints, compiled, lm_head, native, packing
    from llmfinetune.config import parse_job
    from llmfinetune.workflow import run
    from test_packing_attention import _documented_varlen_attn

    # The GPU's code path, on the CPU: the varlen attention (a stand-in), the compiled loss (run uncompiled: dynamo
    # skips frames under a dispatch mode, and the compiled kernels read nothing back), no C kernels, no padding of
    # the row for per-shape kernel state.
    calls = []
    varlen_attn = _documented_varlen_attn("window_size", calls)
    monkeypatch.setattr(packing, "VARLEN_FLASH_DEVICES", ("cpu",))
    monkeypatch.setattr(packing, "_varlen_attention",
                        lambda: (varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)))
    monkeypatch.setattr(lm_head, "FUSED_LOSS_DEVICES", ("cpu",))
    fused = []
    monkeypatch.setattr(compiled, "call", lambda function, *args: fused.append(function.__name__) or function(*args))
    monkeypatch.setattr(arguments, "kernels_keep_state_per_shape", lambda *args, **kwargs: False)
    monkeypatch.setattr(native, "library", lambda: None)  # no C kernels, as on a GPU

    # The non-finite check reads each step's flag from a host copy once the device has written it (an event it
    # waits for), a step late where the step does not log (as on a GPU): reading the copy is no read of the device,
    # waiting for the event within the step that recorded it is one.
    monkeypatch.setattr(checkpoints, "READ_LATER_DEVICES", ("cpu",))
    host_copies, steps_begun, waited_at_once = set(), [0], []
    start_reading, training_step = checkpoints._start_reading, transformers.Trainer.training_step

    class Written:
        def __init__(self):
            self.step = steps_begun[0]

        def synchronize(self):
            if steps_begun[0] == self.step:
                waited_at_once.append(self.step)

    def host_copy_noted(flag):
        host, _ = start_reading(flag)
        host_copies.add(id(host))
        return host, Written()

    def counted_step(self, *args, **kwargs):
        steps_begun[0] += 1
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "_start_reading", host_copy_noted)
    monkeypatch.setattr(transformers.Trainer, "training_step", counted_step)
    reads = collections.Counter()

    class ReadsBack(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in READS_BACK and not (args and id(args[0]) in host_copies):
                frames = traceback.extract_stack()[:-1]
                if not any(frame.name in ALLOWED for frame in frames) and not _epoch_start(frames):
                    ours = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames
                            if "llmfinetune" in f.filename or "transformers" in f.filename]
                    reads[(func._schema.name, " <- ".join(reversed(ours[-4:])))] += 1
            return func(*args, **(kwargs or {}))

    inner_loop = transformers.Trainer._inner_training_loop

    def watched(self, *args, **kwargs):
        with ReadsBack():
            return inner_loop(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "_inner_training_loop", watched)
    data = make_dataset(tmp_path / "data", "text-generation")
    run(parse_job(job_dict("text-generation", method, tiny_models["qwen2"], data, tmp_path / "out", max_steps=6,
                           save_strategy="no", packing=True, logging_steps=3, bf16=True, eval_strategy="no")))
    assert calls and fused and host_copies, "the GPU's attention, loss or late non-finite check did not run"
    assert not [f"{count}x {name} at {where}" for (name, where), count in reads.items()]
    assert waited_at_once == [3, 6]  # the logging steps (logging_steps 3; the last step logs and ends)


def _epoch_start(frames) -> bool:
    """accelerate's data loader starting an epoch (once per epoch)."""
    return any(frame.name == "__iter__" and "accelerate" in frame.filename for frame in frames)
