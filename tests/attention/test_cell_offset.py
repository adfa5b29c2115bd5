"""Per-cell additive offsets (``cell_offset_variation``, issue 16 §3: a threshold shift is mostly an offset)
on the CPU paths: the dense reference, the blocked path (forward and backward) and the streaming decoder.

Float64 throughout, so that a wrong cell, ring row or a missing 1 / S_sat factor shows many orders of
magnitude above rounding (1e-16 relative).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gaincell.attention import AnalogAttentionConfig, AnalogKVDecoder, analog_attention, blocked
from gaincell.attention.config import PAPER_COEFFICIENTS
from gaincell.attention.noise import cell_gains, cell_offsets, layer_config
from gaincell.attention.quantize import clamp_quantize
from gaincell.attention.reference import analog_attention_dense, dac_inputs

PATHS = ("dense", "blocked")
CELLS = {"linear": dict(coefficients=None), "surrogate": dict(coefficients=PAPER_COEFFICIENTS),
         "exact": dict(coefficients=PAPER_COEFFICIENTS, exact_nonlinear_grad=True)}


def _inputs(batch, heads, tokens, dim, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(batch, heads, tokens, dim, generator=g, dtype=torch.float64) * 1.1 - 0.05
    k = 0.45 + 0.3 * torch.randn(batch, heads, tokens, dim, generator=g, dtype=torch.float64)
    v = 0.45 + 0.3 * torch.randn(batch, heads, tokens, dim, generator=g, dtype=torch.float64)
    return q, k, v


def _stream(cfg, q, k, v):
    batch, heads, tokens, dim = q.shape
    decoder = AnalogKVDecoder(cfg, batch=batch, heads=heads, head_dim=dim)
    return torch.stack([decoder.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(tokens)], dim=2)


def _run(path, q, k, v, cfg):
    return _stream(cfg, q, k, v) if path == "decoder" else analog_attention(q, k, v, cfg, implementation=path)


def _per_cell_attention(q, k, v, cfg, gains, offsets):
    """Independent oracle, one cell at a time (q, k, v: (H, T, D) float64; gains, offsets (H, M, D) per
    array): every cell's current (gamma * sum_i c_i alpha**i x y**i + delta) * x, key t' in ring row t' mod M,
    its sub-tile (row // tile_rows) read when it holds a key. Output quantizer off."""
    c = cfg.folded_coefficients
    (gain_k, gain_v), (offset_k, offset_v) = gains, offsets
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


@pytest.mark.parametrize("with_gain_variation", [False, True])
@pytest.mark.parametrize("cell", ["linear", "surrogate"])
def test_offset_adds_to_each_cells_output(cell, with_gain_variation):
    """Closed form, cell by cell: each cell's offset is added to its output (not attenuated, not scaled by
    its gain), ring row t' mod M holds key t' (the sequence wraps the window 2.5 times); every path."""
    cfg = AnalogAttentionConfig(window=8, tile_rows=4, decay_per_step=2e-2, output_levels=None,
                                qk_saturation=4.0, av_saturation=4.0, cell_offset_variation=0.4,
                                cell_variation=0.3 if with_gain_variation else 0.0, noise_seed=2, **CELLS[cell])
    q, k, v = _inputs(1, 2, 20, 3, seed=3)
    ones = torch.ones(2, cfg.window, 3, dtype=torch.float64)
    gains = cell_gains(cfg, heads=2, head_dim=3, dtype=torch.float64) or (ones, ones)
    offsets = cell_offsets(cfg, heads=2, head_dim=3, dtype=torch.float64)
    expected = _per_cell_attention(q[0], k[0], v[0], cfg, gains, offsets)
    without = _per_cell_attention(q[0], k[0], v[0], cfg, gains, (0 * ones, 0 * ones))
    assert (expected - without).abs().max() > 0.05  # the offsets change the answer
    for path in PATHS + ("decoder",):
        torch.testing.assert_close(_run(path, q, k, v, cfg)[0], expected, rtol=1e-12, atol=1e-13, msg=path)


def test_offsets_statistics_and_independence_from_the_gains():
    cfg = AnalogAttentionConfig(window=256, tile_rows=64, cell_variation=0.1, cell_offset_variation=0.2, noise_seed=4)
    offset_k, offset_v = cell_offsets(cfg, heads=4, head_dim=64, dtype=torch.float64)
    gain_k, _ = cell_gains(cfg, heads=4, head_dim=64, dtype=torch.float64)
    assert offset_k.shape == offset_v.shape == (4, 256, 64)
    n = offset_k.numel()
    for o in (offset_k, offset_v):
        # Mean 0 within 5 standard errors (0.2 / sqrt(n)); std 0.2 within 5 standard errors (0.2 / sqrt(2n)).
        assert abs(o.mean().item()) < 5 * 0.2 / math.sqrt(n)
        assert abs(o.std().item() - 0.2) < 5 * 0.2 / math.sqrt(2 * n)
    # Independent of each other and of the gain stream: correlations 0 within 5 / sqrt(n).
    for a, b in ((offset_k, offset_v), (offset_k, gain_k)):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 5 / math.sqrt(n)
    # The gains do not depend on whether offsets are drawn (independent streams).
    assert torch.equal(cell_gains(dataclasses.replace(cfg, cell_offset_variation=0.0), 4, 64, torch.float64)[0], gain_k)
    assert cell_offsets(AnalogAttentionConfig(), 4, 64) is None
    assert layer_config(AnalogAttentionConfig(cell_offset_variation=0.1), 1).noise_seed != 0  # own chip per layer
    with pytest.raises(ValueError, match="cell_offset_variation=-0.1"):
        AnalogAttentionConfig(cell_offset_variation=-0.1)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("ratio", [0.6, 2.5])
def test_streaming_equals_parallel_exactly_with_offsets(cell, ratio):
    """The decoder's quantized outputs equal the parallel ones bit for bit with offsets (and gains) on
    (float64: rounding differences of 1e-16 never cross an output level)."""
    cfg = AnalogAttentionConfig(window=32, tile_rows=8, decay_per_step=1e-2, cell_variation=0.05,
                                cell_offset_variation=1.0, noise_seed=11, **CELLS[cell])
    q, k, v = _inputs(2, 3, int(ratio * cfg.window), 16, seed=int(10 * ratio))
    streamed = _stream(cfg, q, k, v)
    for path in PATHS:
        assert torch.equal(streamed, analog_attention(q, k, v, cfg, implementation=path)), path
    no_offsets = analog_attention(q, k, v, dataclasses.replace(cfg, cell_offset_variation=0.0))
    assert (streamed != no_offsets).float().mean() > 0.05  # the offsets move many outputs by a level


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("long_window", [False, True])
def test_blocked_forward_and_backward_equal_the_reference_with_offsets(cell, long_window):
    """Blocked vs dense, outputs and gradients, with the saved-slab backward (short window) and the
    recomputing one (window long enough that ``_saves`` is False)."""
    window = 256 if long_window else 32
    cfg = AnalogAttentionConfig(window=window, tile_rows=8, decay_per_step=1e-2, cell_variation=0.05,
                                cell_offset_variation=0.6, noise_seed=5, **CELLS[cell])
    q, k, v = _inputs(2, 2, 300 if long_window else 90, 4 if long_window else 16, seed=8)
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert blocked._saves(q.shape, cfg) == (not long_window)  # both backward variants are exercised
    results = []
    for path in PATHS:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        y = analog_attention(*leaves, cfg, implementation=path)
        y.backward(dy)
        results.append([y.detach()] + [x.grad for x in leaves])
    for name, a, b in zip(("y", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{name} of the blocked path")
    # The offsets reach the query gradient: it differs from the one without them.
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    analog_attention(*leaves, dataclasses.replace(cfg, cell_offset_variation=0.0), implementation="blocked").backward(dy)
    assert (leaves[0].grad - results[1][1]).abs().max() > 1e-3


@pytest.mark.parametrize("cell", ["linear", "exact"])
def test_reference_gradient_with_offsets_passes_gradcheck(cell):
    """The dense path's autograd through the offset cells (quantizers off: they are straight-through)."""
    cfg = AnalogAttentionConfig(window=8, tile_rows=4, decay_per_step=3e-2, query_levels=None, stored_levels=None,
                                output_levels=None, qk_saturation=4.0, av_saturation=4.0, cell_offset_variation=0.4,
                                **CELLS[cell])
    q, k, v = (x.requires_grad_() for x in _inputs(1, 2, 12, 3, seed=4))
    assert torch.autograd.gradcheck(lambda a, b, c: analog_attention_dense(a, b, c, cfg), (q, k, v))


def test_same_seed_same_offsets_different_seed_different_offsets():
    q, k, v = _inputs(1, 2, 40, 8, seed=2)
    cfg = AnalogAttentionConfig(window=16, tile_rows=8, output_levels=None, cell_offset_variation=0.3, noise_seed=1)
    for path in PATHS + ("decoder",):
        first = _run(path, q, k, v, cfg)
        assert torch.equal(first, _run(path, q, k, v, cfg))
        assert (first - _run(path, q, k, v, dataclasses.replace(cfg, noise_seed=2))).abs().max() > 1e-3


def test_triton_kernels_decline_offsets():
    """The Triton kernels do not model offsets: ``triton_supports`` names the knob (the Triton entry then
    falls back, with a warning, to the blocked path, which does)."""
    kernels = pytest.importorskip("gaincell.attention.kernels")
    problem = kernels.triton_supports(AnalogAttentionConfig(tile_rows=64, cell_offset_variation=0.05))
    assert problem is not None and "cell_offset_variation=0.05" in problem
    assert kernels.triton_supports(AnalogAttentionConfig(tile_rows=64)) is None


def test_custom_operator_with_offsets_equals_the_reference():
    """The model's path (``gaincell::analog_attention``, blocked, its packed state empty with offsets so
    the backward recomputes): outputs and gradients equal the dense reference's."""
    from gaincell.attention.op import analog_attention_op, op_supports

    cfg = AnalogAttentionConfig(window=16, tile_rows=8, decay_per_step=1e-2, cell_offset_variation=0.6,
                                noise_seed=3, coefficients=PAPER_COEFFICIENTS)
    assert op_supports(cfg, "blocked") is None
    q, k, v = _inputs(1, 2, 40, 8, seed=6)
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for run in (lambda a, b, c: analog_attention_op(a, b, c, cfg, implementation="blocked"),
                lambda a, b, c: analog_attention_dense(a, b, c, cfg)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        y = run(*leaves)
        y.backward(dy)
        results.append([y.detach()] + [x.grad for x in leaves])
    for name, a, b in zip(("y", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{name} of the operator")
