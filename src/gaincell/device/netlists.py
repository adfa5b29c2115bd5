"""Netlists of the signed gain cell, its write and retention test benches, and the array (PySpice).

The cell (per polarity, two per signed weight):

    write bitline WBL --[write transistor, gate = write word line WWL]-- storage node SN --C_s-- gnd
    read word line RWL --[read transistor, gate = SN]-- read bitline RBL (virtual ground, V_bl)

An input is a pulse of width ``t`` and height ``V_read`` on RWL; the read transistor's current,
set by the stored voltage, flows into the bitline, which a charge integrator holds at ``V_bl``
(a voltage source here; its current is the signal). The output is the charge collected during the
pulse. A signed output takes two bitlines (positive and negative part); the output is
``Q(RBL+) - Q(RBL-)``. Which cells sit on them is ``device.cell`` (``CellKind``):

* ``single_ended`` (default): ONE cell per weight stores ``v_min + K / 0.9 * (v_max - v_min)`` on the
  positive bitline; the negative bitline carries a reference cell (the same transistors) holding
  ``device.reference_v`` (default the mid-supply, ``supply_v / 2``), so the signed output is the
  cell's current minus the reference current. Nothing makes this odd in ``W``: the read transistor's
  convex characteristic gives non-zero even terms (``c_2``) and the reference sets where the output
  crosses zero (``c_0``).
* ``differential_pair``: a matched pair, sign-magnitude: the positive cell stores
  ``v_min + max(W, 0) / 0.45 * (v_max - v_min)``, the negative cell the same with ``max(-W, 0)``; zero
  weight is both cells at ``v_min``. Odd in ``W`` by construction (``c_0 = c_2 = 0``).
* ``complementary_pair``: the positive cell stores ``v_min + K / 0.9 * (v_max - v_min)``, the negative
  cell the mirror voltage ``v_max + v_min - V+``. Also odd by construction.

Here ``K`` in [0, 0.9] is the model's stored voltage (docs/attention.md#quantization) and ``W = K - 0.45``; the device stage
sweeps ``K`` levels and maps them to physical voltages with ``stored_voltages``.

Test benches preset a storage node through an ideal switch that opens before the read (the
authors' read current was also characterised against a forced stored voltage); the write bench
simulates the real write path (discharge, then a DAC level through the write transistor).
Every source whose value changes between points is set by an ngspice ``alter`` command, so the
netlist is parsed once per worker.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Dict, List, Sequence, Tuple

import numpy as np

from gaincell.device.technology import Technology, _fmt


class CellKind(str, Enum):
    """How a signed weight is stored and read (``device.cell``); see the module docstring."""

    single_ended = "single_ended"
    differential_pair = "differential_pair"
    complementary_pair = "complementary_pair"


CELL_KINDS = tuple(k.value for k in CellKind)
ODD_BY_CONSTRUCTION = ("differential_pair", "complementary_pair")   # c_0 = c_2 = 0 exactly
MODEL_STORED_MAX_V = 0.9     # the model's stored-voltage range is [0, 0.9] V (docs/attention.md#quantization)
MODEL_OFFSET_V = 0.45        # weight W = K - 0.45 (eq. 4)


@dataclass(frozen=True)
class CellDesign:
    """Every electrical parameter of the cell and of its test benches (units in the names)."""

    read_device: str
    read_w_um: float
    read_l_um: float
    write_device: str
    write_w_um: float
    write_l_um: float
    storage_capacitance_f: float
    cell: str
    reference_v: float
    stored_v_min: float
    stored_v_max: float
    bitline_v: float
    write_wordline_v: float
    hold_wordline_v: float
    hold_bitline_v: float
    edge_ns: float
    preset_ns: float
    read_start_ns: float
    settle_ns: float
    pulse_width_max_ns: float
    discharge_ns: float
    write_ns: float
    time_step_ns: float
    gmin_s: float
    reltol: float

    @classmethod
    def from_config(cls, d) -> "CellDesign":
        get = (lambda k: d[k]) if hasattr(d, "__getitem__") else (lambda k: getattr(d, k))
        def value(f):
            v = get(f)
            if f == "cell":
                return cell_kind_name(v)
            if f == "reference_v":
                return reference_voltage(v, float(get("supply_v")))
            return str(v) if f in ("read_device", "write_device") else float(v)
        return cls(**{f: value(f) for f in cls.__dataclass_fields__})

    # ---- timing -----------------------------------------------------------------------------------
    @property
    def read_stop_s(self) -> float:
        """End of a read transient: preset, the longest pulse, then settling."""
        return (self.read_start_ns + self.pulse_width_max_ns + self.settle_ns) * 1e-9

    @property
    def write_end_ns(self) -> float:
        return self.edge_ns + self.discharge_ns + self.write_ns

    @property
    def write_stop_s(self) -> float:
        return (self.write_end_ns + 2 * self.edge_ns + 5.0) * 1e-9

    def options_line(self) -> str:
        # gmin: ngspice puts gmin across every junction; its default 1e-12 S alone would discharge a
        # 1 fF node with a 1 ms time constant and hide the transistors' own leakage (measured here).
        return f".options gmin={_fmt(self.gmin_s)} reltol={_fmt(self.reltol)}"

    def tran(self, stop_s: float) -> str:
        return f"tran {_fmt(self.time_step_ns * 1e-9)} {_fmt(stop_s)}"

    # ---- weights ----------------------------------------------------------------------------------
    def stored_voltages(self, level_v: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(V+, V-) physical stored voltages of the two cells for model stored voltages K in [0, 0.9]."""
        k = np.asarray(level_v, dtype=float)
        span = self.stored_v_max - self.stored_v_min
        if self.cell == "single_ended":
            pos = self.stored_v_min + k / MODEL_STORED_MAX_V * span
            neg = np.full_like(pos, self.reference_v)
        elif self.cell == "differential_pair":
            w = k - MODEL_OFFSET_V
            pos = self.stored_v_min + np.clip(w, 0, None) / MODEL_OFFSET_V * span
            neg = self.stored_v_min + np.clip(-w, 0, None) / MODEL_OFFSET_V * span
        elif self.cell == "complementary_pair":
            pos = self.stored_v_min + k / MODEL_STORED_MAX_V * span
            neg = self.stored_v_max + self.stored_v_min - pos
        else:
            raise ValueError(f"device.cell={self.cell!r}: expected one of {', '.join(CELL_KINDS)}")
        return pos, neg

    def pulse_spec(self, width_ns: float, amplitude_v: float, delay_ns: float) -> List[float]:
        """ngspice PULSE parameters (V1 V2 TD TR TF PW PER) of a pulse ``width_ns`` wide at half height.

        A zero width is no pulse at all (amplitude 0), as a PWM generator would do.
        """
        edge = self.edge_ns
        if width_ns <= 0:
            return [0.0, 0.0, delay_ns * 1e-9, edge * 1e-9, edge * 1e-9, edge * 1e-9, 1.0]
        flat = max(width_ns - edge, 0.0)   # 50 %-to-50 % width = flat top + one edge
        return [0.0, float(amplitude_v), delay_ns * 1e-9, edge * 1e-9, edge * 1e-9, flat * 1e-9, 1.0]


