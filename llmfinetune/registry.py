"""Named registries: a task or method is looked up by the name the job file uses, never by an if-chain."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, config_key: str):
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, Callable[[], T]] = {}

    def register(self, name: str, loader: Callable[[], T]) -> None:
        self._entries[name] = loader

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> T:
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(
                f"{self.config_key}: unknown {self.kind} '{name}'. Valid {self.kind}s: {', '.join(self.names())}.{hint}"
            )
        return self._entries[name]()


def _lazy(module: str, attr: str) -> Callable[[], object]:
    """Defer importing a task or method (and torch with it) until the job actually uses it."""

    def load():
        import importlib

        return getattr(importlib.import_module(module, __package__), attr)()

    return load


TASKS: Registry = Registry("task", "ft_config.ft_task")
TASKS.register("sequenceclassification", _lazy(".tasks.seq_cls", "SequenceClassification"))
TASKS.register("tokenclassification", _lazy(".tasks.token_cls", "TokenClassification"))
TASKS.register("maskedlm", _lazy(".tasks.masked_lm", "MaskedLM"))
TASKS.register("text-generation", _lazy(".tasks.causal_lm", "CausalLM"))
TASKS.register("preference", _lazy(".tasks.preference", "Preference"))
TASKS.register("rewardmodeling", _lazy(".tasks.reward", "RewardModeling"))

METHODS: Registry = Registry("method", "ft_config.ft_method")
METHODS.register("full", _lazy(".methods.full", "FullFineTune"))
METHODS.register("lora", _lazy(".methods.lora", "LoRA"))
