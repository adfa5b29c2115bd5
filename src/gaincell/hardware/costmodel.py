"""Parametric latency / energy / area model of the analog gain-cell attention (paper Figs. 2c, 3, 5).

One attention head with sliding window M and head dimension D is built from sub-tiles of
``tile_rows x tile_cols`` cells (paper: 64 x 64, limited by IR drop). Each sub-tile holds two arrays
(K and V) of signed cells (two gain cells per weight), a charge-to-pulse (HardSigmoid) circuit per key
after the K array, a read-out per feature after the V array, pulse counters, and its share of the write
DACs; the head shares D digital adders (one input per sub-tile) and the query pulse generators.

Numbers come from the parts, never from totals:

* latency per token (one layer, all heads in parallel) is the timing chain of paper Fig. 2c:
  ``discharge + max(write, query pulses) + phi(S) pulses + V read-out pulse + adders (one clock per
  input, i.e. per sub-tile along the window)``;
* energy per head per token is the sum of per-sub-tile energies times the number of sub-tiles (the
  paper's own accounting: "we multiply the per-sub-tile measurements by 16"), plus per-conversion and
  per-cell-write terms that only our SPICE parameter set fills;
* area per head is cells + charge-to-pulse circuits + counters + DACs per sub-tile, plus adders and
  pulse generators per head, times a floorplan overhead.

Every parameter is a field of :class:`HardwareParameters` with its unit and source (``paper``,
``spice``: our device stage, ``assumption``: stated, not measured), listed by
:meth:`HardwareParameters.describe`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

# Source labels of the parameters.
PAPER = "paper"
SPICE = "spice"
ASSUMPTION = "assumption"

# The authors' published totals (paper Fig. 2c / Fig. 5, docs/hardware.md) that `paper()` must reproduce.
PAPER_LATENCY_PER_TOKEN_NS = 65.0
PAPER_ENERGY_PER_HEAD_PER_TOKEN_NJ = 6.15
PAPER_ENERGY_BREAKDOWN_NJ = {"qk_arrays_charge_to_pulse": 1.12, "av_arrays_readout": 0.70,
                             "digital_routing": 4.0, "dac_write": 0.33}
# The paper's per-sub-tile figures were measured on one 64 x 64 tile and multiplied by 16 (window 1,024).
_PAPER_SUBTILES = 16

# Parts of the energy breakdown (nJ per head per token), in the paper's categories.
ENERGY_PARTS = ("qk_arrays_charge_to_pulse", "av_arrays_readout", "dac_write", "digital_routing")
ENERGY_PART_LABELS = {"qk_arrays_charge_to_pulse": "phi(QK^T) arrays + charge-to-pulse",
                      "av_arrays_readout": "phi(S)V arrays + read-out",
                      "dac_write": "DACs + cell writes",
                      "digital_routing": "digital blocks + routing"}
AREA_PARTS = ("cell_arrays", "charge_to_pulse", "pulse_counters", "dacs", "adders", "pulse_generators",
              "floorplan_overhead")
LATENCY_PARTS = ("discharge", "write_or_query", "phi_pulses", "readout_pulse", "adders")


def _p(default: Any, unit: str, source: str, doc: str) -> Any:
    """A documented parameter: its unit, where its value comes from, and what it is."""
    return field(default=default, metadata={"unit": unit, "source": source, "doc": doc})


# --------------------------------------------------------------------------------------------------
# cell technologies (area per signed weight, retention)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellTechnology:
    """Area and retention of one cell technology. A signed weight is two gain cells."""

    name: str
    signed_cell_area_um2: float     # one signed weight (two cells), um^2
    retention_tau_s: float          # storage-capacitor leakage time constant, s
    source: str                     # where the numbers come from

    def stacked(self, layers: int) -> "CellTechnology":
        """The same cell 3D-stacked on ``layers`` oxide layers (area / N, paper ref. 45)."""
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ValueError(f"stack layers must be a positive integer, got {layers!r}")
        if layers == 1:
            return self
        return dataclasses.replace(self, name=f"{self.name}_3d{layers}",
                                   signed_cell_area_um2=self.signed_cell_area_um2 / layers,
                                   source=self.source + f"; 3D-stacked on {layers} layers: area / {layers}")


# OSFET (ITO) retention: "about 1,000x longer" than the 5 ms silicon cell (paper refs. 26, 29).
_OSFET_TAU_S = 5.0
TECHNOLOGIES: Dict[str, CellTechnology] = {
    "cmos_gain_cell": CellTechnology(
        "cmos_gain_cell", 19.0, 5e-3,
        "paper: the 1 um^2 six-transistor cell is a 19x area reduction against gain cells with CMOS write "
        "transistors (Supplementary Fig. 1); tau = 5 ms from paper Fig. 1h"),
    "ito_6t_worst_case": CellTechnology(
        "ito_6t_worst_case", 1.0, _OSFET_TAU_S,
        "paper: worst-case area of the proposed 6-transistor signed cell, 1 um^2; tau: OSFET cells about "
        "1,000x the 5 ms silicon cell (paper refs. 26, 29)"),
    "ito_2t": CellTechnology(
        "ito_2t", 0.28, _OSFET_TAU_S,
        "paper (ref. 45): 2T ITO gain cell 0.14 um^2 (370 nm x 370 nm), signed = 2 cells = 0.28 um^2; tau: "
        "OSFET about 1,000x the silicon cell"),
}


def cell_technology(name: str, stack_layers: int = 1) -> CellTechnology:
    """Look up a technology by name (``cmos_gain_cell``, ``ito_6t_worst_case``, ``ito_2t``), stacked."""
    if name not in TECHNOLOGIES:
        raise ValueError(f"unknown cell technology {name!r}; expected one of {sorted(TECHNOLOGIES)}")
    return TECHNOLOGIES[name].stacked(stack_layers)


# --------------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HardwareParameters:
    """Every knob of the cost model, typed, with unit and source (see :meth:`describe`).

    Energies are per *reference sub-tile* (``reference_tile_rows x reference_tile_cols`` cells, all
    columns active), per token; :func:`estimate` scales them to the head's window, head dimension and
    tile size (array energy per active cell constant; digital and DAC energy per sub-tile and feature).
    """

    name: str = _p("paper", "-", PAPER, "name of the parameter set")

    # ---- geometry ----
    tile_rows: int = _p(64, "keys", PAPER, "keys (window positions) per sub-tile; 64 limits IR drop")
    tile_cols: int = _p(64, "features", PAPER, "features (head-dim entries) per sub-tile")
    reference_tile_rows: int = _p(64, "keys", PAPER, "rows of the tile on which the per-sub-tile energies "
                                                     "were measured (the 64 x 64 SPICE array)")
    reference_tile_cols: int = _p(64, "features", PAPER, "columns of that reference tile")

    # ---- timing (paper Fig. 2c and Methods 'Analog sliding window attention timing') ----
    clock_period_ns: float = _p(1.0, "ns", PAPER, "pulse generators and counters at 1 GHz; the digital "
                                                  "adders are assumed on the same clock")
    discharge_ns: float = _p(5.0, "ns", PAPER, "discharge (reset) of the storage capacitors before a write")
    write_pulse_ns: float = _p(10.0, "ns", PAPER, "multi-level write pulse of the 3-bit DACs (K and V)")
    query_phase_ns: float = _p(15.0, "ns", PAPER, "query PWM pulses into the K array, at most T_max; runs "
                                                  "in parallel with the write")
    phi_phase_ns: float = _p(15.0, "ns", PAPER, "phi(S) pulses from the charge-to-pulse circuits into the "
                                                "V array, at most T_max")
    readout_pulse_ns: float = _p(15.0, "ns", ASSUMPTION,
                                 "V-array read-out: its charge-to-pulse output (at most T_max) counted by the "
                                 "pulse counters at 1 GHz, which gives the 32 signed output levels (+-16 "
                                 "counts); the paper draws this phase but states no number")
    adder_clocks_per_input: int = _p(1, "clock cycles", PAPER, "each digital adder needs one clock cycle per "
                                                                "input (one input per sub-tile along the window)")

    # ---- energy per reference sub-tile per token ----
    qk_array_energy_per_subtile_j: float = _p(
        1.12e-9 / _PAPER_SUBTILES, "J", PAPER,
        "first array phi(Q K^T) of one sub-tile; the paper's 1.12 nJ per head / 16 sub-tiles, which "
        "includes the charge-to-pulse circuits")
    av_array_energy_per_subtile_j: float = _p(
        0.70e-9 / _PAPER_SUBTILES, "J", PAPER,
        "second array phi(S) V of one sub-tile; the paper's 0.70 nJ per head / 16, read-out included")
    charge_to_pulse_energy_j: float = _p(
        0.0, "J per conversion", PAPER,
        "one charge-to-pulse conversion (per key after the K array, per feature and sub-tile after the V "
        "array); 0 in the paper set because the paper's array figures include it")
    dac_energy_per_subtile_j: float = _p(
        0.33e-9 / _PAPER_SUBTILES, "J", PAPER,
        "write DACs of one sub-tile per token; the paper's 0.33 nJ per head / 16 (every sub-tile's DAC "
        "bank counted, as in the paper's x16 accounting)")
    cell_write_energy_j: float = _p(
        0.0, "J per cell", PAPER,
        "writing one gain cell (2 x cells_per_weight x D cells per token: K and V); 0 in the "
        "paper set because the paper's DAC figure includes it")
    digital_energy_per_subtile_j: float = _p(
        4.0e-9 / _PAPER_SUBTILES, "J", PAPER,
        "digital blocks (pulse generators, counters, adders, control) and routing per sub-tile; the "
        "paper's 4.0 nJ per head / 16")

    cells_per_weight: int = _p(2, "cells", PAPER, "gain cells written per stored signed weight (paper: a pair; "
                                                  "our single-ended cell: one, its reference cell is not rewritten)")

    # ---- area ----
    signed_cell_area_um2: float = _p(1.0, "um^2", PAPER, "one signed weight (two gain cells); worst-case "
                                                         "6-transistor ITO cell")
    cell_technology: str = _p("ito_6t_worst_case", "-", PAPER, "cell technology of the area and retention")
    charge_to_pulse_area_um2: float = _p(
        30.0, "um^2", ASSUMPTION,
        "one charge-to-pulse circuit (comparator + ~100 fF integration capacitor, 28 nm); the paper gives "
        "the layout but no number")
    pulse_counter_area_um2: float = _p(8.0, "um^2", ASSUMPTION, "one 5-bit pulse counter (about five 28 nm "
                                                                "flip-flops and logic)")
    dac_area_um2: float = _p(20.0, "um^2", ASSUMPTION, "one 3-bit write DAC (one per feature and array "
                                                       "in every sub-tile)")
    adder_area_um2: float = _p(40.0, "um^2", ASSUMPTION, "one serial 16-input digital adder with its "
                                                         "accumulator register (D per head)")
    pulse_generator_area_um2: float = _p(10.0, "um^2", ASSUMPTION, "one 4-bit PWM pulse generator (D per "
                                                                   "head, shared by the sub-tiles)")
    floorplan_overhead: float = _p(0.3, "fraction", ASSUMPTION, "routing, wire tapping and spacing as a "
                                                                "fraction of the placed blocks")

    # ---- retention, refresh, IR drop ----
    retention_tau_s: float = _p(5e-3, "s", PAPER, "storage-capacitor leakage time constant (paper Fig. 1h, "
                                                  "silicon CMOS gain cell; the leakage model's tau)")
    max_retention_loss: float = _p(1.0 / 16.0, "fraction", ASSUMPTION,
                                   "largest relative decay of a stored value before a refresh would be "
                                   "needed: half a 3-bit level (0.5 / 8)")
    read_voltage_v: float = _p(0.9, "V", PAPER, "read word-line voltage V_read")
    cell_read_current_a: float = _p(10e-6, "A", PAPER, "largest read current of one cell at V_read "
                                                       "(about +-10 uA, paper Fig. 1e / authors' data)")
    wire_resistance_ohm: float = _p(2.0, "Ohm", PAPER, "series wire resistance per array element")
    wire_capacitance_f: float = _p(0.8e-15, "F", PAPER, "wire capacitance per array element")

    # provenance overrides of the field metadata (a set derived from another source says so here)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False,
                                       metadata={"unit": "-", "source": "-", "doc": "per-field source overrides"})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name in ("name", "cell_technology", "sources"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"hardware parameter {f.name}={value!r}: expected a number ({f.metadata['unit']})")
            if f.type in ("int", int) and not isinstance(value, int):
                raise ValueError(f"hardware parameter {f.name}={value!r}: expected an integer")
            positive = f.name in ("tile_rows", "tile_cols", "reference_tile_rows", "reference_tile_cols", "cells_per_weight",
                                  "clock_period_ns", "signed_cell_area_um2", "retention_tau_s", "read_voltage_v")
            if positive and not value > 0:
                raise ValueError(f"hardware parameter {f.name}={value!r}: expected > 0 ({f.metadata['unit']})")
            if not positive and value < 0:
                raise ValueError(f"hardware parameter {f.name}={value!r}: expected >= 0 ({f.metadata['unit']})")
        if not 0 < self.max_retention_loss < 1:
            raise ValueError(f"max_retention_loss={self.max_retention_loss!r}: expected a fraction in (0, 1)")

    # ------------------------------------------------------------------ parameter sets
    @classmethod
    def paper(cls) -> "HardwareParameters":
        """The authors' published per-part figures (TSMC 28 nm SPICE, paper Methods / Fig. 5).

        This set RESTATES the paper's per-category energies (each category / 16 sub-tiles): its total of
        6.15 nJ per head per token is an input of the cost model, not a reproduction of it. What our own
        circuit costs is the ``simulated`` set.
        """
        return cls()

    @classmethod
    def simulated(cls, device_summary_path: Union[str, Path],
                  base: Optional["HardwareParameters"] = None) -> "HardwareParameters":
        """Per-operation energy and latency from our device stage (``results/<profile>/device/summary.json``).

        The arrays' MAC energy and latency, the cell write energy and the retention come from our SPICE
        run (``array_op_energy_j`` of one ``array_rows x array_cols`` array operation, scaled per cell
        to the reference tile; ``write_energy_j`` per cell; ``array_op_latency_ns``; ``retention_tau_s``).
        The charge-to-pulse conversion is our SPICE bench's energy (``charge_to_pulse_energy_j``: integrator,
        discharge current source and comparator) when the device stage simulated it, else an assumption
        (0.1 pJ: ~100 fF integrated to 0.9 V plus a comparator); the digital blocks and DACs keep the
        paper's figures.
        """
        summary = load_device_summary(device_summary_path)
        base = base or cls.paper()
        c2p = summary.get("charge_to_pulse_energy_j")
        c2p = float(c2p) if isinstance(c2p, (int, float)) and math.isfinite(c2p) and c2p > 0 else None
        rows, cols = summary["array_rows"], summary["array_cols"]
        ref_cells = base.reference_tile_rows * base.reference_tile_cols
        array_per_ref_tile = summary["array_op_energy_j"] * ref_cells / (rows * cols)
        array_phase = max(base.query_phase_ns, float(summary["array_op_latency_ns"]))
        where = f"our SPICE ({summary['technology']}, {Path(device_summary_path).name})"
        sources = {
            "qk_array_energy_per_subtile_j": f"{SPICE}: {where}: array_op_energy_j x {ref_cells}/({rows}x{cols}) cells",
            "av_array_energy_per_subtile_j": f"{SPICE}: {where}: array_op_energy_j x {ref_cells}/({rows}x{cols}) cells",
            "cell_write_energy_j": f"{SPICE}: {where}: write_energy_j",
            "cells_per_weight": f"{SPICE}: {where}: cell_kind {summary.get('cell_kind', 'differential_pair')}",
            "query_phase_ns": f"{SPICE}: {where}: max(T_max, array_op_latency_ns)",
            "phi_phase_ns": f"{SPICE}: {where}: max(T_max, array_op_latency_ns)",
            "retention_tau_s": f"{SPICE}: {where}: retention_tau_s",
            "charge_to_pulse_energy_j": (f"{SPICE}: {where}: charge_to_pulse_energy_j (integrator + comparator bench)"
                                         if c2p is not None else
                                         f"{ASSUMPTION}: ~100 fF x (0.9 V)^2 + comparator, no SPICE of the periphery"),
            "dac_energy_per_subtile_j": f"{PAPER} (our SPICE has no DAC periphery)",
            "digital_energy_per_subtile_j": f"{PAPER} (our SPICE has no digital blocks)",
        }
        return dataclasses.replace(
            base, name="simulated",
            qk_array_energy_per_subtile_j=float(array_per_ref_tile),
            av_array_energy_per_subtile_j=float(array_per_ref_tile),
            charge_to_pulse_energy_j=c2p if c2p is not None else 0.1e-12,
            cell_write_energy_j=float(summary["write_energy_j"]),
            cells_per_weight=1 if summary.get("cell_kind") == "single_ended" else 2,
            query_phase_ns=array_phase, phi_phase_ns=array_phase,
            retention_tau_s=float(summary["retention_tau_s"]),
            sources={**dict(base.sources), **sources})

    def with_technology(self, name: str, stack_layers: int = 1, retention: bool = True) -> "HardwareParameters":
        """This set with another cell technology: its signed-cell area and, if ``retention``, its tau.

        ``retention=False`` keeps this set's tau (the paper's leakage model keeps the conservative 5 ms
        of the silicon cell for its ITO floorplan).
        """
        tech = cell_technology(name, stack_layers)
        changes: Dict[str, Any] = {"cell_technology": tech.name, "signed_cell_area_um2": tech.signed_cell_area_um2}
        sources = {"signed_cell_area_um2": tech.source, "cell_technology": tech.source}
        if retention:
            changes["retention_tau_s"] = tech.retention_tau_s
            sources["retention_tau_s"] = tech.source
        return dataclasses.replace(self, **changes, sources={**dict(self.sources), **sources})

    def replace(self, **changes: Any) -> "HardwareParameters":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def source_of(self, name: str) -> str:
        f = {f.name: f for f in dataclasses.fields(self)}[name]
        return self.sources.get(name, f.metadata["source"])

    def describe(self) -> List[Dict[str, Any]]:
        """Every parameter as ``{name, value, unit, source, doc}`` (the table written next to the results)."""
        rows = []
        for f in dataclasses.fields(self):
            if f.name == "sources":
                continue
            rows.append({"name": f.name, "value": getattr(self, f.name), "unit": f.metadata["unit"],
                         "source": self.source_of(f.name), "doc": f.metadata["doc"]})
        return rows


DEVICE_SUMMARY_KEYS = ("technology", "mac_energy_j", "write_energy_j", "array_op_energy_j",
                       "array_op_latency_ns", "array_rows", "array_cols", "retention_tau_s")


def load_device_summary(path: Union[str, Path]) -> Dict[str, Any]:
    """Read and check the device stage's summary; a missing file or key is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"device summary {path} not found: run the characterize stage first "
                                f"(python -m gaincell characterize) or set hardware.parameter_sets=[paper]")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"device summary {path} is not valid JSON: {err}") from None
    if not isinstance(summary, dict):
        raise ValueError(f"device summary {path}: expected a JSON object, got {type(summary).__name__}")
    missing = [k for k in DEVICE_SUMMARY_KEYS if k not in summary or summary[k] is None]
    if missing:
        raise KeyError(f"device summary {path} lacks {', '.join(missing)} (expected keys: "
                       f"{', '.join(DEVICE_SUMMARY_KEYS)})")
    for key in DEVICE_SUMMARY_KEYS[1:]:
        value = summary[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"device summary {path}: {key}={value!r}, expected a positive number")
    for key in ("array_rows", "array_cols"):
        if int(summary[key]) != summary[key]:
            raise ValueError(f"device summary {path}: {key}={summary[key]!r}, expected an integer")
        summary[key] = int(summary[key])
    return summary


