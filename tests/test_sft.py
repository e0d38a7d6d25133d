"""Causal-LM SFT: every data format, the loss on assistant turns only, EOS learned, packing without cross-talk,
and the tokenization cache."""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from conftest import job_dict
from llmfinetune.config import parse_job
from llmfinetune.errors import UserError
from llmfinetune.registry import TASKS

IGNORE = -100


def _job(tiny_models, tmp_path, data_config=None, **base):
    config = job_dict("text-generation", "full", tiny_models["qwen2"], tmp_path, tmp_path / "run", **base)
    config["ft_config"]["data_config"].update(data_config or {})
    return parse_job(config)


def _tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["qwen2"])


def _prepare(tiny_models, tmp_path, rows, data_config=None, **base):
    job = _job(tiny_models, tmp_path, data_config, **base)
    TASKS.get("text-generation").check(job)
    splits = DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows)})
    return TASKS.get("text-generation").prepare(splits, "validation", _tokenizer(tiny_models), job)


def _learned_text(tokenizer, example) -> list[str]:
    """The labelled stretches of one example, decoded: what the loss teaches the model to say."""
    stretches, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            stretches.append(tokenizer.decode(current))
            current = []
    if current:
        stretches.append(tokenizer.decode(current))
    return stretches


FORMATS = {
    "prompt_response": {"prompt": "What is 2 plus 2?", "response": "Four."},
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 2", "output": "Four."},
    "messages": {"messages": [{"role": "user", "content": "What is 2 plus 2?"},
                              {"role": "assistant", "content": "Four."}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "What is 2 plus 2?"},
                                   {"from": "gpt", "value": "Four."}]},
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_is_detected_and_only_the_answer_and_eos_are_learned(name, tiny_models, tmp_path):
    from llmfinetune.tasks.chat import detect_format

    job = _job(tiny_models, tmp_path)
    assert detect_format(job, list(FORMATS[name])) == name
    prepared = _prepare(tiny_models, tmp_path, [FORMATS[name]] * 2)
    tokenizer = _tokenizer(tiny_models)
    example = prepared.train[0]
    # The tiny model's ChatML template closes the turn with <|im_end|>; EOS follows because pad == EOS here and
    # the model must still learn to stop.
    assert _learned_text(tokenizer, example) == ["Four.<|im_end|><|endoftext|>"]
    assert example["labels"][-1] == tokenizer.eos_token_id == tokenizer.pad_token_id
    text = tokenizer.decode(example["input_ids"])
    assert text.startswith("<|im_start|>user\n")


def test_alpaca_input_system_and_history_become_turns(tiny_models, tmp_path):
    row = {"instruction": "Add them.", "input": "2 and 3", "output": "Five.", "system": "Be brief.",
           "history": [["Add 1 and 1.", "Two."]]}
    prepared = _prepare(tiny_models, tmp_path, [row])
    tokenizer = _tokenizer(tiny_models)
    text = tokenizer.decode(prepared.train[0]["input_ids"])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd 1 and 1.<|im_end|>\n"
                    "<|im_start|>assistant\nTwo.<|im_end|>\n<|im_start|>user\nAdd them.\n2 and 3<|im_end|>\n"
                    "<|im_start|>assistant\nFive.<|im_end|><|endoftext|>")
    # Every assistant turn is learned, including the one from the history.
    assert _learned_text(tokenizer, prepared.train[0]) == ["Two.<|im_end|>", "Five.<|im_end|><|endoftext|>"]


def test_multi_turn_messages_learn_every_assistant_turn_and_no_user_turn(tiny_models, tmp_path):
    row = {"messages": [{"role": "system", "content": "You count."},
                        {"role": "user", "content": "One?"}, {"role": "assistant", "content": "Two."},
                        {"role": "user", "content": "Three?"}, {"role": "assistant", "content": "Four."}]}
    prepared = _prepare(tiny_models, tmp_path, [row])
    learned = _learned_text(_tokenizer(tiny_models), prepared.train[0])
    assert learned == ["Two.<|im_end|>", "Four.<|im_end|><|endoftext|>"]


def test_train_on_prompt_learns_every_token(tiny_models, tmp_path):
    prepared = _prepare(tiny_models, tmp_path, [FORMATS["messages"]], {"train_on_prompt": True})
    example = prepared.train[0]
    assert example["labels"] == example["input_ids"]


