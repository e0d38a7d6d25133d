"""Preference tuning (ft_task preference) on TRL's trainers, with tiny random Qwen2 models: the losses start where the
theory says, a learnable preference is learned, the reference stays the start model, every DPO loss type and the
other algorithms train, and bad rows and settings are named."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from conftest import job_dict, write_jsonl
from llmfinetune.config import parse_job
from llmfinetune.errors import UserError

LN2 = math.log(2)


def preference_rows(n: int, seed: int, conversational: bool = False) -> list[dict]:
    """A rule any model can learn: the preferred answer says 'yes', the other 'no', whatever the prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        prompt, chosen, rejected = f"What is {a} plus {b}?", f"yes {a + b}", f"no {a + b}"
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def make_data(folder: Path, rows=preference_rows, train: int = 64, held_out: int = 32, **kwargs) -> Path:
    write_jsonl(folder / "train.jsonl", rows(train, 1, **kwargs))
    write_jsonl(folder / "validation.jsonl", rows(held_out, 2, **kwargs))
    return folder


def preference_job(model: Path, data: Path, out: Path, method: str = "lora", settings: dict | None = None, **base):
    base = {"per_device_train_batch_size": 8, "learning_rate": 5e-3 if method == "lora" else 1e-3,
            "save_steps": 1000, **base}
    raw = job_dict("preference", method, model, data, out, **base)
    raw["ft_config"]["train_config"]["preference_config"] = settings or {}
    return parse_job(raw)


