"""GPU (or CPU) latency and energy of attention-only autoregressive decoding: the paper's baseline, done better.

The paper (Methods, 'GPU attention latency and energy consumption measurements') ran 10 runs of 1,024
decoding steps with 12 heads of dimension 64, FlashAttention-2, no projections, and read NVML power once
per run with the idle power subtracted. Here:

* the decode loop writes each step's new K and V into a preallocated cache and attends one query over
  the cache (``sdpa``: torch's fused SDPA, flash backend where it applies; ``flash_attn_2``:
  ``flash_attn_with_kvcache`` when flash-attn is installed; ``eager``: matmul + softmax), batch 1 and
  batch 64 reported separately;
* the whole loop is captured once as a CUDA graph (``cuda_graph`` mode; ``python_loop`` is the paper's
  step-by-step launch) and timed with CUDA events;
* energy comes from NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ) read around
  many repetitions (at least ``baseline_energy_window_s`` of work), minus the idle energy of a window
  measured just before, scaled to the same length;
* every result records the GPU model, driver, CUDA, clocks, power limit and settings.

Without a usable GPU (no NVML library, no CUDA) the same loop runs on the CPU: latency, and energy from
RAPL (``/sys/class/powercap``) when readable, otherwise marked unavailable, and the result says so.

The counter arithmetic (:func:`counter_delta`, :func:`active_energy`) is pure and exact, so it is tested
with recorded counter values (a fake NVML), wrap-around and idle subtraction included.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gaincell.io import atomic_to_csv, atomic_write_json

# nvmlDeviceGetTotalEnergyConsumption returns an unsigned long long in millijoules.
NVML_COUNTER_MODULUS = 2 ** 64
NVML_JOULES_PER_COUNT = 1e-3
RAPL_ROOT = Path("/sys/class/powercap")


# --------------------------------------------------------------------------------------------------
# energy arithmetic (pure, exact)
# --------------------------------------------------------------------------------------------------
def counter_delta(start: int, end: int, modulus: int) -> int:
    """Increase of a counter that wraps to 0 at ``modulus``, from reading ``start`` to ``end``.

    Exact for integer readings; assumes at most one wrap between the readings (an NVML counter in mJ
    wraps after 2**64 mJ; a RAPL counter after ``max_energy_range_uj``).
    """
    for name, value in (("start", start), ("end", end), ("modulus", modulus)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"energy counter {name}={value!r}: expected an integer reading")
    if modulus <= 0:
        raise ValueError(f"energy counter modulus={modulus}: expected > 0")
    for name, value in (("start", start), ("end", end)):
        if not 0 <= value < modulus:
            raise ValueError(f"energy counter {name}={value} outside [0, {modulus})")
    return (end - start) % modulus


@dataclass(frozen=True)
class CounterWindow:
    """Two readings of an energy counter around a window of ``seconds``."""

    start: int
    end: int
    seconds: float


@dataclass(frozen=True)
class ActiveEnergy:
    """Energy of a busy window with the idle (static) energy of an equal window subtracted, in J / W."""

    busy_j: float
    idle_j: float            # idle energy measured over the idle window
    idle_scaled_j: float     # idle energy scaled to the busy window's length (subtracted)
    active_j: float          # busy_j - idle_scaled_j
    busy_s: float
    idle_s: float
    busy_power_w: float
    idle_power_w: float
    active_power_w: float


def active_energy(busy: CounterWindow, idle: CounterWindow, joules_per_count: float,
                  modulus: int) -> ActiveEnergy:
    """Busy energy minus idle power x busy time, computed in exact rational arithmetic.

    With equal windows this is ``(busy counts - idle counts) x joules_per_count`` exactly.
    """
    if not busy.seconds > 0 or not idle.seconds > 0:
        raise ValueError(f"energy windows must last > 0 s (busy {busy.seconds!r} s, idle {idle.seconds!r} s)")
    unit = Fraction(joules_per_count)
    busy_counts = counter_delta(busy.start, busy.end, modulus)
    idle_counts = counter_delta(idle.start, idle.end, modulus)
    ratio = Fraction(busy.seconds) / Fraction(idle.seconds)
    idle_scaled = idle_counts * ratio
    active = (busy_counts - idle_scaled) * unit
    return ActiveEnergy(
        busy_j=float(busy_counts * unit), idle_j=float(idle_counts * unit), idle_scaled_j=float(idle_scaled * unit),
        active_j=float(active), busy_s=busy.seconds, idle_s=idle.seconds,
        busy_power_w=float(busy_counts * unit / Fraction(busy.seconds)),
        idle_power_w=float(idle_counts * unit / Fraction(idle.seconds)),
        active_power_w=float(active / Fraction(busy.seconds)))


def energy_per_token(active_j: float, repetitions: int, steps: int, batch: int) -> Tuple[float, float]:
    """(energy per decoding step of the whole batch, energy per generated token = per step / batch), J."""
    for name, value in (("repetitions", repetitions), ("steps", steps), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    per_step = active_j / (repetitions * steps)
    return per_step, per_step / batch


# --------------------------------------------------------------------------------------------------
# energy counters: NVML (GPU) and RAPL (CPU)
# --------------------------------------------------------------------------------------------------
class EnergyUnavailable(RuntimeError):
    """No energy counter could be opened; the message says why."""


@dataclass
class EnergyCounter:
    """A monotonically increasing, wrapping energy counter: ``read()`` -> integer counts."""

    name: str
    read: Callable[[], int]
    joules_per_count: float
    modulus: int
    detail: str = ""


def open_nvml(nvml: Any = None, index: int = 0) -> Tuple[Any, Any]:
    """Initialise NVML and return ``(nvml module, device handle)``; EnergyUnavailable says why not.

    ``nvml`` defaults to ``pynvml`` (nvidia-ml-py); tests pass a fake with the same functions.
    A missing library (``NVMLError_LibraryNotFound``), no driver or no device all end here.
    """
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]
        except ImportError as err:
            raise EnergyUnavailable(f"pynvml (nvidia-ml-py) is not installed: {err}") from None
    error_type = getattr(nvml, "NVMLError", Exception)
    try:
        nvml.nvmlInit()
    except error_type as err:
        raise EnergyUnavailable(f"NVML unavailable: {type(err).__name__}: {err}") from None
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # Volta and newer; fails early otherwise
    except error_type as err:
        _nvml_shutdown(nvml)
        raise EnergyUnavailable(f"NVML total-energy counter unavailable on device {index}: "
                                f"{type(err).__name__}: {err}") from None
    return nvml, handle


def _nvml_shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:  # shutting down a half-open library must not mask the real result
        pass


def nvml_counter(nvml: Any, handle: Any) -> EnergyCounter:
    return EnergyCounter(name="nvml_total_energy", read=lambda: int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle)),
                         joules_per_count=NVML_JOULES_PER_COUNT, modulus=NVML_COUNTER_MODULUS,
                         detail="nvmlDeviceGetTotalEnergyConsumption (mJ since driver load)")


def rapl_counter(root: Path = RAPL_ROOT) -> EnergyCounter:
    """The CPU package-0 RAPL counter (``energy_uj``); EnergyUnavailable when absent or unreadable."""
    root = Path(root)
    if not root.is_dir():
        raise EnergyUnavailable(f"no RAPL interface ({root} does not exist on this machine)")
    zones = sorted(p for p in root.glob("*") if (p / "energy_uj").exists())
    packages = [z for z in zones if (z / "name").exists() and z.joinpath("name").read_text().strip().startswith("package")]
    zone = (packages or zones or [None])[0]
    if zone is None:
        raise EnergyUnavailable(f"no RAPL energy_uj counter under {root}")
    energy_file = zone / "energy_uj"
    try:
        int(energy_file.read_text())
        max_range = int((zone / "max_energy_range_uj").read_text())
    except PermissionError:
        raise EnergyUnavailable(f"RAPL counter {energy_file} is not readable by this user (root only on "
                                f"Linux >= 5.10)") from None
    except (OSError, ValueError) as err:
        raise EnergyUnavailable(f"RAPL counter {energy_file} unreadable: {err}") from None
    name = zone.joinpath("name").read_text().strip() if (zone / "name").exists() else zone.name
    return EnergyCounter(name="rapl", read=lambda: int(energy_file.read_text()), joules_per_count=1e-6,
                         modulus=max_range + 1, detail=f"{energy_file} ({name}; package 0 only)")


def measure_active_energy(counter: EnergyCounter, workload: Callable[[], None], repetitions: int,
                          planned_busy_s: float, sync: Callable[[], None] = lambda: None,
                          clock: Callable[[], float] = time.perf_counter,
                          sleep: Callable[[float], None] = time.sleep, settle_s: float = 0.0) -> ActiveEnergy:
    """Idle window of ``planned_busy_s`` (after ``settle_s``), then ``repetitions`` x ``workload``.

    The idle energy is scaled to the actual busy duration (see :func:`active_energy`).
    """
    sync()
    if settle_s > 0:
        sleep(settle_s)
    idle_start, t0 = counter.read(), clock()
    sleep(max(planned_busy_s, 1e-3))
    idle_end, t1 = counter.read(), clock()
    busy_start, t2 = counter.read(), clock()
    for _ in range(repetitions):
        workload()
    sync()
    busy_end, t3 = counter.read(), clock()
    return active_energy(CounterWindow(busy_start, busy_end, t3 - t2), CounterWindow(idle_start, idle_end, t1 - t0),
                         counter.joules_per_count, counter.modulus)


# --------------------------------------------------------------------------------------------------
# the decode loop
# --------------------------------------------------------------------------------------------------
@dataclass
class DecodeProblem:
    """Precomputed per-step inputs (no projections: attention only) and the KV cache."""

    batch: int
    heads: int
    head_dim: int
    steps: int
    device: str
    dtype: Any
    layout: str = "bhtd"     # bhtd: (B, H, T, D) for sdpa / eager; bthd: (B, T, H, D) for flash_attn
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch", "heads", "head_dim", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"baseline {name}={value!r}: expected a positive integer")
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        B, H, D, T = self.batch, self.heads, self.head_dim, self.steps
        step_shape = (T, B, H, 1, D) if self.layout == "bhtd" else (T, B, 1, H, D)
        cache_shape = (B, H, T, D) if self.layout == "bhtd" else (B, T, H, D)
        kw = dict(device=self.device, dtype=self.dtype)
        self.q = torch.randn(step_shape, generator=gen, device=self.device).to(self.dtype)
        self.k = torch.randn(step_shape, generator=gen, device=self.device).to(self.dtype)
        self.v = torch.randn(step_shape, generator=gen, device=self.device).to(self.dtype)
        self.k_cache = torch.zeros(cache_shape, **kw)
        self.v_cache = torch.zeros(cache_shape, **kw)
        self.scale = 1.0 / math.sqrt(D)


def _sdpa_step_fn(p: DecodeProblem) -> Callable[[int], Any]:
    def step(t: int):
        p.k_cache[:, :, t:t + 1] = p.k[t]
        p.v_cache[:, :, t:t + 1] = p.v[t]
        return F.scaled_dot_product_attention(p.q[t], p.k_cache[:, :, :t + 1], p.v_cache[:, :, :t + 1])
    return step


def _eager_step_fn(p: DecodeProblem) -> Callable[[int], Any]:
    def step(t: int):
        p.k_cache[:, :, t:t + 1] = p.k[t]
        p.v_cache[:, :, t:t + 1] = p.v[t]
        scores = torch.matmul(p.q[t], p.k_cache[:, :, :t + 1].transpose(-1, -2)) * p.scale
        weights = torch.softmax(scores.float(), dim=-1).to(p.dtype)
        return torch.matmul(weights, p.v_cache[:, :, :t + 1])
    return step


def _flash_attn_step_fn(p: DecodeProblem) -> Callable[[int], Any]:
    from flash_attn import flash_attn_with_kvcache  # type: ignore[import-not-found]

    # cache_seqlens as device tensors so the whole loop can be captured in one CUDA graph
    seqlens = [torch.full((p.batch,), t, dtype=torch.int32, device=p.device) for t in range(p.steps)]

    def step(t: int):  # appends k, v at position t in place, attends over t + 1 keys
        return flash_attn_with_kvcache(p.q[t], p.k_cache, p.v_cache, k=p.k[t], v=p.v[t],
                                       cache_seqlens=seqlens[t], softmax_scale=p.scale, causal=False)
    return step


def sdpa_kernel_context(kernel: Optional[str]):
    """Context manager restricting torch SDPA to one backend (``flash``, ``efficient``, ``math``)."""
    if kernel is None:
        return contextlib.nullcontext()

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH}[kernel]
    return sdpa_kernel([backend])


def make_decode_run(backend: str, p: DecodeProblem) -> Tuple[Callable[[], None], str]:
    """A function running all ``p.steps`` decode steps, and the kernel actually used."""
    if backend == "eager":
        step, kernel, ctx_kernel = _eager_step_fn(p), "matmul+softmax", None
    elif backend == "flash_attn_2":
        if p.device == "cpu":
            raise RuntimeError("flash_attn_2 needs a CUDA GPU")
        try:
            import flash_attn  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            raise RuntimeError("flash-attn is not installed (pip install flash-attn)") from None
        step, kernel, ctx_kernel = _flash_attn_step_fn(p), f"flash_attn_with_kvcache {flash_attn.__version__}", None
    elif backend == "sdpa":
        step = _sdpa_step_fn(p)
        ctx_kernel, kernel = None, "sdpa (default selection)"
        if p.device != "cpu":
            # the first fused backend that accepts a one-query decode step of this dtype
            for candidate in ("flash", "efficient", "math"):
                try:
                    with sdpa_kernel_context(candidate):
                        step(0)
                    torch.cuda.synchronize()
                    ctx_kernel, kernel = candidate, f"sdpa_{candidate}"
                    break
                except RuntimeError:
                    continue
        else:
            kernel = "sdpa (cpu)"
    else:
        raise ValueError(f"unknown baseline backend {backend!r}; expected sdpa, flash_attn_2 or eager")

    def run() -> None:
        with sdpa_kernel_context(ctx_kernel):
            for t in range(p.steps):
                step(t)
    return run, kernel


def capture_cuda_graph(run: Callable[[], None], warmup_runs: int) -> Callable[[], None]:
    """Capture the whole decode loop once; replaying it launches every step with no Python overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup_runs)):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    torch.cuda.synchronize()
    return graph.replay


