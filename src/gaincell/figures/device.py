"""Device figures (paper Figs. 1e, 1h, 2 style), read from ``results/<profile>/device/`` and ``fit/``.

Inputs: ``cell_sweep.csv``, ``retention.csv``, ``array.csv``, ``summary.json`` (stage ``characterize``)
and ``coefficients.json``, ``fit_points.csv`` (stage ``fit``). The paper's characteristic is drawn
from ``gaincell.attention.config.PAPER_COEFFICIENTS`` (docs/attention.md#cell-coefficients), never from the authors' files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import matplotlib

from gaincell.fit import monomials

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gaincell.attention.config import PAPER_COEFFICIENTS, fold_coefficients  # noqa: E402
from gaincell.figures._common import read_csv, read_json
from gaincell.figures._common import save_figure as _save

PAPER_SOURCE = "Leroux et al. 2025, TSMC 28 nm cell (docs/attention.md#cell-coefficients coefficients)"


def _tech_label(summary: Dict[str, Any]) -> str:
    cell = summary.get("cell_kind", "")
    ref = f" (reference {summary['reference_v']:g} V)" if summary.get("reference_v") is not None else ""
    return (f"{summary.get('technology')} {summary.get('corner')}, {cell}{ref}, "
            f"stored {summary['stored_window_v'][0]:g}-{summary['stored_window_v'][1]:g} V")


def _num(value: float, full_scale: float) -> str:
    """A coefficient for a label; rounding noise (below 1e-9 of the largest) prints as 0."""
    return "0" if abs(value) < 1e-9 * max(abs(full_scale), 1e-300) else f"{value:.4g}"


def _poly(coeffs, y, x):
    return sum(c * y ** i * x ** j for c, (i, j) in zip(coeffs, monomials(3)))


def fig_device_characteristic(results_dir: Path, out_dir: Path) -> List[Path]:
    """Gain-cell characteristic (paper Fig. 1e): signed output of the cell pair versus stored level for each read word-line voltage, SPICE points with the fitted polynomial.

    Left: raw SPICE, charge per T_max (mean current over the longest pulse, uA) against the model's stored voltage
    K (our stored window mapped onto 0..0.9 V). Right: the same in the model's normalised units, with the
    full-grid fit (lines) and the read-voltage fit the model uses (dashed, at V_read).
    """
    results_dir = Path(results_dir)
    summary = read_json(results_dir / "device" / "summary.json")
    sweep = read_csv(results_dir / "device" / "cell_sweep.csv")
    t_max = float(summary["pulse_width_max_ns"])
    full = sweep[np.isclose(sweep["pulse_width_ns"], t_max)]
    reads = np.sort(full["read_v"].unique())
    colors = plt.cm.viridis(np.linspace(0.1, 0.9, len(reads)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    ax = axes[0]
    for vr, col in zip(reads, colors):
        sub = full[np.isclose(full["read_v"], vr)].sort_values("level_v")
        ax.plot(sub["level_v"], sub["mean_current_a"] * 1e6, "o-", color=col, ms=4, lw=1, label=f"{vr:.2f} V")
    ax.axhline(0, color="0.7", lw=0.6)
    ax.set_xlabel("stored level K (model units, V)")
    ax.set_ylabel(r"charge / $T_{max}$ (uA)")
    ax.set_title(f"SPICE: {summary.get('cell_kind', 'signed')} cell, pulse = T_max = {t_max:g} ns")
    ax.legend(title="read word line", fontsize=8, title_fontsize=8)
    ax.text(0.02, 0.98, _tech_label(summary), transform=ax.transAxes, va="top", fontsize=7, color="0.3")
    ax = axes[1]
    coef_path = results_dir / "fit" / "coefficients.json"
    if coef_path.is_file():
        fit = json.loads(coef_path.read_text())
        scale = fit["normalisation"]["scale_factor"]
        lo, hi = fit["normalisation"]["read_window_v"]
        yy = np.linspace(-0.45, 0.45, 200)
        for vr, col in zip(reads, colors):
            sub = full[np.isclose(full["read_v"], vr)].sort_values("level_v")
            ax.plot(sub["level_v"] - 0.45, sub["mean_current_a"] * 1e6 * scale, "o", color=col, ms=4)
            x = 0.45 + (vr - lo) / (hi - lo) * 0.45 if hi > lo else 0.9
            if fit["full_grid"] and fit["full_grid"].get("coefficients"):
                ax.plot(yy, _poly(fit["full_grid"]["coefficients"], yy, x), "-", color=col, lw=1.2,
                        label=f"x = {x:.3f} V")
        ax.plot(yy, np.polyval(fit["read_voltage_fit"]["folded"][::-1], yy), "--", color="crimson", lw=1.5,
                label=r"read-voltage fit at $V_{read}$ (model)")
        c = fit["folded"]
        big = max(abs(v) for v in c)
        ax.text(0.02, 0.98, "f(y) = " + " + ".join(_num(v, big) + ("" if i == 0 else " y" if i == 1 else f" y^{i}")
                                                for i, v in enumerate(c)).replace("+ -", "- ")
                + f"\nrms residual {fit['residuals']['rms']:.3g} ({100 * fit['residuals']['rms_relative_to_full_scale']:.2f} % FS)"
                + f"\nscale factor {scale:.3g}", transform=ax.transAxes, va="top", fontsize=7.5,
                bbox=dict(fc="white", ec="0.8", alpha=0.9))
        ax.legend(fontsize=7, loc="lower right", title="full-grid fit, model x", title_fontsize=7)
    else:
        ax.text(0.5, 0.5, "run the fit stage for the normalised view", ha="center", transform=ax.transAxes)
    ax.axhline(0, color="0.7", lw=0.6)
    ax.set_xlabel("weight y = K - 0.45 (V)")
    ax.set_ylabel("f(y, x) (paper units, uA)")
    ax.set_title("normalised (docs/attention.md#cell-coefficients) with the polynomial fit")
    fig.suptitle("Gain-cell characteristic (Fig. 1e style)", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_dir, "device_characteristic")


def fig_device_vs_paper(results_dir: Path, out_dir: Path) -> List[Path]:
    """Our normalised cell characteristic at V_read beside the paper's (TSMC 28 nm), with both linear-model slopes.

    Both are scaled to the same linear coefficient c_1 = 13.612 (docs/attention.md#cell-coefficients); the difference is the shape: the
    ratios c_0/c_1, c_2/c_1, c_3/c_1 of each cell.
    """
    fit = read_json(Path(results_dir) / "fit" / "coefficients.json")
    pts = read_csv(Path(results_dir) / "fit" / "fit_points.csv")
    paper = fold_coefficients(PAPER_COEFFICIENTS, 0.9)
    ours = fit["folded"]
    yy = np.linspace(-0.45, 0.45, 200)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    ax = axes[0]
    ax.plot(yy, np.polyval(list(paper)[::-1], yy), color="0.2", lw=2, label=f"paper ({PAPER_SOURCE})")
    ax.plot(yy, np.polyval(ours[::-1], yy), color="crimson", lw=2,
            label=f"ours ({fit['provenance'].get('technology')}, fitted)")
    at = pts[np.isclose(pts["x"], fit["read_voltage_v"]) & (pts["u"] > 0)]
    ax.plot(at["y"], at["target"] / at["u"], "o", color="crimson", ms=3, alpha=0.5, label="our SPICE points / u")
    ax.plot(yy, 19.3 * yy, ":", color="0.2", label="paper linear model g = 19.3")
    ax.plot(yy, fit["linear_slope"] * yy, ":", color="crimson", label=f"our linear slope g = {fit['linear_slope']:.3g}")
    ax.axhline(0, color="0.8", lw=0.6)
    ax.axvline(0, color="0.8", lw=0.6)
    ax.set_xlabel("weight y = K - 0.45 (V)")
    ax.set_ylabel(r"f(y) at $V_{read}$ = 0.9 V (paper units, uA)")
    ax.set_title("normalised characteristic")
    ax.legend(fontsize=7, loc="upper left")
    _coefficient_panel(axes[1], fit, paper)
    big = max(abs(v) for v in ours)
    table = ("folded c_0..c_3 at 0.9 V   ours: " + ", ".join(_num(v, big) for v in ours)
             + "\n                          paper: " + ", ".join(f"{v:.4g}" for v in paper))
    fig.text(0.5, -0.04, table, ha="center", fontsize=8, family="monospace")
    fig.suptitle("Our gain cell against the paper's, same normalisation", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_dir, "device_vs_paper")


_STATUS_STYLE = {"measured": dict(color="crimson", hatch=""),
                 "imposed": dict(color="white", edgecolor="crimson", hatch="///"),
                 "zero by construction": dict(color="white", edgecolor="0.5", hatch="..")}


def _coefficient_panel(ax, fit: Dict[str, Any], paper) -> None:
    """Folded c_i, ours (with fit standard errors, styled by what sets each) beside the paper's."""
    report = fit.get("coefficient_report") or [
        {"name": f"c{i}", "value": v, "standard_error": float("nan"), "status": "measured"}
        for i, v in enumerate(fit["folded"])]
    pos = np.arange(len(report))
    ax.bar(pos - 0.2, list(paper), 0.4, color="0.45", label="paper (from its coefficients)")
    for k, r in enumerate(report):
        style = _STATUS_STYLE.get(r["status"], _STATUS_STYLE["measured"])
        ax.bar(pos[k] + 0.2, r["value"], 0.4, yerr=r["standard_error"] if r["status"] == "measured" else None,
               capsize=3, linewidth=1, **{"edgecolor": "crimson", **style})
        se = r["standard_error"]
        label = (f"{r['value']:.3g}\n+-{se:.2g}" if r["status"] == "measured" else
                 f"{r['value']:.4g}\n{r['status']}" if r["status"] == "imposed" else "0\nby construction")
        ax.text(pos[k] + 0.2, r["value"], label, ha="center", va="bottom" if r["value"] >= 0 else "top", fontsize=6.5)
        ax.text(pos[k] - 0.2, paper[k], f"{paper[k]:.3g}", ha="center", va="bottom" if paper[k] >= 0 else "top",
                fontsize=6.5, color="0.3")
    for status, style in _STATUS_STYLE.items():
        ax.bar([np.nan], [np.nan], **{"edgecolor": "crimson", **style}, label=f"ours: {status}")
    ax.set_xticks(pos, [r["name"] for r in report])
    ax.margins(y=0.15)
    ax.axhline(0, color="0.6", lw=0.6)
    ref = fit.get("provenance", {}).get("reference_v")
    cell = fit.get("provenance", {}).get("cell_kind") or "cell"
    ax.set_title(f"folded coefficients at V_read ({cell}" + (f", reference {ref:g} V)" if ref is not None else ")")
                 + "\nerror bars: least-squares standard errors", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")


def fig_device_mismatch(results_dir: Path, out_dir: Path) -> List[Path]:
    """Monte-Carlo cell-to-cell mismatch: each simulated cell's read-transistor threshold shift (sky130 vth0 mismatch sigma, Pelgrom) against its fitted offset c0 and gain c1.

    Left: offset c_0 of each cell's cubic versus the threshold shift of its read transistor (the reference
    cell has its own shift). Right: gain c_1 relative to the mean. Text: the spread of every coefficient across
    cells with the standard error of that spread. Normalised units of the nominal fit (not renormalised per cell).
    """
    results_dir = Path(results_dir)
    fit = read_json(results_dir / "fit" / "coefficients.json")
    mm = fit.get("mismatch") or {}
    if not mm.get("available"):
        raise FileNotFoundError(f"no Monte-Carlo mismatch in the fit output: {mm.get('reason', 'not run')}")
    cells = read_csv(results_dir / "fit" / "mismatch_fits.csv")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    sc = ax.scatter(cells["delvto_pos_v"] * 1e3, cells["c0"], c=cells["delvto_neg_v"] * 1e3, cmap="coolwarm", s=18)
    fig.colorbar(sc, ax=ax, label="reference transistor's shift (mV)")
    ax.axhline(mm["coefficients"]["c0"]["nominal"], color="0.3", ls="--", lw=1, label="nominal cell")
    ax.set_xlabel("read transistor threshold shift delvto (mV)")
    ax.set_ylabel("c0 (offset, paper units)")
    ax.set_title(f"offset: sigma(c0) = {mm['offset_spread']:.3g} "
                 f"({100 * mm['offset_spread_over_c1']:.2g} % of c1)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    rel = cells["c1"] / mm["coefficients"]["c1"]["mean"]
    ax.hist(rel, bins=max(5, len(rel) // 3), color="crimson", alpha=0.7)
    ax.set_xlabel("c1 / mean(c1) (gain of each cell)")
    ax.set_ylabel("cells")
    ax.set_title(f"gain: sigma(c1)/c1 = {mm['gain_spread_relative']:.3g} +- "
                 f"{mm['gain_spread_relative_standard_error']:.2g}", fontsize=9)
    lines = [f"{mm['cells']} cells, sigma(V_T) = {1e3 * mm['vth_sigma_v']:.3g} mV (sky130 *_mm, "
             f"W/L = {mm['read_w_um']:g}/{mm['read_l_um']:g} um)"]
    lines += [f"sigma({k}) = {v['std']:.3g} +- {v['std_standard_error']:.2g}" for k, v in mm["coefficients"].items()]
    ax.set_ylim(top=ax.get_ylim()[1] * 1.7)          # room for the text above the bars
    ax.text(0.02, 0.98, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=7,
            bbox=dict(fc="white", ec="0.8", alpha=0.9))
    fig.suptitle("Cell-to-cell mismatch, Monte-Carlo SPICE (measured here)", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_dir, "device_mismatch")


def fig_device_fit_residuals(results_dir: Path, out_dir: Path) -> List[Path]:
    """Residuals of the polynomial fits (normalised units): the model's read-voltage fit and the full-grid fit, per point."""
    fit = read_json(Path(results_dir) / "fit" / "coefficients.json")
    pts = read_csv(Path(results_dir) / "fit" / "fit_points.csv")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    at = pts[np.isclose(pts["x"], fit["read_voltage_v"])]
    r_rv = at["target"] - at["pred_read_voltage"]
    sc = axes[0].scatter(at["y"], r_rv, c=at["u"], cmap="plasma", s=12)
    fig.colorbar(sc, ax=axes[0], label="input pulse u = t / T_max")
    axes[0].set_title(f"read-voltage fit (model): rms {fit['read_voltage_fit']['residuals']['rms']:.3g}")
    axes[0].set_xlabel("weight y (V)")
    axes[0].set_ylabel("data - fit (paper units)")
    if "pred_full_grid" in pts and pts["pred_full_grid"].notna().any():
        r_fg = pts["target"] - pts["pred_full_grid"]
        sc = axes[1].scatter(pts["y"], r_fg, c=pts["x"], cmap="viridis", s=10)
        fig.colorbar(sc, ax=axes[1], label="read voltage x (model, V)")
        axes[1].set_title(f"full-grid fit: rms {fit['full_grid']['residuals']['rms']:.3g}")
        axes[2].hist(r_fg, bins=40, color="tab:green", alpha=0.6, label="full grid")
    else:
        axes[1].text(0.5, 0.5, "full-grid fit not available\n(too few read voltages)", ha="center",
                     transform=axes[1].transAxes)
    axes[1].set_xlabel("weight y (V)")
    axes[2].hist(r_rv, bins=40, color="tab:red", alpha=0.6, label="read voltage")
    axes[2].set_xlabel("residual (paper units)")
    axes[2].set_ylabel("points")
    axes[2].legend(fontsize=8)
    full_scale = float(np.abs(pts["target"]).max())
    axes[2].set_title(f"full scale = {full_scale:.3g}")
    for ax in axes[:2]:
        ax.axhline(0, color="0.6", lw=0.6)
    fig.suptitle("Fit residuals", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_dir, "device_fit_residuals")


def fig_device_retention(results_dir: Path, out_dir: Path) -> List[Path]:
    """Retention (paper Fig. 1h): stored voltage of an isolated cell versus time, with the time constant tau.

    tau is the initial-slope time constant (the exponential of the attention model's leakage that matches the
    cell over the model's time scale, well below a millisecond); a least-squares exponential over the whole
    curve is dotted. Sub-threshold leakage through the write transistor hardly depends on the voltage across
    it, so the node discharges almost linearly rather than exponentially.
    """
    results_dir = Path(results_dir)
    summary = read_json(results_dir / "device" / "summary.json")
    ret = read_csv(results_dir / "device" / "retention.csv")
    fits = {round(f["initial_v"], 9): f for f in summary.get("retention_fits", [])}
    floor = float(summary["cell"]["hold_bitline_v"])
    fig, ax = plt.subplots(figsize=(6.8, 4.3))
    levels = ret["initial_v"].nunique()
    for (v0, grp), col in zip(ret.groupby("initial_v"), plt.cm.magma(np.linspace(0.2, 0.8, levels))):
        t = grp["time_s"].to_numpy()
        ax.plot(t * 1e3, grp["stored_v"], color=col, lw=2.2, label=f"SPICE, V0 = {v0:.2f} V")
        f = fits.get(round(v0, 9))
        if f and f.get("tau_s"):
            tt = np.linspace(0, t[-1], 300)
            ax.plot(tt * 1e3, floor + (v0 - floor) * np.exp(-tt / f["tau_s"]), "--", color=col, lw=1,
                    label=f"exp(-t/tau), tau = {f['tau_s'] * 1e3:.3g} ms (initial slope)")
            if f.get("exp_fit_tau_s"):
                ax.plot(tt * 1e3, floor + (v0 - floor) * np.exp(-tt / f["exp_fit_tau_s"]), ":", color=col, lw=1,
                        label=f"LSQ exp fit, tau = {f['exp_fit_tau_s'] * 1e3:.3g} ms")
    ax.set_xlabel("time after write (ms)")
    ax.set_ylabel("stored voltage (V)")
    ax.set_title(f"Retention ({summary['technology']} {summary['corner']}); paper: tau = 5 ms (28 nm)", fontsize=10)
    ax.legend(fontsize=6.5, loc="upper right")
    ax.text(0.98, 0.42, f"tau (top level) = {summary['retention_tau_s'] * 1e3:.3g} ms, droop "
                        f"{abs(summary.get('retention_droop_v_per_s') or 0):.3g} V/s\n"
                        f"C_s = {summary['cell']['storage_capacitance_f'] * 1e15:g} fF, write transistor "
                        f"{summary['cell']['write_device']} {summary['cell']['write_w_um']:g}/{summary['cell']['write_l_um']:g} um, "
                        f"hold WBL {floor:g} V",
            transform=ax.transAxes, fontsize=7.5, ha="right", bbox=dict(fc="white", ec="0.8"))
    fig.tight_layout()
    return _save(fig, out_dir, "device_retention")


def fig_device_array(results_dir: Path, out_dir: Path) -> List[Path]:
    """Array simulation (paper Fig. 2): every output of the SPICE array with wire parasitics against the sum of isolated-cell charges, and the error."""
    results_dir = Path(results_dir)
    summary = read_json(results_dir / "device" / "summary.json")
    arr = read_csv(results_dir / "device" / "array.csv")
    if arr.empty:
        raise ValueError("array.csv is empty: no array was simulated (device.array_trials=0?)")
    fs = float(np.abs(arr["ideal_charge_c"]).max())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    ax = axes[0]
    kinds = {"qk": r"$Q K^T$ array", "pv": r"$\phi(S) V$ array"}
    for kind, col in zip(sorted(arr["kind"].unique()), ["tab:blue", "tab:orange"]):
        sub = arr[arr["kind"] == kind]
        ax.scatter(sub["ideal_charge_c"] * 1e15, sub["charge_c"] * 1e15, s=8, alpha=0.6, color=col,
                   label=kinds.get(kind, kind))
    lim = fs * 1.05e15
    ax.plot([-lim, lim], [-lim, lim], color="0.3", lw=0.8)
    ax.set_xlabel("ideal: sum of isolated-cell charges (fC)")
    ax.set_ylabel("SPICE array output (fC)")
    ax.set_title(f"{summary['array_rows']} x {summary['array_cols']} array, 0.8 fF / 2 Ohm per element")
    ax.legend(fontsize=8)
    ax.text(0.02, 0.98, f"correlation {summary.get('array_correlation', float('nan')):.6f}\n"
                        f"op energy {summary['array_op_energy_j'] * 1e12:.3g} pJ\n"
                        f"op latency {summary['array_op_latency_ns']:.3g} ns",
            transform=ax.transAxes, va="top", fontsize=8, bbox=dict(fc="white", ec="0.8"))
    ax = axes[1]
    err = 100 * arr["error_c"] / fs
    points = ax.scatter(arr["ideal_charge_c"] / fs, err, s=8, alpha=0.6, c=arr["input_sum_ns"], cmap="viridis")
    fig.colorbar(points, ax=ax, label="sum of the input pulse widths (ns)")
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_xlabel("ideal output / full scale")
    ax.set_ylabel("error (% of full scale)")
    ax.set_title(f"rms error {100 * summary.get('array_error_rms_relative_to_full_scale', float('nan')):.3g} % "
                 f"of full scale (paper's 64x64: 0.26 %)")
    fig.suptitle("SPICE array versus isolated cells (Fig. 2 style)", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_dir, "device_array")


def fig_device_pulse_linearity(results_dir: Path, out_dir: Path) -> List[Path]:
    """Pulse-width modulation: output charge versus input pulse width at V_read for every stored level (the model assumes proportionality)."""
    results_dir = Path(results_dir)
    summary = read_json(results_dir / "device" / "summary.json")
    sweep = read_csv(results_dir / "device" / "cell_sweep.csv")
    sub = sweep[np.isclose(sweep["read_v"], summary["read_voltage_v"])]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    levels = np.sort(sub["level_v"].unique())
    for lv, col in zip(levels, plt.cm.coolwarm(np.linspace(0, 1, len(levels)))):
        s = sub[np.isclose(sub["level_v"], lv)].sort_values("pulse_width_ns")
        ax.plot(s["pulse_width_ns"], s["charge_c"] * 1e15, "o-", ms=3, color=col, label=f"K = {lv:.3f} V")
    ax.set_xlabel("input pulse width (ns)")
    ax.set_ylabel("signed output charge (fC)")
    ax.set_title(f"PWM input at V_read = {summary['read_voltage_v']:g} V")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(fig, out_dir, "device_pulse_linearity")
