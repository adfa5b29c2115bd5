"""Pipeline stage ``characterize``: SPICE characterisation of the gain cell and the array.

Writes to ``results/<profile>/device/``:

* ``cell_sweep.csv`` – signed pair read: one row per (pulse width, stored level, read voltage)
* ``write_sweep.csv`` – one cell written per DAC voltage: held voltage, write energy
* ``retention.csv`` – stored voltage versus time for a few initial voltages
* ``array.csv`` – every output of every simulated array operation, with its ideal value
* ``mismatch.csv`` – Monte-Carlo cells (read-transistor threshold shifts): one row per (cell, stored level)
* ``charge_to_pulse.csv`` – the charge-to-pulse read-out: pulse width and supply energy per input charge
* ``energy.csv`` – the energy figures, one row per quantity
* ``failed_points.csv`` – points that did not simulate (parameters and error), possibly empty
* ``summary.json`` – headline numbers (read by the hardware stage) and provenance
* ``cache.sqlite`` – finished points, so a killed run resumes
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from gaincell.device import array as array_mod
from gaincell.device import simulate, sweeps
from gaincell.device.netlists import ArrayLayout, CellDesign, ChargeToPulseDesign, cell_kind_name, reference_voltage
from gaincell.device.technology import TECHNOLOGIES, Technology, TechnologyError, make_technology
from gaincell.io import atomic_to_csv, atomic_write_json
from gaincell.io import finite_or_none as _finite
from gaincell.tracking import Tracker


def _get(section, key):
    return section[key] if hasattr(section, "__getitem__") else getattr(section, key)


def validate_device_config(d) -> None:
    """Raise ``ValueError`` naming the first bad value; nothing is simulated before this passes."""
    g = lambda k: _get(d, k)  # noqa: E731
    if g("technology") not in TECHNOLOGIES:
        raise ValueError(f"device.technology={g('technology')!r}: expected one of {', '.join(TECHNOLOGIES)}")
    cell_kind_name(g("cell"))
    positive = ["supply_v", "read_w_um", "read_l_um", "write_w_um", "write_l_um", "storage_capacitance_f",
                "pulse_width_max_ns", "edge_ns", "time_step_ns", "gmin_s", "reltol", "retention_time_s",
                "write_ns", "read_v_max", "preset_ns", "settle_ns", "c2p_capacitance_f", "c2p_bias_v",
                "c2p_discharge_w_um", "c2p_discharge_l_um", "c2p_inverter_n_w_um", "c2p_inverter_p_w_um",
                "c2p_inverter_l_um"]
    for k in positive:
        v = float(g(k))
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"device.{k}={g(k)!r}: expected a positive finite number")
    for k in ("wire_capacitance_f", "wire_resistance_ohm", "discharge_ns", "mismatch_sigma_scale"):
        v = float(g(k))
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"device.{k}={g(k)!r}: expected a finite number >= 0")
    supply = float(g("supply_v"))
    lo, hi = float(g("stored_v_min")), float(g("stored_v_max"))
    if not (0 <= lo < hi <= supply):
        raise ValueError(f"device.stored_v_min={lo}, stored_v_max={hi}: expected 0 <= min < max <= supply_v={supply}")
    ref = reference_voltage(g("reference_v"), supply)
    if not (math.isfinite(ref) and 0 <= ref <= supply):
        raise ValueError(f"device.reference_v={g('reference_v')!r}: expected a voltage in [0, supply_v={supply}]")
    rlo, rhi = float(g("read_v_min")), float(g("read_v_max"))
    if not (0 < rlo <= rhi <= supply):
        raise ValueError(f"device.read_v_min={rlo}, read_v_max={rhi}: expected 0 < min <= max <= supply_v={supply}")
    if int(g("read_v_points")) > 1 and not rlo < rhi:
        raise ValueError(f"device.read_v_points={g('read_v_points')} needs read_v_min < read_v_max (got {rlo}, {rhi})")
    for k, least in (("pulse_width_points", 2), ("stored_v_points", 2), ("read_v_points", 1), ("write_levels", 2),
                     ("retention_levels", 1), ("array_rows", 1), ("array_cols", 1), ("array_trials", 0),
                     ("array_queries", 1), ("mismatch_cells", 0), ("c2p_points", 0)):
        v = g(k)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < least:
            raise ValueError(f"device.{k}={v!r}: expected an integer >= {least}")
    step = float(g("pulse_width_max_ns")) / (int(g("pulse_width_points")) - 1)
    if not float(g("edge_ns")) < step:
        raise ValueError(f"device.edge_ns={g('edge_ns')}: expected less than the smallest nonzero pulse "
                         f"width {step:g} ns")
    if not float(g("preset_ns")) + float(g("edge_ns")) < float(g("read_start_ns")):
        raise ValueError(f"device.read_start_ns={g('read_start_ns')}: expected after preset_ns + edge_ns "
                         f"({float(g('preset_ns')) + float(g('edge_ns'))} ns)")
    if not float(g("time_step_ns")) <= float(g("pulse_width_max_ns")) / 10:
        raise ValueError(f"device.time_step_ns={g('time_step_ns')}: expected at most pulse_width_max_ns / 10")
    for k in ("write_wordline_v", "hold_wordline_v", "hold_bitline_v", "bitline_v"):
        v = float(g(k))
        if not (math.isfinite(v) and abs(v) <= 2 * supply):
            raise ValueError(f"device.{k}={g(k)!r}: expected a voltage within +-2 x supply_v")
    kinds = list(g("array_kinds"))
    for kind in kinds:
        if kind not in array_mod.ARRAY_KINDS:
            raise ValueError(f"device.array_kinds has {kind!r}: expected a subset of {list(array_mod.ARRAY_KINDS)}")


def config_hash(cfg) -> str:
    """Short hash of the device and fit sections (provenance of every output)."""
    blob = json.dumps({"device": OmegaConf.to_container(cfg.device, resolve=True),
                       "fit": OmegaConf.to_container(cfg.fit, resolve=True)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rows(results: List[simulate.Result]) -> List[Dict[str, Any]]:
    return [row for r in results if r.ok for row in r.rows]


def _failed_rows(sweep: str, results: List[simulate.Result]) -> List[Dict[str, Any]]:
    return [{"sweep": sweep, "error": r.error, "params": json.dumps(r.params, default=str)}
            for r in results if not r.ok]


def cell_charge_lookup(read_df: pd.DataFrame, read_v: float):
    """Vectorised signed charge of one isolated pair at ``read_v``: linear in pulse width between
    grid points, exact at the stored levels of the grid."""
    sub = read_df[np.isclose(read_df["read_v"], read_v)]
    table = sub.pivot_table(index="level_v", columns="pulse_width_ns", values="charge_c")
    levels = table.index.to_numpy()
    widths = table.columns.to_numpy()
    values = table.to_numpy()

    def charge(pw_ns: np.ndarray, level_v: np.ndarray) -> np.ndarray:
        li = np.abs(level_v[..., None] - levels).argmin(-1)
        out = np.empty(pw_ns.shape)
        for k in range(len(levels)):
            m = li == k
            if m.any():
                out[m] = np.interp(pw_ns[m], widths, values[k])
        return out

    return charge


# The sweeps of the stage, in the order of their tables and counts (the simulations run heaviest first).
SWEEPS = ("read", "write", "retention", "array", "mismatch", "charge_to_pulse")


def characterize(cfg) -> Dict[str, Any]:
    """Run every sweep, write the tables and ``summary.json``; returns the summary."""
    started = time.time()
    d = cfg.device
    validate_device_config(d)
    out_dir = Path(str(cfg.results_dir)) / "device"
    tech = make_technology(d)
    tech.check_device(str(d.read_device), "read")
    tech.check_device(str(d.write_device), "write")
    cell = CellDesign.from_config(d)
    grid = sweeps.sweep_grid(d)
    read_v = float(grid["read_v"][-1])
    layout = ArrayLayout(rows=int(d.array_rows), cols=int(d.array_cols),
                         wire_resistance_ohm=float(d.wire_resistance_ohm),
                         wire_capacitance_f=float(d.wire_capacitance_f),
                         write_transistors=bool(d.array_write_transistors),
                         reference_column=cell.cell == "single_ended")
    out_dir.mkdir(parents=True, exist_ok=True)

    plan, array_inputs, mismatch_info = _plan(tech, cell, layout, grid, read_v, d)
    tasks = [task for group in plan.values() for task in group]
    version = simulate.ngspice_version_cached()
    results = simulate.run_tasks(tasks, workers=int(d.workers), cache_path=out_dir / "cache.sqlite",
                                 desc=f"characterize ({tech.name})", version=version)
    res = _by_sweep(plan, results)
    failed = [row for name in SWEEPS for row in _failed_rows(name, res[name])]
    atomic_to_csv(pd.DataFrame(failed, columns=["sweep", "error", "params"]), out_dir / "failed_points.csv")
    if failed:
        print(f"characterize: {len(failed)} of {len(tasks)} points failed (see {out_dir / 'failed_points.csv'}); "
              f"first: {failed[0]['error']}")

    t_max = float(d.pulse_width_max_ns)
    read_df = _read_table(res["read"], failed, out_dir)
    full = read_df[np.isclose(read_df["read_v"], read_v)]
    full_pulse = full[np.isclose(full["pulse_width_ns"], t_max)]
    write_df = pd.DataFrame(_rows(res["write"]))
    if not write_df.empty:
        write_df = write_df.sort_values("target_v").reset_index(drop=True)
    atomic_to_csv(write_df, out_dir / "write_sweep.csv")
    retention_fits = _retention(res["retention"], float(d.hold_bitline_v), out_dir)
    array_summary = _array(res["array"], array_inputs, read_df, read_v, out_dir)
    _mismatch_table(res["mismatch"], mismatch_info, out_dir)
    c2p_df = pd.DataFrame(_rows(res["charge_to_pulse"]))
    atomic_to_csv(c2p_df, out_dir / "charge_to_pulse.csv")
    c2p_summary = _charge_to_pulse_summary(c2p_df, t_max)
    energies = _energy_table(full, full_pulse, write_df, array_summary, layout, out_dir)

    f_max = float(full_pulse["mean_current_a"].abs().max()) if not full_pulse.empty else float("nan")
    summary: Dict[str, Any] = {
        "technology": tech.name, "corner": tech.corner, "technology_provenance": tech.provenance(),
        "ngspice_version": version, "config_hash": config_hash(cfg),
        **energies,
        "array_rows": layout.rows, "array_cols": layout.cols,
        "array_op_energy_j": array_summary.get("array_op_energy_j", float("nan")),
        "array_op_latency_ns": array_summary.get("array_op_latency_ns", float("nan")),
        **{k: v for k, v in array_summary.items() if k not in ("array_op_energy_j", "array_op_latency_ns")},
        **_retention_summary(retention_fits),
        "mismatch": mismatch_info,
        "charge_to_pulse": c2p_summary,
        "charge_to_pulse_energy_j": c2p_summary.get("energy_per_conversion_j", float("nan")),
        "full_scale_current_a": f_max,
        "write_error_max_v": float(write_df["write_error_v"].abs().max()) if not write_df.empty else float("nan"),
        **_design_record(d, cell, grid, read_v),
        "points": {**{name: len(plan[name]) for name in SWEEPS}, "failed": len(failed),
                   "from_cache": sum(1 for r in results if r.cached)},
        "simulated_seconds": float(sum(r.seconds for r in results if not r.cached)),
        "wall_seconds": time.time() - started,
        "units": "SI (J, s, V, A, C) unless the key says otherwise",
    }
    atomic_write_json(out_dir / "summary.json", _finite(summary))
    _log(cfg, summary)
    print(f"characterize: {tech.name} {tech.corner}: full-scale signed current {f_max * 1e6:.2f} uA, "
          f"MAC {summary['mac_energy_j'] * 1e15:.1f} fJ, write {summary['write_energy_j'] * 1e15:.2f} fJ, "
          f"tau {summary['retention_tau_s']:.3g} s, array {layout.rows}x{layout.cols} op "
          f"{summary['array_op_energy_j'] * 1e12:.3g} pJ / {summary['array_op_latency_ns']:.3g} ns; "
          f"{len(failed)} failed; {summary['wall_seconds']:.1f} s -> {out_dir}")
    return summary


def _by_sweep(plan: Dict[str, list], results: list) -> Dict[str, list]:
    """The results of ``plan``'s concatenated tasks, split back by sweep."""
    res, start = {}, 0
    for name, group in plan.items():
        res[name] = results[start:start + len(group)]
        start += len(group)
    return res


