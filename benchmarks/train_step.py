"""Training-step cost of each attention model: tokens/s and peak memory, at the tiny and paper shapes.

Claim measured: how much slower a full training step (forward, backward, AdamW update) of a GPT-2 with
a hardware attention model (``linear_hw``, ``nonlinear_hw``) is than the same GPT-2 with softmax
attention, and how much more memory it needs. The ratio of each model's step time to the softmax
model's is reported per shape and device.

Shapes (``gaincell.model.GPT``):
    tiny   4 layers, 2 heads x 64, width 128, context 256, window 128, vocab 4,096, batch 8 (the tiny profile)
    paper  12 layers, 12 heads x 64, width 768, context 1,024, window 1,024, vocab 50,257 (GPT-2 124M);
           batch 1 on CPU, 8 on GPU, and only a couple of steps on CPU (each takes seconds)

Each (shape, attention, device) runs in its own worker process, one after the other, so that its peak
memory is its own: peak resident set size on CPU (``ru_maxrss``, minus the size before the first step
for ``step_mem_mb``), ``torch.cuda.max_memory_allocated`` on GPU. Step time is the median over the timed
steps after warm-up, as wall time and as this process's CPU time (the latter is less disturbed by other
jobs on a shared machine; both ratios are written). CPU runs use ``--threads`` torch threads (default 1).

    .venv/bin/python benchmarks/train_step.py                 # tiny + paper on CPU (and GPU if present)
    .venv/bin/python benchmarks/train_step.py --shapes tiny --steps 5

Writes ``results/benchmarks/train_step.csv``.

``--interleave`` measures the ratios of issue 17 instead: softmax, linear_hw and nonlinear_hw (and with
``--compile`` their ``torch.compile``d versions) built in one process, their steps taking turns in every
repetition, at each of ``--thread-counts`` (default 1 and 2); medians, ratios to the eager softmax step
and to the same model's eager step, and the targets (linear_hw <= 1.15x, nonlinear_hw <= 1.3x softmax;
compiled faster than eager). Writes ``train_step_interleaved.csv`` and ``.json``.

    .venv/bin/python benchmarks/train_step.py --interleave --shapes tiny --compile
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("softmax", "softmax_window", "linear_hw", "nonlinear_hw")
SHAPES = {
    "tiny": dict(n_layer=4, n_head=2, n_embd=128, block_size=256, window=128, vocab_size=4096,
                 batch={"cpu": 8, "cuda": 8}, steps={"cpu": 5, "cuda": 10}, warmup={"cpu": 1, "cuda": 3}),
    "paper": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, window=1024, vocab_size=50257,
                  batch={"cpu": 1, "cuda": 8}, steps={"cpu": 2, "cuda": 10}, warmup={"cpu": 1, "cuda": 3}),
}


def _rss_mb() -> float:
    """Current resident set size of this process, MB (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_step(shape: str, kind: str, device: str, compile_model: bool = False):
    """A GPT of ``shape`` with attention ``kind``, its AdamW and one fixed batch; returns ``(step, model)``
    where ``step()`` runs forward, backward, clipping and the update, and returns the loss."""
    import torch

    from gaincell.attention import PAPER_COEFFICIENTS, AnalogAttentionConfig
    from gaincell.model import GPT, GPTConfig

    s = SHAPES[shape]
    dev = torch.device(device)
    torch.manual_seed(0)
    analog = AnalogAttentionConfig(window=s["window"],
                                   coefficients=PAPER_COEFFICIENTS if kind == "nonlinear_hw" else None)
    model = GPT(GPTConfig(vocab_size=s["vocab_size"], block_size=s["block_size"], n_layer=s["n_layer"],
                          n_head=s["n_head"], n_embd=s["n_embd"], attention=kind, analog=analog)).to(dev)
    for core in model.attention_cores():  # as the trainer: scalers train only in hardware models
        for p in core.parameters(recurse=False):
            p.requires_grad_(kind in ("linear_hw", "nonlinear_hw"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            **({"fused": True} if device == "cuda" else {}))
    forward = torch.compile(model) if compile_model else model
    batch, T = s["batch"][device], s["block_size"]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, s["vocab_size"], (batch, T), generator=g).to(dev)
    y = torch.randint(0, s["vocab_size"], (batch, T), generator=g).to(dev)

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize(dev)
        return float(loss.detach())
    return step, model


def worker(shape: str, kind: str, device: str, threads: int, steps: int, warmup: int) -> dict:
    import resource

    import torch

    s = SHAPES[shape]
    if device == "cpu":
        torch.set_num_threads(threads)
    dev = torch.device(device)
    step, model = build_step(shape, kind, device)
    batch, T = s["batch"][device], s["block_size"]
    rss_before = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_alloc = torch.cuda.memory_allocated(dev) / 2**20

    wall, cpu = [], []
    for i in range(warmup + steps):
        w0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        if i >= warmup:
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    row = {"shape": shape, "attention": kind, "device": device,
           "device_name": torch.cuda.get_device_name(dev) if device == "cuda" else f"cpu x{threads} threads",
           "batch": batch, "seq_len": T, "window": s["window"], "parameters_m": round(model.num_parameters() / 1e6, 2),
           "tokens_per_step": batch * T, "timed_steps": steps, "warmup_steps": warmup,
           "step_ms": 1e3 * statistics.median(wall), "step_cpu_ms": 1e3 * statistics.median(cpu),
           "loss": loss}
    row["tokens_per_s"] = row["tokens_per_step"] / (row["step_ms"] / 1e3)
    if device == "cuda":
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        row["step_mem_mb"] = row["peak_mem_mb"] - base_alloc
        row["mem_kind"] = "cuda max_memory_allocated"
    else:
        row["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row["step_mem_mb"] = row["peak_mem_mb"] - rss_before
        row["mem_kind"] = "cpu peak RSS"
    return row


# Issue 17's targets for the eager training step at the tiny shape (ratios to the softmax step).
STEP_RATIO_TARGETS = {"linear_hw": 1.15, "nonlinear_hw": 1.3}


def interleaved(shape: str, kinds, device: str, thread_counts, steps: int, warmup: int, compile_too: bool):
    """Every (kind, eager/compiled) variant built in this one process, their steps taking turns within each
    repetition (so load from other processes hits all alike); medians per thread count. Returns rows."""
    import torch

    variants = {}
    for kind in kinds:
        for compiled in ((False, True) if compile_too else (False,)):
            variants[(kind, compiled)] = build_step(shape, kind, device, compiled)[0]
    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for step in variants.values():  # warm-up (and compilation) at this thread count
            for _ in range(warmup):
                step()
        wall = {v: [] for v in variants}
        cpu = {v: [] for v in variants}
        for _ in range(steps):
            for v, step in variants.items():
                w0, c0 = time.perf_counter(), time.process_time()
                step()
                wall[v].append(time.perf_counter() - w0)
                cpu[v].append(time.process_time() - c0)
        for (kind, compiled) in variants:
            rows.append({"shape": shape, "device": device, "threads": threads, "attention": kind,
                         "compiled": compiled, "steps": steps,
                         "step_ms": 1e3 * statistics.median(wall[(kind, compiled)]),
                         "step_cpu_ms": 1e3 * statistics.median(cpu[(kind, compiled)]),
                         "step_ms_iqr": 1e3 * _iqr(wall[(kind, compiled)])})
    _add_ratios(rows)
    return rows


def _iqr(values) -> float:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [0.0, 0.0, 0.0]
    return q[2] - q[0]


def _add_ratios(rows) -> None:
    """Ratios to the eager softmax step and to the same kind's eager step, within each thread count."""
    for r in rows:
        same = {(o["attention"], o["compiled"]): o for o in rows if o["threads"] == r["threads"]}
        soft = same.get(("softmax", False))
        eager = same.get((r["attention"], False))
        for col in ("step_ms", "step_cpu_ms"):
            r[f"{col}_ratio_to_softmax"] = r[col] / soft[col] if soft else None
            r[f"{col}_ratio_to_eager"] = r[col] / eager[col] if eager else None


def goal_checks(rows) -> dict:
    """Issue 17's training-step targets evaluated on these rows (eager wall-time ratios to softmax)."""
    checks = {}
    for r in rows:
        if not r["compiled"] and r["attention"] in STEP_RATIO_TARGETS:
            target = STEP_RATIO_TARGETS[r["attention"]]
            checks[f"{r['attention']}_eager_threads{r['threads']} <= {target}x softmax"] = {
                "ratio": r["step_ms_ratio_to_softmax"], "cpu_time_ratio": r["step_cpu_ms_ratio_to_softmax"],
                "met": r["step_ms_ratio_to_softmax"] <= target}
        if r["compiled"] and r["attention"] in STEP_RATIO_TARGETS:
            checks[f"{r['attention']}_compiled_threads{r['threads']} faster than eager"] = {
                "ratio": r["step_ms_ratio_to_eager"], "met": r["step_ms_ratio_to_eager"] < 1.0}
    return checks


def main_interleaved(args) -> int:
    """``--interleave``: the issue 17 ratios (eager hardware step / eager softmax step, compiled / eager)."""
    import platform

    import torch

    from gaincell.io import atomic_to_csv, atomic_write_json

    shape, device = args.shapes[0], (args.devices or ["cpu"])[0]
    kinds = args.kinds if args.kinds != list(KINDS) else ["softmax", "linear_hw", "nonlinear_hw"]
    # 15 interleaved repetitions: with 7 the median ratios moved by a few percent from run to run
    steps = args.steps or 15
    warmup = args.warmup if args.warmup is not None else 2
    load_before = os.getloadavg()
    started = time.time()
    rows = interleaved(shape, kinds, device, args.thread_counts, steps, warmup, args.compile)
    import pandas as pd

    out_csv = args.out.with_name("train_step_interleaved.csv")
    atomic_to_csv(pd.DataFrame(rows), out_csv)
    summary = {"shape": {k: v for k, v in SHAPES[shape].items()}, "shape_name": shape, "device": device,
               "kinds": kinds, "thread_counts": args.thread_counts, "timed_steps": steps, "warmup_steps": warmup,
               "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "seconds": round(time.time() - started, 1),
               "note": "medians of interleaved steps in one process; wall time (step_ms) and this process's "
                       "CPU time (step_cpu_ms, less disturbed on a shared machine)",
               "goals": goal_checks(rows), "rows": rows}
    atomic_write_json(out_csv.with_suffix(".json"), summary)
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(json.dumps(summary["goals"], indent=1))
    print(f"wrote {out_csv} and {out_csv.with_suffix('.json')}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if present)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: per shape and device; 15 with --interleave)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "train_step.csv")
    ap.add_argument("--worker", nargs=3, metavar=("SHAPE", "KIND", "DEVICE"), help=argparse.SUPPRESS)
    ap.add_argument("--interleave", action="store_true",
                    help="one process, the variants' steps taking turns (ratios; no per-variant memory): "
                         "writes train_step_interleaved.csv/.json")
    ap.add_argument("--thread-counts", nargs="+", type=int, default=[1, 2], help="with --interleave")
    ap.add_argument("--compile", action="store_true", help="with --interleave: also torch.compile'd variants")
    args = ap.parse_args(argv)
    if args.interleave:
        return main_interleaved(args)

    if args.worker:
        shape, kind, device = args.worker
        s = SHAPES[shape]
        print("RESULT " + json.dumps(worker(shape, kind, device, args.threads,
                                             args.steps or s["steps"][device], args.warmup if args.warmup is not None
                                             else s["warmup"][device])))
        return 0

    import pandas as pd
    from tqdm import tqdm

    from gaincell.io import atomic_to_csv

    devices = args.devices
    if devices is None:
        import torch

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    jobs = [(sh, k, d) for d in devices for sh in args.shapes for k in args.kinds]
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for shape, kind, device in tqdm(jobs, desc="train-step benchmark", unit="config"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", shape, kind, device,
               "--threads", str(args.threads)]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        if args.warmup is not None:
            cmd += ["--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            tqdm.write(f"{shape}/{kind}/{device}: failed (exit {proc.returncode}): {' | '.join(tail)}")
            rows.append({"shape": shape, "attention": kind, "device": device, "error": " | ".join(tail)})
            continue
        row = json.loads(lines[-1][len("RESULT "):])
        rows.append(row)
        tqdm.write(f"{shape:5s} {kind:15s} {device}: {row['step_ms']:8.1f} ms/step ({row['step_cpu_ms']:8.1f} ms CPU), "
                   f"{row['tokens_per_s']:9.0f} tok/s, peak {row['peak_mem_mb']:8.0f} MB")
    df = pd.DataFrame(rows)
    if "step_ms" in df:
        for col, ratio in (("step_ms", "step_time_ratio_to_softmax"), ("step_cpu_ms", "cpu_time_ratio_to_softmax"),
                           ("peak_mem_mb", "peak_mem_ratio_to_softmax")):
            ref = df[df["attention"] == "softmax"].set_index(["shape", "device"])[col]
            df[ratio] = [r[col] / ref.get((r["shape"], r["device"]), float("nan")) for _, r in df.iterrows()]
    atomic_to_csv(df, args.out)
    cols = [c for c in ("shape", "device", "attention", "tokens_per_s", "step_ms", "step_time_ratio_to_softmax",
                        "cpu_time_ratio_to_softmax", "peak_mem_mb", "peak_mem_ratio_to_softmax") if c in df]
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