def test_named_template_and_system_prompt(tiny_models, tmp_path):
    prepared = _prepare(tiny_models, tmp_path, [FORMATS["prompt_response"]],
                        {"template": "alpaca", "system_prompt": "Answer in one word."})
    tokenizer = _tokenizer(tiny_models)
    text = tokenizer.decode(prepared.train[0]["input_ids"])
    assert text == "Answer in one word.\n\n### Instruction:\nWhat is 2 plus 2?\n\n### Response:\nFour.<|endoftext|>"
    assert _learned_text(tokenizer, prepared.train[0]) == ["Four.<|endoftext|>"]


def test_plain_template_is_prompt_newline_answer_eos(tiny_models, tmp_path):
    prepared = _prepare(tiny_models, tmp_path, [FORMATS["prompt_response"]], {"template": "plain"})
    tokenizer = _tokenizer(tiny_models)
    assert tokenizer.decode(prepared.train[0]["input_ids"]) == "What is 2 plus 2?\nFour.<|endoftext|>"
    assert _learned_text(tokenizer, prepared.train[0]) == ["Four.<|endoftext|>"]


def test_raw_text_learns_everything_and_long_texts_become_windows(tiny_models, tmp_path):
    words = " ".join(f"word{i}" for i in range(200))
    prepared = _prepare(tiny_models, tmp_path, [{"text": words}], max_length=64)
    lengths = [len(ids) for ids in prepared.train["input_ids"]]
    assert len(lengths) > 1 and max(lengths) <= 64  # cut into windows, nothing dropped
    tokenizer = _tokenizer(tiny_models)
    all_ids = [t for ids in prepared.train["input_ids"] for t in ids]
    assert tokenizer.decode(all_ids) == words + "<|endoftext|>"
    assert all(example["labels"] == example["input_ids"] for example in prepared.train)


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, r"split 'train', row 0: messages\[0\] has role 'wizard'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"row 0: column 'messages' has no assistant turn"),
    ({"messages": "hello"}, r"row 0: column 'messages' must be a non-empty list of turns"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, r"must start with a user turn"),
    ({"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "x"}]},
     r"conversations\[0\] has no content"),
    ({"prompt": "  ", "response": "x"}, r"split 'train', row 0: column 'prompt' is empty or null"),
])
def test_bad_conversation_rows_name_the_row(row, message, tiny_models, tmp_path):
    with pytest.raises(UserError, match=message):
        _prepare(tiny_models, tmp_path, [row])


def test_sft_settings_on_other_tasks_and_bad_values_are_refused(tiny_models, tmp_path):
    config = job_dict("sequenceclassification", "full", tiny_models["bert"], tmp_path, tmp_path / "run", packing=True)
    config["ft_config"]["data_config"]["template"] = "chatml"
    job = parse_job(config)
    with pytest.raises(UserError, match=r"data_config.template: only for ft_task text-generation, preference or "
                                        r"rewardmodeling; ft_config.train_config.base_config.packing: only for ft_task "
                                        r"text-generation; this job's task is sequenceclassification"):
        TASKS.get("sequenceclassification").check(job)
    with pytest.raises(UserError, match=r"template: unknown template 'vicuna'; choose tokenizer .*chatml"):
        TASKS.get("text-generation").check(_job(tiny_models, tmp_path, {"template": "vicuna"}))
    from llmfinetune.arguments import translate

    with pytest.raises(UserError, match=r"packing: expected true or false, got 'yes please'"):
        translate(_job(tiny_models, tmp_path, packing="yes please"))
    with pytest.raises(UserError, match=r"lm_head_on_targets_only: expected true or false, got 3"):
        translate(_job(tiny_models, tmp_path, lm_head_on_targets_only=3))


def test_eos_survives_collation_when_pad_is_eos(tiny_models, tmp_path):
    job = _job(tiny_models, tmp_path)
    rows = [FORMATS["prompt_response"], {"prompt": "Say a long sentence please now.", "response": "Yes, here it is."}]
    prepared = _prepare(tiny_models, tmp_path, rows)
    tokenizer = _tokenizer(tiny_models)
    batch = TASKS.get("text-generation").collator(tokenizer, job)([prepared.train[0], prepared.train[1]])
    for row, example in zip(batch["labels"].tolist(), prepared.train):
        real = [label for label in row[:len(example["labels"])]]
        assert real[-1] == tokenizer.eos_token_id  # EOS is a target, not padding
        assert all(label == IGNORE for label in row[len(example["labels"]):])


