"""Stage ``hardware_estimates``: the cost model at the paper's design point, for our model, and swept.

Writes under ``results/<profile>/hardware/``:

* ``estimates.json``: the design point (window, head dim, heads, layers, tile, cell) for each parameter set
  (``paper``; ``simulated`` from our device stage when its summary exists), the published totals and the
  relative error against them, the estimate for this profile's own model shape, and every parameter with
  unit and source;
* ``parameters.csv`` (set, name, value, unit, source, doc) and ``breakdown.csv`` (tidy: set, quantity,
  part, value, unit);
* ``sweep_window.csv``, ``sweep_head_dim.csv``, ``sweep_heads_layers.csv``, ``sweep_tile.csv``,
  ``sweep_retention.csv``, ``sweep_technology.csv``: one row per design point, one knob varied.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import pandas as pd

from gaincell.hardware.costmodel import (
    PAPER_ENERGY_BREAKDOWN_NJ,
    PAPER_ENERGY_PER_HEAD_PER_TOKEN_NJ,
    PAPER_LATENCY_PER_TOKEN_NS,
    TECHNOLOGIES,
    AnalogTileParameters,
    HardwareEstimate,
    HardwareParameters,
    attention_share,
    energy_components_nj,
    estimate,
    estimate_projections,
)
from gaincell.io import atomic_to_csv, atomic_write_json
from gaincell.tracking import Tracker


def flatten(est: HardwareEstimate) -> Dict[str, Any]:
    """One CSV row: scalars as they are, breakdowns as ``energy_<part>_nj`` / ``area_<part>_um2`` / ``latency_<part>_ns``."""
    row: Dict[str, Any] = {}
    for key, value in est.to_dict().items():
        if key == "energy_breakdown_nj":
            row.update({f"energy_{k}_nj": v for k, v in value.items()})
        elif key == "area_breakdown_um2":
            row.update({f"area_{k}_um2": v for k, v in value.items()})
        elif key == "latency_breakdown_ns":
            row.update({f"latency_{k}_ns": v for k, v in value.items()})
        else:
            row[key] = value
    return row


def parameter_sets(hw: Any) -> Tuple[Dict[str, HardwareParameters], Dict[str, str]]:
    """The configured parameter sets at the configured tile and cell; skipped sets with the reason."""
    sets: Dict[str, HardwareParameters] = {}
    skipped: Dict[str, str] = {}
    for name in hw.parameter_sets:
        if name == "paper":
            params = HardwareParameters.paper()
        elif name == "simulated":
            try:
                params = HardwareParameters.simulated(hw.device_summary_path)
            except FileNotFoundError as err:
                skipped[name] = str(err)
                print(f"hardware_estimates: skipping the simulated set: {err}")
                continue
        else:
            raise ValueError(f"hardware.parameter_sets entry {name!r}: expected paper or simulated")
        # The cell sets the area; the set keeps its own tau (paper: the 5 ms leakage model; ours: SPICE).
        params = params.with_technology(str(hw.cell_technology), int(hw.stack_layers), retention=False)
        sets[name] = params.replace(tile_rows=int(hw.tile_rows), tile_cols=int(hw.tile_cols))
    if not sets:
        raise ValueError("hardware.parameter_sets gave no usable parameter set " + str(skipped))
    return sets, skipped


def _rows(sweep: str, knob: str, points: Iterable[Tuple[Any, HardwareParameters, Dict[str, int]]],
          set_name: str, extra: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    rows = []
    for value, params, size in points:
        row = {"sweep": sweep, "set": set_name, "knob": knob, "knob_value": value, **(extra or {})}
        row.update(flatten(estimate(params, **size)))
        rows.append(row)
    return rows


def sweeps(hw: Any, sets: Dict[str, HardwareParameters]) -> Dict[str, List[Dict[str, Any]]]:
    """Every sweep of the config: one list of rows per CSV."""
    size = dict(window=int(hw.window), head_dim=int(hw.head_dim), heads=int(hw.heads), layers=int(hw.layers))
    out: Dict[str, List[Dict[str, Any]]] = {k: [] for k in ("window", "head_dim", "heads_layers", "tile",
                                                            "retention", "technology")}
    for name, params in sets.items():
        out["window"] += _rows("window", "window", [(w, params, {**size, "window": int(w)})
                                                    for w in hw.sweep_windows], name)
        out["head_dim"] += _rows("head_dim", "head_dim", [(d, params, {**size, "head_dim": int(d)})
                                                          for d in hw.sweep_head_dims], name)
        out["heads_layers"] += _rows("heads_layers", "heads", [(h, params, {**size, "heads": int(h)})
                                                               for h in hw.sweep_heads], name)
        out["heads_layers"] += _rows("heads_layers", "layers", [(n, params, {**size, "layers": int(n)})
                                                                for n in hw.sweep_layers], name)
        tiles = [int(t) for t in hw.sweep_tile_sizes if int(hw.window) % int(t) == 0]
        out["tile"] += _rows("tile", "tile_size", [(t, params.replace(tile_rows=t, tile_cols=t), size)
                                                   for t in tiles], name)
        out["retention"] += _rows("retention", "retention_tau_s",
                                  [(float(tau), params.replace(retention_tau_s=float(tau)), size)
                                   for tau in hw.sweep_retention_tau_s], name)
        tech_points = [(tech, params.with_technology(tech), size) for tech in TECHNOLOGIES]
        tech_points += [(f"ito_2t_3d{n}", params.with_technology("ito_2t", int(n)), size)
                        for n in hw.sweep_stack_layers if int(n) > 1]
        for label, p, s in tech_points:
            out["technology"] += _rows("technology", "cell_technology", [(label, p, s)], name,
                                       {"signed_cell_area_um2": p.signed_cell_area_um2})
    return out


def projection_estimates(hw: Any, params: HardwareParameters) -> Dict[str, Any]:
    """The projections on analog weight tiles (literature tile figures, both HERMES read modes) beside the
    gain-cell attention of ``params`` at the design point: each one's energy and latency per token, the
    attention's share of them, and that share over ``hardware.sweep_windows`` (the attention grows with the
    window, the projections do not)."""
    size = dict(window=int(hw.window), head_dim=int(hw.head_dim), heads=int(hw.heads), layers=int(hw.layers))
    d_model = size["heads"] * size["head_dim"]
    out: Dict[str, Any] = {"attention_parameter_set": params.name, "d_model": d_model, "sets": {}}
    for tiles in (AnalogTileParameters.hermes_one_phase(), AnalogTileParameters.hermes_four_phase()):
        proj = estimate_projections(tiles, d_model, size["layers"])
        sweep = []
        for window in hw.sweep_windows:
            if int(window) % params.tile_rows:
                continue
            share = attention_share(estimate(params, **{**size, "window": int(window)}), proj)
            sweep.append({"window": int(window), **share})
        out["sets"][tiles.name] = {"estimate": proj.to_dict(), "parameters": tiles.describe(),
                                   "design_point": attention_share(estimate(params, **size), proj),
                                   "window_sweep": sweep}
    return out


def relative_errors(est: HardwareEstimate) -> Dict[str, float]:
    """Estimate / published - 1 for the paper's totals and energy parts."""
    errs = {"latency_per_token": est.latency_per_token_ns / PAPER_LATENCY_PER_TOKEN_NS - 1,
            "energy_per_head_per_token": est.energy_per_head_per_token_nj / PAPER_ENERGY_PER_HEAD_PER_TOKEN_NJ - 1}
    errs.update({f"energy_{k}": est.energy_breakdown_nj[k] / v - 1 for k, v in PAPER_ENERGY_BREAKDOWN_NJ.items()})
    return errs