def cell_kind_name(value) -> str:
    """``device.cell`` as its name (an Enum member or its string), or a one-line error naming it."""
    name = value.value if isinstance(value, Enum) else str(value)
    if name not in CELL_KINDS:
        raise ValueError(f"device.cell={value!r}: expected one of {', '.join(CELL_KINDS)}")
    return name


def reference_voltage(reference_v, supply_v: float) -> float:
    """The single-ended cell's reference stored voltage, V: ``device.reference_v`` or, when it is None,
    the mid-supply ``supply_v / 2``."""
    return float(supply_v) / 2 if reference_v is None else float(reference_v)


def pulse_alter(source: str, spec: Sequence[float]) -> str:
    return f"alter @{source.lower()}[pulse] = [ " + " ".join(_fmt(v) for v in spec) + " ]"


def pwl_alter(source: str, points: Sequence[Tuple[float, float]]) -> str:
    return f"alter @{source.lower()}[pwl] = [ " + " ".join(f"{_fmt(t)} {_fmt(v)}" for t, v in points) + " ]"


def dc_alter(source: str, value: float) -> str:
    return f"alter {source.lower()} dc = {_fmt(value)}"


def _circuit(title: str):
    from PySpice.Spice.Netlist import Circuit

    return Circuit(title)


def _finish(circuit, tech: Technology, cell: CellDesign, transistors: List[str], extra: Sequence[str] = (),
            sizes: Sequence[Tuple[str, float, float]] = ()) -> str:
    sizes = list(sizes) or [(cell.read_device, cell.read_w_um, cell.read_l_um),
                            (cell.write_device, cell.write_w_um, cell.write_l_um)]
    body = str(circuit).rstrip()
    if body.endswith(".end"):
        body = body[:-4].rstrip()
    lines = [body.splitlines()[0], tech.preamble(sizes).rstrip()] + body.splitlines()[1:]
    lines += transistors
    lines += list(extra)
    lines += [cell.options_line(), ".end", ""]
    return "\n".join(lines)


