"""Full fine-tuning: every weight trains; the run directory holds a complete model."""
from __future__ import annotations

from ..errors import UserError
from .base import Method


class FullFineTune(Method):
    name = "full"

    def check(self, job):
        if job.ft_config.train_config.lora_config:
            raise UserError(f"{job.source}: ft_config.train_config.lora_config is set but ft_method is 'full', so it "
                            "would be ignored. Set ft_method: lora, or remove lora_config.")
