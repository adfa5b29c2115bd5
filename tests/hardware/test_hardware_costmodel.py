"""The cost model: the paper's totals from its parts, scaling laws, closed forms, clear errors."""
import dataclasses
import json
import math

import numpy as np
import pytest

from gaincell.hardware import HardwareParameters, cell_technology, estimate
from gaincell.hardware.costmodel import ASSUMPTION, PAPER, SPICE, load_device_summary

PAPER_SIZE = dict(window=1024, head_dim=64, heads=12)


def test_paper_set_reproduces_published_totals_within_10_percent():
    est = estimate(HardwareParameters.paper(), **PAPER_SIZE)
    assert est.latency_per_token_ns == pytest.approx(65.0, rel=0.10)
    assert est.energy_per_head_per_token_nj == pytest.approx(6.15, rel=0.10)
    assert est.energy_per_token_nj == pytest.approx(73.8, rel=0.10)
    assert est.energy_per_token_nj == pytest.approx(12 * est.energy_per_head_per_token_nj)
    assert est.subtiles_per_head == 16
    assert est.area_per_head_um2 > 0


def test_energy_breakdown_is_the_papers_table_and_sums_to_the_total():
    est = estimate(HardwareParameters.paper(), **PAPER_SIZE)
    parts = est.energy_breakdown_nj
    assert sum(parts.values()) == pytest.approx(est.energy_per_head_per_token_nj, rel=1e-12)
    assert parts["qk_arrays_charge_to_pulse"] == pytest.approx(1.12)
    assert parts["av_arrays_readout"] == pytest.approx(0.70)
    assert parts["digital_routing"] == pytest.approx(4.0)
    assert parts["dac_write"] == pytest.approx(0.33)


def test_totals_are_built_from_the_parts_not_hard_coded():
    p = HardwareParameters.paper()
    base = estimate(p, **PAPER_SIZE)
    no_digital = estimate(p.replace(digital_energy_per_subtile_j=0.0), **PAPER_SIZE)
    assert base.energy_per_head_per_token_nj - no_digital.energy_per_head_per_token_nj == pytest.approx(4.0)
    # per-sub-tile energy x 16 sub-tiles
    doubled_qk = estimate(p.replace(qk_array_energy_per_subtile_j=2 * p.qk_array_energy_per_subtile_j), **PAPER_SIZE)
    assert doubled_qk.energy_per_head_per_token_nj - base.energy_per_head_per_token_nj == pytest.approx(1.12)
    # a slower discharge adds to the chain one for one
    slower = estimate(p.replace(discharge_ns=p.discharge_ns + 7.0), **PAPER_SIZE)
    assert slower.latency_per_token_ns - base.latency_per_token_ns == pytest.approx(7.0)


def test_latency_chain_closed_form():
    p = HardwareParameters.paper()
    est = estimate(p, **PAPER_SIZE)
    # discharge 5 + max(write 10, Q 15) + phi(S) 15 + read-out 15 + 16 adder inputs x 1 ns
    assert est.latency_per_token_ns == pytest.approx(5 + 15 + 15 + 15 + 16)
    assert sum(est.latency_breakdown_ns.values()) == pytest.approx(est.latency_per_token_ns)
    # the write overlaps the query pulses: only the longer of the two counts
    longer_write = estimate(p.replace(write_pulse_ns=22.0), **PAPER_SIZE)
    assert longer_write.latency_per_token_ns - est.latency_per_token_ns == pytest.approx(22.0 - 15.0)
    shorter_write = estimate(p.replace(write_pulse_ns=3.0), **PAPER_SIZE)
    assert shorter_write.latency_per_token_ns == pytest.approx(est.latency_per_token_ns)
    # the adders take one clock per sub-tile along the window
    assert estimate(p, window=2048, head_dim=64, heads=12).latency_per_token_ns - est.latency_per_token_ns \
        == pytest.approx(16 * p.clock_period_ns)


@pytest.mark.parametrize("which", ["paper", "simulated"])
def test_energy_is_linear_in_window_for_a_fixed_head(which, device_summary):
    p = HardwareParameters.paper() if which == "paper" else HardwareParameters.simulated(device_summary)
    windows = np.arange(1, 33) * 64
    energy = np.array([estimate(p, window=int(w), head_dim=64, heads=1).energy_per_head_per_token_nj
                       for w in windows])
    assert np.allclose(np.diff(energy, 2), 0.0, atol=1e-9 * energy.max())
    assert np.all(np.diff(energy) > 0)
    if which == "paper":  # the paper's accounting: everything per sub-tile, so proportional
        assert np.allclose(energy / windows, energy[0] / windows[0])


def test_latency_is_independent_of_heads_and_energy_proportional():
    p = HardwareParameters.paper()
    ests = [estimate(p, window=1024, head_dim=64, heads=h) for h in (1, 2, 7, 12, 32)]
    assert len({e.latency_per_token_ns for e in ests}) == 1
    for e in ests:
        assert e.energy_per_token_nj == pytest.approx(e.heads * ests[0].energy_per_head_per_token_nj)
        assert e.area_per_head_um2 == pytest.approx(ests[0].area_per_head_um2)
    layered = estimate(p, window=1024, head_dim=64, heads=12, layers=12)
    assert layered.latency_all_layers_ns == pytest.approx(12 * layered.latency_per_token_ns)
    assert layered.energy_all_layers_nj == pytest.approx(144 * layered.energy_per_head_per_token_nj)