def _add_preset(circuit, node: str, name: str, cell: CellDesign) -> None:
    """Ideal preset of a storage node: a switch from a DC source, open from ``preset_ns`` on."""
    circuit.V(f"pre{name}", f"pre{name}", circuit.gnd, 0.0)
    circuit.VoltageControlledSwitch(f"pre{name}", node, f"pre{name}", "pctl", circuit.gnd, model="gc_preset_sw")


def _preset_control(circuit, cell: CellDesign) -> None:
    t_open = cell.preset_ns * 1e-9
    circuit.PieceWiseLinearVoltageSource("pctl", "pctl", circuit.gnd,
                                         values=[(0, 1), (t_open, 1), (t_open + cell.edge_ns * 1e-9, 0)])
    circuit.model("gc_preset_sw", "sw", vt=0.5, vh=0.0, ron=10.0, roff=1e18)


def _cell_transistors(tech: Technology, cell: CellDesign, tag: str, sn: str, rwl: str, rbl: str,
                      wwl: str, wbl: str, with_write: bool = True, read_delvto_v: float = 0.0) -> List[str]:
    lines = [tech.instance(f"r{tag}", rwl, sn, rbl, "0", cell.read_device, cell.read_w_um, cell.read_l_um,
                           delvto_shift_v=read_delvto_v)]
    if with_write:
        lines.append(tech.instance(f"w{tag}", wbl, wwl, sn, "0", cell.write_device, cell.write_w_um, cell.write_l_um))
    return lines


# --------------------------------------------------------------------------------------------------
# test benches
# --------------------------------------------------------------------------------------------------
READ_SOURCES = {"rwl": "vrwl", "pos_preset": "vprep", "neg_preset": "vpren", "pos_bitline": "vblp",
                "neg_bitline": "vbln"}


