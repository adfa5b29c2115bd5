"""GPU baseline: exact energy-counter arithmetic on a fake NVML, the CPU fallback, and the decode loop itself."""
import json
import math
from fractions import Fraction

import pytest
import torch

from gaincell.config import compose
from gaincell.hardware import gpu_baseline as gb

M64 = 2 ** 64


class FakeNVML:
    """Enough of pynvml for the baseline: a total-energy counter that replays recorded readings (mJ)."""

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    def __init__(self, readings=(), missing_library=False):
        self.readings = list(readings)
        self.missing_library = missing_library
        self.shutdowns = 0

    def nvmlInit(self):
        if self.missing_library:
            raise self.NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return self.readings.pop(0)

    def nvmlShutdown(self):
        self.shutdowns += 1


class FakeClock:
    """perf_counter / sleep pair: sleeping advances the clock, each workload call takes `work_s`."""

    def __init__(self):
        self.now = 100.0

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


# ---------------------------------------------------------------------------- pure arithmetic
def test_counter_delta_plain_and_wrapped():
    assert gb.counter_delta(1_000, 4_500, M64) == 3_500
    assert gb.counter_delta(M64 - 100, 50, M64) == 150          # wrapped past 2**64 mJ
    assert gb.counter_delta(7, 7, M64) == 0
    assert gb.counter_delta(262_143_000_000 - 5, 10, 262_143_000_000) == 15  # a RAPL-sized modulus
    with pytest.raises(ValueError, match="outside"):
        gb.counter_delta(-1, 5, M64)
    with pytest.raises(ValueError, match="outside"):
        gb.counter_delta(0, M64, M64)
    with pytest.raises(ValueError, match="integer"):
        gb.counter_delta(1.5, 5, M64)


def test_active_energy_equal_windows_is_exact_integer_subtraction():
    busy = gb.CounterWindow(start=M64 - 2_000, end=3_000, seconds=2.0)   # 5,000 mJ busy, wrapped
    idle = gb.CounterWindow(start=10_000, end=11_200, seconds=2.0)       # 1,200 mJ idle
    e = gb.active_energy(busy, idle, 1e-3, M64)
    assert e.busy_j == 5.0 and e.idle_j == 1.2
    assert e.active_j == float(Fraction(5_000 - 1_200) * Fraction(1e-3))
    assert e.idle_power_w == pytest.approx(0.6) and e.busy_power_w == pytest.approx(2.5)
    assert e.active_power_w == pytest.approx(1.9)


def test_active_energy_scales_idle_to_the_busy_window_exactly():
    busy = gb.CounterWindow(start=0, end=9_000, seconds=3.0)
    idle = gb.CounterWindow(start=M64 - 1_000, end=1_000, seconds=2.0)   # 2,000 mJ over 2 s, wrapped
    e = gb.active_energy(busy, idle, 1e-3, M64)
    expected = (Fraction(9_000) - Fraction(2_000) * Fraction(3.0) / Fraction(2.0)) * Fraction(1e-3)
    assert e.active_j == float(expected)     # 6.0 J, no rounding beyond the final float
    assert e.idle_scaled_j == pytest.approx(3.0)
    with pytest.raises(ValueError, match="> 0 s"):
        gb.active_energy(busy, gb.CounterWindow(0, 1, 0.0), 1e-3, M64)


def test_energy_per_token_divides_by_repetitions_steps_and_batch():
    per_step, per_token = gb.energy_per_token(6.0, repetitions=3, steps=1000, batch=64)
    assert per_step == pytest.approx(2e-3) and per_token == pytest.approx(2e-3 / 64)
    with pytest.raises(ValueError, match="batch=0"):
        gb.energy_per_token(1.0, 1, 1, 0)


