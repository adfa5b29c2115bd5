"""Figures and tables of the adaptation stage, the model-variant study and the leakage study.

Each ``fig_*(results_dir, out_dir) -> list[Path]`` reads only files under ``results_dir`` (written by
``gaincell.adapt`` and the trainer) and saves PNG (150 dpi) and PDF; a figure whose inputs are absent
is skipped (empty list, logged).

* :func:`fig_adapt_statistics` - per-stage output distributions and statistics of the linear model and
  of the nonlinear model before and after adaptation (paper Fig. 4b), one figure per adapted run.
* :func:`fig_adapt_convergence` - worst errors, converged scalers and loss per iteration.
* :func:`fig_study` - validation loss / perplexity of the six model variants (paper Table 1 at our
  scale) with their training curves (paper Fig. 4), plus ``study_table.{csv,md}``.
* :func:`fig_leakage` - validation loss versus leakage per step, evaluated and briefly fine-tuned
  (paper Supplementary Fig. 6), with the comparison to an ALiBi-style bias.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from gaincell import study
from gaincell.figures._common import read_json_if_present
from gaincell.figures._common import save_figure as _save
from gaincell.io import atomic_to_csv, atomic_write_text

log = logging.getLogger(__name__)

STAGE_LABELS = {"q": r"$\tilde q$ (query)", "k": r"$\tilde k$ (key)", "v": r"$\tilde v$ (value)",
                "out": "out (attention output)"}
PAPER_LEAKAGE = 1.56e-4       # lambda of the paper: 12 layers x 65 ns / 5 ms
OSFET_LEAKAGE = 1.56e-7       # tau three orders of magnitude longer (OSFET gain cells)
PAPER_LAYERS, PAPER_STEP_S = 12, 65e-9


STUDY_VARIANTS = study.VARIANTS   # the study's variants (paper Table 1 / Fig. 4), defined once
GROUP_COLORS = {"software": "#7f7f7f", "linear": "#1f77b4", "nonlinear": "#d62728", "analog": "#9467bd"}
VARIANT_COLORS = {1: "#4d4d4d", 2: "#9e9e9e", 3: "#1f77b4", 4: "#ff7f0e", 5: "#d62728", 6: "#2ca02c",
                  7: "#c5b0d5", 8: "#9467bd"}


def _plt():
    matplotlib.use("Agg")

    return plt


def adapt_runs(results_dir: Path, mode: str = "adapt") -> Dict[str, dict]:
    """Summaries of the adapt stage's runs (``adapt/<run>/summary.json``) with the given mode."""
    runs = {}
    base = Path(results_dir) / "adapt"
    if not base.is_dir():
        return runs
    for summary_path in sorted(base.glob("*/summary.json")):
        s = read_json_if_present(summary_path)
        if s and s.get("mode") == mode:
            runs[summary_path.parent.name] = s
    return runs


