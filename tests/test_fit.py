"""The polynomial fit: synthetic recovery, bad input, the authors' read current, normalisation."""
import numpy as np
import pandas as pd
import pytest

from gaincell.attention.config import COEFFICIENT_ORDER, PAPER_COEFFICIENTS, fold_coefficients
from gaincell.fit import (
    FitError,
    fit_characterization,
    fit_folded,
    fit_surface,
    fold,
    linear_slope,
    monomials,
    spread_folded,
)

FIT_CFG = {"order": 3, "min_points": 10, "method": "read_voltage", "pulse_widths": "all", "target_c1": 13.612,
           "model_read_voltage": 0.9, "model_read_min_v": 0.45, "model_stored_max_v": 0.9, "model_offset_v": 0.45}


def _grid():
    y, x, u = np.meshgrid(np.linspace(-0.45, 0.45, 9), np.linspace(0.45, 0.9, 6), [0.2, 0.6, 1.0], indexing="ij")
    return y.ravel(), x.ravel(), u.ravel()


def test_monomial_order_is_the_spec_order():
    assert monomials(3) == list(COEFFICIENT_ORDER)


def test_full_grid_fit_recovers_known_coefficients_from_noisy_data():
    rng = np.random.default_rng(0)
    true = np.array([0.3, -0.5, 0.8, -0.2, 9.0, 4.0, -3.0, -2.0, 1.5, 40.0])
    y, x, u = _grid()
    clean = u * sum(c * y ** i * x ** j for c, (i, j) in zip(true, monomials(3)))
    noisy = clean + rng.normal(0, 1e-4 * np.abs(clean).max(), clean.shape)
    coeffs, res = fit_surface(y, x, u, noisy)
    np.testing.assert_allclose(coeffs, true, atol=0.02 * np.abs(true).max())
    np.testing.assert_allclose(fold(coeffs, 0.9), fold(true, 0.9), atol=1e-3 * np.abs(true).max())
    assert res["rms"] == pytest.approx(1e-4 * np.abs(clean).max(), rel=0.3)   # the residual is the noise


def test_folded_fit_and_spread_round_trip():
    rng = np.random.default_rng(1)
    true = np.array([0.52, 13.6, -2.6, 46.0])
    y = np.tile(np.linspace(-0.45, 0.45, 12), 3)
    u = np.repeat([0.3, 0.7, 1.0], 12)
    t = u * np.polyval(true[::-1], y) + rng.normal(0, 1e-3, y.shape)
    folded, _ = fit_folded(y, u, t)
    np.testing.assert_allclose(folded, true, atol=0.05)
    spread = spread_folded(folded, 0.9)
    np.testing.assert_allclose(fold(spread, 0.9), folded, rtol=1e-12)


def test_spreading_the_paper_folded_coefficients_gives_the_paper_ten():
    """The authors' C[i][j+1] = 0.9 C[i][j] convention is exactly what spread_folded does."""
    folded = fold_coefficients(PAPER_COEFFICIENTS, 0.9)
    np.testing.assert_allclose(spread_folded(folded, 0.9), PAPER_COEFFICIENTS, rtol=1e-6)


def test_rejects_nan_and_too_few_points():
    y, x, u = _grid()
    t = u * y
    bad = t.copy()
    bad[3] = np.nan
    with pytest.raises(FitError, match="NaN"):
        fit_surface(y, x, u, bad)
    with pytest.raises(FitError, match=r"5 data points.*at least 10"):
        fit_folded(y[:5], u[:5], t[:5])
    with pytest.raises(FitError, match="read voltages"):
        fit_surface(y, np.full_like(x, 0.9), u, t)
    with pytest.raises(FitError, match="161 values, expected 162"):
        fit_surface(y, x[:-1], u, t)


def test_authors_read_current_gives_the_paper_folded_coefficients(reference_dir):
    data = np.load(reference_dir / "gain_cell_read_current.npz")
    vstore, vin, iout = data["Vstore"], data["Vin"], data["Iout"] * 1e6   # uA
    j = int(np.argmin(np.abs(vin - 0.9)))
    y = vstore - 0.45
    folded, res = fit_folded(y, np.ones_like(y), iout[:, j])
    np.testing.assert_allclose(folded, [0.5214, 13.612, -2.620, 46.055], atol=1e-3)
    np.testing.assert_allclose(folded, fold_coefficients(PAPER_COEFFICIENTS, 0.9), rtol=1e-6)
    # their full grid gives quite different C[i][j] (docs/attention.md#cell-coefficients): C[1][1] about -120, fold 0.34, 15.4, -0.03, 29.2
    Y, X = np.meshgrid(y, vin, indexing="ij")
    coeffs, _ = fit_surface(Y.ravel(), X.ravel(), np.ones(Y.size), iout.ravel())
    assert coeffs[COEFFICIENT_ORDER.index((1, 1))] == pytest.approx(-120, abs=1)
    np.testing.assert_allclose(fold(coeffs, 0.9), [0.34, 15.4, -0.03, 29.2], atol=0.05)
    # the linear model's slope: the paper's g = 19.3
    assert linear_slope(y, np.ones_like(y), iout[:, j]) == pytest.approx(19.3, rel=0.01)


def _synthetic_sweep(true_folded_ua, read_window=(0.9, 1.8), t_max=15.0):
    """A cell sweep whose charge is a known cubic in y; its terms below y^3 grow with the read voltage
    (so the surface stays inside the order-3 basis: x * y^3 would not)."""
    rows = []
    for vr in np.linspace(*read_window, 4):
        for k in np.linspace(0, 0.9, 8):
            for pw in np.linspace(0, t_max, 6):
                y = k - 0.45
                f_ua = np.polyval(true_folded_ua[2::-1], y) * (vr / read_window[1]) + true_folded_ua[3] * y ** 3
                rows.append({"level_v": k, "read_v": vr, "pulse_width_ns": pw,
                             "charge_c": pw / t_max * f_ua * 1e-6 * t_max * 1e-9})
    return pd.DataFrame(rows)


def test_normalisation_sets_c1_to_the_paper_and_keeps_our_shape():
    true = np.array([0.1, 2.0, -0.3, 12.0])            # our cell, uA
    df = _synthetic_sweep(true)
    result, pts = fit_characterization(df, (0.9, 1.8), 15.0, FIT_CFG)
    scale = 13.612 / 2.0
    np.testing.assert_allclose(result["folded"], true * scale, rtol=1e-9)
    assert result["normalisation"]["scale_factor"] == pytest.approx(scale)
    assert result["shape"]["c3_over_c1"] == pytest.approx(6.0)
    np.testing.assert_allclose(fold_coefficients(result["coefficients"], 0.9), true * scale, rtol=1e-9)
    # our read window 0.9..1.8 V maps onto the model's 0.45..0.9 V
    assert pts["x"].min() == pytest.approx(0.45) and pts["x"].max() == pytest.approx(0.9)
    # full grid: the data is inside the basis (terms i <= 2 linear in x), so the fit is exact
    full = result["full_grid"]
    np.testing.assert_allclose(full["folded"], true * scale, rtol=1e-6)
    assert full["residuals"]["rms_relative_to_full_scale"] < 1e-9
    assert result["linear_slope"] > 13.612                  # a positive cubic steepens the best line


def test_no_positive_slope_is_an_error():
    df = _synthetic_sweep(np.array([0.0, -1.0, 0.0, 0.0]))
    with pytest.raises(FitError, match="c_1"):
        fit_characterization(df, (0.9, 1.8), 15.0, FIT_CFG)