def test_area_is_linear_in_subtiles_with_closed_form_slope():
    p = HardwareParameters.paper()
    areas = np.array([estimate(p, window=64 * n, head_dim=64, heads=1).area_per_head_um2 for n in range(1, 21)])
    assert np.allclose(np.diff(areas, 2), 0.0, atol=1e-9 * areas.max())
    per_subtile = (2 * 64 * 64 * p.signed_cell_area_um2 + (64 + 64) * p.charge_to_pulse_area_um2
                   + 64 * p.pulse_counter_area_um2 + 2 * 64 * p.dac_area_um2) * (1 + p.floorplan_overhead)
    assert areas[1] - areas[0] == pytest.approx(per_subtile)
    per_head = 64 * (p.adder_area_um2 + p.pulse_generator_area_um2) * (1 + p.floorplan_overhead)
    assert areas[15] == pytest.approx(16 * per_subtile + per_head)  # window 1,024


def test_area_scales_with_cell_technology():
    p = HardwareParameters.paper()
    assert cell_technology("cmos_gain_cell").signed_cell_area_um2 / cell_technology("ito_6t_worst_case").signed_cell_area_um2 \
        == pytest.approx(19.0)
    assert cell_technology("ito_2t").signed_cell_area_um2 == pytest.approx(0.28)
    assert cell_technology("ito_2t", 4).signed_cell_area_um2 == pytest.approx(0.07)
    cells = {n: estimate(p.with_technology("ito_2t", n), **PAPER_SIZE).area_breakdown_um2["cell_arrays"] for n in (1, 4)}
    assert cells[1] / cells[4] == pytest.approx(4.0)
    assert cells[1] == pytest.approx(16 * 2 * 64 * 64 * 0.28)
    with pytest.raises(ValueError, match="unknown cell technology 'sram'"):
        cell_technology("sram")
    with pytest.raises(ValueError, match="stack layers"):
        cell_technology("ito_2t", 0)


def test_retention_decay_matches_the_leakage_model():
    est = estimate(HardwareParameters.paper(), window=1024, head_dim=64, heads=12, layers=12)
    # paper: 12 x 65 ns / 5 ms = 1.56e-4 per step (the attention config's decay_per_step)
    assert est.decay_per_step == pytest.approx(12 * 65e-9 / 5e-3, rel=0.05)
    assert est.storage_time_s == pytest.approx(1024 * 12 * est.latency_per_token_ns * 1e-9)
    assert est.oldest_value_retention == pytest.approx(math.exp(-est.storage_time_s / 5e-3))
    long_lived = estimate(HardwareParameters.paper().replace(retention_tau_s=5.0), window=1024, head_dim=64,
                          heads=12, layers=12)
    assert not long_lived.refresh_needed and long_lived.refresh_energy_per_head_per_token_nj == 0.0
    assert est.refresh_needed and est.refresh_energy_per_head_per_token_nj > 0


def test_ir_drop_closed_form():
    p = HardwareParameters.paper()
    est = estimate(p, **PAPER_SIZE)
    assert est.ir_drop_fraction == pytest.approx(2.0 * 10e-6 * 64 * 65 / 2 / 0.9)
    bigger = estimate(p.replace(tile_rows=128, tile_cols=128), **PAPER_SIZE)
    assert bigger.ir_drop_fraction > 3.9 * est.ir_drop_fraction


@pytest.mark.parametrize("kwargs, match", [
    (dict(window=1000, head_dim=64, heads=12), r"window=1000 is not a multiple of the sub-tile rows tile_rows=64"),
    (dict(window=0, head_dim=64, heads=12), r"window=0: expected a positive integer"),
    (dict(window=-64, head_dim=64, heads=12), r"window=-64"),
    (dict(window=1024, head_dim=0, heads=12), r"head_dim=0"),
    (dict(window=1024, head_dim=64, heads=0), r"heads=0"),
    (dict(window=1024, head_dim=64, heads=2.5), r"heads=2.5"),
    (dict(window=1024, head_dim=64, heads=True), r"heads=True"),
    (dict(window=1024, head_dim=64, heads=12, layers=-1), r"layers=-1"),
])
def test_bad_sizes_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate(HardwareParameters.paper(), **kwargs)


def test_bad_parameter_is_a_clear_error():
    with pytest.raises(ValueError, match="digital_energy_per_subtile_j=-1"):
        HardwareParameters.paper().replace(digital_energy_per_subtile_j=-1.0)
    with pytest.raises(ValueError, match="tile_rows=0"):
        HardwareParameters.paper().replace(tile_rows=0)