# --------------------------------------------------------------------------------------------------
# adaptation: distributions before/after (paper Fig. 4b) and convergence
# --------------------------------------------------------------------------------------------------
def fig_adapt_statistics(results_dir: Path, out_dir: Path) -> List[Path]:
    """Adaptation (paper Fig. 4b): distributions of each scaling stage's output (q~, k~, v~, out) in the
    first and last layer for the linear model, and for the nonlinear model before and after equation 9,
    with every scaler's mean and standard deviation against the linear model's; one figure per adapted run.
    """
    plt = _plt()
    paths: List[Path] = []
    for run, summary in adapt_runs(results_dir).items():
        run_dir = Path(results_dir) / "adapt" / run
        if not (run_dir / "histograms.csv").is_file() or not (run_dir / "stats.csv").is_file():
            log.info("fig_adapt_statistics: %s has no histograms.csv/stats.csv, skipped", run)
            continue
        hist = pd.read_csv(run_dir / "histograms.csv")
        stats = pd.read_csv(run_dir / "stats.csv")
        layers = sorted(hist["layer"].unique())
        stages = [s for s in STAGE_LABELS if s in set(hist["stage"])]
        fig = plt.figure(figsize=(4.0 * len(stages), 3.0 * len(layers) + 3.6))
        gs = fig.add_gridspec(len(layers) + 1, len(stages), height_ratios=[1] * len(layers) + [1.25],
                              hspace=0.55, wspace=0.28)
        styles = {"linear": dict(color="black", lw=0, fill=True, alpha=0.25, label="linear model, the target [L]"),
                  "before": dict(color="#ff7f0e", lw=1.6, fill=False, label="nonlinear, before adaptation [NL0]"),
                  "after": dict(color="#d62728", lw=1.4, fill=False, ls="--", label="nonlinear, after adaptation [NL]")}
        for r, layer in enumerate(layers):
            for c, stage in enumerate(stages):
                ax = fig.add_subplot(gs[r, c])
                sub = hist[(hist["layer"] == layer) & (hist["stage"] == stage)]
                head = int(sub["head"].iloc[0]) if len(sub) else 0
                for model_name, st in styles.items():
                    h = sub[sub["model"] == model_name]
                    if h.empty:
                        continue
                    edges = np.append(h["bin_left"].to_numpy(), h["bin_right"].to_numpy()[-1])
                    dens = h["density"].to_numpy()
                    if st["fill"]:
                        ax.stairs(dens, edges, fill=True, color=st["color"], alpha=st["alpha"], label=st["label"])
                    else:
                        ax.stairs(dens, edges, color=st["color"], lw=st["lw"], ls=st.get("ls", "-"),
                                  label=st["label"])
                row = stats[(stats["layer"] == layer) & (stats["head"] == head) & (stats["stage"] == stage)]
                if len(row):
                    row = row.iloc[0]
                    txt = (f"L   $\\mu$={row.mean_linear:+.3f} $\\sigma$={row.std_linear:.3f}\n"
                           f"NL0 $\\mu$={row.mean_before:+.3f} $\\sigma$={row.std_before:.3f}\n"
                           f"NL  $\\mu$={row.mean_after:+.3f} $\\sigma$={row.std_after:.3f}")
                    ax.text(0.02, 0.97, txt, transform=ax.transAxes, va="top", ha="left", fontsize=7,
                            family="monospace", bbox=dict(boxstyle="round", fc="white", ec="0.8", alpha=0.85))
                if stage == "out":  # quantized readout: a tall spike at 0, the rest only visible in log
                    ax.set_yscale("log")
                ax.set_title(f"layer {layer}, head {head}: {STAGE_LABELS[stage]}", fontsize=9)
                ax.set_xlabel("scaled value (q, k, v: pulse width / V; out: readout)", fontsize=7)
                if c == 0:
                    ax.set_ylabel("density")
                ax.tick_params(labelsize=7)
                if r == 0 and c == 0:
                    handles, labels = ax.get_legend_handles_labels()
        # every scaler of every layer and head: nonlinear vs linear statistics
        half = max(len(stages) // 2, 1)
        for k, (what, lab) in enumerate((("std", r"standard deviation $\sigma$"), ("mean", r"mean $\mu$"))):
            ax = fig.add_subplot(gs[len(layers), k * half:(k + 1) * half if k == 0 else len(stages)])
            lin = stats[f"{what}_linear"].to_numpy()
            ax.scatter(lin, stats[f"{what}_before"], s=14, color="#ff7f0e", label="before adaptation", alpha=0.8)
            ax.scatter(lin, stats[f"{what}_after"], s=14, color="#d62728", marker="x", label="after adaptation")
            lo, hi = float(np.nanmin(lin)), float(np.nanmax(lin))
            pad = 0.05 * (hi - lo + 1e-9)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=0.8, ls=":", label="equal")
            worst_b = np.nanmax(np.abs(stats[f"{what}_before"] - lin))
            worst_a = np.nanmax(np.abs(stats[f"{what}_after"] - lin))
            ax.set_title(f"{lab}, all {len(stats)} scalers: worst |error| {worst_b:.2e} -> {worst_a:.2e}",
                         fontsize=9)
            ax.set_xlabel(f"linear model {what}")
            ax.set_ylabel(f"nonlinear model {what}")
            ax.legend(fontsize=7)
        fig.legend(handles, labels, loc="upper center", ncol=3, fontsize=9, bbox_to_anchor=(0.5, 0.955),
                   frameon=False)
        conv = "converged" if summary.get("converged") else "NOT converged"
        fig.suptitle(f"Adaptation of '{run}' onto the nonlinear cell ({summary.get('coefficient_set', '?')} "
                     f"coefficients): {summary.get('iterations')} iterations, {conv} "
                     f"(tolerance {summary.get('tolerance', float('nan')):.0e}); validation loss "
                     f"{summary.get('val_loss_mapped', float('nan')):.3f} -> {summary.get('val_loss', float('nan')):.3f} "
                     f"(linear {summary.get('val_loss_linear', float('nan')):.3f})", fontsize=11)
        paths += _save(fig, out_dir, f"adapt_statistics_{run}")
    if not paths:
        log.info("fig_adapt_statistics: no adapted run under %s/adapt", results_dir)
    return paths


