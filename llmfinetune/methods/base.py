"""What every fine-tuning method provides: how the loaded model becomes the model that trains."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Job
    from ..models import NewWeights
    from ..tasks.base import Task


class Method:
    name: str

    def check(self, job: "Job") -> None:
        """Validate the method's own settings before anything is loaded."""

    def base_dtype(self, job: "Job", task: "Task", training_args):
        """The dtype to load the base model's weights in when this method decides it; None: the job's own
        (model_config.initialization.initializer.dtype)."""
        return None

    def attach(self, trainer, half_precision_base: bool) -> None:
        """Whatever the method adds to the Trainer before training; `half_precision_base`: base_dtype chose bf16."""

    def wrap(self, model, job: "Job", task: "Task", new_weights: "NewWeights", trainable_fp32: bool = False):
        """Return the model to train. `new_weights`: what the checkpoint did not have (random heads, added tokens'
        embedding rows), which must train whatever the method freezes. `trainable_fp32`: the base was loaded in half
        precision by base_dtype for mixed-precision training, and whatever trains must be fp32 again."""
        return model


def half_precision_base_allowed(job: "Job", task: "Task", training_args) -> bool:
    """Whether base_dtype may choose bf16 weights: under bf16 mixed precision, where the task measured it
    (Task.half_precision_base) and the job leaves the dtype open; not beside quantization (its own compute dtype),
    DeepSpeed or FSDP (they hold the weights in their own precision)."""
    init = job.model.initialization.initializer
    written = "dtype" in init.model_fields_set or {"dtype", "torch_dtype"} & init.from_pretrained_kwargs.keys()
    return bool(task.half_precision_base and training_args.bf16 and not written and not job.model.quantization_bit
                and not training_args.deepspeed and not training_args.fsdp)
