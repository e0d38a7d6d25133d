"""Repo-root entry point: `python llm_finetune.py run-ft --ft=FILE` and `accelerate launch llm_finetune.py run-ft ...`."""
import sys

from llmfinetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
