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

    def wrap(self, model, job: "Job", task: "Task", new_weights: "NewWeights", trainable_fp32: bool = False):
        """Return the model to train. `new_weights`: what the checkpoint did not have (random heads, added tokens'
        embedding rows), which must train whatever the method freezes. `trainable_fp32`: the base was loaded in half
        precision by base_dtype for mixed-precision training, and whatever trains must be fp32 again."""
        return model
