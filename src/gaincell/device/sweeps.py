"""The characterisation sweeps: tasks for the simulator, and the post-processing run in the workers.

Four sweeps, each a list of ``simulate.Task``:

* ``read``: the signed pair, every (input pulse width, stored level, read word-line voltage) of the
  grid: charge on each bitline, signed charge, mean current over T_max, stored voltages, read energy.
* ``write``: one cell written with each DAC level: the voltage it holds afterwards, write energy.
* ``retention``: a stored voltage left alone for ``retention_time_s``: the decay curve.
* ``array``: see ``gaincell.device.array``.
* ``mismatch``: Monte-Carlo cells, each with its own read-transistor threshold shifts (``delvto``, drawn
  here from a seed with the model set's vth0 mismatch sigma), read at V_read and T_max on every stored
  level: one polynomial fit per cell gives the spread of each coefficient.

Post-processing functions take ``(waves, params)`` where ``waves`` holds one dict of vectors per
analysis of the task, and return one row (dict) or a list of rows. Units are in the column names.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

from gaincell.device.netlists import (
    MODEL_STORED_MAX_V,
    CellDesign,
    ChargeToPulseDesign,
    charge_to_pulse_netlist,
    dc_alter,
    pulse_alter,
    pwl_alter,
    read_pair_netlist,
    retention_netlist,
    write_bitline_pwl,
    write_cell_netlist,
)
from gaincell.device.simulate import Run, Task
from gaincell.device.technology import Technology

_MOD = "gaincell.device.sweeps"


def _trapz(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def _delivered_energy(t: np.ndarray, v: np.ndarray, i_branch: np.ndarray) -> float:
    """Energy a source delivers to the circuit, J (ngspice's branch current flows into its + node)."""
    return -_trapz(v * i_branch, t)


# --------------------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------------------
def sweep_grid(d) -> Dict[str, np.ndarray]:
    """Pulse widths (ns), model stored levels K (V, on [0, 0.9]) and read voltages (V) of the sweep."""
    get = (lambda k: d[k]) if hasattr(d, "__getitem__") else (lambda k: getattr(d, k))
    pw = np.linspace(0.0, float(get("pulse_width_max_ns")), int(get("pulse_width_points")))
    levels = np.linspace(0.0, MODEL_STORED_MAX_V, int(get("stored_v_points")))
    n_read = int(get("read_v_points"))
    if n_read == 1:
        reads = np.array([float(get("read_v_max"))])
    else:
        reads = np.linspace(float(get("read_v_min")), float(get("read_v_max")), n_read)
    return {"pulse_width_ns": pw, "level_v": levels, "read_v": reads}


# --------------------------------------------------------------------------------------------------
# read sweep
# --------------------------------------------------------------------------------------------------
READ_VECTORS = ["time", "vblp#branch", "vbln#branch", "vrwl#branch", "rwl", "snp", "snn"]


def read_tasks(tech: Technology, cell: CellDesign, grid: Dict[str, np.ndarray]) -> List[Task]:
    netlist = read_pair_netlist(tech, cell)
    tasks = []
    for read_v in grid["read_v"]:
        for level in grid["level_v"]:
            pos, neg = cell.stored_voltages(np.array([level]))
            for pw in grid["pulse_width_ns"]:
                spec = cell.pulse_spec(float(pw), float(read_v), cell.read_start_ns)
                params = {"pulse_width_ns": float(pw), "level_v": float(level), "read_v": float(read_v),
                          "stored_pos_v": float(pos[0]), "stored_neg_v": float(neg[0]),
                          "read_start_ns": cell.read_start_ns, "pulse_width_max_ns": cell.pulse_width_max_ns,
                          "bitline_v": cell.bitline_v}
                run = Run([dc_alter("vprep", pos[0]), dc_alter("vpren", neg[0]), pulse_alter("vrwl", spec)],
                          cell.tran(cell.read_stop_s), stop_time_s=cell.read_stop_s)
                tasks.append(Task(netlist, [run], READ_VECTORS, f"{_MOD}:read_metrics", params))
    return tasks


def read_metrics(waves: List[Dict[str, np.ndarray]], p: Dict[str, Any]) -> Dict[str, Any]:
    w = waves[0]
    t = w["time"]
    q_pos = _trapz(w["vblp#branch"], t)      # charge into the positive bitline's integrator, C
    q_neg = _trapz(w["vbln#branch"], t)
    e_rwl = _delivered_energy(t, w["rwl"], w["vrwl#branch"])
    e_bl = -p["bitline_v"] * (q_pos + q_neg)  # an integrator held above ground absorbs/delivers too
    t_start = p["read_start_ns"] * 1e-9
    t_mid = t_start + max(p["pulse_width_ns"], 0.0) * 1e-9 / 2
    row = dict(p)
    row.update({
        "charge_pos_c": q_pos, "charge_neg_c": q_neg, "charge_c": q_pos - q_neg,
        # charge per T_max: the "current" the polynomial model speaks of (input = pulse / T_max)
        "mean_current_a": (q_pos - q_neg) / (p["pulse_width_max_ns"] * 1e-9),
        "sn_pos_before_v": float(np.interp(t_start, t, w["snp"])),
        "sn_neg_before_v": float(np.interp(t_start, t, w["snn"])),
        "sn_pos_mid_pulse_v": float(np.interp(t_mid, t, w["snp"])),
        "sn_pos_after_v": float(w["snp"][-1]),
        "read_energy_j": e_rwl + e_bl,
        "time_points": int(len(t)),
    })
    return row


# --------------------------------------------------------------------------------------------------
# Monte-Carlo mismatch
# --------------------------------------------------------------------------------------------------
def mismatch_draws(n_cells: int, seed: int, sigma_v: float) -> np.ndarray:
    """(n_cells, 2) threshold shifts, V, of each cell's positive and negative (reference) read transistor:
    independent Gaussians N(0, sigma_v^2) from ``seed`` (the same seed gives the same chips)."""
    if not (isinstance(n_cells, (int, np.integer)) and n_cells >= 0):
        raise ValueError(f"device.mismatch_cells={n_cells!r}: expected an integer >= 0")
    return np.random.default_rng([int(seed), 16]).standard_normal((int(n_cells), 2)) * float(sigma_v)


def mismatch_tasks(tech: Technology, cell: CellDesign, grid: Dict[str, np.ndarray], draws_v: np.ndarray) -> List[Task]:
    """One netlist per Monte-Carlo cell (its own ``delvto``s); each stored level read once at the full read
    voltage with the longest pulse (the fit's ``pulse_widths: max`` points: charge is linear in the pulse)."""
    read_v = float(grid["read_v"][-1])
    width = float(grid["pulse_width_ns"][-1])
    spec = cell.pulse_spec(width, read_v, cell.read_start_ns)
    tasks = []
    for index, (d_pos, d_neg) in enumerate(np.asarray(draws_v, float)):
        netlist = read_pair_netlist(tech, cell, (float(d_pos), float(d_neg)))
        for level in grid["level_v"]:
            pos, neg = cell.stored_voltages(np.array([level]))
            params = {"mc_cell": index, "delvto_pos_v": float(d_pos), "delvto_neg_v": float(d_neg),
                      "pulse_width_ns": width, "level_v": float(level), "read_v": read_v,
                      "stored_pos_v": float(pos[0]), "stored_neg_v": float(neg[0]),
                      "read_start_ns": cell.read_start_ns, "pulse_width_max_ns": cell.pulse_width_max_ns,
                      "bitline_v": cell.bitline_v}
            run = Run([dc_alter("vprep", pos[0]), dc_alter("vpren", neg[0]), pulse_alter("vrwl", spec)],
                      cell.tran(cell.read_stop_s), stop_time_s=cell.read_stop_s)
            tasks.append(Task(netlist, [run], READ_VECTORS, f"{_MOD}:read_metrics", params))
    return tasks


# --------------------------------------------------------------------------------------------------
# charge-to-pulse read-out
# --------------------------------------------------------------------------------------------------
C2P_VECTORS = ["time", "ci", "out", "vdd#branch"]


def charge_to_pulse_tasks(tech: Technology, cell: CellDesign, design: ChargeToPulseDesign, supply_v: float,
                          start_v: Sequence[float], stop_ns: float) -> List[Task]:
    """One transient per starting voltage of the integration node (the charge it holds, above ground)."""
    netlist = charge_to_pulse_netlist(tech, cell, design, supply_v)
    tasks = []
    for v in start_v:
        params = {"start_v": float(v), "start_ns": design.start_ns, "supply_v": float(supply_v),
                  "integration_capacitance_f": design.integration_capacitance_f, "stop_ns": float(stop_ns)}
        run = Run([dc_alter("vprep", float(v))], cell.tran(stop_ns * 1e-9), stop_time_s=stop_ns * 1e-9)
        tasks.append(Task(netlist, [run], C2P_VECTORS, f"{_MOD}:charge_to_pulse_metrics", params))
    return tasks


def charge_to_pulse_metrics(waves: List[Dict[str, np.ndarray]], p: Dict[str, Any]) -> Dict[str, Any]:
    """Pulse width (output above half supply after the count starts; the whole window when it never falls),
    the node's discharge rate at the start, and the supply energy of the conversion."""
    w = waves[0]
    t, out, node = w["time"], w["out"], w["ci"]
    t0 = p["start_ns"] * 1e-9
    after = t >= t0
    high = out[after] > p["supply_v"] / 2
    t_after = t[after]
    falls = np.nonzero(~high)[0]
    if not high[0]:
        width = 0.0
    elif len(falls):
        k = falls[0]                      # interpolate the half-supply crossing
        ta, tb, ya, yb = t_after[k - 1], t_after[k], out[after][k - 1], out[after][k]
        width = float(ta + (p["supply_v"] / 2 - ya) * (tb - ta) / (yb - ya) - t0)
    else:
        width = float(t_after[-1] - t0)
    early = (t >= t0 + 1e-9) & (t <= t0 + 3e-9)
    rate = float(-np.polyfit(t[early], node[early], 1)[0]) if early.sum() >= 2 else float("nan")
    row = dict(p)
    row.update({"pulse_width_ns": width * 1e9, "clipped": bool(high[0] and not len(falls)),
                "discharge_rate_v_per_ns": rate * 1e-9,
                "charge_c": p["start_v"] * p["integration_capacitance_f"],
                "conversion_energy_j": _delivered_energy(t, np.full_like(t, p["supply_v"]), w["vdd#branch"])})
    return row


# --------------------------------------------------------------------------------------------------
# write sweep
# --------------------------------------------------------------------------------------------------
WRITE_VECTORS = ["time", "sn", "wwl", "wbl", "vwwl#branch", "vwbl#branch"]


def write_tasks(tech: Technology, cell: CellDesign, levels_v: Sequence[float]) -> List[Task]:
    netlist = write_cell_netlist(tech, cell)
    targets = sorted(set(np.round(np.concatenate(cell.stored_voltages(np.asarray(levels_v))), 9)))
    tasks = []
    for target in targets:
        params = {"target_v": float(target), "write_end_ns": cell.write_end_ns, "write_ns": cell.write_ns,
                  "discharge_ns": cell.discharge_ns, "write_wordline_v": cell.write_wordline_v}
        run = Run([pwl_alter("vwbl", write_bitline_pwl(cell, float(target)))], cell.tran(cell.write_stop_s),
                  stop_time_s=cell.write_stop_s)
        tasks.append(Task(netlist, [run], WRITE_VECTORS, f"{_MOD}:write_metrics", params))
    return tasks


def write_metrics(waves: List[Dict[str, np.ndarray]], p: Dict[str, Any]) -> Dict[str, Any]:
    w = waves[0]
    t = w["time"]
    energy = _delivered_energy(t, w["wwl"], w["vwwl#branch"]) + _delivered_energy(t, w["wbl"], w["vwbl#branch"])
    end_write = float(np.interp(p["write_end_ns"] * 1e-9, t, w["sn"]))
    stored = float(w["sn"][-1])
    row = dict(p)
    row.update({"sn_end_of_write_v": end_write, "stored_v": stored, "write_error_v": stored - p["target_v"],
                "write_energy_j": energy})
    return row


# --------------------------------------------------------------------------------------------------
# retention
# --------------------------------------------------------------------------------------------------
RETENTION_VECTORS = ["time", "snp"]


def retention_tasks(tech: Technology, cell: CellDesign, initial_v: Sequence[float], duration_s: float,
                    samples: int = 200) -> List[Task]:
    netlist = retention_netlist(tech, cell)
    tasks = []
    max_step = duration_s / 400
    for v0 in initial_v:
        params = {"initial_v": float(v0), "duration_s": float(duration_s), "samples": int(samples),
                  "release_s": (cell.preset_ns + cell.edge_ns) * 1e-9}
        run = Run([dc_alter("vprep", float(v0))],
                  f"tran {cell.time_step_ns * 1e-9!r} {duration_s!r} 0 {max_step!r}", stop_time_s=duration_s)
        tasks.append(Task(netlist, [run], RETENTION_VECTORS, f"{_MOD}:retention_curve", params))
    return tasks


def retention_curve(waves: List[Dict[str, np.ndarray]], p: Dict[str, Any]) -> List[Dict[str, Any]]:
    t, v = waves[0]["time"], waves[0]["snp"]
    t0 = p["release_s"]
    grid = np.concatenate([[t0], t0 + np.geomspace(1e-9, p["duration_s"] - t0, p["samples"] - 1)])
    values = np.interp(grid, t, v)
    return [{"initial_v": p["initial_v"], "time_s": float(tt - t0), "stored_v": float(vv)}
            for tt, vv in zip(grid, values)]


def fit_retention_tau(time_s: np.ndarray, stored_v: np.ndarray, floor_v: float) -> Dict[str, float]:
    """Time constants of the stored-voltage decay (leakage drains the node towards ``floor_v``).

    * ``tau_s``: the initial-slope time constant ``(V_0 - floor) / |dV/dt|`` over the first 5 % of the
      swing: the exponential ``exp(-t / tau)`` of the attention model's leakage (eq. 6) that matches the
      cell where the model uses it (a window of 1,024 tokens x 12 layers x 65 ns is 0.8 ms).
    * ``exp_fit_tau_s``: least-squares fit of ``floor + (V_0 - floor) exp(-t / tau)`` to the whole curve
      on a uniform time grid, and its RMS error (large when the decay is not exponential: sub-threshold
      leakage through the write transistor is nearly independent of V_DS, so the node discharges
      almost linearly).
    * ``t_1e_s``: first time ``V - floor`` falls to 1/e of its initial value (NaN if never).
    * ``droop_v_per_s``: the initial slope itself.
    """
    from scipy.optimize import curve_fit

    t = np.asarray(time_s, float)
    v = np.asarray(stored_v, float)
    v0 = float(v[0])
    amplitude = v0 - floor_v
    beyond = np.nonzero(np.abs(v - v0) > 0.05 * abs(amplitude))[0]
    idx = np.arange(beyond[0] if len(beyond) else len(t))   # the contiguous start of the decay
    if len(idx) >= 2 and t[idx[-1]] > t[idx[0]]:
        slope = float(np.polyfit(t[idx], v[idx], 1)[0])
    else:
        slope = float((v[1] - v[0]) / (t[1] - t[0])) if len(t) > 1 else float("nan")
    tau_initial = abs(amplitude / slope) if slope != 0 and np.isfinite(slope) else float("inf")
    target = floor_v + amplitude / np.e
    below = np.nonzero(v <= target)[0] if amplitude > 0 else np.nonzero(v >= target)[0]
    if len(below) and below[0] > 0:   # interpolate the crossing between the two samples around it
        k = below[0]
        t_1e = float(t[k - 1] + (target - v[k - 1]) * (t[k] - t[k - 1]) / (v[k] - v[k - 1]))
    else:
        t_1e = float(t[below[0]]) if len(below) else float("nan")
    tu = np.linspace(0.0, t[-1], 400)
    vu = np.interp(tu, t, v)

    def model(tt, tau):
        return floor_v + amplitude * np.exp(-tt / tau)

    tau0 = t_1e if np.isfinite(t_1e) and t_1e > 0 else min(tau_initial, 1e9)
    try:
        (tau_fit,), _ = curve_fit(model, tu, vu, p0=[tau0], bounds=([1e-15], [1e9]), maxfev=20000)
        rms = float(np.sqrt(np.mean((model(tu, tau_fit) - vu) ** 2)))
    except Exception:  # pragma: no cover - reported as NaN
        tau_fit, rms = float("nan"), float("nan")
    return {"tau_s": float(tau_initial), "exp_fit_tau_s": float(tau_fit), "exp_fit_rms_v": rms,
            "t_1e_s": t_1e, "droop_v_per_s": slope, "floor_v": float(floor_v)}


# --------------------------------------------------------------------------------------------------
# generic (closed-form checks)
# --------------------------------------------------------------------------------------------------
def sample(waves: List[Dict[str, np.ndarray]], p: Dict[str, Any]) -> Dict[str, Any]:
    """Vector values at given times (``p['samples']``: [[vector, time_s or None], ...]) per run."""
    row: Dict[str, Any] = {}
    for k, w in enumerate(waves):
        for name, at in p["samples"]:
            if at is None or "time" not in w:
                row[f"{k}:{name}"] = float(w[name][-1])
            else:
                row[f"{k}:{name}@{at}"] = float(np.interp(at, w["time"], w[name]))
    return row
