"""Netlist structure: encodings, pulse timing, array parasitics."""
import re

import numpy as np
import pytest

from gaincell.config import compose
from gaincell.device.netlists import ArrayLayout, CellDesign, array_netlist, read_pair_netlist
from gaincell.device.technology import SquareLawTechnology


@pytest.fixture(scope="module")
def cell():
    return CellDesign.from_config(compose(["profile=ci"]).device)


@pytest.fixture(scope="module")
def tech():
    return SquareLawTechnology(name="square_law", corner="n/a", supply_v=1.8)


def test_single_ended_cell_reads_one_stored_voltage_against_the_reference(cell):
    import dataclasses

    se = dataclasses.replace(cell, cell="single_ended", reference_v=0.9)
    k = np.array([0.0, 0.45, 0.9])
    pos, neg = se.stored_voltages(k)
    lo, hi = cell.stored_v_min, cell.stored_v_max
    np.testing.assert_allclose(pos, [lo, (lo + hi) / 2, hi])     # one cell spans the whole window
    np.testing.assert_allclose(neg, 0.9)                          # the reference, whatever the weight
    assert compose(["profile=ci"]).device.cell.value == "single_ended"   # the default
    assert CellDesign.from_config(compose(["profile=ci"]).device).reference_v == pytest.approx(0.9)  # supply / 2


def test_sign_magnitude_encoding_maps_model_levels_onto_the_window(cell):
    import dataclasses

    k = np.array([0.0, 0.225, 0.45, 0.675, 0.9])
    pos, neg = dataclasses.replace(cell, cell="differential_pair").stored_voltages(k)
    lo, hi = cell.stored_v_min, cell.stored_v_max
    np.testing.assert_allclose(pos, [lo, lo, lo, (lo + hi) / 2, hi])
    np.testing.assert_allclose(neg, [hi, (lo + hi) / 2, lo, lo, lo])


def test_complementary_encoding(cell):
    import dataclasses

    comp = dataclasses.replace(cell, cell="complementary_pair")
    pos, neg = comp.stored_voltages(np.array([0.0, 0.45, 0.9]))
    np.testing.assert_allclose(pos, [cell.stored_v_min, (cell.stored_v_min + cell.stored_v_max) / 2, cell.stored_v_max])
    np.testing.assert_allclose(pos + neg, cell.stored_v_min + cell.stored_v_max)
    with pytest.raises(ValueError, match="device.cell='bogus'"):
        dataclasses.replace(cell, cell="bogus").stored_voltages(np.array([0.1]))


def test_pulse_width_is_measured_at_half_height(cell):
    v1, v2, td, tr, tf, pw, per = cell.pulse_spec(7.0, 1.8, 2.0)
    assert (v1, v2, td) == (0.0, 1.8, 2e-9)
    assert pw + (tr + tf) / 2 == pytest.approx(7e-9)   # flat top + half of each edge
    assert cell.pulse_spec(0.0, 1.8, 2.0)[1] == 0.0      # zero width: no pulse at all


def test_read_pair_has_two_cells_on_two_bitlines(tech, cell):
    net = read_pair_netlist(tech, cell)
    transistors = [l for l in net.splitlines() if l.startswith("M")]
    assert len(transistors) == 4                        # read + write transistor per cell, two cells
    assert any(l.startswith("Mrp rwl snp blp") for l in transistors)
    assert any(l.startswith("Mrn rwl snn bln") for l in transistors)
    assert "gmin=" in net and net.rstrip().endswith(".end")


def test_array_netlist_elements_and_parasitics(tech, cell):
    rows, cols = 3, 4
    layout = ArrayLayout(rows=rows, cols=cols, wire_resistance_ohm=2.0, wire_capacitance_f=0.8e-15)
    levels = np.linspace(0, 0.9, rows * cols).reshape(rows, cols)
    pos, neg = cell.stored_voltages(levels)
    net = array_netlist(tech, cell, layout, pos, neg)
    lines = net.splitlines()
    read = [l for l in lines if re.match(r"^Mr[pn]\d", l)]
    write = [l for l in lines if re.match(r"^Mw[pn]\d", l)]
    assert len(read) == len(write) == 2 * rows * cols
    wire_r = [l for l in lines if re.match(r"^R[rb]", l)]
    wire_c = [l for l in lines if re.match(r"^C[rb]", l)]
    # one segment per element on the word line and on each of the two bitlines
    assert len(wire_r) == len(wire_c) == rows * cols * 3
    assert all(float(l.split()[3].rstrip("Ohm")) == 2.0 for l in wire_r)
    assert all(float(l.split()[3].rstrip("F")) == pytest.approx(0.8e-15) for l in wire_c)
    ics = " ".join(l for l in lines if l.startswith(".ic"))
    assert f"v(snp1_2)={float(pos[1, 2])!r}" in ics and f"v(snn2_3)={float(neg[2, 3])!r}" in ics
    # each column's bitlines end at an integrator (voltage source) after the last row
    assert sum(1 for l in lines if re.match(rf"^Vbl[pn]\d+ bl[pn]\d+_{rows} 0", l)) == 2 * cols
    with pytest.raises(ValueError, match="shape"):
        array_netlist(tech, cell, layout, pos[:2], neg)


def test_single_ended_array_shares_one_reference_column(tech, cell):
    import dataclasses

    rows, cols = 3, 4
    se = dataclasses.replace(cell, cell="single_ended", reference_v=0.9)
    layout = ArrayLayout(rows=rows, cols=cols, wire_resistance_ohm=2.0, wire_capacitance_f=0.8e-15,
                         reference_column=True)
    pos, neg = se.stored_voltages(np.linspace(0, 0.9, rows * cols).reshape(rows, cols))
    lines = array_netlist(tech, se, layout, pos, neg).splitlines()
    assert len([l for l in lines if re.match(r"^Mrp\d", l)]) == rows * cols       # one data cell per weight
    ref = [l for l in lines if re.match(r"^Mrn\d+_ref ", l)]
    assert len(ref) == rows                                                     # one reference cell per row
    assert all(l.split()[1] == f"rwl{r}_{cols}" for r, l in enumerate(ref))     # after the last data column
    assert sum(1 for l in lines if re.match(r"^Vbln", l)) == 1                  # one reference bitline
    with pytest.raises(ValueError, match="one reference voltage"):
        array_netlist(tech, se, layout, pos, neg + np.arange(cols) * 0.01)