# --------------------------------------------------------------------------------------------------
# the estimate
# --------------------------------------------------------------------------------------------------
@dataclass
class HardwareEstimate:
    """Latency, energy and area of ``heads`` analog attention heads (one layer unless ``layers`` > 1).

    Energies in nJ per token, latencies in ns per token, areas in um^2 (``area_total_mm2`` in mm^2).
    """

    parameter_set: str
    window: int
    head_dim: int
    heads: int
    layers: int
    window_tiles: int                    # sub-tiles along the window (adder inputs)
    dim_tiles: int                       # sub-tiles along the head dimension
    subtiles_per_head: int
    latency_breakdown_ns: Dict[str, float]
    latency_per_token_ns: float          # one layer, all heads in parallel
    latency_all_layers_ns: float         # layers in sequence (attention only)
    energy_breakdown_nj: Dict[str, float]  # part -> nJ per head per token
    energy_per_head_per_token_nj: float
    energy_per_token_nj: float           # all heads of one layer
    energy_all_layers_nj: float          # all heads of all layers
    area_breakdown_um2: Dict[str, float]  # part -> um^2 per head
    area_per_head_um2: float
    area_total_mm2: float                # heads x layers
    cell_technology: str
    retention_tau_s: float
    decay_per_step: float                # layers x latency / tau (the leakage model's lambda)
    storage_time_s: float                # longest a key/value is held: window x layers x latency
    oldest_value_retention: float        # exp(-storage_time / tau), fraction of the stored value left
    refresh_interval_s: float            # time until the decay reaches max_retention_loss
    refresh_needed: bool                 # storage_time > refresh_interval
    refresh_energy_per_head_per_token_nj: float  # rewriting the window once per refresh interval, if needed
    ir_drop_fraction: float              # worst-case IR drop along a tile line / V_read

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return int(value)


