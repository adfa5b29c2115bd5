"""Checks that a finished pipeline run left every expected output, and that none is trivial.

    python -m gaincell.workflow_check results/ci

Used by CI after the end-to-end run on the ``ci`` profile. Exit status 1 lists what is missing.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, List, Tuple

from gaincell import study

VARIANTS = list(study.VARIANT_RUNS)
TRAINED_RUNS = [r.name for r in study.runs("train")]      # checkpoints/<run>/final.pt + train/<run>/metrics.csv
ADAPTED_RUNS = [r.name for r in study.runs("adapt")]      # checkpoints/<run>/ckpt.pt + adapt/<run>/summary.json
CONVERTED_RUNS = [r.name for r in study.runs("convert")]  # checkpoints/<run>/final.pt (no training)
NOISE_SEED_VARIANTS = [v.run for v in study.VARIANTS if v.noise_seeds]  # val_loss over inference-noise seeds
RULES_WITH_BENCHMARKS = (["characterize", "fit", "prepare_data"]
                         + [r.rule for r in study.RUNS if r.training != "adapt"]
                         + ["leakage_sweep", "variation_sweep", "gpu_baseline", "hardware_estimates", "figures",
                            "generate_sample"])
# Figures every complete run must make (paper Figs. 1e, 1h, 2, 3, 4, 5 and Table 1, at the profile's scale).
REQUIRED_FIGURES = ["device_characteristic", "device_retention", "device_array", "device_vs_paper",
                    "training_curves", "adapt_statistics", "adapt_convergence", "leakage", "study", "eval_tasks",
                    "hardware_breakdown", "hardware_scaling", "hardware_gpu_comparison",
                    "device_mismatch", "variation", "analog_noise", "analog_energy",
                    "study_claims", "signal_health", "nonlinearity"]


def _json(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def _nonempty(path: Path, min_bytes: int = 1) -> Tuple[bool, str]:
    if not path.exists():
        return False, "missing"
    size = path.stat().st_size
    return (size >= min_bytes, f"{size} bytes (< {min_bytes})" if size < min_bytes else "")


def _figure_problems(index_path: Path) -> List[str]:
    """The figure index: no figure failed, every required figure made, every PNG non-trivial."""
    if not index_path.exists():
        return ["figures/index.json: missing"]
    problems = []
    index = _json(index_path)
    if index.get("failed"):
        problems.append(f"figures failed: {index['failed']}")
    missing = [name for name in REQUIRED_FIGURES if name not in index.get("made", {})]
    if missing:
        problems.append(f"figures not made: {', '.join(missing)}")
    for name, entry in index.get("made", {}).items():
        for f in entry["files"]:
            if f.endswith(".png"):
                ok, why = _nonempty(Path(f), 10_000)
                if not ok:
                    problems.append(f"figure {name}: {f}: {why}")
    return problems


def _second_seed(results_dir: Path) -> bool:
    """Whether the run made the second-seed replicate (``workflow.second_seed``, recorded by study_table)."""
    try:
        return bool(_json(results_dir / "diagnose" / "summary.json").get("second_seed", False))
    except (OSError, ValueError):
        return False  # no study summary: reported missing below; the replicate is not asked for


def check(results_dir: Path) -> List[str]:
    """Problems found (empty when the run is complete)."""
    r = Path(results_dir)
    problems: List[str] = []
    second = _second_seed(r)
    made = [run.name for run in study.RUNS if not study.in_use(run.name, second)]  # runs this profile skips
    table, claims = study.table_rows(second), study.claims(second)

    def need(rel: str, min_bytes: int = 1, test: Callable[[Path], str] | None = None) -> None:
        path = r / rel
        ok, why = _nonempty(path, min_bytes)
        if not ok:
            problems.append(f"{rel}: {why}")
            return
        if test is not None:
            try:
                msg = test(path)
            except Exception as err:  # a malformed file is a finding, not a crash
                msg = f"unreadable: {type(err).__name__}: {err}"
            if msg:
                problems.append(f"{rel}: {msg}")

    def coefficients_ok(path: Path) -> str:
        coeffs = _json(path).get("coefficients", [])
        if len(coeffs) != 10 or not all(isinstance(c, (int, float)) for c in coeffs):
            return f"expected 10 coefficients, got {coeffs!r}"
        return "" if any(abs(c) > 0 for c in coeffs) else "all coefficients are zero"

    def noise_spread_ok(path: Path) -> str:
        spread = _json(path).get("val_loss_spread")
        if not isinstance(spread, (int, float)) or not spread > 0:  # 0: the inference noise was not applied
            return f"val_loss_spread over inference-noise seeds is {spread!r}, expected > 0"
        return ""

    def csv_rows(min_rows: int) -> Callable[[Path], str]:
        def test(path: Path) -> str:
            rows = path.read_text().strip().splitlines()
            return "" if len(rows) - 1 >= min_rows else f"{len(rows) - 1} data rows (< {min_rows})"
        return test

    need("device/summary.json", 20)
    need("fit/coefficients.json", 50, coefficients_ok)
    need("data/meta.json", 10)
    need("data/train.bin", 10_000)
    need("data/val.bin", 1_000)
    for run in (n for n in TRAINED_RUNS if n not in made):
        need(study.checkpoint(run), 10_000)
        need(f"train/{run}/metrics.csv", 20, csv_rows(1))
    for run in (n for n in ADAPTED_RUNS if n not in made):
        need(study.checkpoint(run), 10_000)
        need(f"adapt/{run}/summary.json", 10)
    for run in CONVERTED_RUNS:
        need(study.checkpoint(run), 10_000)
    for variant in VARIANTS:
        need(f"eval/{variant}/results.csv", 20, csv_rows(2))
        need(f"adapt/study/{variant}.json", 10, noise_spread_ok if variant in NOISE_SEED_VARIANTS else None)
    leak = r / "adapt" / "leakage"
    if not leak.is_dir() or len(list(leak.glob("*.json"))) < 3:
        problems.append("adapt/leakage: fewer than 3 leakage points")
    for row in table:  # the study table (issue 15): every row on the same validation sequences
        need(f"diagnose/{row.run}.json", 100)
    for name, rows in (("study_table", len(table)), ("claims", len(claims)), ("cells", 1 + len(study.CELLS))):
        need(f"diagnose/{name}.csv", 20, csv_rows(rows))
    variation = r / "adapt" / "variation"
    if not variation.is_dir() or len(list(variation.glob("*.json"))) < 3:
        problems.append("adapt/variation: fewer than 3 variation / readout-noise points")
    need("hardware/estimates.json", 20)
    need("hardware/gpu_baseline.json", 20)
    need(f"samples/{study.SAMPLE_RUN}.txt", 20)
    problems += _figure_problems(r / "figures" / "index.json")
    skipped = {study.RUNS_BY_NAME[n].rule for n in made}
    for rule in (x for x in RULES_WITH_BENCHMARKS if x not in skipped):
        need(f"logs/benchmarks/{rule}.tsv", 10)
    return problems


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m gaincell.workflow_check results/<profile>", file=sys.stderr)
        return 2
    problems = check(Path(argv[0]))
    if problems:
        print(f"workflow check: {len(problems)} problem(s) in {argv[0]}:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"workflow check: every expected output of {argv[0]} is present and non-trivial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
