"""The study table: every row of ``gaincell.study.table_rows`` on the same fixed validation sequences
(``diagnose/<run>.json`` of the ``diagnose`` stage), the paper's claims tested with paired standard
errors, and how much adaptation recovers for each cell.

Statistics. Each model's loss is a mean over N validation sequences; a difference between two models is
the mean over sequences of the per-sequence difference, and its standard error is the sample standard
deviation of those differences over sqrt(N). This SE covers the choice of validation text only, not the
variance between training seeds: with ``workflow.second_seed`` variants 1, 3 and 5 are trained again with a
second seed, their claims repeated on the replicate (``, seed 2``), and the shift of each difference between
the seeds reported (``summary.json``, ``seed_shift``). An ordering is *resolved* when |difference| exceeds
``diagnose.resolve_se`` SEs; an equivalence holds when the interval difference +- resolve_se SE lies
inside +- ``diagnose.equivalence_margin``. A row's *resolution* is resolve_se times the largest paired SE
of its loss against any other row: loss differences smaller than that are not seen for it, and its
attention share is flagged when it does not exceed that resolution.

Outputs under ``results/<profile>/diagnose/``: ``study_table.csv``, ``claims.csv``, ``cells.csv``,
``health.csv`` (signal health, one row per run, layer and head) and ``summary.json``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import pandas as pd

from gaincell import study
from gaincell.io import atomic_to_csv, atomic_write_json
from gaincell.tracking import Tracker


def paired(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """mean(a - b) and its SE over paired per-sequence values (sample std / sqrt(N))."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"paired: need two equal-length 1-D series of >= 2 values, got shape {d.shape}")
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d)))}


def judge_ordering(diff: float, se: float, resolve_se: float) -> str:
    """Verdict on 'worse has the higher loss' from diff = loss(worse) - loss(better)."""
    if abs(diff) <= resolve_se * se:
        return "not resolved"
    return "holds" if diff > 0 else "reversed"


def judge_equivalence(diff: float, se: float, resolve_se: float, margin: float) -> str:
    """'equivalent' when diff +- resolve_se SE lies inside +-margin; 'different' when it lies outside."""
    if abs(diff) + resolve_se * se < margin:
        return "equivalent"
    if abs(diff) - resolve_se * se > margin:
        return "different"
    return "undetermined"


def claim_rows(losses: Dict[str, np.ndarray], resolve_se: float, margin: float,
               claims: Sequence[study.Claim] = study.CLAIMS, target_se: float = float("inf")) -> List[Dict[str, Any]]:
    rows = []
    for claim in claims:
        p = paired(losses[claim.worse], losses[claim.better])
        if claim.kind == "ordering":
            verdict = judge_ordering(p["mean"], p["se"], resolve_se)
        else:
            verdict = judge_equivalence(p["mean"], p["se"], resolve_se, margin)
        rows.append({"claim": claim.name, "kind": claim.kind, "first": claim.worse, "second": claim.better,
                     "difference": p["mean"], "se": p["se"], "low": p["mean"] - resolve_se * p["se"],
                     "high": p["mean"] + resolve_se * p["se"],
                     "margin": margin if claim.kind == "equivalence" else float("nan"), "verdict": verdict,
                     "se_within_target": bool(p["se"] <= target_se)})
    return rows


def _health_means(record: Dict[str, Any]) -> Dict[str, float]:
    health = record.get("health") or []
    if not health:
        return {}
    mean = {k: float(np.mean([h[k] for h in health])) for k in health[0] if isinstance(health[0][k], float)}
    return {"q_clipped": mean["q_low"] + mean["q_high"], "k_clipped": mean["k_low"] + mean["k_high"],
            "v_clipped": mean["v_low"] + mean["v_high"], "hs_zero": mean["hs_zero"], "hs_sat": mean["hs_sat"],
            "readout_zero": mean["readout_zero"], "readout_sat": mean["readout_sat"],
            "output_zero": mean["output_zero"], "q_bits": mean.get("q_bits", float("nan")),
            "k_bits": mean.get("k_bits", float("nan")), "v_bits": mean.get("v_bits", float("nan"))}


def table_rows(records: Dict[str, Dict[str, Any]], losses: Dict[str, np.ndarray], cfg: Any,
               resolve_se: float) -> List[Dict[str, Any]]:
    rows = []
    tokens = study.tokens_per_iter(cfg)
    table = study.table_rows(bool(cfg.workflow.second_seed))
    for row in table:
        rec, loss = records[row.run], losses[row.run]
        others = [paired(loss, losses[o.run])["se"] for o in table if o.run != row.run]
        resolution = resolve_se * max(others)
        vs = paired(loss, losses["softmax"]) if row.run != "softmax" else {"mean": 0.0, "se": 0.0}
        share, mean_share = rec["attention_share"]["zero"], rec["attention_share"]["mean"]
        iters = study.chain_iters(row.run, cfg)
        rows.append({
            "run": row.run, "label": row.label, "role": row.role, "cell": row.cell or _own_cell(cfg),
            "attention": "+".join(rec["attention"]), "iterations": iters, "tokens": iters * tokens,
            "val_loss": float(loss.mean()), "val_loss_se": float(loss.std(ddof=1) / math.sqrt(len(loss))),
            "minus_softmax": vs["mean"], "minus_softmax_se": vs["se"], "resolution": resolution,
            "share_zero": share["mean"], "share_zero_se": share["se"],
            "share_mean": mean_share["mean"], "share_mean_se": mean_share["se"],
            "share_below_resolution": bool(share["mean"] - resolve_se * share["se"] <= resolution),
            **_health_means(rec)})
    return rows


def _own_cell(cfg: Any) -> str:
    c = cfg.attention.coefficients
    return c if isinstance(c, str) else "custom"