def _profile_model(cfg: Any, sets: Dict[str, HardwareParameters]) -> Dict[str, Any]:
    """This profile's own model (its window, heads, head dim, layers), with the paper's parameters."""
    try:
        n_head, n_embd = cfg.model.n_head, cfg.model.n_embd
        model_params = sets.get("paper") or next(iter(sets.values()))
        model_params = model_params.replace(tile_rows=cfg.attention.tile_rows)
        est = estimate(model_params, window=cfg.attention.window, head_dim=n_embd // n_head, heads=n_head,
                       layers=cfg.model.n_layer)
        return {"estimate": est.to_dict(), "parameter_set": model_params.name}
    except ValueError as err:
        return {"skipped": str(err)}


def _write_tables(out_dir: Path, design: Dict[str, Any], tables: Dict[str, List[Dict[str, Any]]]) -> None:
    """parameters.csv, breakdown.csv (energy, area, latency per part) and one sweep_<knob>.csv per sweep."""
    atomic_to_csv(pd.DataFrame([{"set": n, **r} for n, d in design.items() for r in d["parameters"]]),
                  out_dir / "parameters.csv")
    breakdown = []
    for name, d in design.items():
        e = d["estimate"]
        for quantity, key, unit in (("energy", "energy_breakdown_nj", "nJ per head per token"),
                                    ("area", "area_breakdown_um2", "um^2 per head"),
                                    ("latency", "latency_breakdown_ns", "ns per token")):
            breakdown += [{"set": name, "quantity": quantity, "part": k, "value": v, "unit": unit}
                          for k, v in e[key].items()]
    atomic_to_csv(pd.DataFrame(breakdown), out_dir / "breakdown.csv")
    for key, rows in tables.items():
        atomic_to_csv(pd.DataFrame(rows), out_dir / f"sweep_{key}.csv")



