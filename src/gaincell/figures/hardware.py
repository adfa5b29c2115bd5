"""Hardware figures (paper Figs. 2c, 3, 5 style), read from ``results/<profile>/hardware/``.

Inputs: ``estimates.json`` and ``sweep_*.csv`` (stage ``hardware_estimates``), ``gpu_baseline.json``
(stage ``gpu_baseline``). Never imports models; only the cost model's constant labels.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from gaincell.figures._common import read_csv, read_json
from gaincell.figures._common import save_figure as _save

ENERGY_PARTS = ["qk_arrays_charge_to_pulse", "av_arrays_readout", "dac_write", "digital_routing"]
ENERGY_LABELS = {"qk_arrays_charge_to_pulse": r"$\phi(QK^T)$ arrays + charge-to-pulse",
                 "av_arrays_readout": r"$\phi(S)V$ arrays + read-out",
                 "dac_write": "DACs + cell writes", "digital_routing": "digital blocks + routing"}
AREA_LABELS = {"cell_arrays": "gain-cell arrays (K, V)", "charge_to_pulse": "charge-to-pulse circuits",
               "pulse_counters": "pulse counters", "dacs": "write DACs", "adders": "digital adders",
               "pulse_generators": "pulse generators", "floorplan_overhead": "routing / floorplan"}
PART_COLORS = {"qk_arrays_charge_to_pulse": "#4C72B0", "av_arrays_readout": "#55A868", "dac_write": "#C44E52",
               "digital_routing": "#8172B2"}
AREA_COLORS = ["#4C72B0", "#55A868", "#DD8452", "#C44E52", "#8172B2", "#937860", "#BBBBBB"]
SET_LABELS = {"paper": "paper parameters\n(restated: an input,\nnot a reproduction)",
              "simulated": "our SPICE (simulated)"}
# How each energy component's provenance is drawn (cost model: energy_components_nj).
PROVENANCE_HATCH = {"measured here": "", "from the paper": "///", "assumption": "..."}


def _hardware_dir(results_dir: Path) -> Path:
    return Path(results_dir) / "hardware"


def _eng(value: float, unit: str) -> str:
    """1.2e-6 s -> '1.2 us'; engineering prefixes for a compact label."""
    if value is None or not math.isfinite(value) or value == 0:
        return f"0 {unit}"
    prefixes = [(1e-15, "f"), (1e-12, "p"), (1e-9, "n"), (1e-6, "u"), (1e-3, "m"), (1.0, "")]
    scale, prefix = prefixes[0]
    for s, p in prefixes:
        if abs(value) >= s:
            scale, prefix = s, p
    v = value / scale
    return f"{v:.3g} {prefix}{unit}"


def _ratio(x: float) -> str:
    return f"{x:,.0f}x" if x >= 10 else f"{x:.2g}x"


# --------------------------------------------------------------------------------------------------
def fig_hardware_breakdown(results_dir: Path, out_dir: Path) -> List[Path]:
    """Energy, area and timing of one analog attention head at the design point (paper Figs. 2c, 3, 5).

    (a) Energy per head per token by part, for the authors' published figures, our cost model with
    the paper's parameters (which restate the paper's per-category energies: its 6.15 nJ is an input
    there, not a reproduction), and with our SPICE per-operation energies when the device stage ran;
    each bar segment is solid when our SPICE measured it, hatched when it is taken from the paper,
    dotted when it is a stated assumption.
    (b) Area of one head by block (cell area from the chosen technology; periphery areas are stated
    assumptions). (c) The timing chain of one token: discharge, write in parallel with the query
    pulses, phi(S) pulses, V read-out, adders (one clock per sub-tile).
    """
    est = read_json(_hardware_dir(results_dir) / "estimates.json")
    sets = est["sets"]
    design = est["design_point"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 6.2), gridspec_kw={"width_ratios": [1.25, 1.0, 1.15]})

    # (a) energy
    ax = axes[0]
    published = {part: [{"nj": v, "provenance": "from the paper"}]
                 for part, v in est["published"]["energy_breakdown_nj"].items()}
    rows = [("published (paper)", published)]
    rows += [(SET_LABELS.get(n, n), d.get("energy_components_nj")
              or {part: [{"nj": v, "provenance": "?"}] for part, v in d["estimate"]["energy_breakdown_nj"].items()})
             for n, d in sets.items()]
    y = np.arange(len(rows))[::-1]
    for yi, (label, parts) in zip(y, rows):
        left = 0.0
        for part in ENERGY_PARTS:
            total = sum(c["nj"] for c in parts.get(part, []))
            for k, comp in enumerate(parts.get(part, [])):
                ax.barh(yi, comp["nj"], left=left, color=PART_COLORS[part], edgecolor="white",
                        hatch=PROVENANCE_HATCH.get(comp["provenance"], "xx"),
                        label=ENERGY_LABELS[part] if yi == y[0] and k == 0 else None)
                left += comp["nj"]
            if total > 0.45:
                ax.text(left - total / 2, yi, f"{total:.2f}", ha="center", va="center", color="white", fontsize=8,
                        fontweight="bold")
        ax.text(left * 1.01, yi, f"{left:.2f} nJ", va="center", fontsize=9, fontweight="bold")
    ax.set_yticks(y, [r[0] for r in rows])
    ax.set_xlabel("energy per head per token (nJ)")
    ax.set_xlim(0, max(sum(c["nj"] for cs in r[1].values() for c in cs) for r in rows) * 1.25)
    ax.set_title(f"(a) energy, window {design['window']}, D = {design['head_dim']}\n"
                 f"({design['heads']} heads: {12 * est['published']['energy_per_head_per_token_nj']:.1f} nJ published)"
                 if design["heads"] == 12 else f"(a) energy, window {design['window']}, D = {design['head_dim']}")
    pub = est["published"]["energy_breakdown_nj"]
    handles = [Patch(facecolor=PART_COLORS[p], edgecolor="white") for p in ENERGY_PARTS]
    labels = [ENERGY_LABELS[p] for p in ENERGY_PARTS]
    labels = [f"{lab} (paper {pub[p]:.2f} nJ)" for lab, p in zip(labels, ENERGY_PARTS)]
    for prov, hatch in PROVENANCE_HATCH.items():
        handles.append(Patch(facecolor="0.75", edgecolor="white", hatch=hatch))
        labels.append(f"hatch: {prov}" if hatch else "solid: measured here (our SPICE)")
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, fontsize=8, frameon=False)

    # (b) area of one head (first set: geometry and cell are the same in every set)
    ax = axes[1]
    first = next(iter(sets.values()))["estimate"]
    area = first["area_breakdown_um2"]
    total = first["area_per_head_um2"]
    names = list(area)
    left = 0.0
    for i, k in enumerate(names):
        v = area[k] / 1e6
        ax.barh(0, v, left=left, color=AREA_COLORS[i % len(AREA_COLORS)], edgecolor="white",
                label=f"{AREA_LABELS.get(k, k)}: {area[k] / total:.0%}")
        left += v
    ax.set_yticks([0], [f"{first['subtiles_per_head']} sub-tiles\n{first['cell_technology']}"])
    ax.set_xlabel("area per head (mm$^2$)")
    ax.set_xlim(0, left * 1.15)
    ax.text(left * 1.01, 0, f"{total / 1e6:.3f} mm$^2$", va="center", fontsize=9, fontweight="bold")
    ax.set_title(f"(b) area per head; {design['heads']} heads x {design['layers']} layers = "
                 f"{first['area_total_mm2']:.1f} mm$^2$")
    ax.set_ylim(-0.8, 0.8)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False)

    # (c) timing chain (Gantt)
    ax = axes[2]
    lat = sets.get("paper", next(iter(sets.values())))["estimate"]
    params = {r["name"]: r["value"] for r in sets.get("paper", next(iter(sets.values())))["parameters"]}
    chain = lat["latency_breakdown_ns"]
    t = chain["discharge"]
    bars = [("discharge", 0.0, chain["discharge"], "#999999"),
            ("write K, V (DACs)", t, params["write_pulse_ns"], "#C44E52"),
            ("query pulses into K array", t, params["query_phase_ns"], "#4C72B0")]
    t += chain["write_or_query"]
    bars.append((r"$\phi(S)$ pulses into V array", t, chain["phi_pulses"], "#55A868"))
    t += chain["phi_pulses"]
    bars.append(("V read-out pulse counting", t, chain["readout_pulse"], "#DD8452"))
    t += chain["readout_pulse"]
    bars.append((f"adders ({lat['window_tiles']} inputs, 1 clock each)", t, chain["adders"], "#8172B2"))
    for i, (label, start, width, color) in enumerate(bars):
        yi = len(bars) - 1 - i
        ax.barh(yi, width, left=start, color=color)
        ax.text(start + width + 0.6, yi, f"{width:g} ns", va="center", fontsize=8)
    ax.set_yticks(range(len(bars))[::-1], [b[0] for b in bars], fontsize=8)
    ax.axvline(lat["latency_per_token_ns"], color="black", ls="--", lw=1)
    ax.axvline(est["published"]["latency_per_token_ns"], color="tab:red", ls=":", lw=1)
    ax.text(lat["latency_per_token_ns"], len(bars) - 0.35, f" model {lat['latency_per_token_ns']:.0f} ns",
            fontsize=8, ha="left")
    ax.text(est["published"]["latency_per_token_ns"], -0.75, f"published {est['published']['latency_per_token_ns']:.0f} ns ",
            fontsize=8, ha="right", color="tab:red")
    ax.set_xlabel("time within one token (ns)")
    ax.set_xlim(0, lat["latency_per_token_ns"] * 1.3)
    ax.set_ylim(-1, len(bars))
    ax.set_title("(c) timing of one token, all heads in parallel")
    fig.suptitle("Analog gain-cell attention: cost of one head at the design point", fontsize=13)
    fig.subplots_adjust(left=0.09, right=0.98, top=0.85, bottom=0.3, wspace=0.45)
    return _save(fig, out_dir, "hardware_breakdown")


def fig_hardware_scaling(results_dir: Path, out_dir: Path) -> List[Path]:
    """Scaling of the analog attention with window, tile size, and model size (paper Fig. 3 style).

    (a) Energy per head per token against the sliding window, stacked by part (paper parameters; our
    SPICE set dashed): linear in the window, since each 64-key sub-tile adds its arrays, DACs and
    digital share. (b) Latency per token (one clock per extra sub-tile) and area per head against the
    window. (c) Square tile size at the design window: energy and latency against the worst-case IR
    drop (2 Ohm per element, 10 uA per cell), which is why the tile stops at 64. (d) Energy per token
    and chip area against heads and layers (latency does not grow with heads: they run in parallel).
    """
    hdir = _hardware_dir(results_dir)
    win = read_csv(hdir / "sweep_window.csv")
    tile = read_csv(hdir / "sweep_tile.csv")
    hl = read_csv(hdir / "sweep_heads_layers.csv")
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))

    ax = axes[0, 0]
    paper = win[win["set"] == "paper"].sort_values("window")
    base = paper if len(paper) else win[win["set"] == win["set"].iloc[0]].sort_values("window")
    ax.stackplot(base["window"], *[base[f"energy_{p}_nj"] for p in ENERGY_PARTS],
                 labels=[ENERGY_LABELS[p] for p in ENERGY_PARTS], colors=[PART_COLORS[p] for p in ENERGY_PARTS],
                 alpha=0.85)
    for name, g in win.groupby("set"):
        g = g.sort_values("window")
        ax.plot(g["window"], g["energy_per_head_per_token_nj"], "k-" if name == "paper" else "k--", marker="o", ms=3,
                label=f"total, {SET_LABELS.get(name, name)}")
    ax.plot([1024], [6.15], "r*", ms=13, label="published: 6.15 nJ at 1,024", zorder=5)
    ax.set_xlim(0, base["window"].max() * 1.02)
    ax.set_ylim(0, None)
    ax.set_xlabel("sliding window M (tokens)")
    ax.set_ylabel("energy per head per token (nJ)")
    ax.set_title("(a) energy grows linearly with the window")
    ax.legend(fontsize=7.5, loc="upper left")
    ax.grid(alpha=0.3)

    ax = axes[0, 1]
    for name, g in win.groupby("set"):
        g = g.sort_values("window")
        ax.plot(g["window"], g["latency_per_token_ns"], "-" if name == "paper" else "--", marker="o", color="tab:blue",
                label=f"latency, {SET_LABELS.get(name, name)}")
    ax.plot([1024], [65], "r*", ms=13, label="published: 65 ns at 1,024")
    ax.set_xlim(0, base["window"].max() * 1.02)
    ax.set_xlabel("sliding window M (tokens)")
    ax.set_ylabel("latency per token (ns)", color="tab:blue")
    ax2 = ax.twinx()
    g = base
    ax2.plot(g["window"], g["area_per_head_um2"] / 1e6, "s-", color="tab:orange", label="area per head")
    ax2.set_ylim(0, None)
    ax2.set_ylabel("area per head (mm$^2$)", color="tab:orange")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
    ax.set_title(f"(b) latency (+1 clock per sub-tile) and area ({base['cell_technology'].iloc[0]})")
    ax.grid(alpha=0.3)

    ax = axes[1, 0]
    t = tile[tile["set"] == base["set"].iloc[0]].sort_values("knob_value")
    ax.plot(t["knob_value"], t["energy_per_head_per_token_nj"], "o-", color="tab:purple", label="energy per head per token")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sub-tile size (rows = columns)")
    ax.set_ylabel("energy per head per token (nJ)", color="tab:purple")
    ax2 = ax.twinx()
    ax2.plot(t["knob_value"], 100 * t["ir_drop_fraction"], "^-", color="tab:red", label="worst-case IR drop")
    ax2.axhline(5, color="tab:red", ls=":", lw=1)
    ax2.text(t["knob_value"].min(), 5.5, "5 % of V_read", color="tab:red", fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("worst-case IR drop (% of V_read)", color="tab:red")
    for _, r in t.iterrows():
        ax.annotate(f"{r['latency_per_token_ns']:.0f} ns", (r["knob_value"], r["energy_per_head_per_token_nj"]),
                    textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ax.margins(y=0.12)
    window = int(t["window"].iloc[0]) if len(t) else 0
    ax.set_title(f"(c) tile size at window {window} (labels: latency per token)")
    ax.grid(alpha=0.3)

    ax = axes[1, 1]
    g = hl[(hl["set"] == base["set"].iloc[0]) & (hl["knob"] == "heads")].sort_values("knob_value")
    ax.plot(g["knob_value"], g["energy_per_token_nj"], "o-", label="energy per token, one layer (nJ)")
    ax.plot(g["knob_value"], g["latency_per_token_ns"], "s--", label="latency per token, one layer (ns)")
    ax.plot(g["knob_value"], g["area_total_mm2"] / g["layers"], "^-", label="area, one layer (mm$^2$)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("attention heads per layer")
    gl = hl[(hl["set"] == base["set"].iloc[0]) & (hl["knob"] == "layers")].sort_values("knob_value")
    if len(gl):
        r = gl[gl["layers"] == 12]
        if len(r):
            r = r.iloc[0]
            ax.text(0.02, 0.97, f"{int(r['heads'])} heads x 12 layers: {r['energy_all_layers_nj']:.0f} nJ and "
                    f"{r['latency_all_layers_ns']:.0f} ns per token,\n{r['area_total_mm2']:.1f} mm$^2$ of attention "
                    f"hardware", transform=ax.transAxes, va="top", fontsize=8,
                    bbox=dict(boxstyle="round", fc="white", ec="0.7"))
    ax.set_title("(d) heads run in parallel: energy and area grow, latency does not")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    fig.suptitle("Analog attention cost against window, tile size and model size", fontsize=13)
    fig.tight_layout()
    return _save(fig, out_dir, "hardware_scaling")


def fig_hardware_technology(results_dir: Path, out_dir: Path) -> List[Path]:
    """Cell technology and retention: area per head and refresh cost (paper area estimation, Fig. 1h).

    (a) Area of one head (window 1,024, D = 64) for a CMOS-write gain cell (19 um^2 per signed weight),
    the worst-case 6T ITO cell (1 um^2), the 2T ITO cell (0.28 um^2) and 3D stacks of N oxide layers
    (0.28 / N um^2): the periphery soon dominates. (b) Retention: value left in the oldest key of the
    window (storage time = window x layers x latency) and the energy a refresh would add per head and
    token if the decay were not absorbed by training, against the capacitor time constant tau.
    """
    hdir = _hardware_dir(results_dir)
    tech = read_csv(hdir / "sweep_technology.csv")
    ret = read_csv(hdir / "sweep_retention.csv")
    set_name = "paper" if "paper" in set(tech["set"]) else tech["set"].iloc[0]
    tech = tech[tech["set"] == set_name].reset_index(drop=True)
    ret = ret[ret["set"] == set_name].sort_values("knob_value")
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2))

    ax = axes[0]
    x = np.arange(len(tech))
    cells = tech["area_cell_arrays_um2"] / 1e6
    periphery = (tech["area_per_head_um2"] - tech["area_cell_arrays_um2"]) / 1e6
    ax.bar(x, cells, color="#4C72B0", label="gain-cell arrays")
    ax.bar(x, periphery, bottom=cells, color="#BBBBBB", label="periphery + routing (assumed areas)")
    for i, r in tech.iterrows():
        ax.text(i, (cells[i] + periphery[i]) * 1.08, f"{r['area_per_head_um2'] / 1e6:.3g} mm$^2$\n"
                f"({r['signed_cell_area_um2']:.3g} um$^2$/w)", ha="center", fontsize=7.5)
    ax.set_xticks(x, tech["knob_value"], rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(cells.min() / 3, (cells + periphery).max() * 4)
    ax.set_ylabel("area per head (mm$^2$)")
    ax.set_title(f"(a) area per head, window {int(tech['window'].iloc[0])}, D = {int(tech['head_dim'].iloc[0])}")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3, axis="y")

    ax = axes[1]
    ax.plot(ret["knob_value"], ret["oldest_value_retention"], "o-", color="tab:blue", label="value left in the oldest key")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(r"retention time constant $\tau$ (s)")
    ax.set_ylabel("fraction of the stored value left", color="tab:blue")
    ax2 = ax.twinx()
    refresh = ret["refresh_energy_per_head_per_token_nj"].where(ret["refresh_energy_per_head_per_token_nj"] > 0)
    ax2.plot(ret["knob_value"], refresh, "s--", color="tab:red", label="refresh energy (if refreshed)")
    ax2.set_yscale("log")
    ax2.set_ylabel("refresh energy per head per token (nJ)", color="tab:red")
    for tau, label in ((5e-3, "CMOS gain cell\n5 ms (Fig. 1h)"), (5.0, "OSFET ~1,000x")):
        ax.axvline(tau, color="0.5", ls=":", lw=1)
        ax.text(tau, 0.55, label, fontsize=8, ha="center", bbox=dict(fc="white", ec="none", alpha=0.8))
    r = ret.iloc[0]
    ax.set_title(f"(b) retention over a {int(r['window'])}-token window, {int(r['layers'])} layers "
                 f"({r['storage_time_s'] * 1e3:.2f} ms storage)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.suptitle("Cell technology: area and retention", fontsize=13)
    fig.tight_layout()
    return _save(fig, out_dir, "hardware_technology")


def _measured_label(m: Dict[str, Any], device: str) -> str:
    return f"{device}: {m['backend']}, {m['mode'].replace('_', ' ')}, batch {m['batch']}"


def fig_hardware_gpu_comparison(results_dir: Path, out_dir: Path) -> List[Path]:
    """Latency and energy per token: analog attention against GPUs/CPU measured here and published (Fig. 5).

    Attention only, 12 heads, D = 64 (one layer). Latency is per decoding step (what one sequence waits
    per token); energy is per generated token (a step's energy divided by the batch), idle energy
    subtracted. Published GPU figures (the authors' files, batch 64) are shown per generated token;
    the hollow diamond is their per-step value, which the paper compares with. Ratios are against the
    analog estimate with the paper's parameters. Without a GPU, the measured rows are the CPU fallback.
    """
    hdir = _hardware_dir(results_dir)
    est = read_json(hdir / "estimates.json")
    base = read_json(hdir / "gpu_baseline.json")
    rows: List[Dict[str, Any]] = []
    heads = int(base.get("settings", {}).get("heads", 12))  # the analog side with as many heads as measured
    for name, d in est["sets"].items():
        e = d["estimate"]
        rows.append({"label": f"analog, {SET_LABELS.get(name, name)}", "group": "analog",
                     "latency_s": e["latency_per_token_ns"] * 1e-9,
                     "energy_j": e["energy_per_head_per_token_nj"] * 1e-9 * heads, "energy_step_j": None})
    system = base.get("system", {})
    device = system.get("gpu_name") if base.get("device_kind") == "cuda" else f"CPU {system.get('cpu_model', '')}".strip()
    for m in base.get("measurements", []):
        rows.append({"label": _measured_label(m, device or "measured"), "group": "measured",
                     "latency_s": m["latency_per_step_s"], "energy_j": m.get("energy_per_generated_token_j"),
                     "energy_step_j": None})
    for p in base.get("published", []):
        rows.append({"label": f"{p['name']}, batch {p['batch']}", "group": "published",
                     "latency_s": p["latency_per_step_s"], "energy_j": p["energy_per_generated_token_j"],
                     "energy_step_j": p["energy_per_step_j"]})
    if not rows:
        raise ValueError("nothing to compare: no analog estimate and no measurement")
    analog = next((r for r in rows if r["label"].startswith("analog, paper")), rows[0])
    colors = {"analog": "#55A868", "measured": "#4C72B0", "published": "#DD8452"}
    n = len(rows)
    fig, axes = plt.subplots(1, 2, figsize=(15, 1.2 + 0.48 * n), sharey=True)
    y = np.arange(n)[::-1]
    for ax, key, unit, title in ((axes[0], "latency_s", "s", "latency per token (decoding step)"),
                                 (axes[1], "energy_j", "J", "energy per generated token (idle subtracted)")):
        values = [r[key] for r in rows]
        finite = [v for v in values if v]
        finite += [r["energy_step_j"] for r in rows if key == "energy_j" and r["energy_step_j"]]
        lo, hi = min(finite), max(finite)
        ax.set_xscale("log")
        ax.set_xlim(lo / 5, hi * 400)
        for yi, r in zip(y, rows):
            v = r[key]
            if not v:
                ax.text(lo / 4, yi, "unavailable: " + (base.get("energy_unavailable_reason") or "no counter"),
                        va="center", fontsize=7.5, color="0.4")
                continue
            ax.barh(yi, v, color=colors[r["group"]], height=0.7)
            text = _eng(v, unit)
            if r is not analog and analog[key]:
                text += f"  ({_ratio(v / analog[key])} analog)"
            if key == "energy_j" and r["energy_step_j"]:
                ax.plot(r["energy_step_j"], yi, "D", mfc="none", mec="black", ms=7)
                text += f"\nper 64-seq. step: {_eng(r['energy_step_j'], 'J')} ({_ratio(r['energy_step_j'] / analog[key])})"
                ax.text(r["energy_step_j"] * 1.4, yi, text, va="center", fontsize=7.5)
                continue
            ax.text(v * 1.15, yi, text, va="center", fontsize=7.5)
        ax.set_xlabel(f"{title} ({unit}, log scale)")
        ax.grid(alpha=0.3, axis="x", which="both")
    axes[0].set_yticks(y, [r["label"] for r in rows], fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    labels = ["analog estimate (this work)", "measured here", "published (authors' files)"]
    handles.append(plt.Line2D([], [], marker="D", mfc="none", mec="black", ls="none"))
    labels.append("published, per 64-sequence step")
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
    note = textwrap.fill(base.get("note", ""), 170)
    fig.suptitle("Attention only, 12 heads, D = 64: analog gain-cell hardware against GPUs/CPU\n" + note, fontsize=9.5)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, out_dir, "hardware_gpu_comparison")
