"""Figures of the study table (``gaincell.comparisons``) and of the signal-health diagnostics
(``gaincell.diagnose``), read from ``results/<profile>/diagnose/*.csv``.

* :func:`fig_study_claims` - every model's validation loss on the same sequences, and the paper's
  orderings / equivalence with their paired standard errors and verdicts.
* :func:`fig_signal_health` - how the analog signals use their ranges: clipping at the DACs, pulses at
  0 / saturation, readouts rounded to 0 / saturated at the ADC, level usage; and the attention share.
* :func:`fig_nonlinearity` - one paper-Fig.-4-style panel per cell (linear, mapped, adapted,
  fine-tuned) and a summary of how much adaptation recovers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from gaincell.figures._common import save_figure

ROLE_COLORS = {"variant": "#1f77b4", "fair baseline": "#4d4d4d", "ablation": "#9467bd", "cell": "#d62728",
               "seed 2": "#17becf"}
VERDICT_COLORS = {"holds": "#2ca02c", "equivalent": "#2ca02c", "reversed": "#d62728", "different": "#d62728",
                  "not resolved": "#7f7f7f", "undetermined": "#7f7f7f"}
HEALTH_COLUMNS = (("q_clipped", "q~ clipped"), ("k_clipped", "k~ clipped"), ("v_clipped", "v~ clipped"),
                  ("hs_zero", "pulse = 0"), ("hs_sat", "pulse saturated"),
                  ("readout_zero", "readout rounds to 0"), ("readout_sat", "readout at ADC limit"))


def _plt():
    matplotlib.use("Agg")

    return plt


def _read(results_dir: Path, name: str):
    path = Path(results_dir) / "diagnose" / name
    if not path.is_file():
        return None
    return json.loads(path.read_text()) if name.endswith(".json") else pd.read_csv(path)


def fig_study_claims(results_dir: Path, out_dir: Path) -> List[Path]:
    """Study table at our scale: validation loss of every model on the same fixed validation sequences
    (bars: +-1 SE of the mean; labels: training iterations behind each checkpoint), and the paper's
    claims as paired differences with 2-SE intervals: an ordering is resolved only beyond 2 SE, "3 close
    to 1" holds when its interval lies inside the stated margin. SEs are over validation sequences and
    exclude training-seed variance; with the second-seed replicate (cyan rows, ", seed 2" claims) the title
    gives how far a second seed moves each repeated claim."""
    table, claims, summary = (_read(results_dir, n) for n in ("study_table.csv", "claims.csv", "summary.json"))
    if table is None or claims is None or summary is None:
        return []
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 0.42 * len(table) + 2.5),
                                 gridspec_kw={"width_ratios": [1.2, 1]})
    y = np.arange(len(table))[::-1]
    ax.barh(y, table["val_loss"], xerr=table["val_loss_se"], color=[ROLE_COLORS[r] for r in table["role"]],
            alpha=0.8)
    lo = table["val_loss"].min() - 0.05
    ax.set_xlim(lo, table["val_loss"].max() + 0.12)
    for yi, (_, r) in zip(y, table.iterrows()):
        ax.text(r["val_loss"] + r["val_loss_se"] + 0.005, yi, f"{r['val_loss']:.3f}  ({r['iterations']:,} it.)",
                va="center", fontsize=8)
    ax.set_yticks(y, table["label"], fontsize=8)
    ax.set_xlabel(f"validation loss, nats/token ({summary['sequences']} sequences)")
    ax.set_title("every model on the same validation sequences")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.8) for c in ROLE_COLORS.values()]
    ax.legend(handles, list(ROLE_COLORS), fontsize=8, loc="lower right")
    cy = np.arange(len(claims))[::-1]
    k = summary["resolve_se"]
    for yi, (_, c) in zip(cy, claims.iterrows()):
        color = VERDICT_COLORS[c["verdict"]]
        bx.errorbar(c["difference"], yi, xerr=k * c["se"], fmt="o", color=color, capsize=4)
        if c["kind"] == "equivalence":
            bx.fill_betweenx([yi - 0.3, yi + 0.3], -c["margin"], c["margin"], color="#2ca02c", alpha=0.12)
        bx.annotate(f"{c['verdict']}\n{c['difference']:+.4f} +- {c['se']:.4f}", (c["difference"], yi),
                    textcoords="offset points", xytext=(0, 9), ha="center", fontsize=8, color=color)
    bx.axvline(0, color="k", lw=0.8)
    bx.set_yticks(cy, [f"{c['claim']}\n({c['first']} - {c['second']})" for _, c in claims.iterrows()], fontsize=8)
    bx.set_ylim(-0.7, len(claims) - 0.2)
    bx.set_xlabel("paired loss difference, nats/token (bar: 2 SE)")
    bx.set_title(f"paper claims: resolved beyond {k:g} SE; shaded: +-{summary['equivalence_margin']:g} margin",
                 fontsize=10)
    shift = summary.get("seed_shift") or {}
    seeds = ("second seed moves " + ", ".join(f"'{n}' by {v:+.3f}" for n, v in shift.items()) if shift
             else "training-seed variance not included")
    fig.suptitle(f"Study table at this profile's scale. SE over {summary['sequences']} validation sequences; {seeds}"
                 + ("" if summary["target_se_met"] else f"\nworst SE {summary['worst_claim_se']:.4f} above the "
                                                        f"{summary['target_se']} target"), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_dir, "study_claims")


def fig_signal_health(results_dir: Path, out_dir: Path) -> List[Path]:
    """Signal health of every hardware model (mean over layers and heads, on fixed validation sequences):
    the fraction of scaled q~, k~, v~ clipped at the DAC range ends, of in-window HardSigmoid pulses at 0
    and at saturation, and of sub-tile readouts that the ADC rounds to 0 or clips at +-1; right: the
    attention share (loss with every attention output zeroed, or replaced by its mean, minus the loss),
    with a cross where it does not exceed the row's loss-difference resolution. "3 at iteration 0" is
    the calibrated, untrained model; "3'" trained without calibration."""
    table = _read(results_dir, "study_table.csv")
    if table is None:
        return []
    plt = _plt()
    hw = table.dropna(subset=["q_clipped"]) if "q_clipped" in table else table.iloc[:0]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 0.45 * len(table) + 3), gridspec_kw={"width_ratios": [1.4, 1]})
    if len(hw):
        width = 0.8 / len(hw)
        x = np.arange(len(HEALTH_COLUMNS))
        colors = plt.cm.tab20(np.linspace(0, 1, max(len(hw), 2)))
        for i, (_, r) in enumerate(hw.iterrows()):
            ax.bar(x + i * width - 0.4 + width / 2, [r[c] for c, _ in HEALTH_COLUMNS], width, color=colors[i],
                   label=r["label"])
        ax.set_xticks(x, [label for _, label in HEALTH_COLUMNS], rotation=20, ha="right")
        ax.set_ylabel("fraction")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.set_title("analog signal health (mean over layers and heads)")
    y = np.arange(len(table))[::-1]
    bx.barh(y + 0.2, table["share_zero"], 0.4, xerr=table["share_zero_se"], color="#1f77b4", label="zero ablation")
    bx.barh(y - 0.2, table["share_mean"], 0.4, xerr=table["share_mean_se"], color="#aec7e8", label="mean ablation")
    flagged = table["share_below_resolution"].astype(bool)
    bx.plot(table.loc[flagged, "resolution"], y[flagged.values], "rx", ms=10, label="below resolution")
    bx.set_yticks(y, table["label"], fontsize=8)
    bx.set_xlabel("attention share, nats/token")
    bx.legend(fontsize=8, loc="lower right")
    bx.set_title("what rides on attention")
    fig.tight_layout()
    return save_figure(fig, out_dir, "signal_health")


def fig_nonlinearity(results_dir: Path, out_dir: Path) -> List[Path]:
    """Nonlinearity study (paper Fig. 4 style), one panel per cell model: validation loss of the linear
    hardware model (3), mapped onto the nonlinear cell without adaptation (4), adapted by equation 9 (5)
    and, for the profile's own cell, adapted early and fine-tuned (6); dashed: the softmax baselines.
    Right: the share of the mapping's loss increase that adaptation recovers, per cell (bars: paired
    SE of the recovered loss, relative)."""
    cells, table = _read(results_dir, "cells.csv"), _read(results_dir, "study_table.csv")
    if cells is None or table is None:
        return []
    plt = _plt()
    fig, axes = plt.subplots(1, len(cells) + 1, figsize=(4.2 * (len(cells) + 1), 4.2))
    se = dict(zip(table["run"], table["val_loss_se"]))
    loss = dict(zip(table["run"], table["val_loss"]))
    for ax, (_, c) in zip(axes, cells.iterrows()):
        finetuned = c["finetuned_run"] if isinstance(c["finetuned_run"], str) and c["finetuned_run"] else None
        names = ["linear_hw", c["mapped_run"], c["adapted_run"]] + ([finetuned] if finetuned else [])
        labels = ["3 linear", "4 mapped", "5 adapted"] + (["6 fine-tuned"] if finetuned else [])
        ax.bar(labels, [loss[n] for n in names], yerr=[se[n] for n in names], width=0.7,
               color=["#1f77b4", "#ff7f0e", "#d62728", "#2ca02c"][:len(names)])
        for ref, style in (("softmax", "--"), ("softmax_long", ":")):
            ax.axhline(loss[ref], color="k", ls=style, lw=1, label=f"{ref} {loss[ref]:.3f}")
        values = [loss[n] for n in names] + [loss["softmax"]]
        ax.set_ylim(min(values) - 0.05, max(values) + 0.05)
        ax.set_title(f"cell '{c['cell']}'", fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_ylabel("validation loss, nats/token")
        ax.legend(fontsize=7)
    ax = axes[-1]
    frac = cells["recovered_fraction"].to_numpy()
    err = np.abs(cells["recovered_se"].to_numpy() / cells["degradation"].to_numpy())
    ax.bar(cells["cell"], frac, yerr=err, color="#d62728")
    for i, (_, c) in enumerate(cells.iterrows()):  # two lines, inside the axes: neighbours do not overlap
        ax.text(i, max(frac[i], 0) + 0.03, f"{c['recovered']:+.3f}\nof {c['degradation']:+.3f}", ha="center",
                va="bottom", fontsize=7)
    ax.set_ylim(min(0.0, float(np.nanmin(frac))) - 0.05, 1.25)
    ax.tick_params(axis="x", labelsize=8, rotation=20)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_ylabel("recovered / (mapped - linear)")
    ax.set_title("how much adaptation recovers", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_dir, "nonlinearity")
