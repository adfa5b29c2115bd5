"""Set-up shared by ``test_noise.py`` (cell gain variation, readout noise) and ``test_cell_offset.py`` (cell
offsets): the cells and CPU paths, the inputs, a runner per path, the configs of the test families, the
independent per-cell oracle and the forward + backward harness.

Float64 throughout, so that a wrong cell, a wrong ring-buffer row or a missing factor shows as a
difference many orders of magnitude above rounding (1e-16 relative).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from gaincell.attention import AnalogAttentionConfig, AnalogKVDecoder, analog_attention
from gaincell.attention.config import PAPER_COEFFICIENTS
from gaincell.attention.quantize import clamp_quantize
from gaincell.attention.reference import dac_inputs

PATHS = ("dense", "blocked")  # the parallel paths; the streaming decoder is run by ``stream``
CELLS = {"linear": dict(coefficients=None), "surrogate": dict(coefficients=PAPER_COEFFICIENTS),
         "exact": dict(coefficients=PAPER_COEFFICIENTS, exact_nonlinear_grad=True)}
OUTPUTS = ("y", "dq", "dk", "dv")


def inputs(batch, heads, tokens, dim, seed):
    """q over [-0.05, 1.05] (the DAC clamps both ends), k, v around 0.45 V with spread 0.3 V (float64)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(batch, heads, tokens, dim, generator=g, dtype=torch.float64) * 1.1 - 0.05
    k = 0.45 + 0.3 * torch.randn(batch, heads, tokens, dim, generator=g, dtype=torch.float64)
    v = 0.45 + 0.3 * torch.randn(batch, heads, tokens, dim, generator=g, dtype=torch.float64)
    return q, k, v


def stream(cfg, q, k, v, **decoder_kwargs):
    """The streaming decoder, one token at a time, outputs stacked as (B, H, T, D)."""
    batch, heads, tokens, dim = q.shape
    decoder = AnalogKVDecoder(cfg, batch=batch, heads=heads, head_dim=dim, **decoder_kwargs)
    return torch.stack([decoder.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(tokens)], dim=2)


def run(path, q, k, v, cfg):
    """Output of ``path``: one of ``PATHS`` or "decoder"."""
    return stream(cfg, q, k, v) if path == "decoder" else analog_attention(q, k, v, cfg, implementation=path)


def closed_form_config(cell, **knobs):
    """Small chip for the cell-by-cell oracle: window 8 in sub-tiles of 4, leakage on, output quantizer off
    (the oracle sums unquantized readouts), saturations 4 (D = 3 here, not the model's 64)."""
    return AnalogAttentionConfig(window=8, tile_rows=4, decay_per_step=2e-2, output_levels=None, qk_saturation=4.0,
                                 av_saturation=4.0, **knobs, **CELLS[cell])


def gradcheck_config(cell, **knobs):
    """As ``closed_form_config`` with every quantizer off (they are straight-through, not differentiable)."""
    return AnalogAttentionConfig(window=8, tile_rows=4, decay_per_step=3e-2, query_levels=None, stored_levels=None,
                                 output_levels=None, qk_saturation=4.0, av_saturation=4.0, **knobs, **CELLS[cell])


def chip_config(cell, window=32, **knobs):
    """Paths compared with each other: sub-tiles of 8, leakage on, quantizers at their defaults."""
    return AnalogAttentionConfig(window=window, tile_rows=8, decay_per_step=1e-2, **knobs, **CELLS[cell])


def per_cell_attention(q, k, v, cfg, gains, offsets=None):
    """Independent oracle, one cell at a time (q, k, v: (H, T, D) float64; gains and offsets: (K, V) pairs
    of (H, M, D) arrays, offsets None for none): every cell's current
    (gamma * sum_i c_i alpha**i x y**i + delta) * x, key t' in ring row t' mod M, its sub-tile
    (row // tile_rows) read when it holds a key. Output quantizer off (the caller compares unquantized sums)."""
    c = cfg.folded_coefficients
    gain_k, gain_v = gains
    offset_k, offset_v = offsets if offsets is not None else (torch.zeros_like(gain_k), torch.zeros_like(gain_v))
    Q, K, V = dac_inputs(q, k, v, cfg)
    W, U = K - cfg.stored_offset, V - cfg.stored_offset
    heads, tokens, dim = q.shape
    y = torch.zeros(heads, tokens, dim, dtype=torch.float64)
    for h in range(heads):
        for t in range(tokens):
            tiles = {}
            for s in range(max(0, t - cfg.window + 1), t + 1):
                a, row = math.exp(-cfg.decay_per_step * (t - s)), s % cfg.window
                charge = sum((float(gain_k[h, row, d]) * sum(c[i] * a ** i * float(W[h, s, d]) ** i for i in range(4))
                              + float(offset_k[h, row, d])) * float(Q[h, t, d]) for d in range(dim))
                pulse = min(max(charge / cfg.qk_saturation, 0.0), 1.0)
                A = tiles.setdefault(row // cfg.tile_rows, [0.0] * dim)
                for d in range(dim):
                    cell = float(gain_v[h, row, d]) * sum(c[i] * a ** i * float(U[h, s, d]) ** i for i in range(4))
                    A[d] += (cell + float(offset_v[h, row, d])) * pulse / cfg.av_saturation
            for A in tiles.values():
                y[h, t] += clamp_quantize(torch.tensor(A, dtype=torch.float64), None, -1.0, 1.0)
    return y


def outputs_and_gradients(fn, q, k, v, dy):
    """[y, dq, dk, dv] of ``fn(q, k, v)`` for the loss sum(y * dy), on fresh leaves."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [x.grad for x in leaves]


def assert_outputs_close(got, expected, what):
    """Outputs and gradients of two paths equal up to float64 rounding (1e-16 relative per operation,
    accumulated over different summation orders: rtol 1e-10, atol 1e-12 for entries near zero)."""
    for name, a, b in zip(OUTPUTS, got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{name} of {what}")


def assert_seed_decides(q, k, v, cfg, other_seed):
    """On every path the same ``noise_seed`` gives the same result and ``other_seed`` another one."""
    for path in PATHS + ("decoder",):
        first = run(path, q, k, v, cfg)
        assert torch.equal(first, run(path, q, k, v, cfg)), path
        assert (first - run(path, q, k, v, dataclasses.replace(cfg, noise_seed=other_seed))).abs().max() > 1e-3, path
