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
        if job.model.quantization_bit:
            # Quantized weights are integers with no gradient: a "full" run would train nothing but the unquantized
            # norms and heads. QLoRA trains adapters on top of them instead.
            where = f"{job.source}: " if job.source else ""
            raise UserError(f"{where}model_config.quantization_bit ({job.model.quantization_bit}) cannot be "
                            "trained with ft_config.ft_method 'full': quantized weights do not train. Set ft_method: "
                            "lora (QLoRA), or remove quantization_bit to fine-tune every weight.")