def built_trainer(job):
    """The trainer exactly as workflow.run builds it, before any step."""
    from transformers import set_seed

    from llmfinetune import arguments, data, models
    from llmfinetune.registry import METHODS, TASKS

    task, method = TASKS.get(job.task), METHODS.get(job.method)
    task.check(job)
    training_args = arguments.build_training_arguments(job, task, arguments.run_dir(job))
    path = models.resolve_model(job)
    tokenizer = models.load_tokenizer(path, job)
    prepared = task.prepare(data.load_raw_splits(job), data.eval_split_name(job), tokenizer, job)
    set_seed(training_args.seed)
    model, fresh = models.load_model(path, job, task.model_class, prepared.model_kwargs, tokenizer)
    model = method.wrap(model, job, task, fresh)
    return task.trainer_class(job)(model=model, args=training_args, train_dataset=prepared.train,
                                   eval_dataset=prepared.eval, processing_class=tokenizer,
                                   **task.trainer_hooks(tokenizer, job, prepared.model_kwargs))


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_before_any_step_the_loss_is_ln2_and_the_margins_zero(tiny_models, tmp_path, method):
    job = preference_job(tiny_models["qwen2"], make_data(tmp_path / "data"), tmp_path / "run", method)
    metrics = built_trainer(job).evaluate()
    assert metrics["eval_loss"] == pytest.approx(LN2, abs=1e-5)
    for key in ("eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-5), key
    assert metrics["eval_logps/chosen"] < 0 and metrics["eval_logps/rejected"] < 0


@pytest.fixture(scope="module")
def dpo_run(tiny_models, tmp_path_factory):
    """DPO with LoRA on the learnable rule, 40 steps of batch 8, trained once for this module."""
    from llmfinetune.workflow import run

    root = tmp_path_factory.mktemp("dpo")
    return run(preference_job(tiny_models["qwen2"], make_data(root / "data"), root / "run", max_steps=40,
                              eval_strategy="steps", eval_steps=20, logging_steps=5))


def test_dpo_lora_learns_a_preference_and_leaves_the_base_weights_unchanged(tiny_models, dpo_run):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result = dpo_run
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert metrics["eval_rewards/accuracies"] >= 0.9
    assert metrics["eval_rewards/margins"] > 0
    assert metrics["eval_loss"] < LN2
    start = weights(tiny_models["qwen2"])
    base = result.model.get_base_model()
    for name, value in base.state_dict().items():
        key = name.replace(".base_layer", "")
        if key in start:
            assert (value == start[key]).all(), f"base weight {name} changed"
    adapter = load_file(str(result.output_dir / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items()), "the adapter did not train"
    assert not (result.output_dir / "ref").exists(), "TRL's reference adapter copy must not be saved"
    # The run directory loads with plain transformers + peft.
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2"])),
                                         str(result.output_dir))
    assert reloaded.peft_config["default"].r == 4


def test_dpo_full_trains_the_policy_against_a_frozen_copy_of_the_start(tiny_models, tmp_path):
    job = preference_job(tiny_models["qwen2"], make_data(tmp_path / "data"), tmp_path / "run", "full", max_steps=6)
    trainer = built_trainer(job)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    trainer.train()
    start = weights(tiny_models["qwen2"])
    reference = trainer.ref_model.state_dict()
    for key, value in start.items():
        assert (reference[key] == value).all(), f"reference weight {key} changed"
    policy = trainer.model.state_dict()
    assert any(not (policy[key] == value).all() for key, value in start.items()), "the policy did not train"
    metrics = trainer.evaluate()
    assert metrics["eval_rewards/margins"] > 0


def test_the_full_reference_is_built_from_model_config_not_reloaded_by_trl(tiny_models, tmp_path):
    """An added token (model_config.add_special_tokens) resizes the policy's embeddings; a reference that TRL reloads
    from config._name_or_path would not have that row, and the template below puts the token in every prompt."""
    raw = preference_job(tiny_models["qwen2"], make_data(tmp_path / "data", train=8, held_out=8), tmp_path / "run",
                         "full", max_steps=1).to_dict()
    raw["model_config"]["add_special_tokens"] = {"bos_token": "<s>"}
    raw["ft_config"]["data_config"]["template"] = "alpaca"
    trainer = built_trainer(parse_job(raw))
    vocabulary = len(trainer.processing_class)
    assert trainer.ref_model.get_input_embeddings().num_embeddings == vocabulary
    assert trainer.model.get_input_embeddings().num_embeddings == vocabulary
    assert math.isfinite(trainer.train().training_loss)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_precomputed_reference_log_probs_train(tiny_models, tmp_path, method):
    job = preference_job(tiny_models["qwen2"], make_data(tmp_path / "data", train=8, held_out=8), tmp_path / "run",
                         method, settings={"precompute_ref_log_probs": True}, max_steps=1)
    trainer = built_trainer(job)
    assert trainer.ref_model is None and "ref_chosen_logps" in trainer.train_dataset.column_names
    assert math.isfinite(trainer.train().training_loss)


def test_conversational_rows_are_rendered_with_the_sft_template(tiny_models, tmp_path):
    from llmfinetune.workflow import run

    job = preference_job(tiny_models["qwen2"], make_data(tmp_path / "data", conversational=True), tmp_path / "run",
                         max_steps=40)
    result = run(job)
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert metrics["eval_rewards/accuracies"] >= 0.9 and metrics["eval_rewards/margins"] > 0


def _encoder(tokenizer, job, limit=64):
    from llmfinetune.tasks.preference_data import PreferenceEncoder

    return PreferenceEncoder(tokenizer, job, limit)


def test_prompts_and_answers_tokenize_as_sft_renders_them(tiny_models, tmp_path):
    from llmfinetune.models import load_tokenizer
    from llmfinetune.tasks.preference_data import paired_example

    job = preference_job(tiny_models["qwen2"], make_data(tmp_path / "data"), tmp_path / "run")
    tokenizer = load_tokenizer(str(tiny_models["qwen2"]), job)
    string_row = {"prompt": "Say hi", "chosen": "hi", "rejected": "go away"}
    message_row = {"prompt": [{"role": "user", "content": "Say hi"}],
                   "chosen": [{"role": "assistant", "content": "hi"}],
                   "rejected": [{"role": "assistant", "content": "go away"}]}
    implicit_row = {"chosen": message_row["prompt"] + message_row["chosen"],
                    "rejected": message_row["prompt"] + message_row["rejected"]}
    encoded = [_encoder(tokenizer, job).encode([paired_example(row, job, "r")], ["r"])[0]
               for row in (string_row, message_row, implicit_row)]
    assert encoded[0] == encoded[1] == encoded[2]
    prompt_ids, (chosen_ids, rejected_ids) = encoded[0]
    chatml = tokenizer.apply_chat_template(message_row["prompt"] + message_row["chosen"], tokenize=False)
    assert tokenizer.decode(prompt_ids + chosen_ids) == chatml.rstrip() + tokenizer.eos_token
    assert chosen_ids[-1] == rejected_ids[-1] == tokenizer.eos_token_id
    # Implicit-prompt strings: the shared words are the prompt, taken as raw text.
    raw = paired_example({"chosen": "Q: sky colour? A: blue", "rejected": "Q: sky colour? A: green"}, job, "r")
    assert raw.raw_prompt == "Q: sky colour? A: " and raw.answers == ["blue", "green"]


def test_a_template_with_bos_gives_one_bos(tiny_models, tmp_path):
    from llmfinetune.models import load_tokenizer
    from llmfinetune.tasks.preference_data import paired_example

    raw_job = preference_job(tiny_models["qwen2"], make_data(tmp_path / "data"), tmp_path / "run").to_dict()
    raw_job["model_config"]["add_special_tokens"] = {"bos_token": "<s>"}
    raw_job["ft_config"]["data_config"]["template"] = "alpaca"
    job = parse_job(raw_job)
    tokenizer = load_tokenizer(str(tiny_models["qwen2"]), job)
    prompt_ids, _ = _encoder(tokenizer, job).encode(
        [paired_example({"prompt": "Say hi", "chosen": "hi", "rejected": "no"}, job, "r")], ["r"])[0]
    assert prompt_ids.count(tokenizer.bos_token_id) == 1 and prompt_ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Say hi", "chosen": "", "rejected": "no"}, "column 'chosen' is empty or null"),
    ({"prompt": "Say hi", "chosen": "hi", "rejected": None}, "column 'rejected' is empty or null"),
    ({"prompt": "Say hi", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "word " * 80, "chosen": "hi", "rejected": "no"}, "the prompt alone is"),
    ({"chosen": "abc", "rejected": "xyz"}, "share none"),
])
def test_bad_rows_are_named_by_split_and_row(tiny_models, tmp_path, row, message):
    from llmfinetune.workflow import check_job

    data = make_data(tmp_path / "data")
    rows = preference_rows(8, 3)
    if "prompt" not in row:
        rows = [{"chosen": r["prompt"] + " " + r["chosen"], "rejected": r["prompt"] + " " + r["rejected"]}
                for r in rows]
    write_jsonl(data / "train.jsonl", rows[:5] + [row] + rows[5:])
    job = preference_job(tiny_models["qwen2"], data, tmp_path / "run", per_device_train_batch_size=2)
    with pytest.raises(UserError, match=rf"split 'train', row 5: .*{message}"):
        check_job(job)


