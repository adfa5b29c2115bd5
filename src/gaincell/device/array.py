"""The rows x cols gain-cell array with wire parasitics, on random inputs (paper Fig. 2).

Like the authors' arrays (``spice_64x64_arrays.npz``): random inputs applied as pulse widths to the
read word lines (one row per feature ``d``), random stored levels (one column per key), the charge
of every column's signed bitline pair is the output. Each random trial is one netlist (stored
voltages set as initial conditions); each query (one input vector) is one transient of it.

Two kinds, both the same circuit: ``qk`` (the first array: query pulses, stored keys) and ``pv``
(the second array: the charge-to-pulse outputs phi(S) as pulses, stored values; here drawn at random
from the same pulse-width levels, since the charge-to-pulse circuit itself is modelled, not simulated).

The ideal output of a column is the sum of the charges the same cells give in isolation (the read
sweep, no parasitics), so the difference is what the array adds: IR drop along word and bit lines,
wire capacitance, and the stored node's coupling.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from gaincell.device.netlists import ArrayLayout, CellDesign, array_netlist, pulse_alter
from gaincell.device.simulate import Run, Task
from gaincell.device.technology import Technology

ARRAY_KINDS = ("qk", "pv")
INPUT_LEVELS = 16    # 4-bit pulse-width generators (docs/attention.md#quantization)
STORED_LEVELS = 8    # 3-bit DACs


def input_levels(grid_values: np.ndarray, levels: int) -> np.ndarray:
    """The quantized levels (``levels`` evenly from the grid's first to last value) when the sweep grid
    contains them all, else the grid itself (a coarse test grid): array inputs are always grid points,
    so their isolated-cell charges are simulated values, not interpolations."""
    grid_values = np.asarray(grid_values, float)
    wanted = np.linspace(grid_values[0], grid_values[-1], levels)
    if all(np.isclose(grid_values, w, rtol=0, atol=1e-9).any() for w in wanted):
        return wanted
    return grid_values
_MOD = "gaincell.device.array"


def _trapz_cumulative(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum((y[1:] + y[:-1]) * np.diff(x) / 2.0)])


def draw_inputs(seed: int, trial: int, kind: str, rows: int, cols: int, queries: int,
                pulse_widths_ns: np.ndarray, levels_v: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(pulse widths (queries, rows) in ns, stored levels K (rows, cols) in V), uniformly on the grids."""
    rng = np.random.default_rng([seed, trial, ARRAY_KINDS.index(kind)])
    pw = rng.choice(np.asarray(pulse_widths_ns, float), size=(queries, rows))
    levels = rng.choice(np.asarray(levels_v, float), size=(rows, cols))
    return pw, levels


def array_vectors(layout: ArrayLayout) -> List[str]:
    vecs = ["time"]
    for r in range(layout.rows):
        vecs += [f"vrwl{r}#branch", f"rwl{r}_d"]
    for c in range(layout.cols):
        vecs += [f"vblp{c}#branch"] + ([] if layout.reference_column else [f"vbln{c}#branch"])
    return vecs + (["vblnref#branch"] if layout.reference_column else [])


def array_tasks(tech: Technology, cell: CellDesign, layout: ArrayLayout, kinds: Sequence[str], trials: int,
                queries: int, seed: int, grid: Dict[str, np.ndarray], read_v: float
                ) -> Tuple[List[Task], Dict[Tuple[str, int], Dict[str, np.ndarray]]]:
    """Tasks (one per kind, trial, query) and the inputs of each (kind, trial)."""
    tasks: List[Task] = []
    inputs: Dict[Tuple[str, int], Dict[str, np.ndarray]] = {}
    vectors = array_vectors(layout)
    pw_levels = input_levels(grid["pulse_width_ns"], INPUT_LEVELS)
    stored_levels = input_levels(grid["level_v"], STORED_LEVELS)
    for kind in kinds:
        if kind not in ARRAY_KINDS:
            raise ValueError(f"device.array_kinds has {kind!r}: expected a subset of {ARRAY_KINDS}")
        for trial in range(trials):
            pw, levels = draw_inputs(seed, trial, kind, layout.rows, layout.cols, queries, pw_levels,
                                     stored_levels)
            pos, neg = cell.stored_voltages(levels)
            inputs[(kind, trial)] = {"pulse_width_ns": pw, "level_v": levels}
            netlist = array_netlist(tech, cell, layout, pos, neg)
            for q in range(queries):
                commands = [pulse_alter(layout.rwl_source(r), cell.pulse_spec(float(pw[q, r]), read_v,
                                                                             cell.read_start_ns))
                            for r in range(layout.rows)]
                params = {"kind": kind, "trial": trial, "query": q, "rows": layout.rows, "cols": layout.cols,
                          "read_v": float(read_v), "read_start_ns": cell.read_start_ns,
                          "bitline_v": cell.bitline_v, "pulse_widths_ns": [float(x) for x in pw[q]],
                          "reference_column": bool(layout.reference_column)}
                tasks.append(Task(netlist, [Run(commands, cell.tran(cell.read_stop_s),
                                                stop_time_s=cell.read_stop_s)],
                                  vectors, f"{_MOD}:array_metrics", params))
    return tasks, inputs


def array_metrics(waves: List[Dict[str, np.ndarray]], p: Dict[str, Any]) -> List[Dict[str, Any]]:
    w = waves[0]
    t = w["time"]
    rows, cols = p["rows"], p["cols"]
    energy = 0.0
    for r in range(rows):
        energy += -float(np.sum((w[f"rwl{r}_d"] * w[f"vrwl{r}#branch"])[1:] * np.diff(t)
                                + (w[f"rwl{r}_d"] * w[f"vrwl{r}#branch"])[:-1] * np.diff(t)) / 2.0)
    charges_pos, charges_neg = [], []
    cum_all = []
    shared = p.get("reference_column", False)
    q_ref = _trapz_cumulative(w["vblnref#branch"], t) if shared else None
    if shared:
        energy += -p["bitline_v"] * q_ref[-1]
    for c in range(cols):
        qp = _trapz_cumulative(w[f"vblp{c}#branch"], t)
        qn = q_ref if shared else _trapz_cumulative(w[f"vbln{c}#branch"], t)
        charges_pos.append(qp[-1])
        charges_neg.append(qn[-1])
        cum_all.append(qp - qn)
        energy += -p["bitline_v"] * (qp[-1] + (0.0 if shared else qn[-1]))
    # latency: from the start of the pulses until every output is within 0.1 % of full scale of its
    # final charge (full scale = the largest output of this operation)
    scale = max(max(abs(cq[-1]) for cq in cum_all), 1e-30)
    t0 = p["read_start_ns"] * 1e-9
    latest = t0
    for cq in cum_all:
        off = np.nonzero(np.abs(cq - cq[-1]) > 1e-3 * scale)[0]
        if len(off):
            latest = max(latest, float(t[min(off[-1] + 1, len(t) - 1)]))
    latency_ns = (latest - t0) * 1e9
    out = []
    for c in range(cols):
        out.append({"kind": p["kind"], "trial": p["trial"], "query": p["query"], "column": c,
                    "charge_pos_c": float(charges_pos[c]), "charge_neg_c": float(charges_neg[c]),
                    "charge_c": float(charges_pos[c] - charges_neg[c]),
                    "op_energy_j": float(energy), "op_latency_ns": float(latency_ns),
                    "op_max_pulse_ns": float(max(p["pulse_widths_ns"]))})
    return out


def ideal_outputs(pulse_widths_ns: np.ndarray, levels_v: np.ndarray, cell_charge) -> np.ndarray:
    """Sum over rows of isolated-cell charges: (queries, cols) from pw (queries, rows), K (rows, cols).

    ``cell_charge(pw_ns, level_v)`` gives the signed charge of one isolated pair (vectorised).
    """
    q, r = pulse_widths_ns.shape
    c = levels_v.shape[1]
    pw = np.broadcast_to(pulse_widths_ns[:, :, None], (q, r, c))
    lv = np.broadcast_to(levels_v[None, :, :], (q, r, c))
    return cell_charge(pw, lv).sum(axis=1)