def read_pair_netlist(tech: Technology, cell: CellDesign, read_delvto_v: Tuple[float, float] = (0.0, 0.0)) -> str:
    """Signed pair (two cells, two bitlines) read bench; alter ``vprep``/``vpren`` (stored voltages)
    and ``@vrwl[pulse]`` (input pulse). ``read_delvto_v``: threshold shifts of the positive and the
    negative (reference) read transistor, V (Monte-Carlo mismatch; 0 = nominal)."""
    c = _circuit("gaincell signed pair read")
    c.V("wwl", "wwl", c.gnd, cell.hold_wordline_v)
    c.V("wbl", "wbl", c.gnd, cell.hold_bitline_v)
    c.PulseVoltageSource("rwl", "rwl", c.gnd, initial_value=0, pulsed_value=0, pulse_width=1e-9,
                         period=1.0, delay_time=cell.read_start_ns * 1e-9, rise_time=cell.edge_ns * 1e-9,
                         fall_time=cell.edge_ns * 1e-9)
    c.V("blp", "blp", c.gnd, cell.bitline_v)
    c.V("bln", "bln", c.gnd, cell.bitline_v)
    for p in ("p", "n"):
        c.C(f"s{p}", f"sn{p}", c.gnd, cell.storage_capacitance_f)
        _add_preset(c, f"sn{p}", p, cell)
    _preset_control(c, cell)
    transistors = (_cell_transistors(tech, cell, "p", "snp", "rwl", "blp", "wwl", "wbl",
                                     read_delvto_v=read_delvto_v[0])
                   + _cell_transistors(tech, cell, "n", "snn", "rwl", "bln", "wwl", "wbl",
                                       read_delvto_v=read_delvto_v[1]))
    return _finish(c, tech, cell, transistors)


def write_cell_netlist(tech: Technology, cell: CellDesign) -> str:
    """One cell written through its write transistor: discharge, then a DAC level; alter ``@vwbl[pwl]``."""
    c = _circuit("gaincell write")
    e = cell.edge_ns * 1e-9
    t_on = e
    t_off = cell.write_end_ns * 1e-9
    c.PieceWiseLinearVoltageSource("wwl", "wwl", c.gnd, values=[
        (0, cell.hold_wordline_v), (t_on, cell.write_wordline_v), (t_off, cell.write_wordline_v),
        (t_off + e, cell.hold_wordline_v)])
    c.PieceWiseLinearVoltageSource("wbl", "wbl", c.gnd, values=write_bitline_pwl(cell, cell.hold_bitline_v))
    c.V("rwl", "rwl", c.gnd, 0.0)
    c.V("bl", "bl", c.gnd, cell.bitline_v)
    c.C("s", "sn", c.gnd, cell.storage_capacitance_f)
    transistors = _cell_transistors(tech, cell, "0", "sn", "rwl", "bl", "wwl", "wbl")
    # The storage node starts full (an old value), so the discharge phase is exercised too.
    return _finish(c, tech, cell, transistors, extra=[f".ic v(sn)={_fmt(cell.stored_v_max)}"])


def write_bitline_pwl(cell: CellDesign, level_v: float) -> List[Tuple[float, float]]:
    """WBL waveform: 0 V during the discharge phase, the DAC level during the write, then hold."""
    e = cell.edge_ns * 1e-9
    t_write = (cell.edge_ns + cell.discharge_ns) * 1e-9
    t_off = cell.write_end_ns * 1e-9
    return [(0, 0.0), (t_write, 0.0), (t_write + e, float(level_v)), (t_off + e, float(level_v)),
            (t_off + 2 * e, cell.hold_bitline_v)]


def retention_netlist(tech: Technology, cell: CellDesign) -> str:
    """A preset cell left alone (write transistor off): alter ``vprep`` (initial stored voltage)."""
    c = _circuit("gaincell retention")
    c.V("wwl", "wwl", c.gnd, cell.hold_wordline_v)
    c.V("wbl", "wbl", c.gnd, cell.hold_bitline_v)
    c.V("rwl", "rwl", c.gnd, 0.0)
    c.V("bl", "bl", c.gnd, cell.bitline_v)
    c.C("s", "snp", c.gnd, cell.storage_capacitance_f)
    _add_preset(c, "snp", "p", cell)
    _preset_control(c, cell)
    transistors = _cell_transistors(tech, cell, "0", "snp", "rwl", "bl", "wwl", "wbl")
    return _finish(c, tech, cell, transistors)


