"""Figure of the attention benchmark (``benchmarks/attention.py``), read from ``results/benchmarks/attention.csv``.

* :func:`fig_attention_benchmark` - time and peak memory of the analog attention implementations
  (dense reference, blocked CPU path, Triton kernels) and softmax SDPA against sequence length at
  window 1024, plus the CPU goal shape (T=1024, window 256) with speed-ups over the dense reference.

The benchmark writes ``results/benchmarks/`` (beside the profile folders), so the figure looks in
``results_dir/benchmarks`` and then in ``results_dir/../benchmarks``. It returns the PNG (150 dpi) and
PDF it wrote, or an empty list when the benchmark has not been run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from gaincell.io import tmp_path_beside

IMPL_STYLE = {  # name: (label, colour, marker)
    "dense": ("dense reference (T x T)", "#7f7f7f", "s"),
    "blocked": ("blocked (banded PyTorch)", "#1f77b4", "o"),
    "triton": ("Triton kernels (fp32)", "#d62728", "D"),
    "triton_tf32x3": ("Triton kernels (tf32x3)", "#ff9896", "d"),
    "sdpa_causal": ("softmax SDPA, float32", "#2ca02c", "^"),
    "sdpa_causal_bf16": ("softmax SDPA, bfloat16 (FlashAttention)", "#98df8a", "v"),
}
MODE_STYLE = {"forward_backward": ("-", "forward + backward"), "forward": ("--", "forward")}


def _plt():
    matplotlib.use("Agg")

    sns.set_theme(style="whitegrid", context="paper")
    return plt


def _find_csv(results_dir: Path) -> Path | None:
    for folder in (Path(results_dir) / "benchmarks", Path(results_dir).parent / "benchmarks"):
        if (folder / "attention.csv").is_file():
            return folder / "attention.csv"
    return None


def fig_attention_benchmark(results_dir: Path, out_dir: Path) -> List[Path]:
    """Attention implementations: time and peak memory versus sequence length (window 1024), and the
    speed-up of the blocked CPU path / Triton kernels over the dense reference at T=1024, window 256."""
    csv = _find_csv(results_dir)
    if csv is None:
        return []
    return plot_attention_benchmark(csv, Path(out_dir) / "attention_benchmark")


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def plot_attention_benchmark(csv_path: Path, out_stem: Path) -> List[Path]:
    """Draw the three panels from one benchmark CSV; writes ``out_stem``.png and .pdf."""
    plt = _plt()
    df = pd.read_csv(csv_path)
    info = {}
    meta_path = Path(csv_path).with_suffix(".json")
    if meta_path.is_file():
        info = json.loads(meta_path.read_text()).get("machine", {})
    model = "linear_hw" if (df["model"] == "linear_hw").any() else df["model"].iloc[0]
    series = df[df["shape"].str.startswith("window1024") & (df["model"] == model)]
    goal = df[df["shape"].str.startswith("cpu_goal")]
    impls = [i for i in IMPL_STYLE if i in set(df["implementation"])]

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw=dict(width_ratios=[1, 1, 1.45]))
    ax_time, ax_mem, ax_goal = axes

    # (a) time versus T
    for impl in impls:
        label, colour, marker = IMPL_STYLE[impl]
        for mode, (ls, mode_label) in MODE_STYLE.items():
            sel = series[(series["implementation"] == impl) & (series["mode"] == mode)].sort_values("T")
            ok = sel[sel["status"] == "ok"]
            if len(ok):
                ax_time.plot(ok["T"], ok["time_min_s"], ls=ls, marker=marker, color=colour,
                             label=f"{label}" if mode == "forward_backward" else None)
    notes = []  # what was not run, and why (part of the result: e.g. dense does not fit)
    for impl in impls:
        missing = df[(df["implementation"] == impl) & (df["status"] != "ok") & (df["mode"] == "forward_backward")]
        for status, rows in missing.groupby("status"):
            where = ", ".join(f"T={t}" for t in sorted(rows["T"].unique()))
            reason = rows["note"].dropna().iloc[0] if rows["note"].notna().any() else ""
            text = f"{IMPL_STYLE[impl][0]}: {status.replace('_', ' ')} at {where}"
            if status == "unavailable":
                text = f"{IMPL_STYLE[impl][0]}: not run ({reason})"
            notes.append(text)
    ax_time.set_xscale("log", base=2)
    ax_time.set_yscale("log")
    if notes:  # room above the curves for the box
        low, high = ax_time.get_ylim()
        if 0 < low < high:
            ax_time.set_ylim(low, high * (high / low) ** 0.35)
        ax_time.text(0.02, 0.98, "\n".join(notes), transform=ax_time.transAxes, va="top", ha="left", fontsize=7,
                     bbox=dict(boxstyle="round", fc="white", ec="0.8", alpha=0.9))
    ax_time.set_xlabel("sequence length T (tokens), window 1024")
    ax_time.set_ylabel("time per call (s), best of repeats")
    ax_time.set_title("(a) time: solid forward+backward, dashed forward")

    # (b) peak memory versus T (forward + backward), dense estimates where it does not fit
    mem_series = series[series["mode"] == "forward_backward"]
    for impl in impls:
        label, colour, marker = IMPL_STYLE[impl]
        sel = mem_series[mem_series["implementation"] == impl].sort_values("T")
        ok = sel[(sel["status"] == "ok") & (sel["peak_mem_bytes"] > 0)]
        if len(ok):
            ax_mem.plot(ok["T"], ok["peak_mem_bytes"] / 2**20, marker=marker, color=colour, label=label)
        est = sel[sel["status"] == "does_not_fit"]
        if len(est):
            ax_mem.scatter(est["T"], est["est_mem_bytes"] / 2**20, marker=marker, facecolors="none",
                           edgecolors=colour, s=60, label=f"{label}: does not fit (estimate)")
            for _, r in est.iterrows():
                ax_mem.annotate(f"{r['est_mem_bytes'] / 2**30:.0f} GiB\ndoes not fit", (r["T"], r["est_mem_bytes"] / 2**20),
                                textcoords="offset points", xytext=(-10, 8), fontsize=7, color=colour, ha="right")
    if len(mem_series):
        t = sorted(mem_series["T"].unique())
        ref = mem_series[(mem_series["implementation"] == "blocked") & (mem_series["peak_mem_bytes"] > 0)]
        if len(ref):
            y0 = float(ref.sort_values("T")["peak_mem_bytes"].iloc[0]) / 2**20
            ax_mem.plot(t, [y0 * x / t[0] for x in t], color="black", lw=0.8, ls=":", label="proportional to T")
            ax_mem.plot(t, [y0 * (x / t[0]) ** 2 for x in t], color="black", lw=0.8, ls="-.",
                        label="proportional to T$^2$")
    ax_mem.set_xscale("log", base=2)
    ax_mem.set_yscale("log")
    ax_mem.set_xlabel("sequence length T (tokens), window 1024")
    ax_mem.set_ylabel("peak memory above inputs (MiB), forward + backward")
    ax_mem.set_title("(b) peak memory")

    # (c) the CPU goal shape: bars per implementation and mode, speed-up over dense annotated
    goal = goal[goal["status"] == "ok"]
    if len(goal):
        impls = [i for i in impls if i in set(goal["implementation"])]
        models = [m for m in ("linear_hw", "nonlinear_hw") if m in set(goal["model"])]
        bars = [(m, mode) for m in models for mode in ("forward", "forward_backward")]
        width = 0.8 / max(1, len(impls))
        for k, impl in enumerate(impls):
            label, colour, _ = IMPL_STYLE[impl]
            for b, (m, mode) in enumerate(bars):
                sel = goal[(goal["implementation"] == impl) & (goal["model"] == m) & (goal["mode"] == mode)]
                if not len(sel):
                    continue
                r = sel.iloc[0]
                x = b + (k - (len(impls) - 1) / 2) * width
                ax_goal.bar(x, r["time_min_s"], width=width, color=colour, alpha=0.9)
                text = _fmt_time(r["time_min_s"])
                if impl != "dense" and isinstance(r["speedup_vs_dense"], float) and not math.isnan(r["speedup_vs_dense"]):
                    text += f"\n{r['speedup_vs_dense']:.1f}x"
                ax_goal.annotate(text, (x, r["time_min_s"]), textcoords="offset points", xytext=(0, 2),
                                 ha="center", va="bottom", fontsize=6.5)
        ax_goal.set_xticks(range(len(bars)))
        ax_goal.set_xticklabels([f"{m}\n{mode.replace('_', ' + ')}" for m, mode in bars], fontsize=8)
        ax_goal.set_yscale("log")
        ax_goal.set_ylabel("time per call (s), best of repeats")
        first = goal.iloc[0]
        ax_goal.set_title(f"(c) T={first['T']}, window {first['window']}, B={first['B']}, H={first['H']}: "
                          f"speed-up over dense (goal >= 5x fwd)", fontsize=9)
        ax_goal.margins(y=0.25)
    else:
        ax_goal.set_axis_off()

    handles, labels = [], []
    for ax in (ax_time, ax_mem):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    shape_note = ""
    if len(series):
        shape_note = f"B={series['B'].iloc[0]}, H={series['H'].iloc[0]}, D={series['D'].iloc[0]}, {model}"
    device = info.get("gpu") or info.get("cpu_model") or (df["device"].iloc[0] if "device" in df else "")
    fig.suptitle(f"Analog attention implementations ({shape_note}) on {device}, "
                 f"torch threads: {info.get('torch_threads', '?')}", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, kw in ((".png", dict(dpi=150)), (".pdf", {})):
        path = out_stem.with_suffix(ext)
        tmp = tmp_path_beside(path)
        fig.savefig(tmp, format=ext[1:], **kw)
        tmp.replace(path)
        paths.append(path)
    plt.close(fig)
    return paths
