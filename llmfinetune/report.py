"""A run's report: `report.png` (training curves) and `report.md` (the job, final metrics, cost, how to reproduce).

Everything is read from the run directory (`trainer_state.json`, `metrics.json`, `job.yaml`), so `llmfinetune report
RUN_DIR` works on old runs. Facts only known while the run is live (parameter counts, peak memory, tokens seen, the
command line) come in `extra`; whatever is missing is written as "n/a". matplotlib is imported only when drawing.
"""
from __future__ import annotations

import json
import logging
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import UserError

logger = logging.getLogger(__name__)

NA = "n/a"
PNG_NAME = "report.png"
MD_NAME = "report.md"
CONFUSION_NAME = "confusion.png"
# Generation scores (generation_eval.py writes them; repeated so that reading a report never imports it).
GENERATION_SCORES = (("eval_gen_exact_match", "exact match"), ("eval_gen_rouge1", "ROUGE-1"),
                     ("eval_gen_rouge2", "ROUGE-2"), ("eval_gen_rougeL", "ROUGE-L"), ("eval_gen_bleu4", "BLEU-4"))
GENERATION_EXAMPLES = 3
# metrics.json values that are tables, not numbers: shown in their own sections.
PER_CLASS, CONFUSION = "eval_per_class", "eval_confusion_matrix"

# (log key, axis label, short name) in order of preference for the "main metric" panel.
MAIN_METRICS = (
    ("eval_accuracy", "accuracy (fraction correct)", "accuracy"),
    ("eval_rewards/accuracies", "reward accuracy (pairs ranked right)", "reward accuracy"),
    ("eval_f1", "F1 score (0-1)", "F1"),
    ("eval_perplexity", "perplexity (exp of eval loss, lower is better)", "perplexity"),
)
PERPLEXITY_TASKS = ("maskedlm", "text-generation")
# Preference tuning (TRL's DPO family) and reward models log how far the chosen answer's reward is above the
# rejected one's, per logging window in training and at each evaluation.
MARGIN_KEYS = ("rewards/margins", "margin")
# The seed's spellings of TrainingArguments fields (as in arguments.SEED_ALIASES; repeated so that reading a report
# never imports transformers).
_ALIASES = {"max_steps": "max_train_steps", "warmup_steps": "num_warmup_steps", "eval_strategy": "evaluation_strategy"}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (NaN where the platform cannot tell)."""
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


# --------------------------------------------------------------------------------------------------------------------
# Reading the run directory


@dataclass
class Series:
    steps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: Any, value: Any) -> None:
        v = _number(value)
        s = _number(step)
        if v is None or s is None or not math.isfinite(v):
            return
        self.steps.append(s)
        self.values.append(v)

    def __bool__(self) -> bool:
        return bool(self.values)


@dataclass
class RunData:
    run_dir: Path
    state: dict[str, Any]
    log: list[dict[str, Any]]
    metrics: dict[str, Any]
    job: dict[str, Any]
    notes: list[str]

    # job.yaml sections ------------------------------------------------------------------------------------------
    @property
    def model_config(self) -> dict[str, Any]:
        return _dict(self.job.get("model_config"))

    @property
    def ft_config(self) -> dict[str, Any]:
        return _dict(self.job.get("ft_config"))

    @property
    def data_config(self) -> dict[str, Any]:
        return _dict(self.ft_config.get("data_config"))

    @property
    def train_config(self) -> dict[str, Any]:
        return _dict(self.ft_config.get("train_config"))

    @property
    def base_config(self) -> dict[str, Any]:
        return _dict(self.train_config.get("base_config"))

    @property
    def lora_config(self) -> dict[str, Any]:
        return _dict(self.train_config.get("lora_config"))

    @property
    def model(self) -> str:
        return str(self.model_config.get("model_id") or NA)

    @property
    def task(self) -> str:
        return str(self.ft_config.get("ft_task") or NA)

    @property
    def method(self) -> str:
        if not self.job:
            return NA
        return str(self.ft_config.get("ft_method") or "full")

    def base(self, key: str) -> Any:
        """A base_config value by its TrainingArguments name or the seed's alias."""
        config = self.base_config
        if key in config:
            return config[key]
        alias = _ALIASES.get(key)
        return config.get(alias) if alias else None


