"""attention.decay_per_step=derived: lambda = L * delta_t / tau from the cost model and the measured retention."""
import json

import pytest

from gaincell.attention.config import analog_config_from_settings, resolve_decay_per_step
from gaincell.config import AttentionSettings
from gaincell.hardware.costmodel import HardwareParameters, estimate
from gaincell.hardware.decay import derive_decay


def test_derived_decay_is_layers_times_latency_over_measured_tau(device_summary, tmp_path):
    summary = json.loads(device_summary.read_text())
    out = derive_decay(device_summary, window=128, head_dim=64, heads=2, layers=4, tile_rows=64)
    params = HardwareParameters.simulated(device_summary)
    latency_ns = estimate(params, window=128, head_dim=64, heads=2, layers=4).latency_per_token_ns
    # independent arithmetic: 4 layers of one token's timing chain, over our SPICE retention tau
    assert out["decay_per_step"] == pytest.approx(4 * latency_ns * 1e-9 / summary["retention_tau_s"], rel=1e-12)
    assert out["retention_tau_s"] == summary["retention_tau_s"]
    assert out["sources"]["retention_tau_s"].startswith("spice")
    path = tmp_path / "decay_per_step.json"
    path.write_text(json.dumps(out))
    assert resolve_decay_per_step("derived", str(path)) == out["decay_per_step"]
    settings = AttentionSettings(kind="linear_hw", window=128, gain=19.3, decay_per_step="derived",
                                 derived_decay_path=str(path))
    assert analog_config_from_settings(settings).decay_per_step == out["decay_per_step"]


def test_decay_default_and_errors(tmp_path):
    assert AttentionSettings().decay_per_step == 1.56e-4          # the paper's default stays
    assert resolve_decay_per_step(1e-3) == 1e-3
    with pytest.raises(ValueError, match="decay_per_step='measured'"):
        resolve_decay_per_step("measured")
    with pytest.raises(FileNotFoundError, match="derive_decay"):
        resolve_decay_per_step("derived", str(tmp_path / "absent.json"))