def test_measurement_protocol_on_a_fake_nvml():
    # readings in call order: the probe of open_nvml, idle start, idle end, busy start, busy end (mJ);
    # the busy window wraps past 2**64
    nvml = FakeNVML(readings=[M64 - 5_000, M64 - 3_000, M64 - 1_000, M64 - 900, 7_100])
    mod, handle = gb.open_nvml(nvml)
    counter = gb.nvml_counter(mod, handle)
    clock = FakeClock()
    calls = []

    def workload():
        calls.append(1)
        clock.sleep(0.5)          # each repetition takes 0.5 s

    e = gb.measure_active_energy(counter, workload, repetitions=8, planned_busy_s=4.0,
                                 clock=clock.clock, sleep=clock.sleep, settle_s=1.0)
    assert len(calls) == 8
    assert (e.busy_s, e.idle_s) == (4.0, 4.0)
    assert e.busy_j == 8.0 and e.idle_j == 2.0
    assert e.active_j == 6.0                  # (8,000 - 2,000) mJ, exact
    assert nvml.readings == []
    per_step, per_token = gb.energy_per_token(e.active_j, 8, 100, 4)
    assert per_step == pytest.approx(6.0 / 800) and per_token == pytest.approx(6.0 / 3200)


# ---------------------------------------------------------------------------- device choice
def test_missing_nvml_library_takes_the_cpu_path(tmp_path):
    with pytest.raises(gb.EnergyUnavailable, match="LibraryNotFound"):
        gb.open_nvml(FakeNVML(missing_library=True))
    choice = gb.choose_device("auto", nvml=FakeNVML(missing_library=True), cuda_available=False,
                              rapl_root=tmp_path / "no-powercap")
    assert choice.kind == "cpu"
    assert "LibraryNotFound" in choice.reason
    assert choice.energy_counter is None and "RAPL" in choice.energy_unavailable_reason


def test_gpu_with_nvml_gets_the_energy_counter():
    nvml = FakeNVML(readings=[5, 6])
    choice = gb.choose_device("auto", nvml=nvml, cuda_available=True)
    assert choice.kind == "cuda" and choice.energy_counter.name == "nvml_total_energy"
    assert choice.energy_counter.modulus == M64 and choice.energy_counter.read() == 6


def test_explicit_cuda_without_a_gpu_is_an_error():
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        gb.choose_device("cuda", nvml=FakeNVML(missing_library=True), cuda_available=False)
    with pytest.raises(ValueError, match="baseline_device='tpu'"):
        gb.choose_device("tpu")