# ---------------------------------------------------------------- packing

def test_best_fit_packing_fills_rows_and_keeps_every_example():
    from llmfinetune.packing import pack_lengths

    lengths = [50, 30, 20, 70, 10, 90, 40, 60]
    rows = pack_lengths(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert len(rows) == 4  # 370 tokens need at least 4 rows of 100


def _per_example_token_losses(model, input_ids, labels, **inputs):
    import torch

    with torch.no_grad():
        logits = model(input_ids=input_ids, **inputs).logits.float()
    # Position t predicts the label at t + 1, as transformers' causal-LM loss does.
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none",
                                               ignore_index=IGNORE)
    return losses, labels[:, 1:] != IGNORE


@pytest.mark.parametrize("layout, attention", [("rows", "sdpa"), ("rows", "eager"), ("flattened", "sdpa"),
                                               ("flattened", "eager")])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_examples_give_the_same_losses_as_unpacked(train_on_prompt, layout, attention, tiny_models, tmp_path):
    """The proof that packing has no cross-contamination: every example's per-token losses in a packed batch equal
    those of the example run alone (fp32 on CPU; tolerance 1e-5 absolute), in both layouts the collator makes: rows
    (eager/SDPA) and the one flattened row with cu_seq_lens that flash attention gets. A naive concatenation
    (positions running on, one causal mask over the row) is checked to differ, so the test can tell them apart."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmfinetune.packing import PackedCollator, pack_dataset, pack_lengths

    rows = [{"prompt": f"What is {a} plus {b}? Think step by step.", "response": f"{a} plus {b} is {a + b}." * (a % 3 + 1)}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)]]
    prepared = _prepare(tiny_models, tmp_path, rows, {"train_on_prompt": train_on_prompt}, max_length=128)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], attn_implementation=attention).eval()

    alone = {}
    for index, example in enumerate(prepared.train):
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
        losses, mask = _per_example_token_losses(model, ids, labels)
        alone[index] = losses[0][mask[0]]

    packed = pack_dataset(prepared.train, 128)
    assert len(packed) < len(prepared.train)  # several examples per row, or the test proves nothing
    batch = PackedCollator(_tokenizer(tiny_models).pad_token_id, layout=layout)([packed[i] for i in range(len(packed))])
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape[0] == (1 if layout == "flattened" else len(packed))
    inputs = {key: value for key, value in batch.items() if key not in ("input_ids", "labels")}
    losses, mask = _per_example_token_losses(model, batch["input_ids"], batch["labels"], **inputs)
    # Walk the batch in packing order: an example starts where its position id is 0 (a row's padding comes last).
    order = pack_lengths([len(ids) for ids in prepared.train["input_ids"]], 128)
    if layout == "flattened":
        order = [[member for row in order for member in row]]
    checked = 0
    for row_number, members in enumerate(order):
        starts = [i for i, p in enumerate(batch["position_ids"][row_number].tolist()) if p == 0]
        for member, start in zip(members, starts):
            length = len(prepared.train[member]["input_ids"])
            span = slice(start, start + length - 1)
            got = losses[row_number, span][mask[row_number, span]]
            torch.testing.assert_close(got, alone[member], atol=1e-5, rtol=0)
            checked += 1
    assert checked == len(prepared.train)

    # Negative control: without per-example positions the model sees one long text and the losses move.
    naive_losses, naive_mask = _per_example_token_losses(model, batch["input_ids"], batch["labels"], use_cache=False)
    assert not torch.allclose(naive_losses[naive_mask], losses[mask], atol=1e-3)


def test_packed_training_run_learns(tiny_models, tmp_path):
    """A packed LoRA run on a learnable task: the held-out loss measured before training (eval_on_start) drops, and
    the training loss of the last steps is clearly below that of the first. With learning_rate 0 both stay put
    (train losses within 0.05 of each other, the eval loss exactly equal), so these margins can fail."""
    from conftest import make_dataset
    from llmfinetune.workflow import run

    data = make_dataset(tmp_path / "data", "text-generation", train_rows=64, eval_rows=16)
    config = job_dict("text-generation", "lora", tiny_models["qwen2"], data, tmp_path / "run", packing=True,
                      max_steps=8, logging_steps=1, max_length=128, learning_rate=5e-2, save_strategy="no",
                      eval_strategy="no", eval_on_start=True)
    result = run(parse_job(config))
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 8
    first, last = sum(losses[:2]) / 2, sum(losses[-3:]) / 3
    assert last < first - 0.08, losses
    eval_before = [entry["eval_loss"] for entry in history if "eval_loss" in entry][0]
    assert result.metrics["eval_loss"] < eval_before - 0.1, (eval_before, result.metrics["eval_loss"])
    # 64 short examples of ~25 tokens fit in far fewer rows of 128.
    assert result.metrics["train_examples"] < 64 / 3


# ---------------------------------------------------------------- tokenization cache

def _cache_inputs(tiny_models, tmp_path, rows, **base):
    job = _job(tiny_models, tmp_path, **base)
    splits = DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows[:2])})
    return TASKS.get("text-generation"), splits, _tokenizer(tiny_models), job


class _Counting:
    """Wraps a task and counts how often it really tokenizes."""

    def __init__(self, task):
        self.task, self.calls, self.name = task, 0, task.name

    def prepare(self, *args):
        self.calls += 1
        return self.task.prepare(*args)


def test_tokenized_data_is_reused_until_data_settings_or_tokenizer_change(tiny_models, tmp_path, monkeypatch):
    from llmfinetune.cache import prepare_cached

    monkeypatch.setenv("LLMFINETUNE_CACHE", str(tmp_path / "cache"))
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(6)]
    task, splits, tokenizer, job = _cache_inputs(tiny_models, tmp_path, rows)
    counting = _Counting(task)
    first = prepare_cached(counting, splits, "validation", tokenizer, job)
    again = prepare_cached(counting, splits, "validation", tokenizer, job)
    assert counting.calls == 1
    assert again.train["input_ids"] == first.train["input_ids"] and again.eval["labels"] == first.eval["labels"]

    changed_rows = rows[:5] + [{"prompt": "p5", "response": "a different answer"}]
    _, changed, _, _ = _cache_inputs(tiny_models, tmp_path, changed_rows)
    prepare_cached(counting, changed, "validation", tokenizer, job)
    assert counting.calls == 2  # content changed

    _, _, _, shorter = _cache_inputs(tiny_models, tmp_path, rows, max_length=32)
    prepare_cached(counting, splits, "validation", tokenizer, shorter)
    assert counting.calls == 3  # a tokenization setting changed

    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    prepare_cached(counting, splits, "validation", tokenizer, job)
    assert counting.calls == 4  # the tokenizer changed


def test_labels_of_classification_survive_the_cache(tiny_models, tmp_path, monkeypatch):
    from llmfinetune.cache import prepare_cached

    monkeypatch.setenv("LLMFINETUNE_CACHE", str(tmp_path / "cache"))
    config = job_dict("sequenceclassification", "full", tiny_models["bert"], tmp_path, tmp_path / "run")
    job = parse_job(config)
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    splits = DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows)})
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["bert"])
    task = TASKS.get("sequenceclassification")
    fresh = prepare_cached(task, splits, "validation", tokenizer, job)
    cached = prepare_cached(task, splits, "validation", tokenizer, job)
    assert cached.model_kwargs == fresh.model_kwargs and 0 in cached.model_kwargs["id2label"]


def _tokenize_in_process(args):
    """One of several processes starting the same job at once (as DDP ranks do)."""
    model, folder, cache, marker = args
    import os
    import time

    os.environ["LLMFINETUNE_CACHE"] = cache
    from transformers import AutoTokenizer

    from llmfinetune.cache import prepare_cached

    config = job_dict("text-generation", "full", Path(model), Path(folder), Path(folder) / "run")
    job = parse_job(config)
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(8)]
    splits = DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows)})
    task = TASKS.get("text-generation")

    class Slow:
        name = task.name

        def prepare(self, *args):
            with open(marker, "a") as handle:
                handle.write("tokenized\n")
            time.sleep(3)  # long enough that the other process arrives while this one works
            return task.prepare(*args)

    prepared = prepare_cached(Slow(), splits, "validation", AutoTokenizer.from_pretrained(model), job)
    return len(prepared.train)


def test_only_one_process_tokenizes_the_others_wait_and_reuse(tiny_models, tmp_path):
    marker = tmp_path / "marker.txt"
    args = (str(tiny_models["qwen2"]), str(tmp_path), str(tmp_path / "cache"), str(marker))
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        sizes = pool.map(_tokenize_in_process, [args] * 3)
    assert sizes == [8, 8, 8]
    assert marker.read_text().count("tokenized") == 1


# ---------------------------------------------------------------- LM head on learned positions only

def _loss_trajectory(tiny_models, tmp_path, name, **base):
    from conftest import make_dataset
    from llmfinetune.workflow import run

    data = make_dataset(tmp_path / "data", "text-generation", train_rows=48, eval_rows=16)
    out = tmp_path / name
    config = job_dict("text-generation", "lora", tiny_models["qwen2"], data, out, max_steps=4, logging_steps=1,
                      save_strategy="no", gradient_accumulation_steps=2, **base)
    result = run(parse_job(config))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry], result.metrics["eval_loss"]


@pytest.mark.parametrize("packing, flattened", [(False, False), (True, False), (True, True)])
def test_targets_only_lm_head_keeps_the_loss_trajectory(packing, flattened, tiny_models, tmp_path, monkeypatch):
    """The speed option computes logits only where a token is learned; losses at every step (with gradient
    accumulation) and the eval loss must equal the standard full-logits loss (relative tolerance 1e-5), in packed
    rows and in the one flattened row that flash attention gets (forced here: SDPA reads that layout the same way)."""
    if flattened:
        from llmfinetune import packing as packing_module

        monkeypatch.setattr(packing_module, "packed_layout", lambda implementation: packing_module.FLATTENED)
    fast, fast_eval = _loss_trajectory(tiny_models, tmp_path, "fast", packing=packing)
    full, full_eval = _loss_trajectory(tiny_models, tmp_path, "full", packing=packing, lm_head_on_targets_only=False)
    assert len(fast) == len(full) == 4
    assert fast == pytest.approx(full, rel=1e-5)
    assert fast_eval == pytest.approx(full_eval, rel=1e-5)


def test_targets_only_lm_head_computes_fewer_logits(tiny_models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from llmfinetune.lm_head import TargetsOnlyTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, output: seen.append(output.shape))
    trainer = TargetsOnlyTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"))
    labels = torch.tensor([[-100, -100, -100, 5, 6, 7], [-100, -100, 8, 9, -100, -100]])
    trainer.compute_loss(model, {"input_ids": torch.tensor([[1, 2, 3, 5, 6, 7], [1, 2, 8, 9, 0, 0]]),
                                 "labels": labels})
    assert seen == [torch.Size([5, model.config.vocab_size])]  # 5 learned targets, not 12 positions


@pytest.mark.slow
def test_packed_sft_on_two_processes_matches_one_process(tiny_models, tmp_path):
    """DDP with packing and the learned-positions LM head: 2 processes x 2 rows give the loss curve of 1 process x 4
    rows (same rows per step, sequential order). This checks the loss normalisation across processes (the summed
    loss over the global target count, scaled back by the process count), which a wrong scale would break by 2x."""
    import os
    import subprocess
    import sys

    import yaml

    from conftest import REPO, make_dataset

    data = make_dataset(tmp_path / "data", "text-generation", train_rows=96, eval_rows=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    common = {"max_steps": 4, "logging_steps": 1, "train_sampling_strategy": "sequential", "save_strategy": "no",
              "eval_strategy": "no", "packing": True, "max_length": 64}

    def run_with(name, launcher, rows):
        config = job_dict("text-generation", "lora", tiny_models["qwen2"], data, tmp_path / name,
                          per_device_train_batch_size=rows, **common)
        config["ft_config"]["train_config"]["lora_config"]["lora_dropout"] = 0.0
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run([*launcher, "llm_finetune.py", "run-ft", f"--ft={path}"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        return [entry["loss"] for entry in history if "loss" in entry], metrics

    one, one_metrics = run_with("one", [sys.executable], 4)
    two, two_metrics = run_with("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node=2"], 2)
    assert one_metrics["world_size"] == 1 and two_metrics["world_size"] == 2
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)
