"""`python -m llmfinetune`, and `accelerate launch llmfinetune ...` from the repo root, which runs this folder."""
import sys
from pathlib import Path

if not __package__:
    # Run as a folder (python llmfinetune): make the package importable by name.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmfinetune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
