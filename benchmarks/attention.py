"""Speed and memory of the analog attention implementations, side by side in one run.

Implementations (all compute the same function, docs/attention.md, except the softmax baseline):
    dense        gaincell.attention.reference.analog_attention_dense  (T x T matrices; the oracle)
    blocked      gaincell.attention.blocked.analog_attention_blocked  (banded PyTorch; default on CPU)
    triton       gaincell.attention.kernels.analog_attention_triton   (CUDA only; tl.dot in exact float32)
    triton_tf32x3  the same kernels with three-pass TF32 tensor-core products (about float32 accuracy)
    sdpa_causal  torch scaled_dot_product_attention, causal softmax, same float32 inputs: the speed baseline
    sdpa_causal_bf16  the same in bfloat16 (CUDA only): FlashAttention proper

Shapes (full run): the paper's (B=8, H=12, T=1024, D=64, window 1024), long context (T = 2048, 4096,
8192 at window 1024), and the CPU goal shape (T=1024, window 256). ``--quick`` keeps the sequence
lengths but shrinks batch and heads (B=1, H=4; H=12 for the CPU goal shape) and runs the dense
reference only up to T=2048, so it finishes in a few minutes on 2 CPU cores.

Timing: forward under ``torch.no_grad`` and forward+backward (gradients of q, k, v); best (min) and
median of ``--repeats`` runs after a warm-up, the implementations taking turns in every repeat so that
load from other processes hits them alike. Ratios (``speedup_vs_dense``, ``time_vs_sdpa``) are computed
from numbers measured in this same run. Peak memory: on CUDA, ``torch.cuda.max_memory_allocated``
above the inputs; on CPU, the rise of the process's peak resident memory (VmHWM, reset between calls)
measured in a child process started with a small glibc mmap threshold so that freed tensors leave
the resident set. Where the dense reference would not fit in memory (its peak, extrapolated as T^2 from
the largest shape measured, above 70 % of the free memory), the row says ``does_not_fit`` with the
estimate instead of running it.

    .venv/bin/python benchmarks/attention.py --quick
    .venv/bin/python benchmarks/attention.py --device cuda          # on a GPU machine

Writes ``results/benchmarks/attention.csv`` (one row per shape x model x implementation x mode),
``attention.json`` (machine, versions, arguments, goal checks) and the figure ``attention.png``/``.pdf``
(``--name`` changes the stem). ``--threads 1`` is the steadier choice on a machine shared with other
jobs: there a 2-thread op stalls whenever one of its threads is descheduled, which hits the many
small ops of the blocked path harder than the few large ones of the dense reference.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
MODES = ("forward", "forward_backward")
MEMORY_FRACTION = 0.7  # dense runs only if its estimated peak stays below this share of free memory


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    H: int
    T: int
    D: int
    window: int


def shapes_for(quick: bool) -> List[Shape]:
    b, h = (1, 4) if quick else (8, 12)
    series = [Shape(f"window1024_T{t}", b, h, t, 64, 1024) for t in (1024, 2048, 4096, 8192)]
    goal = Shape("cpu_goal_T1024_window256", 1 if quick else 8, 12, 1024, 64, 256)
    tiny = Shape("tiny_T512_window128", 8, 2, 512, 64, 128)  # the tiny profile's heads, window, batch; T=512
    return [goal, tiny] + series


def implementations(device: str) -> Dict[str, Optional[Callable]]:
    """name -> fn(q, k, v, cfg), or None when unavailable here (with the reason in UNAVAILABLE)."""
    from gaincell.attention.blocked import analog_attention_blocked
    from gaincell.attention.reference import analog_attention_dense

    impls: Dict[str, Optional[Callable]] = {"dense": analog_attention_dense, "blocked": analog_attention_blocked}
    if device == "cuda":
        try:
            from gaincell.attention.kernels import analog_attention_triton

            impls["triton"] = lambda q, k, v, cfg: analog_attention_triton(q, k, v, cfg, dot_precision="ieee")
            impls["triton_tf32x3"] = lambda q, k, v, cfg: analog_attention_triton(q, k, v, cfg,
                                                                                   dot_precision="tf32x3")
        except ImportError as err:
            UNAVAILABLE["triton"] = f"triton does not import: {err}"
            impls["triton"] = None
    else:
        UNAVAILABLE["triton"] = "needs a CUDA GPU"
        impls["triton"] = None
    impls["sdpa_causal"] = lambda q, k, v, cfg: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if device == "cuda":  # FlashAttention proper runs in half precision (the cast is timed too)
        impls["sdpa_causal_bf16"] = lambda q, k, v, cfg: F.scaled_dot_product_attention(
            q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
    return impls


UNAVAILABLE: Dict[str, str] = {}


def make_config(model: str, window: int):
    from gaincell.attention import PAPER_COEFFICIENTS, AnalogAttentionConfig

    return AnalogAttentionConfig(window=window, coefficients=PAPER_COEFFICIENTS if model == "nonlinear_hw" else None)


def make_inputs(shape: Shape, device: str, grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = (shape.B, shape.H, shape.T, shape.D)
    # Scaled inputs in the DAC ranges (eq. 8 and docs/attention.md#quantization): q~ in [0, 1], k~ and v~ around the 0.45 V midpoint.
    q = torch.rand(size, generator=g)
    k = 0.45 + 0.3 * (torch.rand(size, generator=g) - 0.5)
    v = 0.45 + 0.6 * (torch.rand(size, generator=g) - 0.5)
    dy = torch.randn(size, generator=g)
    q, k, v, dy = (x.to(device) for x in (q, k, v, dy))
    if grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v, dy


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(fn: Callable, shape: Shape, cfg, mode: str, device: str, inputs=None) -> None:
    q, k, v, dy = inputs if inputs is not None else make_inputs(shape, device, mode == "forward_backward")
    if mode == "forward":
        with torch.no_grad():
            fn(q, k, v, cfg)
    else:
        for x in (q, k, v):
            x.grad = None
        fn(q, k, v, cfg).backward(dy)
    _sync(device)


# ---------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) * 1024


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_memory(fn: Callable, shape: Shape, cfg, mode: str, device: str) -> int:
    """Bytes above the inputs at the peak of one call (CUDA allocator, or resident set on CPU)."""
    inputs = make_inputs(shape, device, mode == "forward_backward")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(fn, shape, cfg, mode, device, inputs)
        return int(torch.cuda.max_memory_allocated() - base)
    base = _status_kib("VmRSS")
    if not _reset_peak_rss():
        return -1
    run_once(fn, shape, cfg, mode, device, inputs)
    return int(_status_kib("VmHWM") - base)


def free_memory_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) * 1024


def measure_memory(plan: List[dict], device: str, impl_names: List[str]) -> List[dict]:
    """Peak memory of every (shape, model, implementation, mode), dense only where it fits."""
    from tqdm import tqdm

    impls = implementations(device)
    out = []
    dense_per_t2: Dict[tuple, float] = {}  # (model, mode) -> bytes per B*H*T^2 of the largest dense run
    for item in tqdm(plan, desc="memory", file=sys.stderr):
        shape = Shape(**item["shape"])
        cfg = make_config(item["model"], shape.window)
        for name in impl_names:
            fn = impls.get(name)
            for mode in MODES:
                row = dict(shape=shape.name, model=item["model"], implementation=name, mode=mode,
                           status="ok", peak_mem_bytes=None, est_mem_bytes=None, note="")
                if fn is None:
                    row.update(status="unavailable", note=UNAVAILABLE.get(name, ""))
                elif name == "dense":
                    t2 = shape.B * shape.H * shape.T ** 2
                    key = (item["model"], mode)
                    # Until one dense run is measured: 12 float32 T x T tensors (forward+backward keeps
                    # S, P, the masks and the nonlinear products), a deliberate overestimate.
                    estimate = dense_per_t2.get(key, 48.0) * t2
                    row["est_mem_bytes"] = int(estimate)
                    if item.get("dense_max_t") and shape.T > item["dense_max_t"]:
                        row.update(status="skipped", note=f"quick mode: dense only up to T={item['dense_max_t']}")
                    elif estimate > MEMORY_FRACTION * free_memory_bytes(device):
                        row.update(status="does_not_fit",
                                   note=f"estimated peak {estimate / 2**30:.1f} GiB > {MEMORY_FRACTION:.0%} of "
                                        f"free {free_memory_bytes(device) / 2**30:.1f} GiB")
                    else:
                        row["peak_mem_bytes"] = peak_memory(fn, shape, cfg, mode, device)
                        dense_per_t2[key] = max(row["peak_mem_bytes"], 1) / t2
                else:
                    row["peak_mem_bytes"] = peak_memory(fn, shape, cfg, mode, device)
                out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------
def measure_time(shape: Shape, model: str, names: List[str], impls, mode: str, device: str,
                 warmup: int, repeats: int) -> Dict[str, List[float]]:
    """Times (s) of each implementation, taking turns within every repeat."""
    cfg = make_config(model, shape.window)
    inputs = make_inputs(shape, device, mode == "forward_backward")
    for name in names:
        for _ in range(warmup):
            run_once(impls[name], shape, cfg, mode, device, inputs)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            _sync(device)
            start = time.perf_counter()
            run_once(impls[name], shape, cfg, mode, device, inputs)
            times[name].append(time.perf_counter() - start)
    return times


def machine_info(device: str) -> dict:
    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(), device=device)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = re.search(r"model name\s*:\s*(.+)", cpuinfo).group(1).strip()
    except (OSError, AttributeError):
        pass
    try:
        info["mem_total_gib"] = round(int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
                                          .group(1)) / 2**20, 1)
    except (OSError, AttributeError):
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    info["load_average_at_start"] = os.getloadavg()
    return info


def goal_checks(df) -> dict:
    """The goals of the kernels issue, evaluated on this run's numbers (None where not measured)."""
    def ratio(shape_prefix, model, mode, num, den):
        sel = df[(df["shape"].str.startswith(shape_prefix)) & (df["model"] == model) & (df["mode"] == mode)]
        a = sel[sel["implementation"] == num]["time_min_s"]
        b = sel[sel["implementation"] == den]["time_min_s"]
        if len(a) and len(b) and a.notna().all() and b.notna().all():
            return float(b.iloc[0] / a.iloc[0])
        return None

    def memory_slope(impl, model, mode):
        import numpy as np

        sel = df[(df["shape"].str.startswith("window1024")) & (df["implementation"] == impl)
                 & (df["model"] == model) & (df["mode"] == mode) & (df["peak_mem_bytes"] > 0)]
        if len(sel) < 2:
            return None
        return float(np.polyfit(np.log(sel["T"]), np.log(sel["peak_mem_bytes"]), 1)[0])

    def backward_over_forward(shape_prefix, model, impl):
        sel = df[(df["shape"].str.startswith(shape_prefix)) & (df["model"] == model) & (df["implementation"] == impl)]
        f = sel[sel["mode"] == "forward"]["time_min_s"]
        fb = sel[sel["mode"] == "forward_backward"]["time_min_s"]
        if len(f) and len(fb) and f.notna().all() and fb.notna().all():
            return float((fb.iloc[0] - f.iloc[0]) / f.iloc[0])
        return None

    checks = {}
    for model in sorted(df["model"].unique()):
        checks[model] = {
            "blocked_vs_dense_forward_speedup_cpu_goal (goal >= 5)":
                ratio("cpu_goal", model, "forward", "blocked", "dense"),
            "blocked_vs_dense_forward_backward_speedup_cpu_goal":
                ratio("cpu_goal", model, "forward_backward", "blocked", "dense"),
            "triton_vs_dense_forward_backward_speedup_paper (goal >= 10)":
                ratio("window1024_T1024", model, "forward_backward", "triton", "dense"),
            "sdpa_over_triton_time_ratio_forward_backward_paper (goal >= 0.5)":
                ratio("window1024_T1024", model, "forward_backward", "triton", "sdpa_causal"),
            "triton_tf32x3_vs_dense_forward_backward_speedup_paper":
                ratio("window1024_T1024", model, "forward_backward", "triton_tf32x3", "dense"),
            "sdpa_over_triton_tf32x3_time_ratio_forward_backward_paper":
                ratio("window1024_T1024", model, "forward_backward", "triton_tf32x3", "sdpa_causal"),
            "sdpa_bf16_over_triton_tf32x3_time_ratio_forward_backward_paper":
                ratio("window1024_T1024", model, "forward_backward", "triton_tf32x3", "sdpa_causal_bf16"),
            "blocked_forward_backward_time_vs_sdpa_tiny_T512 (issue 17 goal <= 1.3)":
                ratio("tiny_T512", model, "forward_backward", "sdpa_causal", "blocked"),  # blocked / sdpa time
            "blocked_backward_over_forward_tiny_T512 (issue 17 goal <= 2; backward = fwd+bwd - fwd)":
                backward_over_forward("tiny_T512", model, "blocked"),
            "blocked_peak_memory_slope_vs_T (1 = linear)": memory_slope("blocked", model, "forward_backward"),
            "triton_peak_memory_slope_vs_T (1 = linear)": memory_slope("triton", model, "forward_backward"),
            "dense_peak_memory_slope_vs_T (2 = quadratic)": memory_slope("dense", model, "forward_backward"),
        }
    return checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batch/heads, dense up to T=2048")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--models", default=None,
                        help="comma list of linear_hw,nonlinear_hw (default: both; --quick: linear_hw, "
                             "plus nonlinear_hw at the CPU goal shape)")
    parser.add_argument("--shapes", default=None, help="comma list of shape names to keep (default: all)")
    parser.add_argument("--implementations", default=None, help="comma list (default: all available)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5; quick 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dense-max-t", type=int, default=None,
                        help="run the dense reference only up to this T (default: all that fit; quick: 2048)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's). On a machine shared with other jobs, 1 thread "
                             "gives far steadier timings: a 2-thread op waits whenever one thread is descheduled")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks")
    parser.add_argument("--name", default="attention", help="output file stem (default: attention)")
    parser.add_argument("--memory-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:  # child process of the CPU memory pass
        job = json.loads(args.memory_worker.read_text())
        rows = measure_memory(job["plan"], job["device"], job["implementations"])
        Path(job["out"]).write_text(json.dumps(rows))
        return 0

    import pandas as pd
    from tqdm import tqdm

    from gaincell.io import atomic_to_csv, atomic_write_json

    repeats = args.repeats or (3 if args.quick else 5)
    dense_max_t = args.dense_max_t or (2048 if args.quick else None)
    shapes = shapes_for(args.quick)
    if args.shapes:
        keep = set(args.shapes.split(","))
        shapes = [s for s in shapes if s.name in keep]
    if args.models:
        models_for = {s.name: args.models.split(",") for s in shapes}
    elif args.quick:
        models_for = {s.name: (["linear_hw", "nonlinear_hw"] if s.name.startswith("cpu_goal") else ["linear_hw"])
                      for s in shapes}
    else:
        models_for = {s.name: ["linear_hw", "nonlinear_hw"] for s in shapes}
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other processes compete, timings "
              f"will be noisy (implementations take turns, so ratios are less affected)", file=sys.stderr)
    impls = implementations(args.device)
    names = [n for n in impls if not args.implementations or n in args.implementations.split(",")]
    plan = [dict(shape=asdict(s), model=m, dense_max_t=dense_max_t) for s in shapes for m in models_for[s.name]]

    # 1. Peak memory (decides where dense fits). CPU: in a child with a small mmap threshold.
    memory_rows: List[dict] = []
    if not args.no_memory:
        if args.device == "cpu":
            with tempfile.TemporaryDirectory() as tmp:
                job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "rows.json"
                job_path.write_text(json.dumps(dict(plan=plan, device="cpu", implementations=names,
                                                    out=str(out_path))))
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
                threads = ["--threads", str(args.threads)] if args.threads else []
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-worker", str(job_path)]
                               + threads, env=env, check=True)
                memory_rows = json.loads(out_path.read_text())
        else:
            memory_rows = measure_memory(plan, args.device, names)
    memory = {(r["shape"], r["model"], r["implementation"], r["mode"]): r for r in memory_rows}

    # 2. Timing, implementations taking turns.
    rows = []
    for item in tqdm(plan, desc="timing", file=sys.stderr):
        shape = Shape(**item["shape"])
        model = item["model"]
        for mode in MODES:
            runnable = []
            for name in names:
                mem = memory.get((shape.name, model, name, mode), {})
                status = mem.get("status", "ok")
                if impls[name] is None:
                    status = "unavailable"
                elif name == "dense" and dense_max_t and shape.T > dense_max_t:
                    status = "skipped"
                if status == "ok":
                    runnable.append(name)
                rows.append(dict(shape=shape.name, B=shape.B, H=shape.H, T=shape.T, D=shape.D, window=shape.window,
                                 model=model, implementation=name, mode=mode, status=status,
                                 time_min_s=None, time_median_s=None,
                                 peak_mem_bytes=mem.get("peak_mem_bytes"), est_mem_bytes=mem.get("est_mem_bytes"),
                                 note=(mem.get("note") or UNAVAILABLE.get(name, "")) if status != "ok" else "",
                                 device=args.device))
            times = measure_time(shape, model, runnable, impls, mode, args.device, args.warmup, repeats)
            for row in rows:
                if (row["shape"], row["model"], row["mode"]) == (shape.name, model, mode) and row["implementation"] in times:
                    t = times[row["implementation"]]
                    row.update(time_min_s=min(t), time_median_s=statistics.median(t))

    df = pd.DataFrame(rows)
    group = ["shape", "model", "mode"]
    dense_t = df[df["implementation"] == "dense"].set_index(group)["time_min_s"]
    sdpa_t = df[df["implementation"] == "sdpa_causal"].set_index(group)["time_min_s"]
    keys = list(zip(df["shape"], df["model"], df["mode"]))
    df["speedup_vs_dense"] = [dense_t.get(k) / t if t and dense_t.get(k) else None
                              for k, t in zip(keys, df["time_min_s"])]
    df["time_vs_sdpa"] = [t / sdpa_t.get(k) if t and sdpa_t.get(k) else None
                          for k, t in zip(keys, df["time_min_s"])]

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = atomic_to_csv(df, args.out / f"{args.name}.csv")
    summary = dict(machine=machine_info(args.device), arguments={k: str(v) for k, v in vars(args).items()},
                   repeats=repeats, goals=goal_checks(df), unavailable=UNAVAILABLE)
    atomic_write_json(args.out / f"{args.name}.json", summary)
    print(f"wrote {csv_path}")

    from gaincell.figures.benchmarks import plot_attention_benchmark

    for path in plot_attention_benchmark(csv_path, args.out / args.name):
        print(f"wrote {path}")
    pd.set_option("display.width", 200)
    show = df[df["status"] == "ok"][["shape", "model", "implementation", "mode", "time_min_s",
                                     "peak_mem_bytes", "speedup_vs_dense", "time_vs_sdpa"]]
    print(show.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(json.dumps(summary["goals"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
