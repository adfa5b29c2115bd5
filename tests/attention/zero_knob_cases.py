"""Inputs and configs whose every operation is exact in float64 (dyadic rationals with few bits), so
that the outputs and gradients do not depend on the summation order of any product: comparisons with
the stored outputs of the code before cell variation and readout noise existed hold bit for bit on any CPU.

Dyadic by construction: query levels 17 on [0, 1] (step 1/16), stored levels 9 on [0, 1] V (step 1/8)
with a 0.5 V offset, output levels 33 on [-1, 1] (step 1/16), gain 4, saturations 4 and 8, no leakage
(alpha = 1), read voltage 1 V and dyadic cell coefficients (the folded c_i are exact sums). Products of
such numbers over at most 64 keys need far fewer than float64's 53 bits.

Run as a script with the *old* code on PYTHONPATH to (re)write ``data/zero_knob_golden.pt``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "data" / "zero_knob_golden.pt"
DYADIC_CELL = (0.25, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, -0.5, 0.0, 4.0)  # c0 = 1/4, c1 = 2, c2 = -1/2, c3 = 4


def dyadic_config(cls, cell: str, **overrides):
    settings = dict(window=32, tile_rows=16, query_levels=17, stored_levels=9, output_levels=33, gain=4.0,
                    qk_saturation=4.0, av_saturation=8.0, stored_offset=0.5, read_voltage=1.0,
                    decay_per_step=0.0, stored_max=1.0,
                    coefficients=DYADIC_CELL if cell != "linear" else None,
                    exact_nonlinear_grad=cell == "exact")
    settings.update(overrides)
    return cls(**settings)


def dyadic_inputs(batch=1, heads=2, tokens=56, dim=8, seed=0):
    """q on a 1/64 grid over [-0.1, 1.1]; k, v on a 1/32 grid around 0.5 V (beyond the range too)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-6, 71, (batch, heads, tokens, dim), generator=g).double() / 64
    k = torch.randint(2, 31, (batch, heads, tokens, dim), generator=g).double() / 32
    v = torch.randint(2, 31, (batch, heads, tokens, dim), generator=g).double() / 32
    return q, k, v


CELLS = ("linear", "surrogate", "exact")


def compute(paths=("dense", "blocked", "decoder")):
    """{(path, cell): (y, dq, dk, dv)} (the decoder: y only) on the dyadic cases; the loss whose
    gradients these are is sum(y * weights) with dyadic weights."""
    from gaincell.attention import AnalogAttentionConfig, AnalogKVDecoder, analog_attention

    out = {}
    for cell in CELLS:
        cfg = dyadic_config(AnalogAttentionConfig, cell)
        q, k, v = dyadic_inputs()
        weights = torch.randint(-8, 9, q.shape, generator=torch.Generator().manual_seed(1)).double() / 8
        for path in paths:
            if path == "decoder":
                dec = AnalogKVDecoder(cfg, batch=q.shape[0], heads=q.shape[1], head_dim=q.shape[3])
                y = torch.stack([dec.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(q.shape[2])], 2)
                out[(path, cell)] = (y,)
                continue
            qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
            y = analog_attention(qq, kk, vv, cfg, implementation=path)
            (y * weights).sum().backward()
            out[(path, cell)] = (y.detach(), qq.grad, kk.grad, vv.grad)
    return out


if __name__ == "__main__":
    # Every path computes the same exact numbers here, so one (y, dq, dk, dv) per cell is stored: the
    # dense reference's, after checking that the other paths given on the command line agree bit for bit.
    results = compute(("dense",) + tuple(sys.argv[1:]))
    golden = {cell: results[("dense", cell)] for cell in CELLS}
    for (path, cell), tensors in results.items():
        for name, got, want in zip(("y", "dq", "dk", "dv"), tensors, golden[cell]):
            assert torch.equal(got, want), f"{path} {cell}: {name} differs from the dense reference"
    torch.save(golden, GOLDEN)
    print(f"wrote {sorted(golden)} to {GOLDEN} (paths checked: {sorted({p for p, _ in results})})")