@pytest.mark.parametrize("settings, message", [
    ({"betta": 0.1}, r"unknown key 'ft_config.train_config.preference_config.betta'.*Did you mean 'beta'"),
    ({"algorithm": "dpoo"}, r"unknown algorithm 'dpoo'.*Did you mean 'dpo'"),
    ({"loss_type": ["sigmod"]}, r"unknown DPO loss type 'sigmod'.*Did you mean 'sigmoid'"),
    ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, r"loss_weights: 1 weight\(s\) for 2"),
    ({"beta": "high"}, r"preference_config.beta: expected a number"),
    ({"learning_rate": 1e-5}, r"TrainingArguments field: put it in ft_config.train_config.base_config"),
    ({"max_length": 64}, r"preference_config.max_length: set by base_config.max_length"),
    ({"algorithm": "simpo", "cpo_alpha": 1.0}, r"algorithm simpo means cpo_alpha 0.0"),
    ({"algorithm": "orpo", "ref_model": "x"}, r"algorithm orpo uses no reference model"),
])
def test_bad_preference_settings_are_named(tiny_models, tmp_path, settings, message):
    from llmfinetune.workflow import check_job

    job = preference_job(tiny_models["qwen2"], make_data(tmp_path / "data"), tmp_path / "run", settings=settings)
    with pytest.raises(UserError, match=message):
        check_job(job, load_data=False)