def _print_summary(design: Dict[str, Any], projections: Dict[str, Any], profile_model: Dict[str, Any]) -> None:
    for name, d in design.items():
        e, err = d["estimate"], d["relative_error_vs_paper"]
        print(f"hardware_estimates [{name}] window {e['window']}, D {e['head_dim']}, {e['heads']} heads: "
              f"{e['latency_per_token_ns']:.1f} ns/token ({err['latency_per_token']:+.1%} vs 65), "
              f"{e['energy_per_head_per_token_nj']:.3f} nJ/head/token ({err['energy_per_head_per_token']:+.1%} vs 6.15), "
              f"{e['energy_per_token_nj']:.1f} nJ/token, {e['area_per_head_um2'] / 1e6:.3f} mm^2/head")
    for name, d in projections["sets"].items():
        share = d["design_point"]
        print(f"hardware_estimates [projections on analog tiles, {name}] {share['projection_energy_nj']:.0f} nJ "
              f"and {share['projection_latency_ns']:.0f} ns per token (all layers); the attention is "
              f"{share['attention_energy_share']:.1%} of the token's energy, {share['attention_latency_share']:.1%} "
              f"of its latency")
    if "estimate" in profile_model:
        e = profile_model["estimate"]
        print(f"hardware_estimates [profile model] window {e['window']}, D {e['head_dim']}, {e['heads']} heads x "
              f"{e['layers']} layers: {e['latency_all_layers_ns']:.0f} ns, {e['energy_all_layers_nj']:.1f} nJ per token")


def run(cfg: Any) -> Dict[str, Any]:
    """Stage ``hardware_estimates``."""
    hw = cfg.hardware
    out_dir = Path(cfg.results_dir) / "hardware"
    sets, skipped = parameter_sets(hw)
    size = dict(window=int(hw.window), head_dim=int(hw.head_dim), heads=int(hw.heads), layers=int(hw.layers))

    design: Dict[str, Any] = {}
    for name, params in sets.items():
        est = estimate(params, **size)
        design[name] = {"estimate": est.to_dict(), "relative_error_vs_paper": relative_errors(est),
                        "energy_components_nj": energy_components_nj(params, size["window"], size["head_dim"]),
                        "parameters": params.describe()}

    profile_model = _profile_model(cfg, sets)
    tables = sweeps(hw, sets)
    projections = projection_estimates(hw, sets.get("paper") or next(iter(sets.values())))
    summary = {
        "schema": 1,
        "design_point": {**size, "tile_rows": int(hw.tile_rows), "tile_cols": int(hw.tile_cols),
                         "cell_technology": str(hw.cell_technology), "stack_layers": int(hw.stack_layers),
                         "note": "every set uses hardware.cell_technology for the area and keeps its own "
                                 "retention tau (paper: the 5 ms leakage model; simulated: our SPICE)"},
        "published": {"latency_per_token_ns": PAPER_LATENCY_PER_TOKEN_NS,
                      "energy_per_head_per_token_nj": PAPER_ENERGY_PER_HEAD_PER_TOKEN_NJ,
                      "energy_per_token_nj_12_heads": 12 * PAPER_ENERGY_PER_HEAD_PER_TOKEN_NJ,
                      "energy_breakdown_nj": PAPER_ENERGY_BREAKDOWN_NJ,
                      "source": "Leroux et al., Nat. Comput. Sci. 2025 (Methods, Fig. 2c, Fig. 5; docs/hardware.md)"},
        "sets": design,
        "skipped_sets": skipped,
        "profile_model": profile_model,
        "projections": projections,  # beyond the paper: projections on analog weight tiles (literature inputs)
        "technologies": {k: dataclasses.asdict(v) for k, v in TECHNOLOGIES.items()},
        "sweeps": {k: f"sweep_{k}.csv" for k in tables},
    }
    atomic_write_json(out_dir / "estimates.json", summary)
    _write_tables(out_dir, design, tables)
    _print_summary(design, projections, profile_model)
    _log(cfg, design, out_dir)
    return summary


def _log(cfg: Any, design: Dict[str, Any], out_dir: Path) -> None:
    """Best-effort W&B/CSV logging through gaincell.tracking (a tracking failure never fails the stage):
    the design point's numbers as the summary, every table written to ``out_dir`` as a W&B table."""
    try:
        tracker = Tracker(cfg, run_name="hardware_estimates", job_type="hardware_estimates")
        flat = {}
        for name, d in design.items():
            e = d["estimate"]
            for key in ("latency_per_token_ns", "energy_per_head_per_token_nj", "energy_per_token_nj",
                        "area_per_head_um2"):
                flat[f"{name}/{key}"] = e[key]
        tracker.summary(flat)
        for table in sorted(Path(out_dir).glob("*.csv")):
            tracker.log_table(f"hardware/{table.stem}", table)
        tracker.finish()
    except Exception as err:  # logging must never lose the written results
        print(f"hardware_estimates: tracking skipped ({type(err).__name__}: {err})")