@dataclass(frozen=True)
class ChargeToPulseDesign:
    """The charge-to-pulse read-out (the HardSigmoid after each array column): the column's charge sits on an
    integration capacitor; from ``start_ns`` a current-source transistor discharges it at a near-constant
    current while a two-inverter comparator holds its output high: the output pulse lasts as long as the
    node stays above the comparator's switching voltage, so its width grows linearly with the charge, and
    a counter that stops at T_max clips it (the HardSigmoid). Units in the names."""

    integration_capacitance_f: float    # integration capacitor, F
    discharge_bias_v: float             # gate voltage of the discharge transistor (sets its current), V
    discharge_w_um: float               # discharge transistor (nfet) width, um
    discharge_l_um: float               # discharge transistor length, um (long: a better current source)
    inverter_n_w_um: float              # comparator inverters: nfet width, um
    inverter_p_w_um: float              # comparator inverters: pfet width, um
    inverter_l_um: float                # comparator inverters: channel length, um
    start_ns: float = 2.0               # discharge (and pulse count) start, ns; the preset opens before it

    def sizes(self) -> List[Tuple[str, float, float]]:
        return [("nfet_01v8", self.discharge_w_um, self.discharge_l_um),
                ("nfet_01v8", self.inverter_n_w_um, self.inverter_l_um),
                ("pfet_01v8", self.inverter_p_w_um, self.inverter_l_um)]


C2P_SOURCES = {"preset": "vprep", "supply": "vdd"}


def charge_to_pulse_netlist(tech: Technology, cell: CellDesign, design: ChargeToPulseDesign, supply_v: float) -> str:
    """The charge-to-pulse bench: alter ``vprep`` (the integration node's voltage when the count starts)."""
    c = _circuit("gaincell charge-to-pulse")
    c.V("dd", "vdd", c.gnd, supply_v)
    t0, edge = design.start_ns * 1e-9, cell.edge_ns * 1e-9
    c.PieceWiseLinearVoltageSource("bias", "vb", c.gnd, values=[(0, 0.0), (t0, 0.0), (t0 + edge, design.discharge_bias_v)])
    c.C("int", "ci", c.gnd, design.integration_capacitance_f)
    _add_preset(c, "ci", "p", cell)
    _preset_control(c, cell)
    n, p, l = design.inverter_n_w_um, design.inverter_p_w_um, design.inverter_l_um
    transistors = [tech.instance("dis", "ci", "vb", "0", "0", "nfet_01v8", design.discharge_w_um, design.discharge_l_um),
                   tech.instance("p1", "o1", "ci", "vdd", "vdd", "pfet_01v8", p, l),
                   tech.instance("n1", "o1", "ci", "0", "0", "nfet_01v8", n, l),
                   tech.instance("p2", "out", "o1", "vdd", "vdd", "pfet_01v8", p, l),
                   tech.instance("n2", "out", "o1", "0", "0", "nfet_01v8", n, l)]
    return _finish(c, tech, cell, transistors, sizes=design.sizes())


# --------------------------------------------------------------------------------------------------
# array
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArrayLayout:
    rows: int                     # inputs (read word lines), e.g. the 64 features d
    cols: int                     # outputs (signed bitline pairs), e.g. 64 keys
    wire_resistance_ohm: float    # per array element, on each wire (RWL, RBL+, RBL-)
    wire_capacitance_f: float     # per array element, on each wire node to ground
    write_transistors: bool = True
    reference_column: bool = False  # single-ended cells: one shared reference column (its cells hold the
    #                                 reference voltage) instead of a negative cell per element

    def rwl_source(self, r: int) -> str:
        return f"vrwl{r}"

    def bitline_source(self, c: int, polarity: str) -> str:
        return f"vbl{polarity}{c}"