def load_run(run_dir: Path) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"report: {run_dir} is not a directory; expected a run directory made by `llmfinetune run-ft`.")
    notes: list[str] = []
    state_path = run_dir / "trainer_state.json"
    if not state_path.is_file():
        # An interrupted run has no top-level state yet, but its latest checkpoint has one.
        checkpoints = sorted(run_dir.glob("checkpoint-*/trainer_state.json"),
                             key=lambda p: _number(p.parent.name.split("-")[-1]) or -1)
        if checkpoints:
            state_path = checkpoints[-1]
            notes.append(f"No trainer_state.json in the run directory; curves are from "
                         f"{state_path.relative_to(run_dir)} (the run may not have finished).")
    state = _read_json(state_path, notes)
    metrics = _read_json(run_dir / "metrics.json", notes)
    job = _read_yaml(run_dir / "job.yaml", notes)
    if not state and not metrics and not job:
        raise UserError(f"report: {run_dir} holds none of trainer_state.json, metrics.json, job.yaml; expected a run "
                        f"directory made by `llmfinetune run-ft`.")
    log = [entry for entry in state.get("log_history", []) if isinstance(entry, dict)] if state else []
    return RunData(run_dir, state, log, metrics, job, notes)


def _read_json(path: Path, notes: list[str]) -> dict[str, Any]:
    if not path.is_file():
        notes.append(f"{path.name} not found.")
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name} could not be read ({exc}).")
        return {}
    return value if isinstance(value, dict) else {}


