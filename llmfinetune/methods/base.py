"""What every fine-tuning method provides: how the loaded model becomes the model that trains."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Job
    from ..tasks.base import Task


class Method:
    name: str

    def check(self, job: "Job") -> None:
        """Validate the method's own settings before anything is loaded."""

    def wrap(self, model, job: "Job", task: "Task", fresh_modules: list[str]):
        """Return the model to train. `fresh_modules` were not in the checkpoint (random heads)."""
        return model
