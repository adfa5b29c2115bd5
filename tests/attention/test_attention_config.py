"""AnalogAttentionConfig: paper defaults, validation, coefficient folding and resolution.

(Named test_attention_config.py, not test_config.py: tests/ has no __init__.py files, so two test
modules with one basename would collide under pytest's default import mode.)
"""
from __future__ import annotations

import json
import math

import pytest

from gaincell.attention import PAPER_COEFFICIENTS, AnalogAttentionConfig, fold_coefficients
from gaincell.attention.config import analog_config_from_settings, resolve_coefficients


def test_defaults_are_the_papers_values():
    cfg = AnalogAttentionConfig()
    assert (cfg.window, cfg.tile_rows, cfg.tiles) == (1024, 64, 16)
    assert (cfg.query_levels, cfg.stored_levels, cfg.output_levels) == (16, 8, 32)
    assert (cfg.gain, cfg.qk_saturation, cfg.av_saturation) == (19.3, 80.0, 40.0)
    assert (cfg.stored_offset, cfg.read_voltage, cfg.stored_max) == (0.45, 0.9, 0.9)
    # lambda = L delta_t / tau = 12 * 65 ns / 5 ms
    assert cfg.decay_per_step == pytest.approx(12 * 65e-9 / 5e-3, rel=1e-12)
    assert cfg.coefficients is None and not cfg.nonlinear
    assert cfg.readout_noise == 0 and cfg.cell_variation == 0 and cfg.exact_nonlinear_grad is False
    assert cfg.folded_coefficients == (0.0, 19.3, 0.0, 0.0)


def test_paper_coefficients_fold_to_the_published_cubic():
    """Spec §10 / reference README: f(y) = 0.5214 + 13.612 y - 2.620 y^2 + 46.055 y^3 at 0.9 V."""
    c = fold_coefficients(PAPER_COEFFICIENTS, 0.9)
    for got, want in zip(c, (0.5214, 13.612, -2.620, 46.055)):
        assert got == pytest.approx(want, abs=6e-4)
    # independent folding: C[i][j] * 0.9**j summed over j, with the spec's (i, j) order typed out
    order = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (3, 0)]
    for i in range(4):
        assert c[i] == pytest.approx(sum(C * 0.9 ** j for (ii, j), C in zip(order, PAPER_COEFFICIENTS) if ii == i))
    cfg = AnalogAttentionConfig(coefficients=list(PAPER_COEFFICIENTS))
    assert cfg.nonlinear and cfg.coefficients == PAPER_COEFFICIENTS and isinstance(cfg.coefficients, tuple)
    assert cfg.folded_coefficients == c
    assert AnalogAttentionConfig(coefficients=PAPER_COEFFICIENTS, read_voltage=0.45).folded_coefficients != c


@pytest.mark.parametrize("kwargs,message", [
    (dict(window=100, tile_rows=64), "window=100 is not a multiple of tile_rows=64"),
    (dict(window=0), "window=0"),
    (dict(tile_rows=0), "tile_rows=0"),
    (dict(query_levels=1), "query_levels=1"),
    (dict(stored_levels=0), "stored_levels=0"),
    (dict(output_levels=1), "output_levels=1"),
    (dict(output_levels=2.5), "output_levels=2.5"),
    (dict(coefficients=(1.0,) * 9), "coefficients has 9 values: expected 10"),
    (dict(coefficients=(1.0,) * 11), "coefficients has 11 values"),
    (dict(coefficients=(float("nan"),) * 10), "finite"),
    (dict(qk_saturation=0.0), "qk_saturation"),
    (dict(av_saturation=-1.0), "av_saturation"),
    (dict(decay_per_step=-1e-4), "decay_per_step"),
    (dict(decay_per_step=math.inf), "decay_per_step"),
    (dict(readout_noise=-0.1), "readout_noise=-0.1"),
    (dict(read_noise=-0.1), "readout_noise=-0.1"),
    (dict(readout_noise=math.nan), "readout_noise=nan"),
    (dict(cell_variation=-0.01), "cell_variation=-0.01"),
    (dict(cell_variation=math.inf), "cell_variation=inf"),
    (dict(noise_seed=-1), "noise_seed=-1"),
    (dict(noise_seed=1.5), "noise_seed=1.5"),
    (dict(read_noise=0.1, readout_noise=0.2), "disagree"),
])
def test_bad_config_values_raise_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        AnalogAttentionConfig(**kwargs)


def test_levels_none_and_small_windows_are_valid():
    cfg = AnalogAttentionConfig(window=8, tile_rows=4, query_levels=None, stored_levels=None, output_levels=None)
    assert cfg.tiles == 2
    assert AnalogAttentionConfig(window=3, tile_rows=1).tiles == 3