def cell_rows(losses: Dict[str, np.ndarray], cfg: Any) -> List[Dict[str, Any]]:
    """Per cell: loss of the linear model, mapped and adapted (and fine-tuned for the profile's cell);
    degradation = mapped - linear, recovered = mapped - adapted, each with its paired SE."""
    cells = [(_own_cell(cfg), "nonlinear_mapped", "nonlinear_adapted", "nonlinear_finetuned")]
    cells += [(c, f"nonlinear_mapped_{c}", f"nonlinear_adapted_{c}", None) for c in study.CELLS]
    rows = []
    for cell, mapped, adapted, finetuned in cells:
        lin = losses["linear_hw"]
        deg, rec = paired(losses[mapped], lin), paired(losses[mapped], losses[adapted])
        rows.append({"cell": cell, "linear": float(lin.mean()), "mapped": float(losses[mapped].mean()),
                     "adapted": float(losses[adapted].mean()),
                     "finetuned": float(losses[finetuned].mean()) if finetuned else float("nan"),
                     "degradation": deg["mean"], "degradation_se": deg["se"],
                     "recovered": rec["mean"], "recovered_se": rec["se"],
                     "recovered_fraction": rec["mean"] / deg["mean"] if deg["mean"] != 0 else float("nan"),
                     "mapped_run": mapped, "adapted_run": adapted, "finetuned_run": finetuned or ""})
    return rows


def health_table(records: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for run, record in records.items():
        for h in record.get("health") or []:
            flat = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in h.items()}
            rows.append({"run": run, **flat})
    return rows


def seed_shift(claims: List[Dict[str, Any]]) -> Dict[str, float]:
    """For each claim repeated on the second-seed replicate (``<name>, seed 2``): seed-2 minus seed-1 difference,
    how far a training seed moves the comparison (to set beside the paired SEs, which exclude it)."""
    by_name = {c["claim"]: c["difference"] for c in claims}
    return {name[:-len(", seed 2")]: diff - by_name[name[:-len(", seed 2")]] for name, diff in by_name.items()
            if name.endswith(", seed 2") and name[:-len(", seed 2")] in by_name}


def load_records(diagnose_dir: Path, rows: Sequence[study.Row] = study.TABLE_ROWS) -> Dict[str, Dict[str, Any]]:
    records = {}
    for row in rows:
        path = diagnose_dir / f"{row.run}.json"
        if not path.is_file():
            raise FileNotFoundError(f"study table: {path} is missing: run the diagnose stage for {row.run}")
        records[row.run] = json.loads(path.read_text())
    counts = {r["sequences"] for r in records.values()}
    if len(counts) != 1:
        raise ValueError(f"study table: rows were evaluated on different numbers of sequences {sorted(counts)}: "
                         f"rerun diagnose with one diagnose.sequences")
    return records


def run(cfg) -> Dict[str, Any]:
    """``python -m gaincell study_table``: the study table, claims and cell summary from diagnose/*.json."""
    d = cfg.diagnose
    out = Path(str(cfg.results_dir)) / "diagnose"
    second_seed = bool(cfg.workflow.second_seed)
    records = load_records(out, study.table_rows(second_seed))
    losses = {k: np.asarray(v["sequence_losses"], dtype=np.float64) for k, v in records.items()}
    k, margin = float(d.resolve_se), float(d.equivalence_margin)
    tables = {"study_table": table_rows(records, losses, cfg, k), "claims": claim_rows(losses, k, margin, study.claims(second_seed),
                                                                          float(d.target_se)),
              "cells": cell_rows(losses, cfg), "health": health_table(records)}
    for name, rows in tables.items():
        atomic_to_csv(pd.DataFrame(rows), out / f"{name}.csv")
    worst_se = max(c["se"] for c in tables["claims"])
    close = [c["se"] for c in tables["claims"] if abs(c["difference"]) < float(d.close_difference)]
    shift = seed_shift(tables["claims"])
    summary = {"sequences": len(next(iter(losses.values()))), "second_seed": second_seed, "resolve_se": k, "equivalence_margin": margin,
               "target_se": float(d.target_se), "worst_claim_se": worst_se,
               "target_se_met": bool(worst_se <= float(d.target_se)),
               "claims_within_target_se": sum(c["se_within_target"] for c in tables["claims"]),
               "claims_tested": len(tables["claims"]),
               # the SE of a paired difference grows with the difference (per-sequence differences spread):
               # the target matters for the close comparisons, where a claim could flip
               "close_difference": float(d.close_difference),
               "worst_close_claim_se": max(close) if close else float("nan"),
               "seed_variance": ("not in the paired SEs; second-seed replicate of variants 1, 3, 5: see seed_shift"
                                 if shift else "not included: one training seed per run"),
               "seed_shift": shift,
               "claims": {c["claim"]: c["verdict"] for c in tables["claims"]}}
    atomic_write_json(out / "summary.json", summary)
    tracker = Tracker(cfg, run_name="study_table", job_type="diagnose")
    if tracker.wandb_run is not None:
        import wandb

        tracker.wandb_run.log({f"study/{n}": wandb.Table(dataframe=pd.DataFrame(r)) for n, r in tables.items() if r})
    tracker.summary({"worst_claim_se": worst_se, **{f"claim/{c}": v for c, v in summary["claims"].items()}})
    tracker.finish()
    print(pd.DataFrame(tables["study_table"])[["run", "iterations", "val_loss", "minus_softmax", "minus_softmax_se",
                                               "share_zero", "share_below_resolution"]].to_string(index=False))
    print(pd.DataFrame(tables["claims"])[["claim", "difference", "se", "verdict"]].to_string(index=False))
    return summary