def _read_yaml(path: Path, notes: list[str]) -> dict[str, Any]:
    if not path.is_file():
        notes.append(f"{path.name} not found.")
        return {}
    try:
        import yaml

        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - a broken job.yaml must not stop the report
        notes.append(f"{path.name} could not be read ({exc}).")
        return {}
    return value if isinstance(value, dict) else {}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> Optional[float]:
    """int/float (not bool), or a numeric string as YAML leaves `2e-5`; else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


# --------------------------------------------------------------------------------------------------------------------
# Curves from the log history


@dataclass
class Curves:
    train_loss: Series
    learning_rate: Series
    eval_loss: Series  # evaluations during training
    final_eval: dict[str, Any]  # trainer.evaluate() after training, when it is not a repeat of the last one
    last_eval: dict[str, Any]  # the last evaluation logged, whichever
    summary: dict[str, Any]  # the train summary entry (train_runtime, train_loss, ...)
    main_key: Optional[str]
    main_label: str
    main_name: str
    main: Series
    main_derived: bool  # perplexity computed here as exp(eval_loss)
    generation: dict[str, Series] = field(default_factory=dict)  # eval_gen_* during training (generation_eval)
    margins: dict[str, Series] = field(default_factory=dict)  # "train" / "eval": reward margin (MARGIN_KEYS)


def curves(run: RunData) -> Curves:
    train_loss, lr = Series(), Series()
    evals: dict[float, dict[str, Any]] = {}  # step -> entry; a resumed run may log a step twice: keep the last
    after: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for entry in run.log:
        step = entry.get("step")
        # Only the end-of-training summary has train_loss; with include_num_input_tokens_seen every per-step log
        # also carries train_runtime, so that key cannot tell them apart.
        if "train_loss" in entry:
            summary = entry
            continue
        if "eval_loss" in entry or any(k.startswith("eval_") and k not in _EVAL_TIMING for k in entry):
            if summary:
                after.append(entry)
            elif _number(step) is not None:
                evals[float(step)] = entry
            continue
        if "loss" in entry:
            train_loss.add(step, entry["loss"])
        if "learning_rate" in entry:
            lr.add(step, entry["learning_rate"])

    final_eval: dict[str, Any] = {}
    if after:
        last = after[-1]
        step = _number(last.get("step"))
        if step is None or step not in evals:
            final_eval = last
    entries = [evals[s] for s in sorted(evals)]
    eval_loss = Series()
    for entry in entries:
        eval_loss.add(entry.get("step"), entry.get("eval_loss"))

    every = entries + ([final_eval] if final_eval else []) + [run.metrics]
    main_key, main_label, main_name, derived = None, "", "", False
    for key, label, name in MAIN_METRICS:
        if any(_number(e.get(key)) is not None for e in every):
            main_key, main_label, main_name = key, label, name
            break
    if main_key is None and run.task in PERPLEXITY_TASKS:
        # Perplexity is added to metrics.json after the last evaluation, so the log history only has the loss.
        main_key, main_label, main_name, derived = "eval_perplexity", MAIN_METRICS[2][1], "perplexity", True
    main = Series()
    if main_key:
        for entry in entries:
            main.add(entry.get("step"), _metric(entry, main_key, derived))
    last_eval = after[-1] if after else (entries[-1] if entries else {})
    generation = {}
    for key, _ in GENERATION_SCORES:
        series = Series()
        for entry in entries:
            series.add(entry.get("step"), entry.get(key))
        generation[key] = series
    return Curves(train_loss, lr, eval_loss, final_eval, last_eval, summary, main_key, main_label, main_name, main,
                  derived, generation, _margins(run.log))


def _margins(log: list[dict[str, Any]]) -> dict[str, Series]:
    found: dict[str, dict[Any, Any]] = {"train": {}, "eval": {}}  # step -> value; the final eval repeats the last
    for entry in log:
        for key in MARGIN_KEYS:
            for name, logged in (("train", key), ("eval", f"eval_{key}")):
                if logged in entry:
                    found[name][entry.get("step")] = entry[logged]
    margins = {}
    for name, values in found.items():
        series = Series()
        for step, value in values.items():
            series.add(step, value)
        if series:
            margins[name] = series
    return margins


_EVAL_TIMING = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def _metric(entry: dict[str, Any], key: str, derived: bool) -> Optional[float]:
    value = _number(entry.get(key))
    if value is None and key == "eval_perplexity" and (derived or "eval_loss" in entry):
        loss = _number(entry.get("eval_loss"))
        value = math.exp(min(loss, 50.0)) if loss is not None else None
    return value


# --------------------------------------------------------------------------------------------------------------------
# The figure


def _title(run: RunData) -> str:
    method = {"lora": "LoRA", "full": "full fine-tuning"}.get(run.method, run.method)
    return f"{run.model}  |  task: {run.task}  |  method: {method}\nrun: {run.run_dir.name}"


def draw(run: RunData, c: Curves, path: Path) -> Path:
    try:
        import matplotlib
    except ImportError as exc:
        raise UserError("report: matplotlib is needed to draw report.png: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    final_generation = {key: _number(run.metrics.get(key)) for key, _ in GENERATION_SCORES}
    with_generation = any(c.generation.values()) or any(v is not None for v in final_generation.values())
    rows = 2 + with_generation + bool(c.margins)
    fig = plt.figure(figsize=(12, 4 * rows), dpi=110, layout="constrained")
    grid = fig.add_gridspec(rows, 2)
    ax_loss, ax_lr = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_eval, ax_main = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    axes = np.array([[ax_loss, ax_lr], [ax_eval, ax_main]])
    if with_generation:
        ax_generation = fig.add_subplot(grid[2, :])
        axes = np.array([*axes.flat, ax_generation])
        rows = next((_number(e.get("eval_gen_rows")) for e in reversed(run.log) if "eval_gen_rows" in e), None)
        _generation_panel(ax_generation, c, final_generation,
                          _number(c.summary.get("step")) or _number(run.state.get("global_step")), rows)
    if c.margins:
        ax_margin = fig.add_subplot(grid[rows - 1, :])
        axes = np.array([*axes.flat, ax_margin])
        _margin_panel(ax_margin, c)
    fig.suptitle(_title(run), fontsize=12, fontweight="bold")
    final_step = _number(c.final_eval.get("step")) if c.final_eval else None
    last_step = _number(c.summary.get("step")) or _number(run.state.get("global_step"))

    losses = [v for v in c.train_loss.values + c.eval_loss.values if v > 0]
    final_loss = _number(c.final_eval.get("eval_loss")) if c.final_eval else None
    if final_loss and final_loss > 0:
        losses.append(final_loss)
    log_loss = bool(losses) and len(losses) == len(c.train_loss.values + c.eval_loss.values) + bool(
        final_loss and final_loss > 0) and max(losses) / min(losses) > 30
    loss_label = "loss (cross-entropy, log scale)" if log_loss else "loss (cross-entropy)"

    # (1) training loss
    if c.train_loss:
        _line(ax_loss, c.train_loss, color="tab:blue", label="training loss (per logging window)")
        mean = _number(c.summary.get("train_loss"))
        if mean is not None:
            ax_loss.axhline(mean, color="tab:blue", linestyle=":", linewidth=1,
                            label=f"mean over the run: {_fmt(mean)}")
        ax_loss.legend(loc="upper right", fontsize=8)
    else:
        mean = _number(c.summary.get("train_loss")) or _number(run.metrics.get("train_loss"))
        if mean is not None and last_step is not None:
            ax_loss.plot([last_step], [mean], "o", color="tab:blue", label="mean training loss of the run")
            ax_loss.legend(loc="upper right", fontsize=8)
        _empty(ax_loss, "no per-step training loss logged\n(fewer steps than logging_steps?)")
    ax_loss.set_title("Training loss")
    ax_loss.set_ylabel(loss_label)

    # (2) learning rate
    if c.learning_rate:
        _line(ax_lr, c.learning_rate, color="tab:purple")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useMathText=True)
        ax_lr.set_ylim(bottom=0)
    else:
        _empty(ax_lr, "no learning rate logged")
    ax_lr.set_title("Learning-rate schedule")
    ax_lr.set_ylabel("learning rate")

    # (3) eval loss
    _eval_panel(ax_eval, c.eval_loss, _number(c.final_eval.get("eval_loss")) if c.final_eval else None, final_step,
                color="tab:red", label="eval loss")
    if c.eval_loss and c.train_loss:
        ax_eval.plot(c.train_loss.steps, c.train_loss.values, color="tab:blue", alpha=0.35, linewidth=1,
                     label="training loss (for comparison)")
    if c.eval_loss or c.final_eval:
        ax_eval.legend(loc="best", fontsize=8)
    ax_eval.set_title("Evaluation loss")
    ax_eval.set_ylabel(loss_label)
    if log_loss:
        ax_loss.set_yscale("log")
        ax_eval.set_yscale("log")

    # (4) main metric
    if c.main_key:
        final = _metric(c.final_eval, c.main_key, c.main_derived) if c.final_eval else None
        _eval_panel(ax_main, c.main, final, final_step, color="tab:green", label=f"eval {c.main_name}")
        if c.main or final is not None:
            ax_main.legend(loc="best", fontsize=8)
        if c.main_name != "perplexity":
            values = c.main.values + ([final] if final is not None else [])
            if values:
                low = min(values)
                ax_main.set_ylim(max(0.0, min(low - 0.05, low - 0.1 * (1 - low))), 1.005)
        ax_main.set_title(f"Eval {c.main_name}" + (" (computed from eval loss)" if c.main_derived else ""))
        ax_main.set_ylabel(c.main_label)
    else:
        _empty(ax_main, "no evaluation metric logged")
        ax_main.set_title("Eval metric")
        ax_main.set_ylabel("metric")

    for ax in axes.flat:
        ax.set_xlabel("step (optimizer steps)")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if last_step:
            ax.set_xlim(0, last_step * 1.03)
    fig.savefig(path)
    plt.close(fig)
    return path


def _generation_panel(ax, c: Curves, final: dict[str, Optional[float]], last_step: Optional[float],
                      rows: Optional[float]) -> None:
    """Generation scores (0-1): during training on the first `rows` eval rows (every_eval), and on every eval row
    at the end."""
    during = f"during training (first {int(rows)} eval rows" if rows else "during training ("
    colors = ("tab:green", "tab:blue", "tab:cyan", "tab:orange", "tab:red")
    for (key, name), color in zip(GENERATION_SCORES, colors):
        series = c.generation.get(key)
        if series:
            ax.plot(series.steps, series.values, color=color, marker="o", markersize=5, linewidth=1.6,
                    label=f"{name} {during}; last: {_fmt(series.values[-1])})")
        if final.get(key) is not None and last_step is not None:
            ax.plot([last_step], [final[key]], marker="*", markersize=14, linestyle="none", color=color,
                    markeredgecolor="black", label=f"{name}, all eval rows after training: {_fmt(final[key])}")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="best", fontsize=8, ncol=2)
    ax.set_title("Generation scores (generated answers vs the reference answers)")
    ax.set_ylabel("score (0-1, higher is better)")


def _margin_panel(ax, c: Curves) -> None:
    """Reward margin (chosen minus rejected): above 0 means the model prefers the chosen answer."""
    for name, color in (("train", "tab:blue"), ("eval", "tab:red")):
        series = c.margins.get(name)
        if series:
            label = "training (per logging window)" if name == "train" else "evaluation"
            ax.plot(series.steps, series.values, color=color, marker="o" if name == "eval" else None, markersize=5,
                    linewidth=1.6, label=f"{label} (last: {_fmt(series.values[-1])})")
    ax.axhline(0, color="black", linewidth=0.8, linestyle=":")
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Reward margin (chosen minus rejected)")
    ax.set_ylabel("reward margin")


def draw_confusion(run: RunData, path: Path) -> Optional[Path]:
    """confusion.png from metrics.json's eval_confusion_matrix (rows: true label, columns: predicted); None when
    the run has none."""
    matrix = _dict(run.metrics.get(CONFUSION))
    labels, counts = matrix.get("labels"), matrix.get("counts")
    if not labels or not counts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = min(4 + 0.45 * len(labels), 20)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=110, layout="constrained")
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, label="words" if run.task == "tokenclassification" else "eval examples")
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 4 else 0,
                  ha="right" if len(labels) > 4 else "center")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    peak = max((max(row) for row in counts), default=0)
    if len(labels) <= 25:  # beyond that the numbers would not fit their cells
        for i, row in enumerate(counts):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=9,
                        color="white" if peak and value > peak / 2 else "black")
    unit = "word tags" if run.task == "tokenclassification" else "classes"
    ax.set_title(f"Confusion matrix of the final evaluation ({unit})\n{run.model} | run: {run.run_dir.name}",
                 fontsize=11)
    fig.savefig(path)
    plt.close(fig)
    return path


def _line(ax, series: Series, color: str, label: Optional[str] = None) -> None:
    marker = "o" if len(series.values) <= 30 else None
    ax.plot(series.steps, series.values, color=color, marker=marker, markersize=4, linewidth=1.6, label=label)


def _eval_panel(ax, series: Series, final: Optional[float], final_step: Optional[float], color: str,
                label: str) -> None:
    if series:
        ax.plot(series.steps, series.values, color=color, marker="o", markersize=6, linewidth=1.6,
                label=f"{label} during training (last: {_fmt(series.values[-1])})")
    if final is not None and final_step is not None:
        ax.plot([final_step], [final], marker="*", markersize=14, linestyle="none", color=color,
                markeredgecolor="black", label=f"{label}, final evaluation: {_fmt(final)}")
    if not series:
        _empty(ax, "no evaluation during training" + ("\n(★ = the final evaluation)" if final is not None else ""))


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="0.4")


# --------------------------------------------------------------------------------------------------------------------
# The markdown


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return NA
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return NA if math.isnan(value) else str(value)
        if value == int(value) and abs(value) < 1e15:
            return _fmt(int(value))
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{max(digits - len(str(int(abs(value)))), 2)}f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else NA
    text = str(value)
    return text if text else NA


def _seconds(value: Any) -> str:
    s = _number(value)
    if s is None:
        return NA
    if s < 120:
        return f"{s:.1f} s"
    minutes, sec = divmod(s, 60)
    if minutes < 60:
        return f"{s:.0f} s ({int(minutes)} min {sec:.0f} s)"
    hours, minutes = divmod(minutes, 60)
    return f"{s:.0f} s ({int(hours)} h {int(minutes)} min)"


def _table(rows: list[tuple[str, str]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {v.replace('|', chr(92) + '|')} |" for k, v in rows]
    return "\n".join(lines)


def _data_source(run: RunData) -> str:
    d = run.data_config
    if d.get("train_file") or d.get("validation_file"):
        source = f"files: train `{d.get('train_file') or NA}`, validation `{d.get('validation_file') or NA}`"
    elif d.get("local_path"):
        source = f"local folder `{d['local_path']}`"
    elif d.get("data_path"):
        source = f"hub dataset `{d['data_path']}`" + (f" (subset `{d['subset']}`)" if d.get("subset") else "")
    else:
        return NA
    columns = d.get("input_columns")
    extra = []
    if columns:
        extra.append("input " + ", ".join(f"`{c}`" for c in (columns if isinstance(columns, list) else [columns])))
    if d.get("label_column") and run.task in ("sequenceclassification", "tokenclassification"):
        extra.append(f"label `{d['label_column']}`")
    if d.get("response_column"):
        extra.append(f"response `{d['response_column']}`")
    num_row = _number(d.get("num_row"))
    if num_row and num_row > 0:
        extra.append(f"first {int(num_row)} rows per split")
    return source + (f"; columns: {'; '.join(extra)}" if extra else "")


def _setting(run: RunData, key: str, fallback: Any = None, fallback_note: str = "") -> str:
    value = run.base(key)
    if value is not None:
        number = _number(value)
        return _fmt(number if number is not None and not isinstance(value, bool) else value)
    if fallback is not None:
        return f"{_fmt(fallback)} ({fallback_note})" if fallback_note else _fmt(fallback)
    return "not set (default)"


def _warmup(run: RunData) -> str:
    value = _number(run.base("warmup_steps"))
    ratio = _number(run.base("warmup_ratio"))
    if value is not None and 0 < value < 1:  # transformers reads warmup_steps < 1 as a fraction of all steps
        return f"{_fmt(value)} of the steps"
    if value is not None:
        return f"{int(value)} steps"
    if ratio is not None:
        return f"{_fmt(ratio)} of the steps"
    return "not set (default)"


def _job_rows(run: RunData, c: Curves) -> list[tuple[str, str]]:
    state = run.state
    peak_lr = max(c.learning_rate.values) if c.learning_rate else None
    rows = [
        ("model", f"`{run.model}`"),
        ("task", run.task),
        ("method", run.method),
        ("data", _data_source(run)),
        ("learning rate", _setting(run, "learning_rate", peak_lr, "peak logged; not set in job.yaml")),
        ("lr schedule / warmup", f"{_setting(run, 'lr_scheduler_type')} / {_warmup(run)}"),
        ("per-device train batch", _setting(run, "per_device_train_batch_size", state.get("train_batch_size"),
                                             "from trainer_state.json")),
        ("gradient accumulation", _setting(run, "gradient_accumulation_steps")),
        ("epochs", _setting(run, "num_train_epochs", state.get("num_train_epochs"), "from trainer_state.json")),
        ("max_steps", _setting(run, "max_steps")),
        ("steps run", _fmt(state.get("global_step")) if state else NA),
        ("max_length (tokens)", _setting(run, "max_length")),
        ("weight decay", _setting(run, "weight_decay")),
        ("seed", _setting(run, "seed")),
    ]
    precision = [k for k in ("bf16", "fp16") if run.base(k) is True]
    if precision:
        rows.append(("precision", ", ".join(precision)))
    if run.method == "lora":
        lora = run.lora_config
        rows.append(("LoRA r / alpha / dropout",
                     " / ".join(_fmt(_number(lora.get(k)) if _number(lora.get(k)) is not None else lora.get(k))
                                for k in ("r", "lora_alpha", "lora_dropout"))))
        if lora.get("target_modules"):
            rows.append(("LoRA target modules", _fmt(lora["target_modules"])))
    dtype = _dict(_dict(run.model_config.get("initialization")).get("initializer")).get("dtype")
    if dtype:
        rows.append(("weights dtype", str(dtype)))
    if run.model_config.get("quantization_bit"):
        rows.append(("quantization", f"{run.model_config['quantization_bit']}-bit"))
    return rows


def _metrics_rows(run: RunData, c: Curves) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    m = dict(c.summary)
    m.update(c.last_eval)
    m.update(run.metrics)  # metrics.json is the final word when it exists
    train_keys = ("train_loss", "epoch", "train_runtime", "train_samples_per_second", "train_steps_per_second",
                  "total_flos")
    train = [(f"`{k}`", _fmt(_number(m.get(k)))) for k in train_keys if k in m]
    eval_keys = [k for k in m if k.startswith("eval_") and k != "eval_examples"
                 and not isinstance(m[k], (dict, list))]  # tables have their own sections
    if c.main_derived and "eval_perplexity" not in m and _number(m.get("eval_loss")) is not None:
        m["eval_perplexity"] = math.exp(min(float(m["eval_loss"]), 50.0))
        eval_keys.append("eval_perplexity")
    first = [k for k in ("eval_loss", "eval_accuracy", "eval_f1", "eval_precision", "eval_recall", "eval_perplexity")
             if k in eval_keys]
    ordered = first + sorted(k for k in eval_keys if k not in first)
    evals = [(f"`{k}`" + (" (exp of eval_loss)" if k == "eval_perplexity" and c.main_derived else ""),
              _fmt(_number(m.get(k)) if _number(m.get(k)) is not None else m.get(k))) for k in ordered]
    return train, evals


def _cost_rows(run: RunData, c: Curves, extra: dict[str, Any]) -> list[tuple[str, str]]:
    m = {**c.summary, **run.metrics}
    runtime = _number(m.get("train_runtime"))
    tokens = _number(extra.get("train_tokens"))
    if tokens is not None and runtime:
        tokens_s = f"{_fmt(tokens / runtime)} ({int(tokens):,} non-pad tokens / {runtime:.1f} s)"
    elif _number(m.get("train_tokens_per_second")) is not None:
        tokens_s = f"{_fmt(_number(m['train_tokens_per_second']))} (transformers' count, per device)"
    else:
        tokens_s = NA
    trainable, total = _number(extra.get("trainable_parameters")), _number(extra.get("total_parameters"))
    if trainable is not None and total:
        params = f"{int(trainable):,} of {int(total):,} ({100.0 * trainable / total:.2f} %)"
    else:
        params = f"{_fmt(int(trainable)) if trainable is not None else NA} of " \
                 f"{_fmt(int(total)) if total is not None else NA}"
        params = NA if params == f"{NA} of {NA}" else params
    rss = _number(extra.get("peak_rss_mib"))
    world = _number(m.get("world_size"))
    gbatch = _number(m.get("global_batch_size"))
    return [
        ("training time (`train_runtime`)", _seconds(runtime)),
        ("whole run, wall clock (`wall_seconds`)", _seconds(m.get("wall_seconds"))),
        ("train samples/s", _fmt(_number(m.get("train_samples_per_second")))),
        ("train tokens/s", tokens_s),
        ("peak memory (RSS, rank 0)", f"{rss:,.0f} MiB" if rss is not None and math.isfinite(rss) else NA),
        ("trainable / total parameters", params),
        ("world size (processes)", _fmt(int(world)) if world is not None else NA),
        ("global batch (per-device x world x accumulation)", _fmt(int(gbatch)) if gbatch is not None else NA),
        ("train / eval examples",
         f"{_fmt(_number(m.get('train_examples')))} / {_fmt(_number(m.get('eval_examples')))}"),
    ]


def _command(run: RunData, extra: dict[str, Any]) -> tuple[str, list[str]]:
    command = extra.get("command")
    if isinstance(command, (list, tuple)):
        command = " ".join(shlex.quote(str(part)) for part in command)
    notes: list[str] = []
    if command:
        return str(command), notes
    job_path = run.run_dir / "job.yaml"
    command = f"llmfinetune run-ft --ft={shlex.quote(str(job_path))}"
    d = run.data_config
    for key in ("local_path", "train_file", "validation_file"):
        value = d.get(key)
        if value and not Path(str(value)).expanduser().is_absolute():
            notes.append(f"`{key}: {value}` in job.yaml is relative: it is read from the current directory first, "
                         f"then from the job file's folder; run from the folder the run was started from, or add "
                         f"`ft_config.data_config.{key}=/absolute/path`.")
    notes.append("This writes to the same run directory; add "
                 "`ft_config.train_config.base_config.output_dir=NEW_DIR` to keep this one.")
    return command, notes


def per_class_table(per_class: dict[str, Any]) -> list[str]:
    """eval_per_class as a markdown table (report.md, and `predict --input` on a labelled file)."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, row in per_class.items():
        row = _dict(row)
        cells = [f"{v:.4f}" if v is not None else NA for v in (_number(row.get(k)) for k in ("precision", "recall",
                                                                                               "f1"))]
        support = _number(row.get("support"))
        name = str(name).replace("|", chr(92) + "|")
        lines.append(f"| {name} | {' | '.join(cells)} | {int(support) if support is not None else NA} |")
    return lines


