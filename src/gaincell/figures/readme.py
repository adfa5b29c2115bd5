"""The README's results section, regenerated from one run's ``results/<profile>/`` (never edited by hand).

    .venv/bin/python -m gaincell.figures.readme results/tiny README.md      (make readme-results)

Replaces the text between ``<!-- results:begin -->`` and ``<!-- results:end -->`` with: the run's time
(the Snakemake benchmark of every rule, and the ideal-schedule analysis when it was made), the cell, fit,
mismatch and hardware numbers, each labelled *measured* (computed here), *imposed* (fixed by a
normalisation) or *paper* (an input taken from the paper), then every markdown table the ``figures``
stage wrote (the study table with its resolved orderings, diagnostics, nonlinearity summary, ...).
A file the section needs that the run did not produce is an error naming it: a partial run gives no README.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import pandas as pd

from gaincell.figures._common import read_csv, read_json
from gaincell.io import atomic_write_text

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def pipeline_rows(results: Path, profile: str) -> list[str]:
    """The run's time from its own records: every rule's benchmark TSV and the schedule analysis."""
    tsvs = sorted((results / "logs" / "benchmarks").glob("*.tsv"))
    if not tsvs:
        raise FileNotFoundError(f"{results}/logs/benchmarks: no rule benchmarks; run the pipeline first")
    times = {p.stem: float(pd.read_csv(p, sep="\t")["s"].iloc[-1]) for p in tsvs}
    longest = max(times, key=times.get)
    rows = [f"| rules run | {len(times)} (summed rule time {sum(times.values()) / 60:.1f} min; longest "
            f"`{longest}` {times[longest] / 60:.1f} min) | measured |"]
    schedule = results.parent / "benchmarks" / f"pipeline_schedule_{profile}.json"
    if schedule.is_file():
        s = json.loads(schedule.read_text())
        rows.append(f"| pipeline wall time on {s.get('cores', '?')} cores | {s['measured_wall_s'] / 60:.1f} min; "
                    f"ideal schedule of the same rule times {s['ideal_s'] / 60:.1f} min "
                    f"(critical path {s['critical_path_s'] / 60:.1f} min), ratio {s['ratio_wall_to_ideal']:.2f} "
                    f"| measured |")
    return rows


def cell_rows(results: Path) -> list[str]:
    """SPICE numbers of the cell, the array and the fit, with the paper's beside them."""
    dev, fit = read_json(results / "device" / "summary.json"), read_json(results / "fit" / "coefficients.json")
    rows = [f"| cell | {dev.get('cell_kind', '?')} read against {dev.get('reference_v', '?')} V; "
            f"full-scale current {dev['full_scale_current_a'] * 1e6:.2f} uA; "
            f"{dev['mac_energy_j'] * 1e15:.0f} fJ per multiply, {dev['write_energy_j'] * 1e15:.2f} fJ per write "
            f"| measured (sky130 SPICE) | TSMC 28 nm, ~ +-10 uA |",
            f"| retention | tau {dev['retention_tau_s'] * 1e3:.0f} ms from the initial slope "
            f"(whole-curve exponential {dev['retention_exp_fit_tau_s'] * 1e3:.0f} ms) | measured | 5 ms |",
            f"| array {dev['array_rows']} x {dev['array_cols']} with parasitics | "
            f"{dev['array_error_rms_relative_to_full_scale'] * 100:.2f} % rms error vs the ideal sum; "
            f"{dev['array_op_energy_j'] * 1e12:.1f} pJ, {dev['array_op_latency_ns']:.1f} ns per operation "
            f"| measured | 0.26 % (64 x 64) |"]
    coeff = "; ".join(f"c{i} = {r['value']:.3f} +- {r['standard_error']:.3f} ({r['status']})"
                      for i, r in enumerate(fit["coefficient_report"]))
    rows.append(f"| fit (folded, y = K - 0.45 V) | {coeff} | measured / imposed as marked "
                f"| 0.521, 13.612, -2.620, 46.055 |")
    rows.append(f"| linear model's gain g (fitted slope) | {fit['linear_slope']:.2f} +- "
                f"{fit['linear_slope_standard_error']:.2f} | measured | 19.3 |")
    mm = fit.get("mismatch") or {}
    if mm.get("available"):
        rows.append(f"| cell-to-cell mismatch ({mm['cells']} Monte-Carlo cells, sigma(Vth) "
                    f"{mm['vth_sigma_v'] * 1e3:.1f} mV) | gain spread sigma(c1)/c1 = "
                    f"{mm['gain_spread_relative'] * 100:.1f} +- {mm['gain_spread_relative_standard_error'] * 100:.1f} %; "
                    f"offset spread sigma(c0) = {mm['offset_spread']:.3f} ({mm['offset_spread_over_c1'] * 100:.1f} % "
                    f"of c1) | measured | not reported |")
    return rows


def hardware_rows(results: Path) -> list[str]:
    """The cost model's per-token figures for each parameter set, labelled by where its inputs come from."""
    est = read_json(results / "hardware" / "estimates.json")
    rows = []
    for name, entry in est["sets"].items():
        e = entry["estimate"]
        label = "paper's energies restated (an input, not a reproduction)" if name == "paper" else \
            "energies our SPICE measures where simulated, the rest from the paper (see the breakdown figure)"
        rows.append(f"| hardware, `{name}` set | {e['latency_per_token_ns']:.0f} ns per token, "
                    f"{e['energy_per_head_per_token_nj']:.2f} nJ per head per token, "
                    f"{e['area_per_head_um2'] / 1e6:.3f} mm^2 per head | {label} | 65 ns, 6.15 nJ |")
    return rows


