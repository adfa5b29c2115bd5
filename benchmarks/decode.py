"""Streaming decode speed versus position: the gain-cell KV arrays (``AnalogKVDecoder``) per token.

Claim measured: once the window is full, the per-token cost of the analog decoder no longer depends on
how many tokens came before (the arrays overwrite their oldest slot), while a softmax KV cache that
keeps the whole history (measured side by side, same shapes) slows down as the sequence grows.

Shape of the paper's decode loop (the GPU baseline of the hardware estimates uses the same): one layer
of 12 heads, head dimension 64, window 1,024, batch 1. ``--quick`` shrinks the window to 256.

    .venv/bin/python benchmarks/decode.py --quick
    .venv/bin/python benchmarks/decode.py --window 1024 --steps 3072 --device cuda

Writes one row per (decoder, position bucket) to ``results/benchmarks/decode.csv``: tokens/s and
ms/token (median step time over the bucket; the decoders are stepped in turn at every position, so a
load spike from another process affects them alike), and ``decode.json`` with the ratio of each
decoder's step to ``softmax_ring_window`` (SDPA over a ring buffer of the same window, the issue 17
reference: target analog_linear and analog_nonlinear <= 2x), e.g.

    .venv/bin/python benchmarks/decode.py --window 256 --heads 4 --steps 768 --no-softmax

``decode.json`` also holds the time of a prompt (``--prefill-tokens``, default one window) into a fresh
analog decoder, gathered (``prefill``'s batched path) and stepped token by token: on CPU ``prefill``
steps, because gathering measured slower there.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gaincell.attention import AnalogAttentionConfig, AnalogKVDecoder
from gaincell.attention import decoder as decoder_module
from gaincell.attention.config import PAPER_COEFFICIENTS
from gaincell.io import atomic_to_csv, atomic_write_json

REPO = Path(__file__).resolve().parents[1]


class FullSoftmaxCache:
    """Reference point: causal softmax over every past token, K/V cache preallocated (no copies)."""

    def __init__(self, batch, heads, head_dim, max_steps, device, dtype):
        self.k = torch.zeros(batch, heads, max_steps, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.steps = 0

    @torch.no_grad()
    def step(self, q, k, v):
        t = self.steps
        self.k[:, :, t], self.v[:, :, t] = k, v
        self.steps += 1
        return F.scaled_dot_product_attention(q.unsqueeze(2), self.k[:, :, :t + 1],
                                              self.v[:, :, :t + 1]).squeeze(2)


class RingSoftmaxCache:
    """Reference point of issue 17: softmax over the same sliding window as the analog arrays, a K/V ring
    buffer of ``window`` slots written in place, one fused SDPA call per step (no mask: every cached key is
    in the window, and the order of keys does not change softmax attention)."""

    def __init__(self, batch, heads, head_dim, window, device, dtype):
        self.k = torch.zeros(batch, heads, window, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.window, self.steps = window, 0

    @torch.no_grad()
    def step(self, q, k, v):
        slot = self.steps % self.window
        self.k[:, :, slot], self.v[:, :, slot] = k, v
        self.steps += 1
        if self.steps >= self.window:
            return F.scaled_dot_product_attention(q.unsqueeze(2), self.k, self.v).squeeze(2)
        return F.scaled_dot_product_attention(q.unsqueeze(2), self.k[:, :, :self.steps],
                                              self.v[:, :, :self.steps]).squeeze(2)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decoders(makers, steps, batch, heads, head_dim, bucket, device, seed):
    """Per-step wall time (s) of ``steps`` calls of every decoder, interleaved position by position (so
    that load from other processes hits all of them alike), grouped into position buckets."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Pre-drawn inputs so the timing is of the decoders alone.
    q = torch.rand(steps, batch, heads, head_dim, generator=gen).to(device)
    k = (0.45 + 0.2 * torch.randn(steps, batch, heads, head_dim, generator=gen)).to(device)
    v = (0.45 + 0.2 * torch.randn(steps, batch, heads, head_dim, generator=gen)).to(device)
    for make in makers.values():  # warm-up (allocations, kernels) on separate instances
        warm = make()
        for t in range(min(8, steps)):
            warm.step(q[t], k[t], v[t])
    decoders = {name: make() for name, make in makers.items()}
    times = {name: [] for name in makers}
    for t in tqdm(range(steps), desc="decode", file=sys.stderr):
        for name, decoder in decoders.items():
            _sync(device)
            start = time.perf_counter()
            decoder.step(q[t], k[t], v[t])
            _sync(device)
            times[name].append(time.perf_counter() - start)
    rows = []
    for name in makers:
        for lo in range(0, steps, bucket):
            chunk = times[name][lo:lo + bucket]
            median = statistics.median(chunk)
            rows.append({"decoder": name, "position_start": lo, "position_end": lo + len(chunk),
                         "ms_per_token": 1e3 * median, "tokens_per_s": 1.0 / median,
                         "mean_ms_per_token": 1e3 * statistics.fmean(chunk)})
    return rows