def test_rapl_counter_when_readable(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text("123456\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    choice = gb.choose_device("cpu", rapl_root=tmp_path)
    assert choice.kind == "cpu" and choice.energy_counter.name == "rapl"
    assert choice.energy_counter.read() == 123456
    assert choice.energy_counter.modulus == 262143328851 and choice.energy_counter.joules_per_count == 1e-6


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path of this machine")
def test_real_pynvml_without_gpu_gives_cpu():
    assert gb.choose_device("auto").kind == "cpu"


# ---------------------------------------------------------------------------- the decode loop
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_decode_loop_computes_causal_attention_over_the_cache(backend):
    p = gb.DecodeProblem(batch=2, heads=3, head_dim=8, steps=6, device="cpu", dtype=torch.float64, seed=1)
    run, kernel = gb.make_decode_run(backend, p)
    step = gb._sdpa_step_fn(p) if backend == "sdpa" else gb._eager_step_fn(p)
    q = p.q[:, :, :, 0].permute(1, 2, 0, 3)          # (B, H, T, D)
    k = p.k[:, :, :, 0].permute(1, 2, 0, 3)
    v = p.v[:, :, :, 0].permute(1, 2, 0, 3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), float("-inf"))
    reference = torch.softmax(scores, -1) @ v
    for t in range(6):
        out = step(t)
        torch.testing.assert_close(out[:, :, 0], reference[:, :, t])
    run()  # the whole loop runs too
    torch.testing.assert_close(p.k_cache, k)


def test_stage_on_cpu_writes_a_result_that_says_so(tmp_path):
    cfg = compose(["profile=ci", f"results_dir={tmp_path}", "hardware.baseline_cpu_steps=8",
                   "hardware.baseline_cpu_batches=[1,2]", "hardware.baseline_cpu_runs=2",
                   "hardware.baseline_warmup_runs=1", "tracking.mode=disabled"])
    if torch.cuda.is_available():
        pytest.skip("this test checks the CPU fallback")
    summary = gb.run(cfg)
    data = json.loads((tmp_path / "hardware" / "gpu_baseline.json").read_text())
    assert data == json.loads(json.dumps(summary))
    assert data["device_kind"] == "cpu" and not data["gpu_available"]
    assert "No GPU measurement" in data["note"]
    got = {(m["backend"], m["mode"], m["batch"]) for m in data["measurements"]}
    assert got == {("sdpa", "python_loop", 1), ("sdpa", "python_loop", 2), ("eager", "python_loop", 1),
                   ("eager", "python_loop", 2)}
    for m in data["measurements"]:
        assert m["latency_per_step_s"] > 0 and m["steps"] == 8 and m["dtype"] == "float32"
        assert m["latency_per_step_s"] == pytest.approx(m["latency_per_run_s"] / 8)
        if not data["energy_available"]:
            assert m["energy_per_generated_token_j"] is None and m["energy_source"] == "unavailable"
    assert {s["reason"] for s in data["skipped"]} >= {"CUDA graphs need a GPU"}
    assert [p["name"] for p in data["published"]] == ["RTX 4090 (paper)", "Jetson Nano (paper)"]
    rtx = data["published"][0]
    assert rtx["energy_per_generated_token_j"] == pytest.approx(rtx["energy_per_step_j"] / 64)
    assert (tmp_path / "hardware" / "gpu_baseline.csv").read_text().count("\n") == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_on_gpu(tmp_path):
    cfg = compose(["profile=ci", f"results_dir={tmp_path}", "hardware.baseline_steps=32",
                   "hardware.baseline_batches=[1]", "hardware.baseline_runs=2", "hardware.baseline_backends=[sdpa]",
                   "hardware.baseline_energy_window_s=0.2", "hardware.baseline_idle_settle_s=0",
                   "tracking.mode=disabled"])
    data = gb.run(cfg)
    assert data["device_kind"] == "cuda"
    modes = {m["mode"] for m in data["measurements"]}
    assert modes == {"cuda_graph", "python_loop"}, data["skipped"]


def test_baseline_energy_path_with_a_counter_on_the_cpu():
    """The measurement loop with an energy counter (as on a GPU with NVML), here a 1 W clock-driven meter."""
    import time

    cfg = compose(["profile=ci", "hardware.baseline_cpu_steps=4", "hardware.baseline_cpu_batches=[2]",
                   "hardware.baseline_cpu_runs=2", "hardware.baseline_warmup_runs=1",
                   "hardware.baseline_backends=[eager]", "hardware.baseline_cpu_energy_window_s=0.05",
                   "hardware.baseline_idle_settle_s=0"])
    meter = gb.EnergyCounter(name="fake_1W", read=lambda: int(time.perf_counter() * 1e6), joules_per_count=1e-6,
                             modulus=M64)
    choice = gb.DeviceChoice("cpu", "test", energy_counter=meter)
    result = gb.baseline(cfg.hardware, choice, progress=False)
    (m,) = result["measurements"]
    assert m["energy_source"] == "fake_1W" and m["energy_repetitions"] >= 2
    assert m["idle_power_w"] == pytest.approx(1.0, rel=0.05) and m["busy_power_w"] == pytest.approx(1.0, rel=0.05)
    # a constant 1 W meter has no workload energy above idle
    assert abs(m["active_power_w"]) < 0.05
    assert m["energy_per_generated_token_j"] == pytest.approx(m["energy_per_step_j"] / 2)
