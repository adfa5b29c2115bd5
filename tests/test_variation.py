"""The variation / readout-noise sweep stage (issue 16 §3) and its figure, on the small trained model of
test_adapt (a 2-layer linear hardware GPT that learned a periodic task)."""
from __future__ import annotations

import json

import pytest

from gaincell.variation import variation_eval
from test_adapt import _cfg, _write_results, trained_linear  # noqa: F401 (fixture)


def _point(tmp_path, knob, value, chips=1, seed=0):
    return variation_eval(_cfg(tmp_path, f"+stage.knob={knob}", "+stage.models=[linear_hw]", f"+stage.chips={chips}",
                               f"attention.{knob}={value}", f"attention.noise_seed={seed}"))


def test_variation_sweep_points_and_figure(trained_linear, tmp_path):  # noqa: F811
    from gaincell.adapt import batch_losses
    from gaincell.figures.variation import fig_variation

    _write_results(tmp_path, trained_linear)
    zero = _point(tmp_path, "cell_variation", 0.0)
    assert (tmp_path / "adapt" / "variation" / "cell_variation_0.json").is_file()
    # zero variation is the trained model itself, on the same fixed batches as every study evaluation
    from gaincell.adapt.inputs import fixed_batches

    val = fixed_batches(_cfg(tmp_path), trained_linear, "val")
    reference = sum(batch_losses(trained_linear, val, "cpu")) / len(val)
    assert zero["models"]["linear_hw"]["val_loss"] == pytest.approx(reference, rel=1e-6)
    big = _point(tmp_path, "cell_variation", 0.5, chips=2)
    # a 50 % gain spread per cell hurts a model trained on identical cells; two chips differ
    assert big["models"]["linear_hw"]["val_loss"] > zero["models"]["linear_hw"]["val_loss"]
    a, b = big["models"]["linear_hw"]["val_loss_per_chip"]
    assert a != b and big["models"]["linear_hw"]["val_loss_chip_sem"] > 0
    # same seed, same chip: the point is reproducible
    assert _point(tmp_path, "cell_variation", 0.5, chips=2)["models"]["linear_hw"]["val_loss_per_chip"] == [a, b]
    noisy = _point(tmp_path, "readout_noise", 0.3)
    assert noisy["models"]["linear_hw"]["val_loss"] != zero["models"]["linear_hw"]["val_loss"]
    offset = _point(tmp_path, "cell_offset_variation", 2.0)
    # per-cell offsets of ~10 % of the linear cell's slope (g = 19.3) move the loss; their unit is recorded
    assert offset["models"]["linear_hw"]["val_loss"] != zero["models"]["linear_hw"]["val_loss"]
    assert offset["models"]["linear_hw"]["folded_c1"] == pytest.approx(19.3)
    from gaincell.figures.variation import variation_table

    table = variation_table(tmp_path)     # the shared zero point starts the readout-noise curve too
    assert set(table[table.knob == "readout_noise"]["value"]) == {0.0, 0.3}
    assert set(table[table.knob == "cell_offset_variation"]["value"]) == {0.0, 2.0}
    # a Monte-Carlo mismatch result (numbers of the shape the fit stage writes) is marked on the offset panel
    (tmp_path / "fit").mkdir(exist_ok=True)
    mismatch = {"available": True, "gain_spread_relative": 0.049, "gain_spread_relative_standard_error": 0.005,
                "offset_spread": 0.65, "offset_spread_over_c1": 0.048,
                "coefficients": {"c0": {"std_standard_error": 0.07}}}
    (tmp_path / "fit" / "coefficients.json").write_text(json.dumps({"mismatch": mismatch}))
    paths = fig_variation(tmp_path, tmp_path / "figures")
    assert [p.name for p in paths] == ["variation.png", "variation.pdf"]
    row = json.loads((tmp_path / "adapt" / "variation" / "readout_noise_0.3.json").read_text())
    assert row["knob"] == "readout_noise" and row["value"] == 0.3


def test_variation_stage_rejects_bad_input(trained_linear, tmp_path):  # noqa: F811
    _write_results(tmp_path, trained_linear)
    with pytest.raises(ValueError, match="stage.knob='leakage'"):
        variation_eval(
            _cfg(tmp_path, "+stage.knob=leakage", "+stage.models=[linear_hw]"))
    with pytest.raises(ValueError, match="stage.models is required"):
        variation_eval(_cfg(tmp_path, "+stage.knob=cell_variation"))
