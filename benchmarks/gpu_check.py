"""One-shot GPU check of the analog attention: kernel correctness, kernel speed, decode baseline, training.

Run through ``benchmarks/gpu_check.sh`` (which sets the paths and the environment). Four sections, each
with its own ``pass`` field, measured in this one process on one GPU:

    kernel_tests       the Triton kernels against the dense float64-capable reference: y, dq, dk, dv for
                       the linear cell, the nonlinear surrogate and the exact nonlinear gradient, with
                       leakage, T above and below the window, a ragged head dimension
    kernel_benchmark   forward and forward+backward time and peak memory at B=8, H=12, T=1024, D=64
                       (window 1,024): Triton (exact float32 and tf32x3), the dense reference, the blocked
                       path, SDPA causal in float32 and in bfloat16 (FlashAttention)
    decode_baseline    the attention-only KV-cache decode loop of ``gaincell.hardware.gpu_baseline`` (12
                       heads, D=64, 1,024 steps; SDPA; CUDA graph and Python loop) at batch 1 and 64,
                       energy per token from NVML's total-energy counter
    train_step         a GPT-2-124M-shaped training step (12 x 12 x 768, context 1,024, batch 8, bf16
                       autocast, fused AdamW) with softmax and with linear_hw attention: tokens/s, memory

``--dry-run`` runs the same code on the CPU at tiny sizes (Triton kernels in the interpreter,
``TRITON_INTERPRET=1`` set by the shell script; no NVML), so that this script cannot rot unnoticed.

Needs only torch, triton, numpy (and nvidia-ml-py for energy): no hydra, wandb, snakemake, pandas or tqdm
on these paths. Writes ``gpu_check.json`` (rewritten after each section, so a timeout keeps what was
done) and ``gpu_check.txt`` (a short summary) into ``--out``.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))  # the sibling benchmark modules (attention.py, train_step.py)

import attention as attention_bench  # noqa: E402
import train_step as train_step_bench  # noqa: E402
from gaincell.attention import PAPER_COEFFICIENTS, AnalogAttentionConfig  # noqa: E402
from gaincell.attention.blocked import analog_attention_blocked  # noqa: E402
from gaincell.attention.functional import resolve_implementation  # noqa: E402
from gaincell.attention.reference import analog_attention_dense  # noqa: E402
from gaincell.io import atomic_write_json, atomic_write_text  # noqa: E402

SECTIONS = ("kernel_tests", "kernel_benchmark", "decode_baseline", "train_step")
NONLINEAR = dict(coefficients=PAPER_COEFFICIENTS)
# Kernel test cases: name -> (B, H, T, window, tile_rows, D, dtype, extra config). Leakage is raised far
# above the paper's 1.56e-4 per step so that it visibly changes the result.
GPU_CASES = {
    "linear_T>window": (2, 3, 1000, 256, 64, 64, "float32", dict(decay_per_step=2e-3)),
    "surrogate_T>window": (2, 3, 1000, 256, 64, 64, "float32", dict(NONLINEAR, decay_per_step=2e-3)),
    "exact_T>window": (2, 3, 1000, 256, 64, 64, "float32", dict(NONLINEAR, exact_nonlinear_grad=True,
                                                                decay_per_step=2e-3)),
    "exact_T<window_ragged_D": (1, 2, 333, 512, 64, 48, "float32", dict(NONLINEAR, exact_nonlinear_grad=True)),
    "linear_float64_window_one_tile": (1, 2, 300, 64, 64, 64, "float64", dict(decay_per_step=1e-2)),
    "surrogate_float64_tile32": (1, 2, 200, 64, 32, 40, "float64", dict(NONLINEAR, decay_per_step=1e-2)),
}
DRY_CASES = {
    "linear_T>window": (1, 2, 70, 32, 16, 7, "float64", dict(decay_per_step=1e-2)),
    "exact_T<window": (1, 1, 40, 64, 16, 5, "float64", dict(NONLINEAR, exact_nonlinear_grad=True)),
}
# Float32 GPU products sum in a different order than the reference: a value sitting on a readout level's
# rounding boundary or a clamp edge may flip (one level, 2/31, of one sub-tile); at most 0.2 % of the
# entries may differ by more than 1e-4. Float64 must agree to 1e-10 (relative to the largest value).
FLOAT32_MAX_FRACTION_OFF = 2e-3
FLOAT64_RTOL = 1e-10


def kernel_case_inputs(B: int, H: int, T: int, D: int, dtype: torch.dtype, device: str, seed: int = 0):
    """q, k, v straddling the DAC ranges (some values clamp), and an upstream gradient dy."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q = r(B, H, T, D) * 1.2 - 0.1
    k = r(B, H, T, D) * 1.1 - 0.1 + 0.3 * r(B, H, T, 1)
    v = r(B, H, T, D) * 1.1 - 0.1 + 0.4 * (r(B, H, T, 1) - 0.5)
    dy = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, dy)]