def time_runs(workload: Callable[[], None], runs: int, device: str) -> List[float]:
    """Seconds of each of ``runs`` calls: CUDA events on a GPU, perf_counter on the CPU."""
    times = []
    for _ in range(runs):
        if device == "cpu":
            t0 = time.perf_counter()
            workload()
            times.append(time.perf_counter() - t0)
        else:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            workload()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
    return times


# --------------------------------------------------------------------------------------------------
# system description
# --------------------------------------------------------------------------------------------------
def _safe(fn: Callable[[], Any]) -> Any:
    try:
        value = fn()
    except Exception:  # a query the driver or device does not support is recorded as None
        return None
    return value.decode() if isinstance(value, bytes) else value


def gpu_clocks(nvml: Any, handle: Any) -> Dict[str, Any]:
    """Current SM / memory clocks (MHz), performance state and temperature."""
    return {"sm_clock_mhz": _safe(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
            "mem_clock_mhz": _safe(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)),
            "pstate": _safe(lambda: nvml.nvmlDeviceGetPerformanceState(handle)),
            "temperature_c": _safe(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))}


def gpu_system_info(nvml: Any, handle: Any) -> Dict[str, Any]:
    info = {
        "gpu_name": _safe(lambda: nvml.nvmlDeviceGetName(handle)) or _safe(lambda: torch.cuda.get_device_name(0)),
        "driver_version": _safe(nvml.nvmlSystemGetDriverVersion),
        "cuda_runtime": torch.version.cuda,
        "compute_capability": _safe(lambda: ".".join(map(str, torch.cuda.get_device_capability(0)))),
        "max_sm_clock_mhz": _safe(lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM)),
        "max_mem_clock_mhz": _safe(lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_MEM)),
        "applications_sm_clock_mhz": _safe(lambda: nvml.nvmlDeviceGetApplicationsClock(handle, nvml.NVML_CLOCK_SM)),
        "power_limit_w": _safe(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0),
        "persistence_mode": _safe(lambda: nvml.nvmlDeviceGetPersistenceMode(handle)),
        "idle_clocks": gpu_clocks(nvml, handle),
    }
    return info


