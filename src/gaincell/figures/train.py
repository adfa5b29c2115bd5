"""Figures of the training stage, read from ``results_dir/train/<run>/metrics.csv`` (+ ``.summary.json``).

* :func:`fig_training_curves` - training loss (smoothed, raw behind) and validation loss of every run
  against tokens seen, final validation losses annotated.
* :func:`fig_training_throughput` - measured training throughput (tokens/s) per run, with each run's
  ratio to the softmax run, from the runs' summaries.

Each returns the PNG (150 dpi) and PDF paths it wrote, or an empty list when no run exists.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from gaincell.figures._common import save_figure as _save

log = logging.getLogger(__name__)

KIND_COLORS = {"softmax": "#4d4d4d", "softmax_window": "#9e9e9e", "linear_hw": "#1f77b4",
               "nonlinear_hw": "#d62728"}
KIND_STYLES = {"softmax": "-", "softmax_window": "--", "linear_hw": "-.", "nonlinear_hw": ":"}


def _plt():
    matplotlib.use("Agg")

    sns.set_theme(style="whitegrid", context="paper")
    return plt


def _runs(results_dir: Path) -> Dict[str, pd.DataFrame]:
    runs = {}
    for csv in sorted((Path(results_dir) / "train").glob("*/metrics.csv")):
        try:
            df = pd.read_csv(csv)
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
            log.warning("skipping unreadable %s: %s", csv, exc)
            continue
        if {"iter", "tokens", "train_loss", "val_loss"} <= set(df.columns) and len(df):
            runs[csv.parent.name] = df
    return runs


def _summary(results_dir: Path, run: str) -> dict:
    path = Path(results_dir) / "train" / run / "metrics.summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}



def fig_training_curves(results_dir: Path, out_dir: Path) -> List[Path]:
    """Training and validation loss of every training run against tokens seen."""
    runs = _runs(Path(results_dir))
    if not runs:
        log.info("fig_training_curves: no train/*/metrics.csv under %s; skipped", results_dir)
        return []
    plt = _plt()

    palette = sns.color_palette("tab10", n_colors=max(10, len(runs)))
    fig, (ax_tr, ax_val) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, (run, df) in enumerate(runs.items()):
        summary = _summary(results_dir, run)
        kind = summary.get("attention", "")
        color = palette[i % len(palette)]
        style = KIND_STYLES.get(kind, "-")
        label = f"{run} ({kind})" if kind and kind != run else run
        train = df[["tokens", "train_loss"]].dropna()
        if len(train):
            x = train["tokens"].to_numpy(float) / 1e6
            y = train["train_loss"].to_numpy(float)
            span = max(1, len(y) // 20)
            smooth = pd.Series(y).ewm(span=span).mean().to_numpy()
            ax_tr.plot(x, y, color=color, alpha=0.2, lw=0.8)
            ax_tr.plot(x, smooth, color=color, lw=1.8, ls=style, label=label)
        val = df[["tokens", "val_loss"]].dropna()
        if len(val):
            x = val["tokens"].to_numpy(float) / 1e6
            y = val["val_loss"].to_numpy(float)
            ax_val.plot(x, y, marker="o", ls=style, color=color, ms=3.5, lw=1.5,
                        label=f"{run}: {y[-1]:.3f} (ppl {np.exp(y[-1]):.0f})")
    ax_tr.set(title="Training loss (EMA-smoothed; raw behind)", xlabel="tokens seen (millions)",
              ylabel="cross-entropy (nats/token)")
    ax_val.set(title="Validation loss (fixed held-out batches)", xlabel="tokens seen (millions)")
    ax_tr.legend(fontsize=8, loc="upper right", title="run (attention; line style)", title_fontsize=8)
    ax_val.legend(fontsize=8, loc="upper right", title="final val loss", title_fontsize=8)
    fig.suptitle(f"Training runs in {Path(results_dir).name}: loss against tokens seen", fontsize=11)
    fig.tight_layout()
    paths = _save(fig, Path(out_dir), "training_curves")
    plt.close(fig)
    return paths


def fig_training_throughput(results_dir: Path, out_dir: Path) -> List[Path]:
    """Measured training throughput per run (tokens/s), with the ratio to the softmax run."""
    rows = []
    for run in _runs(Path(results_dir)):
        s = _summary(results_dir, run)
        if s.get("tokens_per_s"):
            rows.append({"run": run, "attention": s.get("attention", "?"), "tokens_per_s": float(s["tokens_per_s"]),
                         "device": s.get("device", "?"), "world_size": s.get("world_size", 1)})
    if not rows:
        log.info("fig_training_throughput: no run summaries with tokens_per_s under %s; skipped", results_dir)
        return []
    df = pd.DataFrame(rows).sort_values("tokens_per_s", ascending=False)
    # The reference is the run named "softmax" (the pipeline's baseline), else the first softmax run.
    ref_rows = df[df["run"] == "softmax"]
    if not len(ref_rows):
        ref_rows = df[df["attention"] == "softmax"].sort_values("run")
    ref_value = float(ref_rows["tokens_per_s"].iloc[0]) if len(ref_rows) else None
    ref_name = str(ref_rows["run"].iloc[0]) if len(ref_rows) else None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(df) + 1.5))
    colors = [KIND_COLORS.get(a, "#8c564b") for a in df["attention"]]
    ax.barh(df["run"], df["tokens_per_s"], color=colors)
    for y, (_, r) in enumerate(df.iterrows()):
        note = f"{r.tokens_per_s:,.0f} tok/s"
        if ref_value:
            note += f"  ({r.tokens_per_s / ref_value:.2f}x {ref_name})"
        ax.text(r.tokens_per_s, y, "  " + note, va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, df["tokens_per_s"].max() * 1.6)
    devices = ", ".join(sorted({f"{d} x{w}" for d, w in zip(df["device"], df["world_size"])}))
    ax.set(xlabel="training throughput (tokens/s, whole run incl. evaluation)", ylabel="run",
           title=f"Training throughput per run ({devices})")
    fig.tight_layout()
    paths = _save(fig, Path(out_dir), "training_throughput")
    plt.close(fig)
    return paths


__all__ = ["fig_training_curves", "fig_training_throughput"]