# How a parameter's source reads on a figure: our SPICE measured it, the paper states it, or we assume it.
PROVENANCE_LABELS = {SPICE: "measured here", PAPER: "from the paper", ASSUMPTION: "assumption"}


def provenance(params: HardwareParameters, name: str) -> str:
    """``measured here`` / ``from the paper`` / ``assumption``: the kind of source of one parameter."""
    source = params.source_of(name)
    kind = source.split(":")[0].split(" ")[0].strip()
    return PROVENANCE_LABELS.get(kind, kind)


def energy_components_nj(params: HardwareParameters, window: int, head_dim: int) -> Dict[str, List[Dict[str, Any]]]:
    """Energy per head per token, nJ, of every energy part (ENERGY_PARTS) as its components, each with the
    parameter it comes from and that parameter's provenance (``measured here``, ``from the paper``,
    ``assumption``): what the figures mark on each bar. Components of 0 nJ are kept (a set may zero one).

    Array energy scales with active cells (window x head_dim) relative to the reference tile; the DACs,
    counters and adders with (sub-tiles along the window) x (features) relative to one tile.
    """
    p = params
    window_tiles = window // p.tile_rows
    cell_scale = window * head_dim / (p.reference_tile_rows * p.reference_tile_cols)
    feature_tile_scale = window_tiles * head_dim / p.reference_tile_cols
    qk_conversions = window                      # one charge-to-pulse per key
    av_conversions = window_tiles * head_dim     # one read-out per feature per sub-tile
    cells_written = 2 * p.cells_per_weight * head_dim   # the new K and V columns
    terms = {
        "qk_arrays_charge_to_pulse": [("qk_array_energy_per_subtile_j", cell_scale),
                                      ("charge_to_pulse_energy_j", qk_conversions)],
        "av_arrays_readout": [("av_array_energy_per_subtile_j", cell_scale),
                              ("charge_to_pulse_energy_j", av_conversions)],
        "dac_write": [("dac_energy_per_subtile_j", feature_tile_scale), ("cell_write_energy_j", cells_written)],
        "digital_routing": [("digital_energy_per_subtile_j", feature_tile_scale)],
    }
    return {part: [{"parameter": name, "nj": getattr(p, name) * count * 1e9, "provenance": provenance(p, name),
                    "source": p.source_of(name)} for name, count in parts]
            for part, parts in terms.items()}