def cpu_system_info() -> Dict[str, Any]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model or platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------------
# device choice and the stage
# --------------------------------------------------------------------------------------------------
@dataclass
class DeviceChoice:
    kind: str                          # cuda | cpu
    reason: str                        # why (always filled)
    nvml: Any = None
    handle: Any = None
    energy_counter: Optional[EnergyCounter] = None
    energy_unavailable_reason: str = ""


def choose_device(requested: str = "auto", nvml: Any = None, cuda_available: Optional[bool] = None,
                  rapl_root: Path = RAPL_ROOT) -> DeviceChoice:
    """CUDA when torch sees a GPU (energy from NVML when it opens), otherwise the CPU (energy from RAPL).

    ``requested="cuda"`` without a GPU is an error; ``auto`` never is.
    """
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"hardware.baseline_device={requested!r}: expected auto, cuda or cpu")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if requested in ("auto", "cuda"):
        try:
            nvml_mod, handle = open_nvml(nvml)
            nvml_reason = ""
        except EnergyUnavailable as err:
            nvml_mod, handle, nvml_reason = None, None, str(err)
        if cuda_available:
            if nvml_mod is not None:
                return DeviceChoice("cuda", "CUDA GPU found", nvml_mod, handle, nvml_counter(nvml_mod, handle))
            return DeviceChoice("cuda", "CUDA GPU found", energy_unavailable_reason=nvml_reason)
        if nvml_mod is not None:
            _nvml_shutdown(nvml_mod)
        if requested == "cuda":
            raise RuntimeError(f"hardware.baseline_device=cuda but torch sees no CUDA GPU ({nvml_reason or 'NVML ok'})")
        reason = f"no usable CUDA GPU (torch.cuda.is_available()={cuda_available}; " \
                 f"{nvml_reason or 'NVML opened but torch has no CUDA build'})"
    else:
        reason = "hardware.baseline_device=cpu"
    try:
        counter = rapl_counter(rapl_root)
        return DeviceChoice("cpu", reason, energy_counter=counter)
    except EnergyUnavailable as err:
        return DeviceChoice("cpu", reason, energy_unavailable_reason=str(err))


