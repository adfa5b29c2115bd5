"""The characterize and fit stages end to end on a tiny grid, and bad parameters fail first."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra.errors import ConfigCompositionException

from gaincell.config import compose

TINY = ["profile=ci", "device.array_rows=3", "device.array_cols=3", "device.array_trials=1",
        "device.array_queries=1", "device.array_kinds=[qk]", "device.pulse_width_points=4",
        "device.stored_v_points=5", "device.read_v_points=4", "device.write_levels=3",
        "device.retention_levels=1", "device.retention_time_s=0.05", "device.workers=1"]


def test_characterize_and_fit_end_to_end(tmp_path, sky130_tech):
    from gaincell.attention.config import fold_coefficients, resolve_coefficients
    from gaincell.device.stage import characterize
    from gaincell.fit import run as fit_run

    cfg = compose(TINY + [f"results_dir={tmp_path}",
                          f"device.model_cache_dir={sky130_tech.lib_dir.parents[5]}"])
    summary = characterize(cfg)
    dev = Path(tmp_path) / "device"
    for name in ("cell_sweep.csv", "write_sweep.csv", "retention.csv", "array.csv", "energy.csv",
                 "summary.json", "failed_points.csv"):
        assert (dev / name).is_file(), name
    on_disk = json.loads((dev / "summary.json").read_text())
    for key in ("technology", "mac_energy_j", "write_energy_j", "array_op_energy_j", "array_op_latency_ns",
                "array_rows", "array_cols", "retention_tau_s", "ngspice_version"):
        assert on_disk[key] is not None, key
    assert on_disk["points"]["failed"] == 0
    sweep = pd.read_csv(dev / "cell_sweep.csv")
    assert len(sweep) == 4 * 5 * 4
    full = sweep[(sweep.read_v == sweep.read_v.max()) & (sweep.pulse_width_ns == 15.0)].sort_values("level_v")
    assert np.all(np.diff(full.charge_c) > 0)                       # output grows with the stored weight
    assert full.charge_c.iloc[0] == pytest.approx(-full.charge_c.iloc[-1], rel=1e-6)  # sign-magnitude: odd
    assert np.allclose(sweep[sweep.pulse_width_ns == 0].charge_c, 0, atol=1e-18)        # no pulse, no charge
    # charge grows linearly with the pulse width (what the model assumes) to within 1 % of full scale
    one = sweep[(sweep.read_v == sweep.read_v.max()) & (sweep.level_v == 0.9)].sort_values("pulse_width_ns")
    slope = one.charge_c.iloc[-1] / 15.0
    assert np.max(np.abs(one.charge_c - slope * one.pulse_width_ns)) < 0.01 * one.charge_c.iloc[-1]
    assert 1e-4 < summary["retention_tau_s"] < 10
    assert 0 < summary["write_energy_j"] < summary["mac_energy_j"]
    array = pd.read_csv(dev / "array.csv")
    assert len(array) == 3 and np.corrcoef(array.charge_c, array.ideal_charge_c)[0, 1] > 0.99

    result = fit_run(cfg)
    coeffs = json.loads((Path(tmp_path) / "fit" / "coefficients.json").read_text())
    assert len(coeffs["coefficients"]) == 10 and coeffs["folded"][1] == pytest.approx(13.612)
    assert coeffs["full_grid"]["coefficients"] is not None
    assert coeffs["provenance"]["ngspice_version"].startswith("ngspice")
    loaded = resolve_coefficients("fitted", str(Path(tmp_path) / "fit" / "coefficients.json"))
    assert fold_coefficients(loaded, 0.9)[1] == pytest.approx(13.612)
    assert result["residuals"]["rms_relative_to_full_scale"] < 0.05


@pytest.mark.parametrize("override,message", [
    ("device.stored_v_max=2.5", "stored_v_max"),
    ("device.read_w_um=-1", "read_w_um"),
    ("device.pulse_width_points=1", "pulse_width_points"),
    ("device.signed_encoding=twos", "signed_encoding"),
    ("device.array_kinds=[kq]", "array_kinds"),
    ("device.read_device=nfet_01v8", "read_device"),   # not a device of the square_law technology
])
def test_bad_device_parameters_fail_before_any_simulation(tmp_path, override, message):
    from gaincell.device.stage import characterize

    # a value outside a choice field's set (signed_encoding) is refused already when the config is composed
    with pytest.raises((ValueError, ConfigCompositionException), match=message):
        characterize(compose(TINY + [f"results_dir={tmp_path}", "device.technology=square_law",
                                     "device.read_device=nmos", "device.write_device=nmos", override]))
    assert not (Path(tmp_path) / "device").exists()