def estimate(params: HardwareParameters, window: int, head_dim: int, heads: int, layers: int = 1) -> HardwareEstimate:
    """Latency, energy and area for ``heads`` heads of window ``window`` and head dimension ``head_dim``.

    Raises ValueError when a size is not a positive integer or ``window`` is not a multiple of the
    sub-tile rows (``params.tile_rows``).
    """
    window = _check_size("window", window)
    head_dim = _check_size("head_dim", head_dim)
    heads = _check_size("heads", heads)
    layers = _check_size("layers", layers)
    p = params
    if window % p.tile_rows:
        raise ValueError(f"window={window} is not a multiple of the sub-tile rows tile_rows={p.tile_rows}: "
                         f"the KV window is split into whole {p.tile_rows}-key sub-tiles")
    window_tiles = window // p.tile_rows
    dim_tiles = -(-head_dim // p.tile_cols)
    subtiles = window_tiles * dim_tiles

    # ---- latency: the timing chain of one token (paper Fig. 2c); heads run in parallel ----
    latency = {
        "discharge": p.discharge_ns,
        "write_or_query": max(p.write_pulse_ns, p.query_phase_ns),  # V is written while Q drives K
        "phi_pulses": p.phi_phase_ns,
        "readout_pulse": p.readout_pulse_ns,
        "adders": window_tiles * p.adder_clocks_per_input * p.clock_period_ns,  # one clock per input
    }
    latency_ns = sum(latency.values())

    # ---- energy per head per token (each part a sum of components, see energy_components_nj) ----
    energy_j = {part: sum(c["nj"] for c in comps) * 1e-9
                for part, comps in energy_components_nj(p, window, head_dim).items()}
    energy_nj = {k: v * 1e9 for k, v in energy_j.items()}
    per_head_nj = sum(energy_nj.values())

    # ---- area per head (whole sub-tiles are placed even when head_dim leaves columns empty) ----
    tile_cells = p.tile_rows * p.tile_cols
    area = {
        "cell_arrays": subtiles * 2 * tile_cells * p.signed_cell_area_um2,
        "charge_to_pulse": subtiles * (p.tile_rows + p.tile_cols) * p.charge_to_pulse_area_um2,
        "pulse_counters": subtiles * p.tile_cols * p.pulse_counter_area_um2,
        "dacs": subtiles * 2 * p.tile_cols * p.dac_area_um2,
        "adders": dim_tiles * p.tile_cols * p.adder_area_um2,
        "pulse_generators": dim_tiles * p.tile_cols * p.pulse_generator_area_um2,
    }
    area["floorplan_overhead"] = p.floorplan_overhead * sum(area.values())
    area_head = sum(area.values())

    # ---- retention and refresh ----
    token_period_s = layers * latency_ns * 1e-9          # one token passes all layers before the next
    storage_time_s = window * token_period_s             # a key is overwritten after `window` tokens
    refresh_interval_s = -p.retention_tau_s * math.log1p(-p.max_retention_loss)
    refresh_needed = storage_time_s > refresh_interval_s
    # A refresh rewrites the whole window (window columns, each a token's write) once per interval.
    write_nj_per_column = energy_nj["dac_write"]
    refresh_nj = (window * write_nj_per_column * token_period_s / refresh_interval_s) if refresh_needed else 0.0

    # Worst case IR drop: every cell of a line of N elements sinks the full read current.
    n = max(p.tile_rows, p.tile_cols)
    ir_drop = p.wire_resistance_ohm * p.cell_read_current_a * n * (n + 1) / 2 / p.read_voltage_v

    return HardwareEstimate(
        parameter_set=p.name, window=window, head_dim=head_dim, heads=heads, layers=layers,
        window_tiles=window_tiles, dim_tiles=dim_tiles, subtiles_per_head=subtiles,
        latency_breakdown_ns=latency, latency_per_token_ns=latency_ns, latency_all_layers_ns=layers * latency_ns,
        energy_breakdown_nj=energy_nj, energy_per_head_per_token_nj=per_head_nj,
        energy_per_token_nj=heads * per_head_nj, energy_all_layers_nj=layers * heads * per_head_nj,
        area_breakdown_um2=area, area_per_head_um2=area_head, area_total_mm2=heads * layers * area_head * 1e-6,
        cell_technology=p.cell_technology, retention_tau_s=p.retention_tau_s,
        decay_per_step=token_period_s / p.retention_tau_s, storage_time_s=storage_time_s,
        oldest_value_retention=math.exp(-storage_time_s / p.retention_tau_s),
        refresh_interval_s=refresh_interval_s, refresh_needed=refresh_needed,
        refresh_energy_per_head_per_token_nj=refresh_nj, ir_drop_fraction=ir_drop)


# --------------------------------------------------------------------------------------------------
# the projections on analog weight tiles (beyond the paper; literature inputs, separate from `estimate`)
# --------------------------------------------------------------------------------------------------
LITERATURE = "literature"
# IBM HERMES (Le Gallo et al., Nat. Electron. 6, 680 (2023)): 64 PCM cores of 256 x 256, 14 nm; for 8-bit
# input/output MVMs 63.1 TOPS at 9.76 TOPS/W (one-phase read) or 16.1 TOPS at 2.48 TOPS/W (four-phase).
HERMES_CORES = 64
HERMES_CORE_ROWS = HERMES_CORE_COLS = 256
HERMES_SOURCE = ("Le Gallo et al., Nat. Electron. 6, 680 (2023), 14 nm PCM chip, 8-bit input/output MVMs: "
                 "{tops} TOPS at {tops_w} TOPS/W ({mode} read); 1 MAC = 2 operations")


@dataclass(frozen=True)
class AnalogTileParameters:
    """Analog weight tiles (crossbars holding a projection's weights): per-MAC energy and per-MVM latency.

    Literature inputs, not simulated here (source in ``source``); the projections' cost is kept apart
    from the attention's :func:`estimate` (see :func:`estimate_projections`).
    """

    name: str = _p("hermes_one_phase", "-", LITERATURE, "name of the parameter set")
    tile_rows: int = _p(HERMES_CORE_ROWS, "inputs", LITERATURE, "inputs (crossbar rows) per tile")
    tile_cols: int = _p(HERMES_CORE_COLS, "outputs", LITERATURE, "outputs (crossbar columns) per tile")
    energy_per_mac_j: float = _p(2 / 9.76e12, "J per MAC", LITERATURE,
                                 "chip-level energy of one multiply-accumulate in an 8-bit MVM: 2 / (TOPS/W)")
    mvm_latency_ns: float = _p(2 * HERMES_CORE_ROWS * HERMES_CORE_COLS / (63.1e12 / HERMES_CORES) * 1e9, "ns",
                               LITERATURE, "one MVM of a full tile: 2 x rows x cols operations / (TOPS per core)")
    source: str = _p(HERMES_SOURCE.format(tops=63.1, tops_w=9.76, mode="one-phase"), "-", LITERATURE,
                     "where the numbers come from")

    def __post_init__(self) -> None:
        for name in ("tile_rows", "tile_cols", "energy_per_mac_j", "mvm_latency_ns"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"analog tile parameter {name}={value!r}: expected a number > 0")

    @classmethod
    def hermes_one_phase(cls) -> "AnalogTileParameters":
        """HERMES in its one-phase (low-precision, fast) read mode: 63.1 TOPS, 9.76 TOPS/W."""
        return cls()

    @classmethod
    def hermes_four_phase(cls) -> "AnalogTileParameters":
        """HERMES in its four-phase (high-precision) read mode: 16.1 TOPS, 2.48 TOPS/W."""
        return cls(name="hermes_four_phase", energy_per_mac_j=2 / 2.48e12,
                   mvm_latency_ns=2 * HERMES_CORE_ROWS * HERMES_CORE_COLS / (16.1e12 / HERMES_CORES) * 1e9,
                   source=HERMES_SOURCE.format(tops=16.1, tops_w=2.48, mode="four-phase"))

    def describe(self) -> List[Dict[str, Any]]:
        return [{"name": f.name, "value": getattr(self, f.name), "unit": f.metadata["unit"],
                 "source": f.metadata["source"], "doc": f.metadata["doc"]} for f in dataclasses.fields(self)]


# The projections of one GPT-2 block, in order of execution: (name, inputs, outputs) in units of d_model
# (the MLP's hidden width is 4 d_model). QKV -> [attention] -> out -> fc -> proj run one after another.
PROJECTIONS = (("qkv", 1, 3), ("attention_out", 1, 1), ("mlp_fc", 1, 4), ("mlp_proj", 4, 1))


@dataclass
class ProjectionEstimate:
    """Energy and latency per token of a transformer's projections on analog weight tiles.

    One MAC per weight per token; every tile of a projection works in parallel and their partial sums
    add digitally (that addition, LayerNorm, GELU and the residual adds are not counted).
    """

    parameter_set: str
    d_model: int
    layers: int
    macs_per_token_per_layer: int
    tiles_per_layer: int
    energy_breakdown_nj: Dict[str, float]   # projection -> nJ per token, one layer
    energy_per_token_nj: float              # one layer
    energy_all_layers_nj: float
    latency_per_token_ns: float             # one layer: the projections' MVMs in sequence
    latency_all_layers_ns: float

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def estimate_projections(tiles: AnalogTileParameters, d_model: int, layers: int = 1) -> ProjectionEstimate:
    """The projections (QKV, attention output, MLP up and down) of ``layers`` GPT-2 blocks of width
    ``d_model`` on analog weight tiles ``tiles``."""
    d_model = _check_size("d_model", d_model)
    layers = _check_size("layers", layers)
    energy, macs, n_tiles = {}, 0, 0
    for name, k_in, k_out in PROJECTIONS:
        n_in, n_out = k_in * d_model, k_out * d_model
        macs += n_in * n_out
        n_tiles += -(-n_in // tiles.tile_rows) * -(-n_out // tiles.tile_cols)
        energy[name] = n_in * n_out * tiles.energy_per_mac_j * 1e9
    per_layer_nj = sum(energy.values())
    latency = len(PROJECTIONS) * tiles.mvm_latency_ns
    return ProjectionEstimate(parameter_set=tiles.name, d_model=d_model, layers=layers,
                              macs_per_token_per_layer=macs, tiles_per_layer=n_tiles, energy_breakdown_nj=energy,
                              energy_per_token_nj=per_layer_nj, energy_all_layers_nj=layers * per_layer_nj,
                              latency_per_token_ns=latency, latency_all_layers_ns=layers * latency)


def attention_share(attention: HardwareEstimate, projections: ProjectionEstimate) -> Dict[str, float]:
    """What part of a token's energy and latency the gain-cell attention is once the projections are on
    analog tiles too (all layers; the attention's heads run in parallel, then the next projection)."""
    if attention.layers != projections.layers:
        raise ValueError(f"attention estimate has {attention.layers} layers, the projections {projections.layers}")
    att_e, proj_e = attention.energy_all_layers_nj, projections.energy_all_layers_nj
    att_t, proj_t = attention.latency_all_layers_ns, projections.latency_all_layers_ns
    return {"attention_energy_nj": att_e, "projection_energy_nj": proj_e, "token_energy_nj": att_e + proj_e,
            "attention_energy_share": att_e / (att_e + proj_e),
            "attention_latency_ns": att_t, "projection_latency_ns": proj_t, "token_latency_ns": att_t + proj_t,
            "attention_latency_share": att_t / (att_t + proj_t)}
