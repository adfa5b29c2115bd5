"""Figures of the fully analog transformer (projections on analog weight tiles + gain-cell attention).

``fig_analog_noise``: validation loss of the fully analog variants at every inference-noise seed, without
noise, and beside the digital-projection variant they start from (``adapt/study/*.json``).
``fig_analog_energy``: a token's energy and latency with the projections on analog tiles as well, and the
attention's share of the energy over the window (``hardware/estimates.json``, section ``projections``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from gaincell import study
from gaincell.figures._common import read_json_if_present, save_figure

log = logging.getLogger(__name__)

PART_COLORS = {"attention": "#2ca02c", "qkv": "#1f77b4", "attention_out": "#aec7e8", "mlp_fc": "#9467bd",
               "mlp_proj": "#c5b0d5"}
PART_LABELS = {"attention": "gain-cell attention (paper parameters)", "qkv": "QKV projection",
               "attention_out": "attention output projection", "mlp_fc": "MLP up-projection",
               "mlp_proj": "MLP down-projection"}


def _plt():
    matplotlib.use("Agg")

    return plt


def fig_analog_noise(results_dir: Path, out_dir: Path) -> List[Path]:
    """Fully analog transformer: validation loss (nats/token, the study's fixed batches) of the variants
    with analog projections at each inference-noise seed (dots; programming noise on the weights and
    read-out noise, drawn per seed), their mean and standard deviation over seeds (bar), the same tiles
    without inference noise (diamond: the 8-bit converters only), and the variant with digital
    projections they start from (dashed line)."""
    results_dir = Path(results_dir)
    analog = [v for v in study.VARIANTS if v.noise_seeds]
    runs = {v.run: read_json_if_present(results_dir / "adapt" / "study" / f"{v.run}.json") for v in analog}
    runs = {k: s for k, s in runs.items() if s and s.get("mode") == "analog_eval"}
    if not runs:
        log.info("fig_analog_noise: no analog_eval results under %s", results_dir)
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    labels = []
    for i, v in enumerate(v for v in analog if v.run in runs):
        s = runs[v.run]
        seeds = np.array(list(s["val_loss_seeds"].values()), dtype=float)
        ax.errorbar([i], [s["val_loss"]], yerr=[s["val_loss_spread"] or 0.0], fmt="s", color="#9467bd", ms=9,
                    capsize=6, label="mean +- sd over noise seeds" if i == 0 else None, zorder=3)
        jitter = np.linspace(-0.12, 0.12, len(seeds)) if len(seeds) > 1 else np.zeros(1)
        ax.plot(i + 0.25 + jitter, seeds, "o", color="#c5b0d5", mec="#6a3d9a", ms=6,
                label="one noise seed (one programmed chip)" if i == 0 else None)
        ax.plot([i - 0.25], [s["val_loss_noise_free"]], "D", color="0.35", ms=7,
                label="no inference noise (8-bit converters only)" if i == 0 else None)
        labels.append(f"{v.number}. {v.label}")
    base = next((v for v in study.VARIANTS if v.number == 6), None)
    ref = read_json_if_present(results_dir / "adapt" / "study" / f"{base.run}.json") if base else None
    if ref and ref.get("val_loss") is not None:
        ax.axhline(ref["val_loss"], color="#2ca02c", ls="--", lw=1.2,
                   label=f"{base.number}. {base.label} (digital projections)")
    first = next(iter(runs.values()))
    noise = first.get("noise", {}).get("inference_noise", {})
    ax.set_xticks(range(len(labels)), labels, fontsize=9)
    ax.set_xlim(-0.7, len(labels) - 0.3)
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title(f"Fully analog transformer: inference noise (programming {noise.get('programming_noise')} x "
                 f"max|W| per column, read-out {noise.get('output_noise')})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, out_dir, "analog_noise")


def fig_analog_energy(results_dir: Path, out_dir: Path) -> List[Path]:
    """Fully analog transformer, GPT-2 124M design point: a token's energy and latency (all 12 layers)
    with the projections on analog weight tiles (literature figures of IBM's HERMES PCM chip, two read
    modes) beside the gain-cell attention (paper parameters), and the attention's share of the token's
    energy against the sliding window (the attention grows with the window, the projections do not).
    Not simulated here: the tile figures are published chip-level numbers; LayerNorm, GELU, residual
    adds and the embedding / LM head are not counted."""
    summary = read_json_if_present(Path(results_dir) / "hardware" / "estimates.json")
    proj = (summary or {}).get("projections")
    if not proj:
        log.info("fig_analog_energy: no projections section in hardware/estimates.json under %s", results_dir)
        return []
    plt = _plt()
    fig, (ax_e, ax_t, ax_s) = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1, 0.8, 1.2]})
    names = list(proj["sets"])
    for x, name in enumerate(names):
        d = proj["sets"][name]
        est, share = d["estimate"], d["design_point"]
        parts = {"attention": share["attention_energy_nj"]}
        parts.update({k: v * est["layers"] for k, v in est["energy_breakdown_nj"].items()})
        bottom = 0.0
        for part, value in parts.items():
            ax_e.bar(x, value / 1e3, bottom=bottom / 1e3, color=PART_COLORS[part],
                     label=PART_LABELS[part] if x == 0 else None)
            bottom += value
        ax_e.text(x, bottom / 1e3, f"{bottom / 1e3:.1f} uJ\nattention {share['attention_energy_share']:.1%}",
                  ha="center", va="bottom", fontsize=8)
        ax_t.bar(x, share["attention_latency_ns"] / 1e3, color=PART_COLORS["attention"],
                 label="attention" if x == 0 else None)
        ax_t.bar(x, share["projection_latency_ns"] / 1e3, bottom=share["attention_latency_ns"] / 1e3,
                 color=PART_COLORS["qkv"], label="projections (4 MVMs per layer)" if x == 0 else None)
        ax_t.text(x, share["token_latency_ns"] / 1e3, f"{share['token_latency_ns'] / 1e3:.1f} us\n"
                  f"attention {share['attention_latency_share']:.1%}", ha="center", va="bottom", fontsize=8)
        sweep = d["window_sweep"]
        mac_pj = next(p["value"] for p in d["parameters"] if p["name"] == "energy_per_mac_j") * 1e12
        ax_s.plot([r["window"] for r in sweep], [100 * r["attention_energy_share"] for r in sweep], "o-",
                  label=f"{name.replace('_', ' ')} tiles: {mac_pj:.2f} pJ/MAC")
    labels = [n.replace("hermes_", "HERMES tiles,\n").replace("_", "-") + " read" for n in names]
    for ax in (ax_e, ax_t):
        ax.set_xticks(range(len(names)), labels, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.18)
    ax_e.set_ylabel("energy per token, all layers (uJ)")
    ax_e.set_title(f"Energy per token (d_model {proj['d_model']}, window "
                   f"{summary['design_point']['window']})", fontsize=10)
    ax_e.legend(fontsize=7, loc="upper left")
    ax_t.set_ylabel("latency per token, all layers (us)")
    ax_t.set_title("Latency per token (layers in sequence)", fontsize=10)
    ax_t.legend(fontsize=7, loc="upper left")
    ax_s.set_xscale("log", base=2)
    ax_s.set_xlabel("sliding window M (tokens)")
    ax_s.set_ylabel("attention's share of a token's energy (%)")
    ax_s.set_title("Attention share when the projections are analog too", fontsize=10)
    ax_s.grid(alpha=0.3)
    ax_s.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_dir, "analog_energy")