def fig_adapt_convergence(results_dir: Path, out_dir: Path) -> List[Path]:
    """Convergence of the adaptation: worst |mu_NL - mu_L| and |sigma_NL - sigma_L| over all scalers per
    iteration against the tolerance, the share of converged scalers, and the calibration-loss gap to the
    linear model."""
    plt = _plt()
    runs = {r: s for r, s in adapt_runs(results_dir).items()
            if (Path(results_dir) / "adapt" / r / "history.csv").is_file()}
    if not runs:
        log.info("fig_adapt_convergence: no adapt/<run>/history.csv under %s", results_dir)
        return []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    tol = None
    for i, (run, s) in enumerate(runs.items()):
        h = pd.read_csv(Path(results_dir) / "adapt" / run / "history.csv")
        col = colors[i % len(colors)]
        tol = s.get("tolerance", tol)
        axes[0].semilogy(h["iteration"], h["worst_mean_error"].clip(lower=1e-12), color=col, lw=1.6,
                         label=f"{run}: worst |$\\mu_{{NL}}-\\mu_L$|")
        axes[0].semilogy(h["iteration"], h["worst_std_error"].clip(lower=1e-12), color=col, lw=1.6, ls="--",
                         label=f"{run}: worst |$\\sigma_{{NL}}-\\sigma_L$|")
        axes[1].plot(h["iteration"], 100 * h["converged_scalers"] / h["total_scalers"], color=col, lw=1.6,
                     label=f"{run} ({int(h['total_scalers'].iloc[0])} scalers)")
        ref = s.get("calibration_loss_linear", 0.0)
        axes[2].plot(h["iteration"], h["calibration_loss"] - ref, color=col, lw=1.6, marker="o", ms=3,
                     label=f"{run} (linear model: {ref:.4f})")
        status = f"converged in {s.get('iterations')} it." if s.get("converged") else \
            f"NOT converged after {s.get('iterations')} it. ({s.get('not_converged_count')} scalers out)"
        axes[0].annotate(status, xy=(h["iteration"].iloc[-1], max(h["worst_mean_error"].iloc[-1],
                                                                   h["worst_std_error"].iloc[-1], 1e-12)),
                         xytext=(-5, 10 + 14 * i), textcoords="offset points", ha="right", fontsize=8, color=col)
    if tol is not None:
        axes[0].axhline(tol, color="black", lw=1, ls=":", label=f"tolerance {tol:.0e}")
    axes[0].set(xlabel="iteration", ylabel="worst absolute error over all scalers",
                title="Statistics error (all stages, layers, heads)")
    axes[1].set(xlabel="iteration", ylabel="scalers within tolerance (%)", ylim=(0, 105),
                title="Converged scalers (|$\\Delta\\mu$| and |$\\Delta\\sigma$| < tol)")
    axes[2].axhline(0.0, color="black", lw=1, ls=":")
    axes[2].set(xlabel="iteration", ylabel="nonlinear - linear model loss (nats/token)",
                title="Loss gap to the linear model (calibration batches)")

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("Adaptation (equation 9): a <- a $\\sigma_L/\\sigma_{NL}$, b <- b + $\\mu_L-\\mu_{NL}$, "
                 "damped $\\beta$: 1.0 -> 0.1", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_dir, "adapt_convergence")


