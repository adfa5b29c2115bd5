"""Downstream evaluation figure (the paper's task comparison): grouped bars per task, one bar per
model variant, with the harness's standard errors. Reads ``<results_dir>/eval/summary.csv``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from gaincell import study
from gaincell.figures._common import save_figure

ACCURACY_METRICS = (("acc", "Accuracy"), ("acc_norm", "Accuracy, length-normalised (acc_norm)"))
# Perplexity-like metrics, lower is better; word_perplexity is the paper's WikiText-2 number.
PERPLEXITY_METRICS = ("word_perplexity", "perplexity")
# Answer options of the harness's multiple-choice tasks (ARC: mostly 4), for the chance level.
HARNESS_CHOICES = {"arc_easy": 4, "arc_challenge": 4, "winogrande": 2, "hellaswag": 4, "piqa": 2}


def chance_levels(results_dir: Path, tasks) -> dict:
    """task -> 1 / number of answer options, for multiple-choice tasks whose options are known: the
    harness's (table above) and the local ones (first example of ``eval/tasks/<task>.jsonl``)."""
    levels = {}
    for task in tasks:
        if task in HARNESS_CHOICES:
            levels[task] = 1.0 / HARNESS_CHOICES[task]
            continue
        data = Path(results_dir) / "eval" / "tasks" / f"{task}.jsonl"
        if data.is_file():
            with open(data) as fh:
                first = json.loads(fh.readline() or "{}")
            if isinstance(first.get("choices"), list) and first["choices"]:
                levels[task] = 1.0 / len(first["choices"])
    return levels