def _forward_backward(fn: Callable, q, k, v, cfg, dy) -> List[torch.Tensor]:
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    y = fn(q, k, v, cfg)
    (y * dy).sum().backward()
    return [y.detach(), q.grad, k.grad, v.grad]


def compare_case(case, device: str) -> dict:
    """One case: every output of the Triton kernels against the dense reference, with its verdict."""
    from gaincell.attention.kernels import analog_attention_triton

    B, H, T, window, tile, D, dtype_name, extra = case
    cfg = AnalogAttentionConfig(window=window, tile_rows=tile, qk_saturation=80.0 * D / 64,
                                av_saturation=40.0 * tile / 32, **extra)
    q, k, v, dy = kernel_case_inputs(B, H, T, D, getattr(torch, dtype_name), device)
    expected = _forward_backward(analog_attention_dense, q, k, v, cfg, dy)
    got = _forward_backward(lambda *a: analog_attention_triton(*a, dot_precision="ieee"), q, k, v, cfg, dy)
    outputs = {}
    for label, e, g in zip(("y", "dq", "dk", "dv"), expected, got):
        diff = (g.double() - e.double()).abs()
        scale = e.double().abs().max().item()
        r = dict(max_abs=diff.max().item(), fraction_off=(diff > 1e-4).double().mean().item(), scale=scale)
        if dtype_name == "float64":
            r["pass"] = r["max_abs"] <= FLOAT64_RTOL * max(1.0, scale)
        else:
            r["pass"] = r["fraction_off"] < FLOAT32_MAX_FRACTION_OFF and r["max_abs"] < 0.25 * max(1.0, scale)
        r["pass"] = bool(r["pass"] and scale > 1e-3)  # an all-zero output would make the test vacuous
        outputs[label] = r
    return dict(shape=dict(B=B, H=H, T=T, window=window, tile_rows=tile, D=D), dtype=dtype_name,
                config={k: (list(v) if isinstance(v, tuple) else v) for k, v in extra.items()},
                outputs=outputs, **{"pass": all(r["pass"] for r in outputs.values())})


def kernel_tests(device: str, dry_run: bool) -> dict:
    cases = DRY_CASES if dry_run else GPU_CASES
    results = {}
    for name, case in cases.items():
        try:
            results[name] = compare_case(case, device)
        except Exception as err:  # e.g. a kernel that does not compile for this GPU: recorded, others still run
            results[name] = {"pass": False, "error": f"{type(err).__name__}: {err}"}
    return {"pass": all(r["pass"] for r in results.values()), "cases": results,
            "criterion": f"float64: max |diff| <= {FLOAT64_RTOL} x max(1, |ref|); float32: < "
                         f"{FLOAT32_MAX_FRACTION_OFF:.1%} of entries off by > 1e-4 (readout-level flips)"}