# --------------------------------------------------------------------------------------------------
# the study: six variants (paper Table 1 / Fig. 4)
# --------------------------------------------------------------------------------------------------
def _metrics(results_dir: Path, run: str) -> Optional[pd.DataFrame]:
    p = Path(results_dir) / "train" / run / "metrics.csv"
    if not p.is_file():
        return None
    try:
        return pd.read_csv(p)
    except (ValueError, pd.errors.EmptyDataError):
        return None


FIXED = "fixed validation batches"


def study_table(results_dir: Path) -> pd.DataFrame:
    """One row per variant: validation loss and perplexity, and where the number comes from.

    Preference: the adapt stage's ``evaluate`` mode (``adapt/study/<run>.json``) or adaptation summaries,
    which all use the same fixed validation batches (their per-batch losses are kept in the column
    ``batch_losses`` for paired comparisons); else the trainer's last validation estimate. Variants with
    analog projections (``noise_seeds``) come from ``analog_eval``: ``val_loss`` is the mean over the
    inference-noise seeds, ``val_loss_spread`` their standard deviation (empty for the other variants).
    """
    results_dir = Path(results_dir)
    adapted = adapt_runs(results_dir, "adapt")
    mapped = adapt_runs(results_dir, "map_only")
    rows = []
    for v in STUDY_VARIANTS:
        loss, source, per_batch, spread, seeds = None, None, None, None, None
        s = read_json_if_present(results_dir / "adapt" / "study" / f"{v.run}.json")
        if s and s.get("val_loss") is not None and s.get("mode") == "analog_eval":
            loss, per_batch, spread = s["val_loss"], s.get("val_batch_losses"), s.get("val_loss_spread")
            seeds = len(s.get("val_loss_seeds") or {})
            source = f"{FIXED} (analog_eval: mean of {seeds} inference-noise seeds)"
        elif s and s.get("val_loss") is not None:
            loss, source, per_batch = s["val_loss"], FIXED + " (adapt evaluate)", s.get("val_batch_losses")
        elif v.run in adapted or v.run in mapped:
            s = adapted.get(v.run) or mapped[v.run]
            loss, source, per_batch = s["val_loss"], f"{FIXED} ({s['mode']})", s.get("val_batch_losses")
        elif v.run == "linear_hw" and "nonlinear_adapted" in adapted:
            s = adapted["nonlinear_adapted"]
            loss, source, per_batch = s["val_loss_linear"], FIXED + " (adapt)", s.get("val_batch_losses_linear")
        else:
            m = _metrics(results_dir, v.run)
            if m is not None and "val_loss" in m and m["val_loss"].notna().any():
                loss, source = float(m["val_loss"].dropna().iloc[-1]), "trainer's last validation estimate"
        iters = 0
        for run in v.curve_runs:
            m = _metrics(results_dir, run)
            if m is not None and len(m):
                iters += int(m["iter"].max())
        rows.append({"variant": v.number, "model": v.label, "run": v.run, "val_loss": loss,
                     "val_loss_spread": spread, "noise_seeds": seeds,
                     "val_ppl": math.exp(loss) if loss is not None else None,
                     "training_iterations": iters if v.curve_runs else 0, "source": source,
                     "batch_losses": per_batch})
    df = pd.DataFrame(rows)
    lin = df.loc[df.run == "linear_hw", "val_loss"]
    ref = lin.iloc[0] if len(lin) and lin.notna().iloc[0] else None
    df["delta_vs_linear"] = df["val_loss"] - ref if ref is not None else None
    return df


