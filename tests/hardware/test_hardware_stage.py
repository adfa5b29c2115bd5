"""Stage hardware_estimates: the files it writes, their consistency with the model, and the figures."""
import json

import numpy as np
import pandas as pd
import pytest

from gaincell.config import compose
from gaincell.hardware import HardwareParameters, estimate, stage


def _cfg(tmp_path, *extra):
    return compose(["profile=ci", f"results_dir={tmp_path}", "tracking.mode=disabled", *extra])


@pytest.fixture
def stage_dir(tmp_path, device_summary):
    assert device_summary == tmp_path / "device" / "summary.json"  # where the stage looks by default
    stage.run(_cfg(tmp_path))
    return tmp_path


def test_estimates_json_holds_both_sets_and_the_published_totals(stage_dir):
    data = json.loads((stage_dir / "hardware" / "estimates.json").read_text())
    assert set(data["sets"]) == {"paper", "simulated"} and data["skipped_sets"] == {}
    paper = data["sets"]["paper"]
    assert abs(paper["relative_error_vs_paper"]["latency_per_token"]) < 0.10
    assert abs(paper["relative_error_vs_paper"]["energy_per_head_per_token"]) < 0.10
    ref = estimate(HardwareParameters.paper(), window=1024, head_dim=64, heads=12, layers=12)
    assert paper["estimate"]["energy_per_head_per_token_nj"] == pytest.approx(ref.energy_per_head_per_token_nj)
    assert paper["estimate"]["area_per_head_um2"] == pytest.approx(ref.area_per_head_um2)
    sim = data["sets"]["simulated"]
    assert any(r["source"].startswith("spice") for r in sim["parameters"])
    # the ci profile's own model: window 64, 1 head of 64, 2 layers
    model = data["profile_model"]["estimate"]
    assert (model["window"], model["heads"], model["head_dim"], model["layers"]) == (64, 1, 64, 2)


def test_sweep_tables_are_tidy_and_follow_the_scaling_laws(stage_dir):
    hdir = stage_dir / "hardware"
    win = pd.read_csv(hdir / "sweep_window.csv")
    assert set(win["set"]) == {"paper", "simulated"}
    assert sorted(win[win["set"] == "paper"]["window"]) == [64, 256, 1024, 4096]
    for _, g in win.groupby("set"):
        g = g.sort_values("window")
        slope = np.diff(g["energy_per_head_per_token_nj"]) / np.diff(g["window"])
        assert np.allclose(slope, slope[0])
    hl = pd.read_csv(hdir / "sweep_heads_layers.csv")
    heads = hl[(hl["knob"] == "heads") & (hl["set"] == "paper")]
    assert heads["latency_per_token_ns"].nunique() == 1
    tile = pd.read_csv(hdir / "sweep_tile.csv")
    for _, g in tile.groupby("set"):
        assert g.sort_values("knob_value")["ir_drop_fraction"].is_monotonic_increasing
    tech = pd.read_csv(hdir / "sweep_technology.csv")
    assert {"cmos_gain_cell", "ito_6t_worst_case", "ito_2t", "ito_2t_3d16"} <= set(tech["knob_value"])
    ret = pd.read_csv(hdir / "sweep_retention.csv")
    for _, g in ret.groupby("set"):
        assert g.sort_values("knob_value")["oldest_value_retention"].is_monotonic_increasing
    breakdown = pd.read_csv(hdir / "breakdown.csv")
    energy = breakdown[(breakdown["set"] == "paper") & (breakdown["quantity"] == "energy")]
    assert energy["value"].sum() == pytest.approx(6.15)
    params = pd.read_csv(hdir / "parameters.csv")
    assert params["source"].notna().all() and params["unit"].notna().all()


def test_without_device_summary_the_simulated_set_is_skipped_with_a_reason(tmp_path):
    summary = stage.run(_cfg(tmp_path))
    assert set(summary["sets"]) == {"paper"}
    assert "characterize" in summary["skipped_sets"]["simulated"]
    with pytest.raises(ValueError, match="parameter_sets entry 'spice'"):
        stage.run(_cfg(tmp_path, "hardware.parameter_sets=[spice]"))


def test_hardware_figures_render(stage_dir, tmp_path):
    from gaincell.figures import hardware as figs
    from gaincell.hardware import gpu_baseline as gb

    # a recorded baseline (as the CPU fallback writes it) next to the estimates
    cfg = _cfg(stage_dir)
    baseline = {"device_kind": "cpu", "note": "No GPU measurement (test).", "system": {"cpu_model": "test CPU"},
                "settings": {"heads": 12}, "energy_unavailable_reason": "no RAPL (test)",
                "measurements": [{"backend": "sdpa", "mode": "python_loop", "batch": 1, "latency_per_step_s": 2e-4,
                                  "energy_per_generated_token_j": None},
                                 {"backend": "eager", "mode": "python_loop", "batch": 64, "latency_per_step_s": 3e-3,
                                  "energy_per_generated_token_j": 2e-4}],
                "published": gb.published_figures(cfg.hardware)}
    (stage_dir / "hardware" / "gpu_baseline.json").write_text(json.dumps(baseline))
    out = tmp_path / "figs"
    made = []
    for fig in (figs.fig_hardware_breakdown, figs.fig_hardware_scaling, figs.fig_hardware_technology,
                figs.fig_hardware_gpu_comparison):
        made += fig(stage_dir, out)
    pngs = [p for p in made if p.suffix == ".png"]
    assert len(pngs) == 4 and all(p.stat().st_size > 10_000 for p in pngs)
    assert all(p.with_suffix(".pdf").exists() for p in pngs)


def test_figures_name_the_missing_input(tmp_path):
    from gaincell.figures import hardware as figs

    with pytest.raises(FileNotFoundError, match="estimates.json"):
        figs.fig_hardware_breakdown(tmp_path, tmp_path / "out")