def _measure_one(choice: DeviceChoice, backend: str, mode: str, batch: int, heads: int, head_dim: int, steps: int,
                 runs: int, warmup_runs: int, dtype_name: str, energy_window_s: float, settle_s: float,
                 seed: int) -> Dict[str, Any]:
    device = "cuda" if choice.kind == "cuda" else "cpu"
    dtype = getattr(torch, dtype_name)
    if mode == "cuda_graph" and device == "cpu":
        raise RuntimeError("CUDA graphs need a GPU")
    if mode not in ("cuda_graph", "python_loop"):
        raise ValueError(f"unknown baseline mode {mode!r}; expected cuda_graph or python_loop")
    layout = "bthd" if backend == "flash_attn_2" else "bhtd"
    problem = DecodeProblem(batch, heads, head_dim, steps, device, dtype, layout, seed)
    run, kernel = make_decode_run(backend, problem)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if mode == "cuda_graph":
        workload = capture_cuda_graph(run, warmup_runs)
    else:
        workload = run
    for _ in range(max(1, warmup_runs)):
        workload()
    sync()
    times = time_runs(workload, runs, device)
    mean_s = statistics.fmean(times)
    std_s = statistics.stdev(times) if len(times) > 1 else 0.0
    row: Dict[str, Any] = {
        "device_kind": choice.kind, "backend": backend, "kernel": kernel, "mode": mode, "batch": batch,
        "heads": heads, "head_dim": head_dim, "steps": steps, "runs": runs, "dtype": dtype_name,
        "latency_per_run_s": mean_s, "latency_per_run_std_s": std_s,
        "latency_per_step_s": mean_s / steps, "latency_per_step_std_s": std_s / steps,
        "latency_per_step_median_s": statistics.median(times) / steps,
        "latency_per_generated_token_s": mean_s / steps / batch,
        "energy_source": choice.energy_counter.name if choice.energy_counter else "unavailable",
        "energy_available": choice.energy_counter is not None,
        "energy_per_step_j": None, "energy_per_generated_token_j": None, "energy_repetitions": None,
        "energy_busy_s": None, "idle_power_w": None, "busy_power_w": None, "active_power_w": None,
    }
    if choice.energy_counter is not None:
        repetitions = max(runs, math.ceil(energy_window_s / max(mean_s, 1e-9)))
        energy = measure_active_energy(choice.energy_counter, workload, repetitions, repetitions * mean_s,
                                       sync=sync, settle_s=settle_s)
        per_step, per_token = energy_per_token(energy.active_j, repetitions, steps, batch)
        row.update(energy_per_step_j=per_step, energy_per_generated_token_j=per_token, energy_repetitions=repetitions,
                   energy_busy_s=energy.busy_s, idle_power_w=energy.idle_power_w, busy_power_w=energy.busy_power_w,
                   active_power_w=energy.active_power_w)
    if choice.nvml is not None:
        clocks = gpu_clocks(choice.nvml, choice.handle)  # right after the busy window
        row.update({f"after_run_{k}": v for k, v in clocks.items()})
    del problem, run, workload
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def baseline(hw: Any, choice: DeviceChoice, progress: bool = True) -> Dict[str, Any]:
    """Measure every (batch, backend, mode) the config asks for on the chosen device."""
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415 (absent on the GPU machine, benchmarks/gpu_check.sh)
    else:  # no progress bar, and no tqdm needed (the one-shot GPU check runs without it)
        def tqdm(items, **_):
            return items

    on_gpu = choice.kind == "cuda"
    steps = int(hw.baseline_steps if on_gpu else hw.baseline_cpu_steps)
    runs = int(hw.baseline_runs if on_gpu else hw.baseline_cpu_runs)
    batches = [int(b) for b in (hw.baseline_batches if on_gpu else hw.baseline_cpu_batches)]
    dtype_name = str(hw.baseline_dtype) if on_gpu else "float32"
    window_s = float(hw.baseline_energy_window_s if on_gpu else hw.baseline_cpu_energy_window_s)
    modes = [str(m) for m in hw.baseline_modes]
    backends = [str(b) for b in hw.baseline_backends]
    if not hasattr(torch, dtype_name) or not isinstance(getattr(torch, dtype_name), torch.dtype):
        raise ValueError(f"hardware.baseline_dtype={dtype_name!r}: expected a torch dtype name such as float16")
    plan = [(b, be, m) for b in batches for be in backends for m in modes]
    measurements, skipped = [], []
    for batch, backend, mode in tqdm(plan, desc=f"{choice.kind} decode baseline"):
        if mode == "cuda_graph" and not on_gpu:
            skipped.append({"batch": batch, "backend": backend, "mode": mode, "reason": "CUDA graphs need a GPU"})
            continue
        if backend == "flash_attn_2" and not on_gpu:
            skipped.append({"batch": batch, "backend": backend, "mode": mode, "reason": "flash_attn_2 needs a GPU"})
            continue
        try:
            measurements.append(_measure_one(choice, backend, mode, batch, int(hw.baseline_heads),
                                             int(hw.baseline_head_dim), steps, runs, int(hw.baseline_warmup_runs),
                                             dtype_name, window_s, float(hw.baseline_idle_settle_s),
                                             int(hw.baseline_seed)))
        except (RuntimeError, ImportError) as err:  # e.g. flash-attn absent, out of memory: recorded, not fatal
            skipped.append({"batch": batch, "backend": backend, "mode": mode, "reason": f"{type(err).__name__}: {err}"})
            if on_gpu:
                torch.cuda.empty_cache()
    return {"steps": steps, "runs": runs, "batches": batches, "dtype": dtype_name, "energy_window_s": window_s,
            "measurements": measurements, "skipped": skipped}