def time_prefill(makers, tokens, batch, heads, head_dim, device, seed, repeats=5):
    """Wall time (s, median of ``repeats`` interleaved repetitions) of a ``tokens``-token prompt into a
    fresh analog decoder: ``prefill`` gathering the arrays each token sees (the batched path, forced on
    CPU too) and stepping the tokens one by one (what ``prefill`` does on CPU); the outputs are checked
    to be equal."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.rand(batch, heads, tokens, head_dim, generator=gen).to(device)
    k = (0.45 + 0.2 * torch.randn(batch, heads, tokens, head_dim, generator=gen)).to(device)
    v = (0.45 + 0.2 * torch.randn(batch, heads, tokens, head_dim, generator=gen)).to(device)
    gathers = decoder_module.PREFILL_GATHERS_ON_CPU
    times = {(name, how): [] for name in makers for how in ("gathered", "stepped")}
    try:
        for _ in range(repeats):
            for name, make in makers.items():
                outputs = {}
                for how in ("gathered", "stepped"):
                    decoder_module.PREFILL_GATHERS_ON_CPU = how == "gathered"
                    decoder = make()
                    _sync(device)
                    start = time.perf_counter()
                    outputs[how] = decoder.prefill(q, k, v) if how == "gathered" else torch.stack(
                        [decoder.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(tokens)], dim=2)
                    _sync(device)
                    times[(name, how)].append(time.perf_counter() - start)
                if not torch.equal(outputs["gathered"], outputs["stepped"]):
                    raise AssertionError(f"{name}: prefill differs from stepping the same tokens")
    finally:
        decoder_module.PREFILL_GATHERS_ON_CPU = gathers
    return {f"{name}_{how}_ms": 1e3 * statistics.median(t) for (name, how), t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=1024, help="window M, tokens (default 1024)")
    parser.add_argument("--tile-rows", type=int, default=64)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="tokens decoded (default 3 x window)")
    parser.add_argument("--buckets", type=int, default=12, help="position buckets reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: one token's work is too small to split, and "
                             "a shared machine's other jobs make several threads stall)")
    parser.add_argument("--quick", action="store_true", help="window 256 (unless --window is given)")
    parser.add_argument("--no-softmax", action="store_true", help="skip the full softmax cache reference")
    parser.add_argument("--prefill-tokens", type=int, default=None,
                        help="prompt length for the prefill timing (default: the window; 0: skip it)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "decode.csv")
    args = parser.parse_args(argv)
    if args.quick and "--window" not in (argv if argv is not None else sys.argv[1:]):
        args.window = 256
    steps = args.steps or 3 * args.window
    if steps < 2 * args.window:
        parser.error(f"--steps={steps}: expected at least 2 x window ({2 * args.window}) to see the "
                     f"full-window regime")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bucket = max(1, steps // args.buckets)
    shape = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim)

    makers = {
        "analog_linear": lambda: AnalogKVDecoder(
            AnalogAttentionConfig(window=args.window, tile_rows=args.tile_rows), device=device, **shape),
        "analog_nonlinear": lambda: AnalogKVDecoder(
            AnalogAttentionConfig(window=args.window, tile_rows=args.tile_rows,
                                  coefficients=PAPER_COEFFICIENTS), device=device, **shape),
    }
    makers["softmax_ring_window"] = lambda: RingSoftmaxCache(window=args.window, device=device,
                                                             dtype=torch.float32, **shape)
    if not args.no_softmax:
        makers["softmax_full_cache"] = lambda: FullSoftmaxCache(max_steps=steps, device=device,
                                                                dtype=torch.float32, **shape)
    rows = time_decoders(makers, steps, bucket=bucket, device=device, seed=0, **shape)
    prefill_tokens = args.window if args.prefill_tokens is None else args.prefill_tokens
    analog = {name: make for name, make in makers.items() if name.startswith("analog")}
    prefill = time_prefill(analog, prefill_tokens, device=device, seed=1, **shape) if prefill_tokens else {}
    frame = pd.DataFrame(rows)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    meta = {"device": device_name, "threads": torch.get_num_threads(), "window": args.window,
            "tile_rows": args.tile_rows, "steps": steps, **shape}
    for key, value in meta.items():
        frame[key] = value
    atomic_to_csv(frame, args.out, index=False)

    print(f"decode: {args.heads} heads x D={args.head_dim}, window {args.window}, batch {args.batch}, "
          f"{steps} steps on {frame['device'].iloc[0]} ({torch.get_num_threads()} threads) -> {args.out}")
    print(frame.pivot(index="position_start", columns="decoder", values="tokens_per_s").round(0).to_string())
    # Issue 17's target: the analog step <= 2x the SDPA ring-buffer step over the same window, window full.
    full = frame[frame.position_start >= args.window].groupby("decoder")["ms_per_token"].median()
    ratios = {name: float(full[name] / full["softmax_ring_window"]) for name in full.index}
    summary = {**meta, "ms_per_token_window_full": {k: float(v) for k, v in full.items()},
               "ratio_to_softmax_ring_window": ratios,
               "goal_analog_linear_le_2x_ring": ratios.get("analog_linear", float("nan")) <= 2.0,
               "goal_analog_nonlinear_le_2x_ring": ratios.get("analog_nonlinear", float("nan")) <= 2.0,
               "prefill_tokens": prefill_tokens, "prefill": prefill,
               "timing": "wall time per step, median over the position buckets after the window filled; decoders "
                         "stepped in turn at every position"}
    atomic_write_json(args.out.with_suffix(".json"), summary)
    print("ratio to the SDPA ring-buffer step (window full): "
          + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    for name in makers:
        sub = frame[frame.decoder == name]
        full = sub[sub.position_start >= args.window]  # window full from here on
        first, last = full.iloc[0], full.iloc[-1]
        print(f"{name:>20}: tokens/s {first.tokens_per_s:8.0f} at position {int(first.position_start)} -> "
              f"{last.tokens_per_s:8.0f} at {int(last.position_start)} "
              f"(ratio last/first {last.tokens_per_s / first.tokens_per_s:.2f})")
    if prefill:
        print(f"prompt of {prefill_tokens} tokens (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in prefill.items()))


if __name__ == "__main__":
    main()
