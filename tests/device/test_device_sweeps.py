"""Post-processing of the sweeps: retention time constants, grids, ideal array outputs."""
import numpy as np
import pytest

from gaincell.device.array import ideal_outputs
from gaincell.device.sweeps import fit_retention_tau, sweep_grid


def test_retention_tau_of_an_exponential_and_of_a_linear_droop():
    t = np.concatenate([[0.0], np.geomspace(1e-9, 1.0, 400)])
    exp = fit_retention_tau(t, 0.1 + 0.8 * np.exp(-t / 0.2), floor_v=0.1)
    assert exp["exp_fit_tau_s"] == pytest.approx(0.2, rel=1e-3)
    assert exp["tau_s"] == pytest.approx(0.2, rel=0.03)          # initial slope over the first 5 %
    assert exp["t_1e_s"] == pytest.approx(0.2, rel=0.02)
    ramp = fit_retention_tau(t, np.clip(1.0 - 5.0 * t, 0, None), floor_v=0.0)   # constant-current leak
    assert ramp["droop_v_per_s"] == pytest.approx(-5.0, rel=1e-6)
    assert ramp["tau_s"] == pytest.approx(0.2, rel=1e-6)          # V0 / |dV/dt|
    assert ramp["exp_fit_rms_v"] > 0.01                           # an exponential does not fit a ramp


def test_grid_includes_the_quantized_levels_by_default():
    g = sweep_grid({"pulse_width_max_ns": 15.0, "pulse_width_points": 16, "stored_v_points": 8,
                    "read_v_points": 4, "read_v_min": 0.9, "read_v_max": 1.8})
    np.testing.assert_allclose(g["pulse_width_ns"], np.arange(16.0))                 # 4-bit inputs, 1 ns apart
    np.testing.assert_allclose(g["level_v"], np.linspace(0, 0.9, 8))                 # 3-bit DAC levels
    np.testing.assert_allclose(g["read_v"], [0.9, 1.2, 1.5, 1.8])


def test_ideal_array_output_is_the_sum_of_cell_charges():
    pw = np.array([[1.0, 2.0, 0.0]])                    # 1 query, 3 rows
    k = np.array([[0.0, 0.9], [0.45, 0.9], [0.9, 0.0]])  # 3 rows, 2 columns
    out = ideal_outputs(pw, k, lambda p, lv: p * (lv - 0.45))
    np.testing.assert_allclose(out, [[1 * -0.45 + 2 * 0 + 0, 1 * 0.45 + 2 * 0.45 + 0]])


def test_array_inputs_use_the_quantized_levels_when_the_grid_has_them():
    from gaincell.device.array import input_levels

    np.testing.assert_allclose(input_levels(np.linspace(0, 15, 31), 16), np.arange(16.0))
    np.testing.assert_allclose(input_levels(np.linspace(0, 0.9, 15), 8), np.linspace(0, 0.9, 8))
    coarse = np.linspace(0, 15, 6)       # a test grid without the 16 levels: its own points
    np.testing.assert_allclose(input_levels(coarse, 16), coarse)
