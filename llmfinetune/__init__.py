"""llmfinetune: one YAML job file -> a fine-tuned Hugging Face model, on a laptop CPU or many GPUs."""

__version__ = "0.1.0"