# ---------------------------------------------------------------------------------------------------
# kernel benchmark
# ---------------------------------------------------------------------------------------------------
def _benchmark_implementations(device: str) -> Dict[str, Callable]:
    from gaincell.attention.kernels import analog_attention_triton

    impls = {"triton": lambda q, k, v, cfg: analog_attention_triton(q, k, v, cfg, dot_precision="ieee")}
    if device == "cuda":
        impls["triton_tf32x3"] = lambda q, k, v, cfg: analog_attention_triton(q, k, v, cfg, dot_precision="tf32x3")
    impls.update(dense=analog_attention_dense, blocked=analog_attention_blocked,
                 sdpa_causal=lambda q, k, v, cfg: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    if device == "cuda":  # FlashAttention proper needs half precision (the cast is timed too)
        impls["sdpa_causal_bf16"] = lambda q, k, v, cfg: F.scaled_dot_product_attention(
            q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
    return impls


def kernel_benchmark(device: str, dry_run: bool) -> dict:
    shape = (attention_bench.Shape("dry_run", 1, 2, 160, 16, 64) if dry_run
             else attention_bench.Shape("paper_B8_H12_T1024", 8, 12, 1024, 64, 1024))
    repeats, warmup = (2, 1) if dry_run else (10, 2)
    impls = _benchmark_implementations(device)
    rows, ratios = [], {}
    for model in ("linear_hw", "nonlinear_hw"):
        cfg = attention_bench.make_config(model, shape.window)
        for mode in attention_bench.MODES:
            times = attention_bench.measure_time(shape, model, list(impls), impls, mode, device, warmup, repeats)
            for name, t in times.items():
                rows.append(dict(model=model, mode=mode, implementation=name, time_min_s=min(t),
                                 time_median_s=statistics.median(t),
                                 peak_mem_bytes=attention_bench.peak_memory(impls[name], shape, cfg, mode, device)))
            best = {name: min(t) for name, t in times.items()}
            ratios[f"{model}/{mode}"] = {
                "triton_time_vs_dense": best["triton"] / best["dense"],
                "triton_time_vs_sdpa_causal_fp32": best["triton"] / best["sdpa_causal"],
                **({"triton_tf32x3_time_vs_sdpa_causal_bf16": best["triton_tf32x3"] / best["sdpa_causal_bf16"]}
                   if "sdpa_causal_bf16" in best else {})}
    ok = all(math.isfinite(r["time_min_s"]) and r["time_min_s"] > 0 for r in rows)
    return {"pass": ok, "shape": shape.__dict__, "repeats": repeats, "rows": rows, "ratios": ratios,
            "memory": "CUDA max_memory_allocated above the inputs" if device == "cuda"
                      else "rise of the process's peak resident set (VmHWM)",
            "criterion": "every implementation ran; times are measurements, not pass/fail thresholds"}


# ---------------------------------------------------------------------------------------------------
# decode baseline and training step
# ---------------------------------------------------------------------------------------------------
def _baseline_settings(dry_run: bool) -> SimpleNamespace:
    """The ``hardware.baseline_*`` settings the stage would read (the paper's shape; short energy windows)."""
    return SimpleNamespace(
        baseline_heads=2 if dry_run else 12, baseline_head_dim=16 if dry_run else 64,
        baseline_steps=1024, baseline_runs=5, baseline_batches=[1, 64], baseline_dtype="float16",
        baseline_backends=["sdpa", "flash_attn_2", "eager"], baseline_modes=["cuda_graph", "python_loop"],
        baseline_warmup_runs=1 if dry_run else 2, baseline_energy_window_s=2.0, baseline_idle_settle_s=0.5,
        baseline_cpu_steps=16, baseline_cpu_runs=1, baseline_cpu_batches=[1, 64],
        baseline_cpu_energy_window_s=0.05, baseline_seed=0)


def decode_baseline(device: str, dry_run: bool) -> dict:
    from gaincell.hardware.gpu_baseline import _nvml_shutdown, baseline, choose_device

    choice = choose_device("cpu" if dry_run else "cuda")
    try:
        result = baseline(_baseline_settings(dry_run), choice, progress=False)
    finally:
        if choice.nvml is not None:
            _nvml_shutdown(choice.nvml)
    rows = result["measurements"]
    per_batch = {b: [r for r in rows if r["batch"] == b and math.isfinite(r["latency_per_step_s"])]
                 for b in result["batches"]}
    ok = all(per_batch.values())
    if device == "cuda":  # on a GPU the energy must have been measured too
        graphs = [r for r in rows if r["mode"] == "cuda_graph"]
        ok = ok and bool(graphs) and all((r["energy_per_generated_token_j"] or 0) > 0 for r in graphs)
    return {"pass": ok, "device_kind": choice.kind, "device_reason": choice.reason,
            "energy_source": choice.energy_counter.detail if choice.energy_counter else
            f"unavailable: {choice.energy_unavailable_reason}", **result,
            "criterion": "a finite latency at every batch; on a GPU also NVML energy > 0 for the CUDA-graph runs"}


def train_step(device: str, dry_run: bool) -> dict:
    shape = "tiny" if dry_run else "paper"
    steps, warmup = (1, 1) if dry_run else (8, 3)
    rows = {}
    for kind in ("softmax", "linear_hw"):
        rows[kind] = train_step_bench.worker(shape, kind, device, threads=torch.get_num_threads(), steps=steps,
                                             warmup=warmup)
        if device == "cuda":
            torch.cuda.empty_cache()
    implementation = resolve_implementation("auto", on_cuda=device == "cuda")
    ok = all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in rows.values())
    if device == "cuda":
        ok = ok and implementation == "triton"
    return {"pass": ok, "shape": shape, "analog_implementation": implementation, "runs": rows,
            "linear_hw_step_time_ratio_to_softmax": rows["linear_hw"]["step_ms"] / rows["softmax"]["step_ms"],
            "linear_hw_peak_mem_ratio_to_softmax": rows["linear_hw"]["peak_mem_mb"] / rows["softmax"]["peak_mem_mb"],
            "criterion": "finite loss and throughput for both; on a GPU linear_hw runs the Triton kernels"}


# ---------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------
SECTION_FUNCTIONS = {"kernel_tests": kernel_tests, "kernel_benchmark": kernel_benchmark,
                     "decode_baseline": decode_baseline, "train_step": train_step}


def summary_lines(report: dict) -> List[str]:
    """The short text summary: one verdict line per section plus its headline numbers."""
    lines = [f"gaincell GPU check ({'dry run on CPU' if report['dry_run'] else report['machine'].get('gpu')}), "
             f"{report['seconds']:.0f} s: {'PASS' if report['pass'] else 'FAIL'}"]
    for name in SECTIONS:
        s = report.get(name)
        if s is None:
            lines.append(f"  {name}: not run")
            continue
        verdict = "pass" if s.get("pass") else "FAIL"
        detail = s.get("error", "")
        if name == "kernel_tests" and "cases" in s:
            detail = ", ".join(f"{c}: {'ok' if r['pass'] else 'DIFF'}" for c, r in s["cases"].items())
        elif name == "kernel_benchmark" and "ratios" in s:
            detail = "; ".join(f"{k} time triton/sdpa_fp32 {v['triton_time_vs_sdpa_causal_fp32']:.2f}, "
                               f"triton/dense {v['triton_time_vs_dense']:.3f}" for k, v in s["ratios"].items())
        elif name == "decode_baseline" and "measurements" in s:
            detail = "; ".join(f"{r['backend']} {r['mode']} b{r['batch']} {r['latency_per_step_s'] * 1e6:.1f} us/step"
                               + (f" {r['energy_per_generated_token_j'] * 1e6:.2f} uJ/token"
                                  if r["energy_per_generated_token_j"] else "") for r in s["measurements"])
        elif name == "train_step" and "runs" in s:
            detail = (", ".join(f"{k} {r['tokens_per_s']:.0f} tok/s" for k, r in s["runs"].items())
                      + f"; linear_hw/softmax step time {s['linear_hw_step_time_ratio_to_softmax']:.2f}x")
        lines.append(f"  {name} ({s.get('seconds', 0):.0f} s): {verdict}. {detail}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton interpreted (set by gpu_check.sh)")
    ap.add_argument("--out", type=Path, default=BENCHMARKS.parent / "results" / "benchmarks")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    args = ap.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--dry-run needs TRITON_INTERPRET=1 in the environment before start (gpu_check.sh sets it)")
    if not args.dry_run and not torch.cuda.is_available():
        ap.error(f"no CUDA GPU visible to {sys.executable} (torch {torch.__version__}); use --dry-run on a CPU")
    torch.manual_seed(0)
    started = time.perf_counter()
    report = {"schema": 1, "dry_run": args.dry_run, "device": device, "pass": False,
              "machine": attention_bench.machine_info(device), "python": platform.python_version()}
    json_path, text_path = args.out / "gpu_check.json", args.out / "gpu_check.txt"
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            report[name] = SECTION_FUNCTIONS[name](device, args.dry_run)
        except Exception as err:  # one broken section must not lose the others' measurements
            report[name] = {"pass": False, "error": f"{type(err).__name__}: {err}",
                            "traceback": traceback.format_exc(limit=8)}
        report[name]["seconds"] = round(time.perf_counter() - t0, 2)
        report["seconds"] = round(time.perf_counter() - started, 2)
        report["pass"] = all(report.get(s, {}).get("pass") for s in args.sections)
        atomic_write_json(json_path, report)
        print(f"[gpu_check] {name}: {'pass' if report[name]['pass'] else 'FAIL'} ({report[name]['seconds']:.0f} s)",
              flush=True)
    text = "\n".join(summary_lines(report)) + "\n"
    atomic_write_text(text_path, text)
    print(text + f"wrote {json_path} and {text_path}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
