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


def worker(shape: str, kind: str, device: str, threads: int, steps: int, warmup: int) -> dict:
    import resource

    import torch

    from gaincell.attention import PAPER_COEFFICIENTS, AnalogAttentionConfig
    from gaincell.model import GPT, GPTConfig

    s = SHAPES[shape]
    if device == "cpu":
        torch.set_num_threads(threads)
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
    batch = s["batch"][device]
    T = s["block_size"]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, s["vocab_size"], (batch, T), generator=g).to(dev)
    y = torch.randint(0, s["vocab_size"], (batch, T), generator=g).to(dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else None
    rss_before = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_alloc = torch.cuda.memory_allocated(dev) / 2**20

    def step():
        if autocast is not None:
            with autocast:
                _, loss = model(x, y)
        else:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize(dev)
        return float(loss.detach())

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if present)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: per shape and device)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "train_step.csv")
    ap.add_argument("--worker", nargs=3, metavar=("SHAPE", "KIND", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

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
