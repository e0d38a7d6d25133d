"""Full fine-tuning: every weight trains; the run directory holds a complete model."""
from __future__ import annotations

import logging

from ..errors import UserError
from .base import Method, half_precision_base_allowed

logger = logging.getLogger(__name__)


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

    def base_dtype(self, job, task, training_args):
        """bf16 weights, with fp32 masters in the optimizer (master_weights.py), where base.half_precision_base_allowed
        and the optimizer can step on masters."""
        import torch

        from .. import master_weights

        if not half_precision_base_allowed(job, task, training_args):
            return None
        unsupported = master_weights.unsupported_because(training_args)
        if unsupported:
            logger.info("Full fine-tuning in bf16 with fp32 weights under autocast: bf16 weights with fp32 master "
                        "copies would be faster, but %s.", unsupported)
            return None
        logger.info("Full fine-tuning in bf16: the weights in bf16, fp32 master copies of them in the optimizer, the "
                    "saved model fp32; set model_config.initialization.initializer.dtype: float32 for fp32 weights "
                    "under autocast.")
        return torch.bfloat16

    def attach(self, trainer, half_precision_base):
        if half_precision_base:
            from .. import master_weights

            master_weights.keep_fp32_masters(trainer)