def _format_value(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def load_eval_table(results_dir: Path) -> pd.DataFrame:
    """The tidy table of every variant: ``eval/summary.csv``, or the per-variant ``results.csv``
    files themselves when the summary is missing or older than one of them."""
    eval_dir = Path(results_dir) / "eval"
    summary = eval_dir / "summary.csv"
    parts = sorted(eval_dir.glob("*/results.csv"))
    if summary.is_file() and all(p.stat().st_mtime <= summary.stat().st_mtime for p in parts):
        table = pd.read_csv(summary)
    elif parts:
        table = pd.concat([pd.read_csv(p) for p in parts], ignore_index=True)
    else:
        raise FileNotFoundError(f"no evaluation results under {eval_dir} (expected summary.csv or "
                                f"<variant>/results.csv): run the evaluate stage first")
    if table.empty:
        raise ValueError(f"evaluation table under {eval_dir} is empty")
    return table


def _grouped_bars(ax, table: pd.DataFrame, variants: List[str], colors, log_scale: bool = False,
                  chance: dict | None = None) -> None:
    tasks = list(dict.fromkeys(table["task"]))
    width = 0.8 / max(len(variants), 1)
    x = np.arange(len(tasks))
    for i, variant in enumerate(variants):
        rows = table[table["variant"] == variant].set_index("task")
        values = np.array([rows["value"].get(t, np.nan) for t in tasks], dtype=float)
        errors = np.array([rows["stderr"].get(t, np.nan) for t in tasks], dtype=float)
        pos = x - 0.4 + width * (i + 0.5)
        bars = ax.bar(pos, values, width * 0.92, label=variant, color=colors[i],
                      yerr=errors, capsize=2, error_kw={"lw": 0.8})
        for bar, value, err in zip(bars, values, errors):
            if np.isfinite(value):
                top = value + (err if np.isfinite(err) else 0.0)
                ax.annotate(_format_value(value), (bar.get_x() + bar.get_width() / 2, top),
                            xytext=(0, 4), textcoords="offset points", ha="center", va="bottom",
                            fontsize=7, rotation=90 if len(variants) > 2 else 0)
    for k, task in enumerate(tasks):
        if chance and task in chance:
            ax.hlines(chance[task], k - 0.45, k + 0.45, colors="0.3", linestyles="--", lw=1,
                      label="chance" if k == min(i for i, t in enumerate(tasks) if t in chance) else None)
    ax.set_xticks(x)
    ax.set_xticklabels(tasks, rotation=20, ha="right")
    if log_scale:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _row_ratios(panels) -> List[float]:
    """Second-row column widths in proportion to the number of task groups of each panel."""
    if len(panels) < 2:
        return [1.0, 1.0]
    return [max(1.0, float(part["task"].nunique())) for part, *_ in panels[:2]]


def fig_eval_tasks(results_dir: Path, out_dir: Path) -> List[Path]:
    """Downstream tasks through lm-evaluation-harness: accuracy (and length-normalised accuracy where
    the task defines it) per task and perplexity (word perplexity for perplexity tasks, target-word
    perplexity for last-word tasks; log scale, lower is better), one bar per model variant, error
    bars = the harness's standard errors (bootstrap for perplexity; none for word perplexity)."""
    matplotlib.use("Agg")

    table = load_eval_table(results_dir)
    # the study's order (paper Table 1), then any other variant in the order found
    study_order = list(study.VARIANT_RUNS)
    found = list(dict.fromkeys(table["variant"]))
    variants = [v for v in study_order if v in found] + [v for v in found if v not in study_order]
    cmap = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
    colors = [cmap(i % cmap.N) for i in range(len(variants))]
    panels = []
    for metric, title in ACCURACY_METRICS:
        part = table[table["metric"] == metric]
        if not part.empty:
            panels.append((part, title, "accuracy (fraction correct)", False, True))
    ppl = table[table["metric"].isin(PERPLEXITY_METRICS)].copy()
    if not ppl.empty:
        # A task reports one perplexity: word_perplexity if it has it, else perplexity.
        ppl["rank"] = ppl["metric"].map({m: i for i, m in enumerate(PERPLEXITY_METRICS)})
        best = ppl.groupby("task")["rank"].transform("min")
        ppl = ppl[ppl["rank"] == best]
        ppl["task"] = ppl["task"] + "\n(" + ppl["metric"] + ")"
        panels.append((ppl, "Perplexity (lower is better)", "perplexity", True, False))
    if not panels:
        raise ValueError(f"no accuracy or perplexity metric in the evaluation table of {results_dir}")

    # Accuracy across the top; acc_norm and perplexity share the second row (when present).
    fig = plt.figure(figsize=(11, 4.2 if len(panels) == 1 else 8.4))
    grid = fig.add_gridspec(1 if len(panels) == 1 else 2, 2, width_ratios=_row_ratios(panels[1:]))
    axes = [fig.add_subplot(grid[0, :])]
    if len(panels) == 2:
        axes.append(fig.add_subplot(grid[1, :]))
    elif len(panels) == 3:
        axes += [fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])]
    chance = chance_levels(results_dir, table["task"].unique())
    for ax, (part, title, ylabel, log_scale, is_accuracy) in zip(axes, panels):
        values = part["value"].to_numpy(dtype=float)
        log_scale = log_scale and np.nanmax(values) / max(np.nanmin(values), 1e-12) > 20
        _grouped_bars(ax, part, variants, colors, log_scale=log_scale, chance=chance if is_accuracy else None)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel + (" (log scale)" if log_scale else ""))
        top = float(np.nanmax(part["value"] + part["stderr"].fillna(0)))
        if is_accuracy:
            ax.set_ylim(0, min(1.05, max(0.05, top * 1.3)))
        elif not log_scale:
            ax.set_ylim(0, top * 1.3)
    handles, labels = [], []
    for ax in axes:  # variants, plus "chance" wherever a panel drew it
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, title="model variant", loc="upper center", ncol=min(len(labels), 6),
               bbox_to_anchor=(0.5, 1.02), frameon=False)
    n = int(table["num_samples"].max()) if "num_samples" in table else None
    fig.suptitle("Downstream evaluation (lm-evaluation-harness)" + (f", up to {n} examples per task" if n else ""),
                 y=1.06 if len(panels) == 1 else 1.04, fontsize=11)
    fig.tight_layout()

    return save_figure(fig, Path(out_dir), "eval_tasks")