def _per_class_section(run: RunData) -> list[str]:
    per_class = _dict(run.metrics.get(PER_CLASS))
    if not per_class:
        return []
    entities = run.task == "tokenclassification"
    lines = ["### Per class", "",
             "Final evaluation, one row per " + ("entity type (seqeval: an entity counts when its type and its "
                                                 "whole span are right)" if entities else "class") + ".", "", *per_class_table(per_class), ""]
    if _dict(run.metrics.get(CONFUSION)).get("counts"):
        lines += [f"![confusion matrix]({CONFUSION_NAME})", ""]
    return lines


def _generation_section(run: RunData) -> list[str]:
    """A few (prompt, reference, generated) rows of generations.jsonl, with their scores."""
    if _number(run.metrics.get("eval_gen_exact_match")) is None:
        return []
    name = str(run.metrics.get("eval_gen_file") or "generations.jsonl")
    lines = ["## Generations", "",
             f"Scores on {run.metrics.get('eval_gen_tokenization') or NA}; every row is in [{name}]({name}).", ""]
    rows = []
    try:
        with (run.run_dir / name).open(encoding="utf-8") as handle:
            for line in handle:
                if len(rows) == GENERATION_EXAMPLES:
                    break
                if line.strip():
                    rows.append(json.loads(line))
    except (OSError, ValueError):
        return lines + [f"{name} could not be read.", ""]
    fence = "~~~~"  # generated text may hold backticks
    for number, row in enumerate(rows, 1):
        scores = _dict(row.get("scores"))
        shown = ", ".join(f"{label} {_fmt(_number(scores.get(key[len('eval_gen_'):])))}"
                          for key, label in GENERATION_SCORES)
        lines += [f"**Example {number}** (eval row {row.get('row', NA)}; {shown})", ""]
        for part in ("prompt", "reference", "generated"):
            lines += [f"{part}:", "", fence + "text", str(row.get(part, "")).replace(fence, "~ ~ ~ ~"), fence, ""]
    return lines


