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

    def wrap(self, model, job: "Job", task: "Task", new_weights: "NewWeights"):
        """Return the model to train. `new_weights`: what the checkpoint did not have (random heads, added tokens'
        embedding rows), which must train whatever the method freezes."""
        return model