def _markdown(df: pd.DataFrame) -> list[str]:
    """A small DataFrame as a markdown table (floats to 4 decimals, missing values blank)."""
    def cell(v):
        if isinstance(v, float):
            return "" if v != v else f"{v:.4f}"
        return str(v)
    return ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False))]


# What the study stage (``diagnose/``) measured, and the columns of each that the README shows.
STUDY_TABLES = {
    "study_table.csv": ("the study (paired SE over per-sequence mean losses; attention share = loss with "
                        "every attention output zeroed minus the loss)",
                        ["label", "iterations", "tokens", "val_loss", "val_loss_se", "minus_softmax",
                         "minus_softmax_se", "share_zero", "share_zero_se", "share_below_resolution"]),
    "claims.csv": ("the paper's claims, resolved only beyond 2 paired SE (equivalence: interval inside the margin)",
                   ["claim", "difference", "se", "low", "high", "margin", "verdict", "se_within_target"]),
    "cells.csv": ("the nonlinearity study: per cell, loss of the linear / mapped / adapted (/ fine-tuned) "
                  "models and the fraction of the mapping loss that adaptation recovers",
                  ["cell", "linear", "mapped", "adapted", "finetuned", "recovered_fraction"]),
}


def study_summary(results: Path) -> list[str]:
    """How well the study resolves its comparisons (``diagnose/summary.json``): sequences, worst paired SE
    over all claims and over the close ones, and what a second training seed moves."""
    s = read_json(results / "diagnose" / "summary.json")
    within = (f"{s['claims_within_target_se']} of {s['claims_tested']} claims have a paired SE within the target; "
              if "claims_tested" in s else "")
    lines = [f"Study resolution (measured): {s['sequences']} validation sequences per model; {within}worst paired SE "
             f"of a claim {s['worst_claim_se']:.4f} nats/token (target {s['target_se']:g}; the SE of a paired "
             f"difference grows with the difference), worst over claims closer than {s['close_difference']:g} "
             f"nats/token {s['worst_close_claim_se']:.4f}. Training-seed variance: {s['seed_variance']}."]
    shift = s.get("seed_shift") or {}
    if shift:
        lines.append("Second training seed minus first, same claim (nats/token): " + "; ".join(
            f"{name}: {value:+.4f}" for name, value in shift.items()) + ".")
    return [" ".join(lines), ""]


def study_tables(results: Path) -> list[str]:
    """The study's tables from ``diagnose/``, each with its columns that a reader needs."""
    parts = study_summary(results)
    for name, (title, columns) in STUDY_TABLES.items():
        df = read_csv(results / "diagnose" / name)
        parts += [f"#### {title} (`diagnose/{name}`)", "", *_markdown(df[[c for c in columns if c in df]]), ""]
    return parts


# What each markdown table of the figures stage measures, where a reader could mistake it for another.
FIGURE_TABLE_CAPTIONS = {
    "study_table.md": ("every variant on the adaptation stage's fixed validation batches (fewer sequences than "
                       "the study above, so larger SE), with the fully analog rows 7-8 (mean +- sd over "
                       "inference-noise seeds); 'training it.' counts only the run's own iterations"),
}


def variation_table(results: Path) -> list[str]:
    """Validation loss of each swept model at every point of the variation / noise sweep (one chip per
    point unless the profile draws more; the 0 point is shared by the knobs)."""
    rows = []
    for path in sorted((results / "adapt" / "variation").glob("*.json")):
        point = json.loads(path.read_text())
        for run, model in point["models"].items():
            rows.append({"knob": point["knob"], "value": float(point["value"]), "model": run,
                         "val_loss": model["val_loss"], "chips": point["chips"]})
    if not rows:
        raise FileNotFoundError(f"{results}/adapt/variation: no sweep points; run the whole pipeline first")
    table = pd.DataFrame(rows).pivot_table(index=["knob", "value", "chips"], columns="model",
                                           values="val_loss").reset_index()
    return ["#### validation loss vs cell gain spread, cell offset spread and readout noise "
            "(`adapt/variation/`, figure `variation.png`)", "", *_markdown(table), ""]


def markdown_tables(results: Path) -> list[str]:
    """Every markdown table the figures stage wrote, under its file name."""
    parts = []
    for path in sorted((results / "figures").glob("*.md")):
        if path.name == "captions.md":
            continue
        caption = FIGURE_TABLE_CAPTIONS.get(path.name, "")
        parts += [f"#### `figures/{path.name}`{': ' + caption if caption else ''}", "", path.read_text().strip(), ""]
    return parts


def results_section(results: Path, profile: str) -> str:
    head = ["| what | our result | label | paper |", "|---|---|---|---|"]
    lines = [f"Generated by `make readme-results` from `{results}` on {time.strftime('%Y-%m-%d')} "
             f"({_cpu()}). *measured*: computed in this run; *imposed*: fixed by a normalisation; "
             f"*paper*: an input taken from the paper.", "",
             "| what | our result | label |", "|---|---|---|", *pipeline_rows(results, profile), "",
             *head, *cell_rows(results), *hardware_rows(results), "", *study_tables(results), *variation_table(results),
             *markdown_tables(results)]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, section: str) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: no {BEGIN} ... {END} markers to replace")
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    atomic_write_text(readme, f"{before}{BEGIN}\n{section}{END}{after}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results/<profile> of a complete run")
    parser.add_argument("readme", type=Path, nargs="?", default=Path("README.md"))
    args = parser.parse_args(argv)
    update_readme(args.readme, results_section(args.results, args.results.name))


if __name__ == "__main__":
    main()