def published_figures(hw: Any) -> List[Dict[str, Any]]:
    """The config's published GPU figures, with per-generated-token values derived (/ batch)."""
    rows = []
    for fig in hw.published_gpus:
        d = {k: fig[k] for k in ("name", "latency_per_step_s", "energy_per_step_j", "batch", "heads", "head_dim",
                                 "steps", "source")}
        d["latency_per_generated_token_s"] = d["latency_per_step_s"] / d["batch"]
        d["energy_per_generated_token_j"] = d["energy_per_step_j"] / d["batch"]
        rows.append(d)
    return rows


def run(cfg: Any) -> Dict[str, Any]:
    """Stage ``gpu_baseline``: writes ``results/<profile>/hardware/gpu_baseline.json`` (+ ``.csv``)."""
    import pandas as pd  # noqa: PLC0415 (absent on the GPU machine, benchmarks/gpu_check.sh)

    hw = cfg.hardware
    out_dir = Path(cfg.results_dir) / "hardware"
    choice = choose_device(str(hw.baseline_device))
    print(f"gpu_baseline: device {choice.kind} ({choice.reason}); energy: "
          f"{choice.energy_counter.detail if choice.energy_counter else 'unavailable: ' + choice.energy_unavailable_reason}")
    torch.manual_seed(int(hw.baseline_seed))
    if choice.kind == "cpu" and int(hw.baseline_cpu_threads) > 0:
        torch.set_num_threads(int(hw.baseline_cpu_threads))
    started = time.time()
    try:
        system = gpu_system_info(choice.nvml, choice.handle) if choice.nvml is not None else {}
        if choice.kind == "cuda" and not system:
            system = {"gpu_name": torch.cuda.get_device_name(0), "cuda_runtime": torch.version.cuda}
        system.update(cpu_system_info())
        system.update({"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()})
        result = baseline(hw, choice)
    finally:
        if choice.nvml is not None:
            _nvml_shutdown(choice.nvml)
    energy_note = (f"energy from {choice.energy_counter.detail}, idle energy of an equal window subtracted"
                   if choice.energy_counter else f"energy unavailable: {choice.energy_unavailable_reason}")
    if choice.kind == "cpu":
        note = (f"No GPU measurement: {choice.reason}. The same attention-only decode loop ran on the CPU "
                f"({result['steps']} steps, batches {result['batches']}); {energy_note}.")
    else:
        note = f"GPU measurement on {system.get('gpu_name')}; {energy_note}."
    summary = {
        "schema": 1,
        "device_kind": choice.kind,
        "gpu_available": choice.kind == "cuda",
        "energy_available": choice.energy_counter is not None,
        "energy_source": choice.energy_counter.name if choice.energy_counter else "unavailable",
        "energy_unavailable_reason": choice.energy_unavailable_reason or None,
        "device_reason": choice.reason,
        "note": note,
        "system": system,
        "settings": {"heads": int(hw.baseline_heads), "head_dim": int(hw.baseline_head_dim),
                     "steps": result["steps"], "runs": result["runs"], "batches": result["batches"],
                     "dtype": result["dtype"], "backends": list(hw.baseline_backends), "modes": list(hw.baseline_modes),
                     "warmup_runs": int(hw.baseline_warmup_runs), "energy_window_s": result["energy_window_s"],
                     "cpu_threads": torch.get_num_threads() if choice.kind == "cpu" else None,
                     "idle_settle_s": float(hw.baseline_idle_settle_s), "seed": int(hw.baseline_seed),
                     "attention_only": True, "kv_cache": "preallocated, one K/V write per step"},
        "measurements": result["measurements"],
        "skipped": result["skipped"],
        "published": published_figures(hw),
        "seconds": round(time.time() - started, 2),
    }
    atomic_write_json(out_dir / "gpu_baseline.json", summary)
    atomic_to_csv(pd.DataFrame(result["measurements"]), out_dir / "gpu_baseline.csv")
    for m in result["measurements"]:
        e = m["energy_per_generated_token_j"]
        print(f"  {m['backend']:>12s} {m['mode']:<11s} batch {m['batch']:>3d}: "
              f"{m['latency_per_step_s'] * 1e6:9.1f} us/step, "
              + (f"{e * 1e6:9.3f} uJ/token" if e is not None else "energy unavailable"))
    for s in result["skipped"]:
        print(f"  skipped {s['backend']} {s['mode']} batch {s['batch']}: {s['reason']}")
    _log(cfg, summary)
    return summary


def _log(cfg: Any, summary: Dict[str, Any]) -> None:
    """Best-effort W&B/CSV logging through gaincell.tracking (a tracking failure never fails the stage)."""
    from gaincell.tracking import Tracker  # noqa: PLC0415 (absent on the GPU machine, benchmarks/gpu_check.sh)

    try:
        tracker = Tracker(cfg, run_name="gpu_baseline", job_type="gpu_baseline")
        for i, m in enumerate(summary["measurements"]):
            tracker.log({k: v for k, v in m.items() if isinstance(v, (int, float)) and v is not None}, step=i)
        tracker.summary({"device_kind": summary["device_kind"], "energy_available": summary["energy_available"]})
        tracker.finish()
    except Exception as err:  # logging must never lose a finished measurement
        print(f"gpu_baseline: tracking skipped ({type(err).__name__}: {err})")