def test_packing_and_sft_keys_are_refused_with_the_reason(tiny_models, tmp_path):
    from llmfinetune.workflow import check_job

    data = make_data(tmp_path / "data")
    job = preference_job(tiny_models["qwen2"], data, tmp_path / "run", packing=True)
    with pytest.raises(UserError, match="packing: not with ft_task preference. Each chosen and rejected"):
        check_job(job, load_data=False)
    raw = preference_job(tiny_models["qwen2"], data, tmp_path / "run").to_dict()
    raw["ft_config"]["data_config"]["train_on_prompt"] = True
    with pytest.raises(UserError, match="train_on_prompt: only for ft_task text-generation"):
        check_job(parse_job(raw), load_data=False)
    raw = preference_job(tiny_models["qwen2"], data, tmp_path / "run").to_dict()
    raw["ft_config"]["data_config"]["input_columns"] = ["question"]
    with pytest.raises(UserError, match="input_columns: ft_task preference reads 0 text columns"):
        check_job(parse_job(raw), load_data=False)
    raw["ft_config"]["data_config"].update(input_columns=None, template="chatml", system_prompt="Be brief.")
    check_job(parse_job(raw))  # the SFT rendering settings do apply


def test_trl_defaults_do_not_leak_into_the_training_arguments(tiny_models, tmp_path):
    from llmfinetune.arguments import build_training_arguments
    from llmfinetune.registry import TASKS

    job = preference_job(tiny_models["qwen2"], make_data(tmp_path / "data"), tmp_path / "run",
                         settings={"beta": "0.25"})
    args = build_training_arguments(job, TASKS.get("preference"), tmp_path / "run")
    assert type(args).__name__ == "DPOConfig"
    assert args.beta == 0.25 and args.learning_rate == 5e-3
    assert not args.bf16 and not args.gradient_checkpointing and args.logging_steps == 10
    assert args.use_cpu and args.report_to == []


