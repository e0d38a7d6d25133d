"""Tasks and methods are looked up by name; an unknown name lists the valid ones and suggests the closest."""
from __future__ import annotations

import pytest

from llmfinetune.config import parse_job
from llmfinetune.errors import UserError
from llmfinetune.registry import METHODS, TASKS, Registry
from llmfinetune.workflow import check_job

ALL_TASKS = "maskedlm, preference, rewardmodeling, sequenceclassification, text-generation, tokenclassification"


def lookup_error(registry, name) -> str:
    with pytest.raises(UserError) as info:
        registry.get(name)
    return str(info.value)


@pytest.mark.parametrize("typo, suggestion", [
    ("sequenceclasification", "sequenceclassification"),
    ("tokenclassifcation", "tokenclassification"),
    ("maskedLM", "maskedlm"),
    ("text_generation", "text-generation"),
])
def test_unknown_task_lists_valid_and_suggests(typo, suggestion):
    assert lookup_error(TASKS, typo) == (f"ft_config.ft_task: unknown task '{typo}'. Valid tasks: {ALL_TASKS}. "
                                         f"Did you mean '{suggestion}'?")


@pytest.mark.parametrize("typo, suggestion", [("lorra", "lora"), ("ful", "full"), ("Lora", "lora")])
def test_unknown_method_lists_valid_and_suggests(typo, suggestion):
    assert lookup_error(METHODS, typo) == (f"ft_config.ft_method: unknown method '{typo}'. Valid methods: full, lora. "
                                           f"Did you mean '{suggestion}'?")


def test_unknown_name_without_close_match():
    message = lookup_error(TASKS, "regression")
    assert message == f"ft_config.ft_task: unknown task 'regression'. Valid tasks: {ALL_TASKS}."


def test_names_and_membership():
    assert TASKS.names() == ALL_TASKS.split(", ")
    assert METHODS.names() == ["full", "lora"]
    assert "lora" in METHODS and "qlora" not in METHODS


@pytest.mark.parametrize("name, cls", [("sequenceclassification", "SequenceClassification"),
                                       ("tokenclassification", "TokenClassification"),
                                       ("maskedlm", "MaskedLM"), ("text-generation", "CausalLM"),
                                       ("preference", "Preference"), ("rewardmodeling", "RewardModeling")])
def test_every_task_loads_and_matches_its_name(name, cls):
    task = TASKS.get(name)
    assert type(task).__name__ == cls
    assert task.name == name


@pytest.mark.parametrize("name, cls", [("full", "FullFineTune"), ("lora", "LoRA")])
def test_every_method_loads(name, cls):
    method = METHODS.get(name)
    assert type(method).__name__ == cls and method.name == name


def test_registry_is_lazy():
    calls = []
    registry = Registry("widget", "x.widget")
    registry.register("a", lambda: calls.append("a") or "made")
    assert calls == []
    assert registry.get("a") == "made" and calls == ["a"]


@pytest.mark.parametrize("field, value, fragment", [
    ("ft_task", "sequenceclasification", "Did you mean 'sequenceclassification'?"),
    ("ft_method", "lorra", "Did you mean 'lora'?"),
])
def test_check_job_reports_unknown_names_first(field, value, fragment):
    raw = {"model_config": {"model_id": "m"},
           "ft_config": {"ft_task": "maskedlm", "data_config": {"local_path": "nowhere"}}}
    raw["ft_config"][field] = value
    with pytest.raises(UserError) as info:
        check_job(parse_job(raw), load_data=False)
    assert f"ft_config.{field}: unknown" in str(info.value) and fragment in str(info.value)