def render_markdown(run: RunData, c: Curves, extra: dict[str, Any]) -> str:
    train, evals = _metrics_rows(run, c)
    command, command_notes = _command(run, extra)
    parts = [
        f"# Fine-tuning report: {run.run_dir.name}",
        "",
        f"`{run.model}` | task **{run.task}** | method **{run.method}**",
        "",
        f"![training curves]({PNG_NAME})",
        "",
        f"Curves: [{PNG_NAME}]({PNG_NAME})",
        "",
        "## Job",
        "",
        _table(_job_rows(run, c), ("setting", "value")),
        "",
        "## Final metrics",
        "",
        "### Train",
        "",
        _table(train, ("metric", "value")) if train else NA,
        "",
        "### Eval",
        "",
        _table(evals, ("metric", "value")) if evals else f"{NA} (no evaluation recorded)",
        "",
        *_per_class_section(run),
        *_generation_section(run),
        "## Time, throughput and size",
        "",
        _table(_cost_rows(run, c, extra), ("", "value")),
        "",
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
    ]
    if command_notes:
        parts += [""] + [f"- {note}" for note in command_notes]
    if run.notes:
        parts += ["", "## Notes", ""] + [f"- {note}" for note in run.notes]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------------------------------


def write_report(run_dir: Path, extra: Optional[dict[str, Any]] = None) -> tuple[Path, Path]:
    """Write `run_dir/report.png` and `run_dir/report.md`; return their paths.

    `extra` may carry `trainable_parameters`, `total_parameters`, `peak_rss_mib`, `train_tokens` and `command`;
    missing ones are reported as "n/a".
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    c = curves(run)
    extra = dict(extra or {})
    md_path = run_dir / MD_NAME
    md_path.write_text(render_markdown(run, c, extra), encoding="utf-8")
    png_path = draw(run, c, run_dir / PNG_NAME)
    draw_confusion(run, run_dir / CONFUSION_NAME)
    logger.info("Report written: %s and %s", md_path, png_path)
    return png_path, md_path