def test_resolve_coefficients(tmp_path):
    assert resolve_coefficients(None) is None
    assert resolve_coefficients("paper") == PAPER_COEFFICIENTS
    assert resolve_coefficients([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) == tuple(float(i) for i in range(1, 11))
    fitted = tmp_path / "coefficients.json"
    fitted.write_text(json.dumps({"coefficients": [0.5] * 10, "rms": 0.01}))
    assert resolve_coefficients("fitted", str(fitted)) == (0.5,) * 10
    with pytest.raises(FileNotFoundError, match="run the fit stage"):
        resolve_coefficients("fitted", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="coefficients='best'"):
        resolve_coefficients("best")


def test_trimmed_reference_removes_exactly_the_offset_at_every_read_voltage(tmp_path):
    """fitted_trimmed = the fitted cell read against its own zero-weight current: the cell's polynomial minus
    its value at W = 0, at any read voltage; the slope, curvature and cubic terms untouched."""
    fitted = tmp_path / "coefficients.json"
    fitted.write_text(json.dumps({"coefficients": list(PAPER_COEFFICIENTS), "linear_slope": 13.2}))
    full = resolve_coefficients("fitted", str(fitted))
    trimmed = resolve_coefficients("fitted_trimmed", str(fitted))
    for v_read in (0.45, 0.7, 0.9):
        c, t = fold_coefficients(full, v_read), fold_coefficients(trimmed, v_read)
        assert t[0] == 0.0 and t[1:] == c[1:]
        for w in (-0.45, -0.1, 0.2, 0.45):   # the cell's current against the W = 0 reference, by hand
            current = sum(ci * w ** i for i, ci in enumerate(c))
            assert sum(ti * w ** i for i, ti in enumerate(t)) == pytest.approx(current - c[0], rel=1e-12, abs=1e-12)
    settings = dict(kind="linear_hw", coefficients="fitted_trimmed", gain=None, fitted_coefficients_path=str(fitted))
    assert analog_config_from_settings(settings).gain == 13.2   # the trim leaves the fitted slope g


def test_analog_config_from_settings(tmp_path):
    settings = dict(kind="nonlinear_hw", window=128, tile_rows=64, query_levels=16, stored_levels=None,
                    output_levels=32, gain=19.3, qk_saturation=80.0, av_saturation=40.0, stored_offset=0.45,
                    read_voltage=0.9, decay_per_step=0.0, coefficients="paper",
                    fitted_coefficients_path=str(tmp_path / "none.json"), exact_nonlinear_grad=True,
                    read_noise=0.02)
    cfg = analog_config_from_settings(settings)
    assert cfg == AnalogAttentionConfig(window=128, stored_levels=None, decay_per_step=0.0,
                                        coefficients=PAPER_COEFFICIENTS, exact_nonlinear_grad=True, read_noise=0.02)
    # every other kind gets the linear cell, whatever the coefficient setting
    assert analog_config_from_settings({**settings, "kind": "linear_hw", "coefficients": "fitted"}).coefficients is None
    with pytest.raises(ValueError, match="needs attention.coefficients"):
        analog_config_from_settings({**settings, "coefficients": None})


def test_analog_config_from_composed_hydra_config():
    from gaincell.config import compose

    cfg = compose(["attention=nonlinear_hw", "attention.coefficients=paper", "attention.window=128"])
    analog = analog_config_from_settings(cfg.attention)
    assert analog.nonlinear and analog.window == 128 and analog.coefficients == PAPER_COEFFICIENTS


def test_settings_carry_variation_noise_and_seed(tmp_path):
    settings = dict(kind="linear_hw", window=128, tile_rows=64, query_levels=16, stored_levels=8,
                    output_levels=32, gain=19.3, qk_saturation=80.0, av_saturation=40.0, stored_offset=0.45,
                    read_voltage=0.9, decay_per_step=0.0, coefficients="paper",
                    fitted_coefficients_path=str(tmp_path / "none.json"), exact_nonlinear_grad=False)
    cfg = analog_config_from_settings({**settings, "cell_variation": 0.05, "readout_noise": 0.01, "noise_seed": 7})
    assert (cfg.cell_variation, cfg.readout_noise, cfg.noise_seed) == (0.05, 0.01, 7)
    old = analog_config_from_settings({**settings, "read_noise": 0.02})  # settings saved before the rename
    assert (old.cell_variation, old.readout_noise, old.noise_seed) == (0.0, 0.02, 0)
    from gaincell.config import AttentionSettings

    defaults = AttentionSettings()
    assert (defaults.cell_variation, defaults.readout_noise, defaults.noise_seed) == (0.0, 0.0, 0)