def ordering_checks(df: pd.DataFrame) -> List[Tuple[str, str, str]]:
    """The paper's qualitative ordering checked on our numbers: (claim, verdict, detail).

    Verdict: ``yes``/``NO``, with ``within noise`` when the paired difference over the shared validation
    batches is under two standard errors; ``n/a`` where a number is missing."""
    loss = {int(r.variant): (None if pd.isna(r.val_loss) else float(r.val_loss)) for r in df.itertuples()}
    per_batch = {int(r.variant): r.batch_losses for r in df.itertuples()}

    def check(text, a, b, op):
        if loss.get(a) is None or loss.get(b) is None:
            return (text, "n/a", "missing")
        diff = loss[a] - loss[b]
        ok = diff > 0 if op == ">" else diff < 0
        verdict, detail = ("yes" if ok else "NO"), f"{loss[a]:.4f} vs {loss[b]:.4f}"
        pa, pb = per_batch.get(a), per_batch.get(b)
        if isinstance(pa, list) and isinstance(pb, list) and len(pa) == len(pb) > 1:
            d = np.asarray(pa) - np.asarray(pb)
            se = float(d.std(ddof=1) / math.sqrt(len(d)))
            detail += f", diff {d.mean():+.4f} +- {se:.4f} (paired SE, {len(d)} batches)"
            if abs(d.mean()) < 2 * se:
                verdict += ", within noise"
        return (text, verdict, detail)

    return [
        check("4 worse than 5: adaptation is needed", 4, 5, ">"),
        check("5 worse than 3: the nonlinear cell costs accuracy", 5, 3, ">"),
        check("6 better than 5: fine-tuning recovers", 6, 5, "<"),
        check("4 worse than 3: mapping alone loses accuracy", 4, 3, ">"),
    ]