def array_netlist(tech: Technology, cell: CellDesign, layout: ArrayLayout,
                  stored_pos_v: np.ndarray, stored_neg_v: np.ndarray) -> str:
    """rows x cols signed array with wire parasitics; storage nodes start at the given voltages.

    Row ``r``'s read word line is driven at column 0's side and runs past every column through
    ``wire_resistance_ohm`` per element, with ``wire_capacitance_f`` at every element; each column's
    two bitlines run past every row the same way to the integrator's virtual ground after the last
    row (the element farthest from it sees the largest IR drop). Alter ``@vrwl<r>[pulse]``.
    """
    R, C = layout.rows, layout.cols
    pos = np.asarray(stored_pos_v, float)
    neg = np.asarray(stored_neg_v, float)
    if pos.shape != (R, C) or neg.shape != (R, C):
        raise ValueError(f"stored voltages must have shape {(R, C)}, got {pos.shape} and {neg.shape}")
    shared = layout.reference_column
    if shared and not np.allclose(neg, neg[0, 0]):
        raise ValueError("a shared reference column needs one reference voltage (stored_neg_v all equal)")
    c = _circuit(f"gaincell array {R}x{C}" + (" + reference column" if shared else ""))
    c.V("wwl", "wwl", c.gnd, cell.hold_wordline_v)
    c.V("wbl", "wbl", c.gnd, cell.hold_bitline_v)
    rw, cw = layout.wire_resistance_ohm, layout.wire_capacitance_f
    transistors: List[str] = []
    ics: List[str] = []
    n_wl = C + 1 if shared else C      # the reference column sits after the last data column
    for r in range(R):
        c.PulseVoltageSource(f"rwl{r}", f"rwl{r}_d", c.gnd, initial_value=0, pulsed_value=0, pulse_width=1e-9,
                             period=1.0, delay_time=cell.read_start_ns * 1e-9, rise_time=cell.edge_ns * 1e-9,
                             fall_time=cell.edge_ns * 1e-9)
        prev = f"rwl{r}_d"
        for col in range(n_wl):
            node = f"rwl{r}_{col}"
            c.R(f"r{r}_{col}", prev, node, rw)
            c.C(f"r{r}_{col}", node, c.gnd, cw)
            prev = node
    bitlines = [(col, "p") for col in range(C)] + ([("ref", "n")] if shared else [(col, "n") for col in range(C)])
    for col, p in bitlines:
        for r in range(R):
            node, nxt = f"bl{p}{col}_{r}", f"bl{p}{col}_{r + 1}"
            c.R(f"b{p}{col}_{r}", node, nxt, rw)
            c.C(f"b{p}{col}_{r}", node, c.gnd, cw)
        c.V(f"bl{p}{col}", f"bl{p}{col}_{R}", c.gnd, cell.bitline_v)
    for r in range(R):
        cells = [(col, "p", pos[r, col], col) for col in range(C)]
        cells += ([("ref", "n", neg[r, 0], C)] if shared else [(col, "n", neg[r, col], col) for col in range(C)])
        for col, p, v, wl_col in cells:
            sn = f"sn{p}{r}_{col}"
            c.C(f"s{p}{r}_{col}", sn, c.gnd, cell.storage_capacitance_f)
            transistors += _cell_transistors(tech, cell, f"{p}{r}_{col}", sn, f"rwl{r}_{wl_col}",
                                             f"bl{p}{col}_{r}", "wwl", "wbl",
                                             with_write=layout.write_transistors)
            ics.append(f"v({sn})={_fmt(v)}")
    extra = [".ic " + " ".join(ics[k:k + 16]) for k in range(0, len(ics), 16)]
    return _finish(c, tech, cell, transistors, extra=extra)


def closed_form_netlists() -> Dict[str, str]:
    """Small circuits with textbook answers, run through the same simulation code by the tests."""
    rc = _circuit("rc charge")
    rc.PulseVoltageSource("in", "in", rc.gnd, initial_value=0, pulsed_value=1.0, pulse_width=1.0, period=2.0,
                          delay_time=0.0, rise_time=1e-12, fall_time=1e-12)
    rc.R("1", "in", "out", 1e3)
    rc.C("1", "out", rc.gnd, 1e-12)          # tau = 1 ns
    divider = _circuit("divider")
    divider.V("in", "in", divider.gnd, 1.0)
    divider.R("1", "in", "mid", 3e3)
    divider.R("2", "mid", divider.gnd, 1e3)
    return {"rc": str(rc), "divider": str(divider)}
