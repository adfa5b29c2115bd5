"""Fixtures of the hardware tests: a fake device-stage summary (the device stage may not have run)."""
import json

import pytest

FAKE_DEVICE_SUMMARY = {"technology": "sky130", "mac_energy_j": 4e-15, "write_energy_j": 12e-15,
                       "array_op_energy_j": 1.5e-12, "array_op_latency_ns": 18.0, "array_rows": 16,
                       "array_cols": 16, "retention_tau_s": 0.02, "ngspice_version": "39"}


@pytest.fixture
def device_summary(tmp_path):
    path = tmp_path / "device" / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(FAKE_DEVICE_SUMMARY))
    return path