def fig_study(results_dir: Path, out_dir: Path) -> List[Path]:
    """The model-variant study (paper Table 1 and Fig. 4 at this profile's scale): validation loss and
    perplexity of the six variants on the same batches, the paper's qualitative ordering checked with
    paired standard errors, and the training curves; also writes ``study_table.csv`` and ``.md``."""
    plt = _plt()
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    df = study_table(results_dir)
    if df["val_loss"].isna().all():
        log.info("fig_study: no variant has a validation loss yet under %s", results_dir)
        return []
    paths = [atomic_to_csv(df.drop(columns=["batch_losses"]), out_dir / "study_table.csv")]
    md = ["| # | model | val. loss (nats/token) | perplexity | vs linear | training it. | measured on |",
          "|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        f = (lambda x, fmt: "n/a" if x is None or pd.isna(x) else format(x, fmt))
        pm = "" if pd.isna(r.val_loss_spread) else f" +- {r.val_loss_spread:.4f} (sd over {int(r.noise_seeds)} noise seeds)"
        md.append(f"| {r.variant} | {r.model} | {f(r.val_loss, '.4f')}{pm} | {f(r.val_ppl, '.2f')} | "
                  f"{f(getattr(r, 'delta_vs_linear', None), '+.4f')} | {r.training_iterations} | {r.source or 'n/a'} |")
    checks = ordering_checks(df)
    md += ["", "Paper's qualitative ordering on these numbers:"]
    md += [f"- {t}: {verdict} ({detail})" for t, verdict, detail in checks]
    paths.append(atomic_write_text(out_dir / "study_table.md", "\n".join(md) + "\n"))

    fig, (ax_bar, ax_curve, ax_zoom) = plt.subplots(1, 3, figsize=(20, 5.6), gridspec_kw={"width_ratios": [1, 1.1, 0.9]})
    have = df[df["val_loss"].notna()]
    ypos = np.arange(len(have))[::-1]
    ax_bar.barh(ypos, have["val_loss"], color=[VARIANT_COLORS[int(n)] for n in have["variant"]], alpha=0.85,
                xerr=have["val_loss_spread"].astype(float).fillna(0.0), error_kw={"capsize": 3, "lw": 1})
    ax_bar.set_yticks(ypos, [f"{int(r.variant)}. {r.model}" for r in have.itertuples()], fontsize=8)
    lo = float(have["val_loss"].min())
    hi = float(have["val_loss"].max())
    ax_bar.set_xlim(max(0.0, lo - 0.6 * (hi - lo + 0.05)), hi + 0.45 * (hi - lo + 0.05))
    for y, r in zip(ypos, have.itertuples()):
        mark = "" if r.source and r.source.startswith(FIXED) else " *"
        pm = "" if pd.isna(r.val_loss_spread) else f" +- {r.val_loss_spread:.3f} (sd, {int(r.noise_seeds)} noise seeds)"
        ax_bar.text(r.val_loss, y, f" {r.val_loss:.3f}{pm} (ppl {r.val_ppl:.1f}){mark}", va="center", fontsize=8)
    ax_bar.set_xlabel("validation cross-entropy (nats/token)")
    ax_bar.set_title("Validation loss of the model variants (paper Table 1)")
    txt = "\n".join(f"{t}: {verdict}\n    {d}" for t, verdict, d in checks)
    if (have["source"].fillna("").str.startswith("trainer")).any():
        txt += "\n* trainer's validation estimate (other batches)"
    ax_bar.text(0.01, -0.2, "Paper's ordering on our numbers:\n" + txt, transform=ax_bar.transAxes, va="top",
                fontsize=8, family="monospace")
    ax_bar.grid(axis="x", alpha=0.3)

    # training curves, on one iteration axis: baseline, then each fine-tuning from its end
    base = _metrics(results_dir, "softmax")
    offset0 = int(base["iter"].max()) if base is not None and len(base) else 0
    x_end = offset0
    analog_start = offset0 + sum(int(m["iter"].max()) for m in (_metrics(results_dir, run) for run in
                                 next((v.curve_runs for v in STUDY_VARIANTS if v.number == 6), ()))
                                 if m is not None and len(m))
    for ax, zoom in ((ax_curve, False), (ax_zoom, True)):
        for v in STUDY_VARIANTS:
            start = 0 if v.number == 1 else offset0
            if v.group == "analog":  # the analog runs continue from variant 6's end (study.RUNS)
                start = analog_start
            for k, run in enumerate(v.curve_runs):
                m = _metrics(results_dir, run)
                if m is None or "val_loss" not in m:
                    continue
                vm = m[m["val_loss"].notna()]
                style = "--" if (v.number == 6 and k == 0) else "-"
                lab = f"{v.number}. {v.label}" if k == len(v.curve_runs) - 1 else f"{v.number}. (linear part, {run})"
                ax.plot(start + vm["iter"], vm["val_loss"], style, color=VARIANT_COLORS[v.number], lw=1.6,
                        marker="o", ms=3, label=lab)
                start += int(m["iter"].max()) if len(m) else 0
                x_end = max(x_end, start)
        lin = _metrics(results_dir, "linear_hw")
        x_mapped = offset0 + (int(lin["iter"].max()) if lin is not None and len(lin) else 0)
        for n in (4, 5):
            r = df[df.variant == n].iloc[0]
            if not pd.isna(r.val_loss):
                ax.plot([x_mapped], [r.val_loss], marker="*" if n == 5 else "X", ms=12, ls="none",
                        color=VARIANT_COLORS[n], label=f"{n}. {r.model}")
        early = adapt_runs(results_dir).get("nonlinear_adapted_early")
        early_m = _metrics(results_dir, "linear_hw_early")
        if early and early_m is not None and len(early_m):
            ax.plot([offset0 + int(early_m["iter"].max())], [early["val_loss"]], marker="*", ms=10, ls="none",
                    color=VARIANT_COLORS[6], label="6. adapted early linear model (start of fine-tuning)")
        if offset0:
            ax.axvline(offset0, color="0.5", lw=0.8, ls=":")
        ax.set_xlabel("training iteration (baseline, then each fine-tuning from its end)")
        ax.set_ylabel("validation cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
    ax_curve.set_title("Training curves (paper Fig. 4)")
    ax_curve.legend(fontsize=7, loc="upper right")
    # zoom on the end of training, where the variants are compared
    finals = have["val_loss"].to_numpy(dtype=float)
    pad = max(0.05, 0.25 * float(finals.max() - finals.min()))
    ax_zoom.set_ylim(finals.min() - pad, finals.max() + pad)
    ax_zoom.set_xlim(offset0 - 0.02 * max(x_end - offset0, 1), x_end + 0.05 * max(x_end - offset0, 1))
    ax_zoom.set_title("Zoom: the fine-tuning phase\n(curves: the trainer's estimate on its own validation batches; "
                      "markers and bars: the fixed batches)", fontsize=9)
    fig.tight_layout()
    return paths + _save(fig, out_dir, "study_variants")


# --------------------------------------------------------------------------------------------------
# leakage (paper Supplementary Fig. 6)
# --------------------------------------------------------------------------------------------------
def leakage_table(results_dir: Path) -> pd.DataFrame:
    rows = [read_json_if_present(p) for p in sorted((Path(results_dir) / "adapt" / "leakage").glob("*.json"))]
    rows = [r for r in rows if r and "decay_per_step" in r]
    return pd.DataFrame(rows).sort_values("decay_per_step").reset_index(drop=True) if rows else pd.DataFrame()


def alibi_slopes(n_head: int) -> np.ndarray:
    """ALiBi's per-head slopes for a power-of-two head count (Press et al.): 2^(-8h/H), h = 1..H."""
    return 2.0 ** (-8.0 * np.arange(1, n_head + 1) / n_head)


def fig_leakage(results_dir: Path, out_dir: Path) -> List[Path]:
    """Capacitor leakage (paper Supplementary Fig. 6): validation loss of the trained hardware model at
    each leakage per step, as trained and after brief fine-tuning at that leakage, and the decay's weight
    on a key m tokens back compared with ALiBi's bias."""
    plt = _plt()
    df = leakage_table(results_dir)
    if df.empty:
        log.info("fig_leakage: no adapt/leakage/*.json under %s", results_dir)
        return []
    lam = df["decay_per_step"].to_numpy(dtype=float)
    nonzero = lam[lam > 0]
    zero_x = (nonzero.min() / 10) if nonzero.size else 1e-8
    x = np.where(lam > 0, lam, zero_x)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(16, 5.2), gridspec_kw={"width_ratios": [1.2, 1]})
    kind = str(df["kind"].iloc[0])
    ax.plot(x, df["val_loss"], "o-", color="#d62728", lw=1.8, label=f"{kind} model as trained, evaluated at each leakage")
    if "val_loss_finetuned" in df and df["val_loss_finetuned"].notna().any():
        n_ft = int(df["finetune_iters"].max())
        ax.plot(x, df["val_loss_finetuned"], "s--", color="#2ca02c", lw=1.8,
                label=f"after {n_ft} fine-tuning iterations at that leakage")
    ax.set_xscale("log")
    ax.axvline(PAPER_LEAKAGE, color="0.3", ls=":", lw=1)
    ax.text(PAPER_LEAKAGE, 0.6, " paper: 1.56e-4\n (tau = 5 ms)", transform=ax.get_xaxis_transform(), fontsize=8)
    ax.axvline(OSFET_LEAKAGE, color="0.3", ls=":", lw=1)
    ax.text(OSFET_LEAKAGE, 0.6, " OSFET cells\n (tau x1000)", transform=ax.get_xaxis_transform(), fontsize=8)
    ticks = sorted(set(x.tolist()))
    ax.set_xticks(ticks, ["0\n(no leak)" if t == zero_x and (lam == 0).any() else f"{t:.3g}" for t in ticks],
                  fontsize=8)
    ax.minorticks_off()
    k_ms = PAPER_LAYERS * PAPER_STEP_S * 1e3  # tau (ms) = L * delta_t / lambda

    def to_tau(v):
        v = np.asarray(v, dtype=float)
        return k_ms / np.where(v > 0, v, np.nan)

    sec = ax.secondary_xaxis("top", functions=(to_tau, to_tau))
    sec.set_xlabel("capacitor time constant tau (ms) for the paper's 12 layers x 65 ns per step", fontsize=8)
    sec.tick_params(labelsize=7)
    for xi, yi in zip(x, df["val_loss"]):
        ax.annotate(f"{yi:.3f}", (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7,
                    color="#d62728")
    # paired noise level: the same validation batches at every leakage value
    if "val_batch_losses" in df and (lam == 0).any():
        ref = np.asarray(df.loc[lam == 0, "val_batch_losses"].iloc[0], dtype=float)
        lines = []
        for value, losses in zip(lam, df["val_batch_losses"]):
            if value > 0 and isinstance(losses, list) and len(losses) == len(ref) > 1:
                d = np.asarray(losses, dtype=float) - ref
                lines.append(f"lambda={value:.3g}: {d.mean():+.4f} +- {d.std(ddof=1) / math.sqrt(len(d)):.4f}")
        if lines:  # room above the curves for the box
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi + 0.7 * (hi - lo))
            ax.text(0.99, 0.97, "loss change vs no leakage (as trained),\npaired SE over the same batches:\n" +
                    "\n".join(lines), transform=ax.transAxes, ha="right", va="top", fontsize=7,
                    family="monospace", bbox=dict(boxstyle="round", fc="white", ec="0.8", alpha=0.9))
    ax.set_xlabel("leakage per token step lambda = L delta_t / tau")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title("Validation loss vs capacitor leakage (paper Supplementary Fig. 6)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)

    # how the decay weights keys, next to ALiBi's bias
    window = int(df["window"].iloc[0]) if "window" in df else 1024
    m = np.arange(0, max(window, 1024))
    for value, col in zip([v for v in sorted(set(nonzero.tolist()))], plt.cm.viridis(np.linspace(0, 0.9, nonzero.size))):
        ax2.fill_between(m, np.exp(-2 * value * m), np.exp(-value * m), color=col, alpha=0.35)
        ax2.plot(m, np.exp(-2 * value * m), color=col, lw=1.2, label=f"leakage lambda={value:.3g}")
    slopes = alibi_slopes(12)
    for s, ls in ((slopes[-1], "-"), (slopes[len(slopes) // 2], "--"), (slopes[0], ":")):
        ax2.plot(m, np.exp(-s * m), color="black", ls=ls, lw=1, label=f"ALiBi slope {s:.3g} (exp(-s m))")
    ax2.axvline(window - 1, color="0.5", lw=0.8, ls=":")
    ax2.text(window - 1, 1e-5, f" this model's window edge (m = {window - 1})", fontsize=8, color="0.3")
    ax2.set_yscale("log")
    ax2.set_ylim(1e-6, 1.5)
    ax2.set_xlabel("distance m between query and key (tokens)")
    ax2.set_ylabel("multiplicative weight on that key's contribution")
    ax2.set_title("Leakage as a recency bias, compared with ALiBi", fontsize=10)
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax2.grid(alpha=0.3)
    note = ("Leakage multiplies a stored k and v by exp(-lambda m). The key array's charge S is scaled once,\n"
            "the value-array readout again: a key m tokens back is weighted by exp(-2 lambda m) while the\n"
            "HardSigmoid is linear, exp(-lambda m) when it saturates (shaded band). ALiBi adds -s m to the\n"
            f"softmax logits, i.e. the same multiplicative form exp(-s m) before normalisation, with head\n"
            f"slopes s = 2^(-8h/H) (here H=12: {slopes[-1]:.2g}..{slopes[0]:.2g}). The paper's lambda = 1.56e-4 "
            f"is\n{slopes[-1] / (2 * PAPER_LEAKAGE):.0f}x gentler than ALiBi's gentlest head "
            f"(weight {np.exp(-2 * PAPER_LEAKAGE * (window - 1)):.2f} at the window edge, m = {window - 1}); "
            "no normalisation\nfollows, so the decay also shrinks the output, which the output scaler can absorb.")
    fig.text(0.5, -0.02, note, ha="center", va="top", fontsize=8.5, family="monospace")
    fig.tight_layout()
    return _save(fig, out_dir, "leakage")