def test_every_parameter_is_documented_with_unit_and_source():
    p = HardwareParameters.paper()
    rows = p.describe()
    names = {f.name for f in dataclasses.fields(p)} - {"sources"}
    assert {r["name"] for r in rows} == names
    for r in rows:
        assert r["unit"] and r["doc"], r
        assert r["source"].split(":")[0].split(" ")[0] in (PAPER, SPICE, ASSUMPTION), r


def test_simulated_set_takes_per_operation_figures_from_the_device_summary(device_summary):
    s = json.loads(device_summary.read_text())
    p = HardwareParameters.simulated(device_summary)
    ref_cells = 64 * 64
    assert p.qk_array_energy_per_subtile_j == pytest.approx(s["array_op_energy_j"] * ref_cells / (16 * 16))
    assert p.cell_write_energy_j == s["write_energy_j"]
    assert p.retention_tau_s == s["retention_tau_s"]
    assert p.query_phase_ns == max(15.0, s["array_op_latency_ns"])
    assert p.source_of("qk_array_energy_per_subtile_j").startswith(SPICE)
    assert p.source_of("digital_energy_per_subtile_j").startswith(PAPER)
    est = estimate(p, **PAPER_SIZE)
    qk = (16 * p.qk_array_energy_per_subtile_j + 1024 * p.charge_to_pulse_energy_j) * 1e9
    assert est.energy_breakdown_nj["qk_arrays_charge_to_pulse"] == pytest.approx(qk)
    write = (16 * p.dac_energy_per_subtile_j + 4 * 64 * s["write_energy_j"]) * 1e9
    assert est.energy_breakdown_nj["dac_write"] == pytest.approx(write)
    assert est.latency_per_token_ns == pytest.approx(5 + 18 + 18 + 15 + 16)


def test_device_summary_errors_name_the_problem(tmp_path, device_summary):
    full = json.loads(device_summary.read_text())
    with pytest.raises(FileNotFoundError, match="characterize"):
        load_device_summary(tmp_path / "absent.json")
    partial = {k: v for k, v in full.items() if k not in ("array_op_energy_j", "retention_tau_s")}
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    with pytest.raises(KeyError, match="array_op_energy_j, retention_tau_s"):
        load_device_summary(tmp_path / "partial.json")
    (tmp_path / "bad.json").write_text(json.dumps({**full, "write_energy_j": "lots"}))
    with pytest.raises(ValueError, match="write_energy_j='lots'"):
        load_device_summary(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_device_summary(tmp_path / "broken.json")


def test_energy_components_sum_to_the_breakdown_and_say_where_each_comes_from(device_summary):
    from gaincell.hardware.costmodel import energy_components_nj

    paper, sim = HardwareParameters.paper(), HardwareParameters.simulated(device_summary)
    for p in (paper, sim):
        comps = energy_components_nj(p, 1024, 64)
        est = estimate(p, **PAPER_SIZE)
        for part, parts in comps.items():
            assert sum(c["nj"] for c in parts) == pytest.approx(est.energy_breakdown_nj[part], rel=1e-12)
    # the paper set restates the paper's categories: every nonzero component is "from the paper"
    assert {c["provenance"] for parts in energy_components_nj(paper, 1024, 64).values() for c in parts} == {"from the paper"}
    by_name = {c["parameter"]: c["provenance"] for parts in energy_components_nj(sim, 1024, 64).values() for c in parts}
    assert by_name["qk_array_energy_per_subtile_j"] == by_name["av_array_energy_per_subtile_j"] == "measured here"
    assert by_name["cell_write_energy_j"] == "measured here"
    assert by_name["digital_energy_per_subtile_j"] == by_name["dac_energy_per_subtile_j"] == "from the paper"
    assert by_name["charge_to_pulse_energy_j"] == "assumption"


def test_single_ended_cell_writes_one_cell_per_weight(device_summary):
    s = json.loads(device_summary.read_text())
    device_summary.write_text(json.dumps({**s, "cell_kind": "single_ended"}))
    p = HardwareParameters.simulated(device_summary)
    assert p.cells_per_weight == 1 and p.source_of("cells_per_weight").startswith(SPICE)
    est = estimate(p, **PAPER_SIZE)
    write = (16 * p.dac_energy_per_subtile_j + 2 * 64 * s["write_energy_j"]) * 1e9   # K and V, one cell each
    assert est.energy_breakdown_nj["dac_write"] == pytest.approx(write)
    assert HardwareParameters.paper().cells_per_weight == 2


def test_simulated_charge_to_pulse_energy_is_measured_when_the_device_stage_has_it(device_summary):
    from gaincell.hardware.costmodel import energy_components_nj

    assert HardwareParameters.simulated(device_summary).source_of("charge_to_pulse_energy_j").startswith(ASSUMPTION)
    s = json.loads(device_summary.read_text())
    device_summary.write_text(json.dumps({**s, "charge_to_pulse_energy_j": 0.12e-12}))
    p = HardwareParameters.simulated(device_summary)
    assert p.charge_to_pulse_energy_j == 0.12e-12
    comps = {c["parameter"]: c["provenance"] for cs in energy_components_nj(p, 1024, 64).values() for c in cs}
    assert comps["charge_to_pulse_energy_j"] == "measured here"
