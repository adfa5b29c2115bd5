"""The linear hardware model's gain g (issue 16 §2): the fitted cell's own slope when the attention uses
the fitted coefficients, the paper's 19.3 with the paper's, a number when given; fixed at training."""
import dataclasses
import json

import pytest

from gaincell.attention.config import PAPER_GAIN, AnalogAttentionConfig, analog_config_from_settings, resolve_gain
from gaincell.config import AttentionSettings


@pytest.fixture()
def fit_json(tmp_path):
    path = tmp_path / "coefficients.json"
    path.write_text(json.dumps({"coefficients": [0.0] * 4 + [13.612] + [0.0] * 5, "linear_slope": 14.25}))
    return str(path)


def test_gain_follows_the_cell(fit_json):
    assert resolve_gain(None, "fitted", fit_json) == 14.25     # the fitted cell's own slope
    assert resolve_gain(None, "paper", fit_json) == PAPER_GAIN == 19.3
    assert resolve_gain(21.0, "fitted", fit_json) == 21.0       # an explicit number wins
    with pytest.raises(ValueError, match="attention.gain=null with coefficients="):
        resolve_gain(None, [1.0] * 10)
    with pytest.raises(FileNotFoundError, match="run the fit stage"):
        resolve_gain(None, "fitted", fit_json + ".missing")


def test_settings_resolve_the_gain_for_hardware_kinds_only(fit_json):
    for kind in ("linear_hw", "nonlinear_hw"):
        s = AttentionSettings(kind=kind, window=128, coefficients="fitted", fitted_coefficients_path=fit_json)
        assert analog_config_from_settings(s).gain == 14.25
    paper = AttentionSettings(kind="linear_hw", window=128, coefficients="paper")
    assert analog_config_from_settings(paper).gain == 19.3
    # softmax never reads g, so it never needs the fit result
    soft = AttentionSettings(kind="softmax", window=128, coefficients="fitted", fitted_coefficients_path="/nonexistent")
    assert analog_config_from_settings(soft).gain == PAPER_GAIN


def test_adaptation_keeps_the_linear_models_gain(fit_json):
    """One linear model serves every cell: mapping onto another cell changes the coefficients, not g."""
    from omegaconf import OmegaConf

    from gaincell.adapt.stage import nonlinear_config

    linear = AnalogAttentionConfig(window=128, gain=14.25)
    cfg = OmegaConf.create({"attention": {"coefficients": "paper", "fitted_coefficients_path": fit_json}})
    mapped = nonlinear_config(cfg, linear)
    assert mapped.gain == 14.25 and mapped.coefficients is not None
    assert dataclasses.replace(mapped, coefficients=None) == linear