def _retention_summary(fits: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The initial-slope time constant of the highest stored level (what exp(-t/tau) of the attention
    model should use); whole-curve exponential fit and 1/e time beside it (see sweeps.fit_retention_tau)."""
    top = max(fits, key=lambda r: r["initial_v"]) if fits else {}
    return {"retention_tau_s": top.get("tau_s", float("nan")),
            "retention_exp_fit_tau_s": top.get("exp_fit_tau_s", float("nan")),
            "retention_t_1e_s": top.get("t_1e_s", float("nan")),
            "retention_droop_v_per_s": top.get("droop_v_per_s", float("nan")),
            "retention_fits": fits}


def _design_record(d, cell: CellDesign, grid, read_v: float) -> Dict[str, Any]:
    """The simulated design: windows, cell, sweep grid."""
    return {"stored_window_v": [float(d.stored_v_min), float(d.stored_v_max)],
            "read_window_v": [float(d.read_v_min), float(d.read_v_max)], "read_voltage_v": read_v,
            "cell_kind": cell.cell,
            "reference_v": cell.reference_v if cell.cell == "single_ended" else None,
            "pulse_width_max_ns": float(d.pulse_width_max_ns),
            "supply_v": float(d.supply_v),
            "cell": {k: getattr(cell, k) for k in cell.__dataclass_fields__},
            "grid": {k: [float(x) for x in v] for k, v in grid.items()}}


def _plan(tech: Technology, cell: CellDesign, layout: ArrayLayout, grid, read_v: float, d):
    """Every simulation of the stage by sweep, heaviest first (array, read, write, retention, mismatch,
    charge-to-pulse), with the array's inputs and the mismatch draw's description."""
    retention_v = np.linspace(float(d.stored_v_min), float(d.stored_v_max), int(d.retention_levels))[::-1]
    array_tasks, array_inputs = array_mod.array_tasks(
        tech, cell, layout, list(d.array_kinds), int(d.array_trials), int(d.array_queries), int(d.seed),
        grid, read_v)
    mismatch_tasks, mismatch_info = _mismatch_plan(tech, cell, grid, d)
    plan = {
        "array": array_tasks,
        "read": sweeps.read_tasks(tech, cell, grid),
        "write": sweeps.write_tasks(tech, cell, np.linspace(0.0, 0.9, int(d.write_levels))),
        "retention": sweeps.retention_tasks(tech, cell, retention_v, float(d.retention_time_s)),
        "mismatch": mismatch_tasks,
        "charge_to_pulse": _charge_to_pulse_plan(tech, cell, d),
    }
    return plan, array_inputs, mismatch_info


def _read_table(res_read, failed, out_dir: Path) -> pd.DataFrame:
    """cell_sweep.csv: one row per (read voltage, stored level, pulse width)."""
    read_df = pd.DataFrame(_rows(res_read))
    if read_df.empty:
        raise simulate.SimulationError(f"every read point failed; first error: {failed[0]['error'] if failed else '?'}")
    read_df = read_df.drop(columns=["read_start_ns", "pulse_width_max_ns", "bitline_v"])
    read_df = read_df.sort_values(["read_v", "level_v", "pulse_width_ns"]).reset_index(drop=True)
    atomic_to_csv(read_df, out_dir / "cell_sweep.csv")
    return read_df


def _retention(res_ret, hold_bitline_v: float, out_dir: Path) -> List[Dict[str, Any]]:
    """retention.csv and one time-constant fit per initial stored voltage."""
    ret_df = pd.DataFrame(_rows(res_ret))
    atomic_to_csv(ret_df, out_dir / "retention.csv")
    fits = []
    for v0, grp in (ret_df.groupby("initial_v") if not ret_df.empty else []):
        fitted = sweeps.fit_retention_tau(grp["time_s"].to_numpy(), grp["stored_v"].to_numpy(), hold_bitline_v)
        fits.append({"initial_v": float(v0), **fitted})
    return fits


def _array(res_array, array_inputs, read_df: pd.DataFrame, read_v: float, out_dir: Path) -> Dict[str, Any]:
    """array.csv with each output's ideal sum of cells beside it, and the array's energy, latency and error."""
    arr_df = pd.DataFrame(_rows(res_array))
    array_summary: Dict[str, Any] = {}
    if not arr_df.empty:
        lookup = cell_charge_lookup(read_df, read_v)
        ideal = []
        for (kind, trial), inp in array_inputs.items():
            out = array_mod.ideal_outputs(inp["pulse_width_ns"], inp["level_v"], lookup)
            for q in range(out.shape[0]):
                for c in range(out.shape[1]):
                    ideal.append({"kind": kind, "trial": trial, "query": q, "column": c, "ideal_charge_c": out[q, c],
                                  "input_sum_ns": float(inp["pulse_width_ns"][q].sum())})
        arr_df = arr_df.merge(pd.DataFrame(ideal), on=["kind", "trial", "query", "column"], how="left")
        arr_df["error_c"] = arr_df["charge_c"] - arr_df["ideal_charge_c"]
        arr_df = arr_df.sort_values(["kind", "trial", "query", "column"]).reset_index(drop=True)
        ops = arr_df.drop_duplicates(["kind", "trial", "query"])
        full_scale = float(np.abs(arr_df["ideal_charge_c"]).max()) or 1.0
        array_summary = {
            "array_op_energy_j": float(ops["op_energy_j"].mean()),
            "array_op_latency_ns": float(ops["op_latency_ns"].mean()),
            "array_op_latency_max_ns": float(ops["op_latency_ns"].max()),
            "array_ops_simulated": int(len(ops)),
            "array_error_rms_c": float(np.sqrt(np.mean(arr_df["error_c"] ** 2))),
            "array_error_rms_relative_to_full_scale": float(np.sqrt(np.mean(arr_df["error_c"] ** 2)) / full_scale),
            "array_error_mean_relative_to_full_scale": float(arr_df["error_c"].mean() / full_scale),
            "array_correlation": float(np.corrcoef(arr_df["charge_c"], arr_df["ideal_charge_c"])[0, 1])
            if len(arr_df) > 2 else float("nan"),
        }
    atomic_to_csv(arr_df, out_dir / "array.csv")
    return array_summary


def _mismatch_table(res_mm, mismatch_info: Dict[str, Any], out_dir: Path) -> None:
    """mismatch.csv (Monte-Carlo cells); adds the drawn threshold shifts' sample spread to ``mismatch_info``."""
    mm_df = pd.DataFrame(_rows(res_mm))
    if not mm_df.empty:
        mm_df = mm_df.drop(columns=["read_start_ns", "pulse_width_max_ns", "bitline_v"])
        mm_df = mm_df.sort_values(["mc_cell", "level_v"]).reset_index(drop=True)
        mismatch_info["delvto_sample_std_v"] = float(np.std(mm_df.drop_duplicates("mc_cell")["delvto_pos_v"], ddof=1)) \
            if mm_df["mc_cell"].nunique() > 1 else float("nan")
    atomic_to_csv(mm_df, out_dir / "mismatch.csv")


def _energy_table(full: pd.DataFrame, full_pulse: pd.DataFrame, write_df: pd.DataFrame,
                  array_summary: Dict[str, Any], layout: ArrayLayout, out_dir: Path) -> Dict[str, float]:
    """energy.csv (each quantity with its definition); returns the cell energies for the summary."""
    mac_energy = float(full["read_energy_j"].mean())
    mac_energy_full = float(full_pulse["read_energy_j"].mean()) if not full_pulse.empty else float("nan")
    write_energy = float(write_df["write_energy_j"].mean()) if not write_df.empty else float("nan")
    energy_rows = [
        {"quantity": "mac_energy_j", "value": mac_energy,
         "definition": "read energy of one signed multiply (two cells), mean over the pulse-width x level grid at V_read"},
        {"quantity": "mac_energy_full_pulse_j", "value": mac_energy_full,
         "definition": "same at the longest pulse T_max, mean over levels"},
        {"quantity": "write_energy_j", "value": write_energy,
         "definition": "energy of one cell write (discharge + DAC pulse), mean over the written voltages"},
        {"quantity": "signed_write_energy_j", "value": 2 * write_energy, "definition": "two cells per signed weight"},
    ]
    if array_summary:
        energy_rows += [
            {"quantity": "array_op_energy_j", "value": array_summary["array_op_energy_j"],
             "definition": f"one {layout.rows}x{layout.cols} array operation (one input vector), mean"},
            {"quantity": "array_op_energy_per_mac_j",
             "value": array_summary["array_op_energy_j"] / (layout.rows * layout.cols),
             "definition": "array operation energy / (rows x cols)"},
        ]
    atomic_to_csv(pd.DataFrame(energy_rows), out_dir / "energy.csv")
    return {"mac_energy_j": mac_energy, "mac_energy_full_pulse_j": mac_energy_full,
            "write_energy_j": write_energy, "signed_write_energy_j": 2 * write_energy}


def _mismatch_plan(tech: Technology, cell: CellDesign, grid, d):
    """Monte-Carlo tasks and what they are: the read transistor's vth0 mismatch sigma (from the model
    set, times ``mismatch_sigma_scale``) and the seeded draws; no tasks when the technology has none."""
    n_cells = int(_get(d, "mismatch_cells"))
    info: Dict[str, Any] = {"cells": n_cells, "seed": int(_get(d, "mismatch_seed"))}
    if n_cells <= 0:
        return [], {**info, "available": False, "reason": "device.mismatch_cells=0"}
    try:
        sigma_lib = tech.vth_mismatch_sigma_v(cell.read_device, cell.read_w_um, cell.read_l_um)
    except TechnologyError as err:
        print(f"characterize: no Monte-Carlo mismatch run: {err}")
        return [], {**info, "available": False, "reason": str(err)}
    sigma = sigma_lib * float(_get(d, "mismatch_sigma_scale"))
    draws = sweeps.mismatch_draws(n_cells, info["seed"], sigma)
    info.update({"available": True, "vth_sigma_library_v": sigma_lib, "vth_sigma_v": sigma,
                 "sigma_scale": float(_get(d, "mismatch_sigma_scale")),
                 "read_w_um": cell.read_w_um, "read_l_um": cell.read_l_um,
                 "source": "sky130 *_mm corners: sw_mm_vth0 x mismatch_factor / sqrt(W L) x the subcircuit's size "
                           "factors (delvto); drawn per read transistor here (the reference cell's too)"})
    return sweeps.mismatch_tasks(tech, cell, grid, draws), info


def _charge_to_pulse_plan(tech: Technology, cell: CellDesign, d) -> List[simulate.Task]:
    """Tasks of the charge-to-pulse bench: ``c2p_points`` starting voltages of the integration node from
    half supply to the supply (sky130 only: the comparator needs its pfet)."""
    points = int(_get(d, "c2p_points"))
    if points <= 0 or tech.name != "sky130":
        return []
    design = ChargeToPulseDesign(
        integration_capacitance_f=float(_get(d, "c2p_capacitance_f")), discharge_bias_v=float(_get(d, "c2p_bias_v")),
        discharge_w_um=float(_get(d, "c2p_discharge_w_um")), discharge_l_um=float(_get(d, "c2p_discharge_l_um")),
        inverter_n_w_um=float(_get(d, "c2p_inverter_n_w_um")), inverter_p_w_um=float(_get(d, "c2p_inverter_p_w_um")),
        inverter_l_um=float(_get(d, "c2p_inverter_l_um")), start_ns=float(_get(d, "read_start_ns")))
    supply = float(_get(d, "supply_v"))
    stop_ns = design.start_ns + 2 * float(_get(d, "pulse_width_max_ns"))
    return sweeps.charge_to_pulse_tasks(tech, cell, design, supply, np.linspace(supply / 2, supply, points), stop_ns)


def _charge_to_pulse_summary(df: pd.DataFrame, t_max_ns: float) -> Dict[str, Any]:
    """Energy per conversion (mean over the simulated charges, pulses counted up to T_max) and the pulse's
    linearity in the charge: slope (ns per fC), offset, and the largest deviation from the line."""
    if df.empty:
        return {"available": False, "reason": "device.c2p_points=0 or a technology without the comparator's pfet"}
    lin = df[(df["pulse_width_ns"] > 0) & ~df["clipped"].astype(bool) & (df["pulse_width_ns"] < t_max_ns)]
    out: Dict[str, Any] = {"available": True, "energy_per_conversion_j": float(df["conversion_energy_j"].mean()),
                           "energy_max_j": float(df["conversion_energy_j"].max()), "points": int(len(df))}
    if len(lin) >= 2:
        slope, offset = np.polyfit(lin["charge_c"] * 1e15, lin["pulse_width_ns"], 1)
        resid = lin["pulse_width_ns"] - (slope * lin["charge_c"] * 1e15 + offset)
        out.update({"pulse_ns_per_fc": float(slope), "pulse_offset_ns": float(offset),
                    "nonlinearity_max_ns": float(np.abs(resid).max()), "linear_points": int(len(lin))})
    return out


def _log(cfg, summary: Dict[str, Any]) -> None:
    """Headline numbers to the experiment tracker (W&B offline + CSV); a tracking failure never fails the stage."""
    try:
        tracker = Tracker(cfg, run_name="characterize", job_type="characterize")
    except Exception as err:  # tracking must never fail the stage
        print(f"characterize: tracking disabled ({type(err).__name__}: {err})")
        return
    try:
        tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and v is not None})
    finally:
        tracker.finish()
