"""How precise must the cell be? (issue 16 §3), read from ``results/<profile>/adapt/variation/*.json``
(stage ``variation_eval``) and the Monte-Carlo mismatch of ``fit/coefficients.json`` (stage ``fit``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from gaincell.figures._common import save_figure

KNOB_LABELS = {"cell_variation": "cell-to-cell gain variation (relative std, fixed per chip)",
               "readout_noise": "readout noise (std on each sub-tile readout, ADC range [-1, 1])"}
MODEL_STYLE = {"nonlinear_adapted": ("adapted (variant 5)", "tab:orange"),
               "nonlinear_finetuned": ("adapted + fine-tuned (variant 6)", "tab:green")}


def variation_table(results_dir: Path) -> pd.DataFrame:
    """One row per (knob, value, model) of the sweep; the shared zero point appears under both knobs."""
    rows = []
    for path in sorted((Path(results_dir) / "adapt" / "variation").glob("*.json")):
        point = json.loads(path.read_text())
        for name, m in point["models"].items():
            rows.append({"knob": point["knob"], "value": point["value"], "model": name, "chips": point["chips"],
                         "val_loss": m["val_loss"], "sem": m.get("val_loss_chip_sem"),
                         "output_levels": m.get("output_levels")})
    if not rows:
        raise FileNotFoundError(f"no sweep points under {Path(results_dir) / 'adapt' / 'variation'}: run the "
                                f"variation_sweep rule first")
    table = pd.DataFrame(rows)
    # value 0 of either knob is the same model (no variation, no noise): every knob's curve starts there
    zero = table[table["value"] == 0].drop_duplicates("model")
    for knob in KNOB_LABELS:
        if not ((table["knob"] == knob) & (table["value"] == 0)).any():
            table = pd.concat([table, zero.assign(knob=knob)], ignore_index=True)
    return table.sort_values(["knob", "model", "value"])


def _measured_gain_spread(results_dir: Path) -> Optional[Dict[str, Any]]:
    path = Path(results_dir) / "fit" / "coefficients.json"
    if not path.is_file():
        return None
    mm = json.loads(path.read_text()).get("mismatch") or {}
    return mm if mm.get("available") else None


def fig_variation(results_dir: Path, out_dir: Path) -> List[Path]:
    """How precise must the cell be? Validation loss of the adapted and the fine-tuned nonlinear models versus cell-to-cell gain variation and versus readout noise, with the variation our Monte-Carlo SPICE measures marked.

    Each point is the mean loss over the study's fixed validation batches on one or more simulated chips
    (error bars: standard error over chips when there are several). Left, dashed: the gain spread
    sigma(c1)/c1 of our sky130 cell from Monte-Carlo mismatch SPICE (the band is its standard error); its
    offset spread sigma(c0) is not part of this model and is given in the caption box. Right, dotted: the
    output ADC's own quantization noise (one level / sqrt(12)), below which readout noise is hidden by it.
    """
    results_dir = Path(results_dir)
    table = variation_table(results_dir)
    mm = _measured_gain_spread(results_dir)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), sharey=True)
    for ax, knob in zip(axes, ("cell_variation", "readout_noise")):
        sub = table[table["knob"] == knob]
        positive = sub["value"][sub["value"] > 0]
        linthresh = float(positive.min()) if len(positive) else 1e-2
        for model, grp in sub.groupby("model", sort=False):
            label, colour = MODEL_STYLE.get(model, (model, None))
            err = grp["sem"].astype(float).to_numpy() if grp["sem"].notna().any() else None
            ax.errorbar(grp["value"], grp["val_loss"], yerr=err, fmt="o-", color=colour, label=label, ms=4, capsize=3)
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_xlim(left=0)
        ax.set_xlabel(KNOB_LABELS[knob])
        ax.grid(alpha=0.3)
        if knob == "cell_variation" and mm is not None:
            g, e = mm["gain_spread_relative"], mm["gain_spread_relative_standard_error"]
            ax.axvspan(g - e, g + e, color="crimson", alpha=0.15)
            ax.axvline(g, color="crimson", ls="--", lw=1.2,
                       label=f"our cell, Monte-Carlo SPICE: {g:.3f} +- {e:.3f}")
            ax.text(0.02, 0.78, f"measured offset spread sigma(c0) = {mm['offset_spread']:.3g} "
                    f"({100 * mm['offset_spread_over_c1']:.2g} % of c1), not modelled here",
                    transform=ax.transAxes, fontsize=7, color="crimson")
        levels = sub["output_levels"].dropna()
        if knob == "readout_noise" and len(levels):
            lsb = 2.0 / (float(levels.iloc[0]) - 1)
            ax.axvline(lsb / np.sqrt(12), color="0.3", ls=":", lw=1.2,
                       label=f"ADC quantization noise ({int(levels.iloc[0])} levels): {lsb / np.sqrt(12):.3f}")
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("validation loss (nats / token)")
    chips = int(table["chips"].max())
    fig.suptitle(f"How precise must the cell be? (validation loss, {chips} simulated chip(s) per point)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, out_dir, "variation")