def test_a_lora_sft_run_directory_as_start_is_merged_once_and_is_both_policy_and_reference(tiny_models, tmp_path):
    """DPO after SFT: model_id is the SFT LoRA run directory. The start (and the reference) must be base + SFT
    adapter, not the bare base; it is merged once and reused."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import make_dataset
    from llmfinetune import models
    from llmfinetune.workflow import run

    sft = run(parse_job(job_dict("text-generation", "lora", tiny_models["qwen2"], make_dataset(
        tmp_path / "sft-data", "text-generation"), tmp_path / "sft-run", max_steps=3, learning_rate=5e-2)))
    job = preference_job(sft.output_dir, make_data(tmp_path / "data"), tmp_path / "run")
    start = Path(models.resolve_model(job))
    assert start != sft.output_dir and (start / "config.json").is_file()
    ids = torch.tensor([[3, 17, 42, 5, 9, 11]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(start)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
        bare = base(ids).logits
        sft_model = PeftModel.from_pretrained(base, str(sft.output_dir))(ids).logits
    assert torch.allclose(merged, sft_model, atol=1e-5)
    assert not torch.allclose(merged, bare, atol=1e-3)  # the SFT adapter changed the model: a bare base would show
    weights_time = (start / "model.safetensors").stat().st_mtime_ns
    assert Path(models.resolve_model(job)) == start
    assert (start / "model.safetensors").stat().st_mtime_ns == weights_time  # merged once, then reused
    metrics = built_trainer(job).evaluate()  # reference = the merged start: no preference before any step
    assert metrics["eval_loss"] == pytest.approx(LN2, abs=1e-5)


def _one_step_loss(job) -> float:
    trainer = built_trainer(job)
    result = trainer.train()
    return result.training_loss


def _loss_types():
    from llmfinetune.tasks.preference import dpo_loss_types

    return dpo_loss_types()


@pytest.mark.parametrize("loss_type", _loss_types())
def test_every_dpo_loss_type_trains_a_step_with_a_finite_loss(tiny_models, tmp_path, loss_type):
    settings = {"loss_type": [loss_type]}
    if loss_type == "exo_pair":
        settings["label_smoothing"] = 1e-3  # TRL refuses exo_pair without it
    job = preference_job(tiny_models["qwen2"], make_data(tmp_path / "data", train=8, held_out=8), tmp_path / "run",
                         settings=settings, max_steps=1)
    assert math.isfinite(_one_step_loss(job))


def test_loss_types_combine_with_weights(tiny_models, tmp_path):
    job = preference_job(tiny_models["qwen2"], make_data(tmp_path / "data", train=8, held_out=8), tmp_path / "run",
                         settings={"loss_type": ["sigmoid", "sft"], "loss_weights": [0.8, 0.2]}, max_steps=1)
    assert math.isfinite(_one_step_loss(job))


def unpaired_rows(n: int, seed: int) -> list[dict]:
    rows = []
    for row in preference_rows(n, seed):
        rows.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        rows.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    return rows


@pytest.mark.parametrize("algorithm, rows", [("kto", unpaired_rows), ("kto", preference_rows),
                                             ("orpo", preference_rows), ("simpo", preference_rows),
                                             ("cpo", preference_rows)])
def test_kto_orpo_simpo_and_cpo_train(tiny_models, tmp_path, algorithm, rows):
    from llmfinetune.workflow import run

    data = make_data(tmp_path / "data", rows=rows, train=32, held_out=16)
    job = preference_job(tiny_models["qwen2"], data, tmp_path / "run", settings={"algorithm": algorithm},
                         max_steps=3)
    result = run(job)
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert any(key.startswith("eval_rewards/") for key in metrics), sorted(metrics)


def test_unpaired_rows_need_kto(tiny_models, tmp_path):
    from llmfinetune.workflow import check_job

    job = preference_job(tiny_models["qwen2"], make_data(tmp_path / "data", rows=unpaired_rows), tmp_path / "run")
    with pytest.raises(UserError, match="only algorithm kto learns from"):
        check_job(job)


# ---------------------------------------------------------------- after training: eval, predict, export, report

def cli(capsys, *args) -> tuple[int, str, str]:
    from llmfinetune.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_reproduces_the_final_eval_of_training(dpo_run, capsys):
    code, out, err = cli(capsys, "eval", "--model", dpo_run.output_dir)
    assert code == 0, err
    metrics = json.loads(out)
    trained = json.loads((dpo_run.output_dir / "metrics.json").read_text())
    keys = [k for k in trained if k.startswith(("eval_loss", "eval_rewards/", "eval_logps/"))]
    assert len(keys) == 7, keys
    for key in keys:
        assert metrics[key] == pytest.approx(trained[key], rel=1e-6, abs=1e-7), key


def test_predict_generates_from_the_trained_prompt_format(dpo_run, capsys):
    code, out, err = cli(capsys, "predict", "--model", dpo_run.output_dir, "--text", "What is 3 plus 4?",
                         "--max-new-tokens", "3")
    assert code == 0, err
    prediction = json.loads(out.strip().splitlines()[-1])["prediction"]
    assert isinstance(prediction["generated_text"], str) and prediction["finish_reason"] in ("eos", "length")


def test_export_merge_gives_a_plain_causal_lm_with_the_same_logits(dpo_run, capsys, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    code, _, err = cli(capsys, "export", "--model", dpo_run.output_dir, "--out", out, "--merge")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    batch = dpo_run.tokenizer(["What is 3 plus 4?"], return_tensors="pt")
    policy = dpo_run.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, policy(**batch).logits, rtol=0, atol=1e-5)


def test_the_report_draws_reward_accuracy_and_margin_curves(dpo_run):
    from llmfinetune.report import curves, load_run

    drawn = curves(load_run(dpo_run.output_dir))
    assert drawn.main_key == "eval_rewards/accuracies" and len(drawn.main.values) == 2
    assert len(drawn.margins["train"].values) == 8 and len(drawn.margins["eval"].values) == 2
    assert drawn.margins["eval"].values[-1] > 0
    assert (dpo_run.output_dir / "report.png").stat().st_size > 0


# ---------------------------------------------------------------- resume and several processes

def _losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def test_resume_from_a_checkpoint_continues_the_same_loss_trajectory(tiny_models, tmp_path):
    """A run stopped after checkpoint-3 (its later files removed, as a kill leaves them) resumes to the losses of the
    run that was not stopped: same adapter, optimizer, scheduler, RNG and data position."""
    import shutil

    from llmfinetune.workflow import run

    data = make_data(tmp_path / "data", train=48, held_out=8)
    settings = dict(max_steps=6, save_steps=3, logging_steps=1, eval_strategy="no")
    straight = run(preference_job(tiny_models["qwen2"], data, tmp_path / "straight", **settings)).output_dir
    stopped = run(preference_job(tiny_models["qwen2"], data, tmp_path / "stopped", **settings)).output_dir
    for leftover in ("checkpoint-6", "trainer_state.json", "metrics.json", "adapter_model.safetensors"):
        path = stopped / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = run(preference_job(tiny_models["qwen2"], data, tmp_path / "stopped", resume_from_checkpoint=True,
                                 **settings)).output_dir
    expected, actual = _losses(straight), _losses(resumed)
    assert sorted(actual) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert actual[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_models, tmp_path):
    """torchrun, 2 processes x 4 pairs against 1 process x 8 pairs, in order: the same DPO loss curve (rel 1e-4)."""
    import os
    import subprocess
    import sys

    import yaml

    from conftest import REPO

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    data = make_data(tmp_path / "data", train=48, held_out=8)
    outs = {}
    for processes, batch in ((1, 8), (2, 4)):
        job = preference_job(tiny_models["qwen2"], data, tmp_path / f"run-{processes}", max_steps=4, logging_steps=1,
                             per_device_train_batch_size=batch, train_sampling_strategy="sequential",
                             save_strategy="no", eval_strategy="no").to_dict()
        job["ft_config"]["train_config"]["lora_config"]["lora_dropout"] = 0.0
        path = tmp_path / f"job-{processes}.yaml"
        path.write_text(yaml.safe_dump(job))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        done = subprocess.run([*(launcher if processes > 1 else [sys.executable]), "llm_finetune.py", "run-ft",
                               f"--ft={path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        outs[processes] = tmp_path / f"run-{processes}"
    one, two = _losses(outs[1]), _losses(outs[2])
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    assert [two[s] for s in sorted(two)] == pytest.approx([one[s] for s in sorted(one)], rel=1e-4, abs=1e-5)
    assert json.loads((outs[2] / "metrics.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("method, stage", [("full", 3), ("lora", 2), ("lora", 3)])
def test_deepspeed_zero_trains_saves_and_eval_reproduces(tiny_models, tmp_path, method, stage):
    """deepspeed --num_gpus 2 on CPU (gloo). Full ZeRO-3 partitions the reference model as well (TRL prepares it);
    `eval` in one process, with the reference rebuilt from model_config, reproduces the run's final eval loss."""
    import os
    import shutil
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    from conftest import REPO

    pytest.importorskip("deepspeed")
    from test_deepspeed import SEED_DEEPSPEED

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    job = preference_job(tiny_models["qwen2"], make_data(tmp_path / "data", train=32, held_out=16), tmp_path / "run",
                         method, max_steps=4, save_steps=4).to_dict()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    config = json.loads(json.dumps(SEED_DEEPSPEED))
    if stage == 3:
        config["zero_optimization"] = {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                       "stage3_gather_16bit_weights_on_model_save": True}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    done = subprocess.run([shutil.which("deepspeed"), "--num_gpus", "2", "llm_finetune.py", "run-ft", f"--ft={path}",
                           "--deepspeed", str(tmp_path / "ds.json")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and (out / "checkpoint-4" / "global_step4").is_dir()
    assert metrics["eval_rewards/margins"] > 0
    saved = load_file(str(out / ("model.safetensors" if method == "full" else "adapter_model.safetensors")))
    assert saved and all(t.numel() > 0 for t in saved.values()), "ZeRO-3 saved empty (partitioned) tensors"
    if method == "lora":
        assert any("lora_B" in k and v.abs().max() > 0 for k, v in saved.items())
    again = subprocess.run([sys.executable, "-m", "llmfinetune", "eval", "--model", str(out)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_ray_ft_trains_dpo_with_two_workers(tiny_models, tmp_path):
    import sys

    import yaml

    pytest.importorskip("ray.train")
    from test_ray import _run

    job = preference_job(tiny_models["qwen2"], make_data(tmp_path / "data", train=32, held_out=16), tmp_path / "run",
                         max_steps=4).to_dict()
    job["scaling_config"] = {"num_workers": 2, "num_cpus_per_worker": 1, "num_gpus_per_worker": 0}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = _run([sys.executable, "-m", "llmfinetune", "ray-ft", f"--ft={path}"], timeout=300)
    assert result.returncode == 0, result.stdout[-6000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 16
    assert math.isfinite(metrics["eval_loss"]) and "eval_rewards/margins" in metrics


# ---------------------------------------------------------------- fuzzed job keys and rows, through `llmfinetune check`

PREFERENCE = "ft_config.train_config.preference_config"


@pytest.fixture(scope="module")
def preference_base(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-preference")
    data = make_data(root / "data", train=12, held_out=4)
    job = preference_job(tiny_models["qwen2"], data, root / "run", per_device_train_batch_size=2).to_dict()
    return job, data


def _valid_preference_keys(algorithm: str) -> set[str]:
    from llmfinetune.tasks.preference import ALGORITHMS, OWN_KEYS, config_fields

    module, config, *_ = ALGORITHMS[algorithm]
    import importlib

    return set(OWN_KEYS) | set(config_fields(getattr(importlib.import_module(module), config)))


def _fuzz():
    from hypothesis import HealthCheck, settings

    return settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


def test_fuzzed_preference_config_keys_are_named(preference_base):
    from hypothesis import assume, given
    from hypothesis import strategies as st

    from test_fuzz_inputs import assert_user_error, check_job_dict, scratch

    @_fuzz()
    @given(algorithm=st.sampled_from(["dpo", "kto", "orpo", "cpo", "simpo"]),
           key=st.from_regex(r"[a-z][a-z0-9_]{0,16}", fullmatch=True),
           value=st.one_of(st.integers(), st.booleans(), st.text(max_size=8), st.none()))
    def case(algorithm, key, value):
        assume(key not in _valid_preference_keys(algorithm))
        job = json.loads(json.dumps(preference_base[0]))
        job["ft_config"]["train_config"]["preference_config"] = {"algorithm": algorithm, key: value}
        with scratch() as folder:
            code, output = check_job_dict(job, folder)
        assert_user_error(code, output, f"{PREFERENCE}.{key}")

    case()


def test_fuzzed_bad_rows_are_named_by_split_and_row(preference_base):
    from hypothesis import given
    from hypothesis import strategies as st

    from test_fuzz_inputs import assert_user_error, check_job_dict, scratch

    rows = preference_rows(12, 1)

    @_fuzz()
    @given(row=st.integers(min_value=0, max_value=11), side=st.sampled_from(["prompt", "chosen", "rejected"]),
           bad=st.sampled_from([None, "", "   ", [], "same", {"role": "user"}, [{"role": "wizard", "content": "x"}]]))
    def case(row, side, bad):
        broken = json.loads(json.dumps(rows))
        if bad == "same":  # identical answers
            broken[row]["rejected"] = broken[row]["chosen"]
        else:
            broken[row][side] = bad
        with scratch() as folder:
            data = folder / "data"
            write_jsonl(data / "train.jsonl", broken)
            shutil_copy(preference_base[1] / "validation.jsonl", data / "validation.jsonl")
            job = json.loads(json.dumps(preference_base[0]))
            job["ft_config"]["data_config"]["local_path"] = str(data)
            code, output = check_job_dict(job, folder)
        assert_user_error(code, output, f"split 'train', row {row}")

    case()


def shutil_copy(source: Path, target: Path) -> None:
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
