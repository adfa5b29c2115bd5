"""Per-cell additive offsets (``cell_offset_variation``, issue 16 §3: a threshold shift is mostly an offset)
on the CPU paths: the dense reference, the blocked path (forward and backward) and the streaming decoder.

Float64 throughout (set-up shared with ``test_noise.py``: ``cell_cases``), so that a wrong cell, ring row
or a missing 1 / S_sat factor shows many orders of magnitude above rounding (1e-16 relative).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from cell_cases import (
    CELLS,
    PATHS,
    assert_outputs_close,
    assert_seed_decides,
    chip_config,
    closed_form_config,
    gradcheck_config,
    inputs,
    outputs_and_gradients,
    per_cell_attention,
    run,
    stream,
)

from gaincell.attention import AnalogAttentionConfig, analog_attention, blocked
from gaincell.attention.config import PAPER_COEFFICIENTS
from gaincell.attention.noise import cell_gains, cell_offsets, layer_config
from gaincell.attention.reference import analog_attention_dense


@pytest.mark.parametrize("with_gain_variation", [False, True])
@pytest.mark.parametrize("cell", ["linear", "surrogate"])
def test_offset_adds_to_each_cells_output(cell, with_gain_variation):
    """Closed form, cell by cell: each cell's offset is added to its output (not attenuated, not scaled by
    its gain), ring row t' mod M holds key t' (the sequence wraps the window 2.5 times); every path."""
    cfg = closed_form_config(cell, cell_offset_variation=0.4, cell_variation=0.3 if with_gain_variation else 0.0,
                             noise_seed=2)
    q, k, v = inputs(1, 2, 20, 3, seed=3)
    ones = torch.ones(2, cfg.window, 3, dtype=torch.float64)
    gains = cell_gains(cfg, heads=2, head_dim=3, dtype=torch.float64) or (ones, ones)
    offsets = cell_offsets(cfg, heads=2, head_dim=3, dtype=torch.float64)
    expected = per_cell_attention(q[0], k[0], v[0], cfg, gains, offsets)
    without = per_cell_attention(q[0], k[0], v[0], cfg, gains, (0 * ones, 0 * ones))
    assert (expected - without).abs().max() > 0.05  # the offsets change the answer
    for path in PATHS + ("decoder",):
        torch.testing.assert_close(run(path, q, k, v, cfg)[0], expected, rtol=1e-12, atol=1e-13, msg=path)


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
    cfg = chip_config(cell, cell_variation=0.05, cell_offset_variation=1.0, noise_seed=11)
    q, k, v = inputs(2, 3, int(ratio * cfg.window), 16, seed=int(10 * ratio))
    streamed = stream(cfg, q, k, v)
    for path in PATHS:
        assert torch.equal(streamed, analog_attention(q, k, v, cfg, implementation=path)), path
    no_offsets = analog_attention(q, k, v, dataclasses.replace(cfg, cell_offset_variation=0.0))
    assert (streamed != no_offsets).float().mean() > 0.05  # the offsets move many outputs by a level


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("long_window", [False, True])
def test_blocked_forward_and_backward_equal_the_reference_with_offsets(cell, long_window):
    """Blocked vs dense, outputs and gradients, with the saved-slab backward (short window) and the
    recomputing one (window long enough that ``_saves`` is False)."""
    cfg = chip_config(cell, window=256 if long_window else 32, cell_variation=0.05, cell_offset_variation=0.6,
                      noise_seed=5)
    q, k, v = inputs(2, 2, 300 if long_window else 90, 4 if long_window else 16, seed=8)
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert blocked._saves(q.shape, cfg) == (not long_window)  # both backward variants are exercised
    results = [outputs_and_gradients(lambda a, b, c: analog_attention(a, b, c, cfg, implementation=path), q, k, v, dy)
               for path in PATHS]
    assert_outputs_close(*results, "the blocked path")
    # The offsets reach the query gradient: it differs from the one without them.
    no_offsets = dataclasses.replace(cfg, cell_offset_variation=0.0)
    dq_no_offsets = outputs_and_gradients(lambda a, b, c: analog_attention(a, b, c, no_offsets, implementation="blocked"),
                                          q, k, v, dy)[1]
    assert (dq_no_offsets - results[1][1]).abs().max() > 1e-3


@pytest.mark.parametrize("cell", ["linear", "exact"])
def test_reference_gradient_with_offsets_passes_gradcheck(cell):
    """The dense path's autograd through the offset cells (quantizers off: they are straight-through)."""
    cfg = gradcheck_config(cell, cell_offset_variation=0.4)
    q, k, v = (x.requires_grad_() for x in inputs(1, 2, 12, 3, seed=4))
    assert torch.autograd.gradcheck(lambda a, b, c: analog_attention_dense(a, b, c, cfg), (q, k, v))


def test_same_seed_same_offsets_different_seed_different_offsets():
    q, k, v = inputs(1, 2, 40, 8, seed=2)
    cfg = AnalogAttentionConfig(window=16, tile_rows=8, output_levels=None, cell_offset_variation=0.3, noise_seed=1)
    assert_seed_decides(q, k, v, cfg, other_seed=2)


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
    q, k, v = inputs(1, 2, 40, 8, seed=6)
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    operator = outputs_and_gradients(lambda a, b, c: analog_attention_op(a, b, c, cfg, implementation="blocked"),
                                     q, k, v, dy)
    reference = outputs_and_gradients(lambda a, b, c: analog_attention_dense(a, b, c, cfg), q, k, v, dy)
    assert_outputs_close(operator, reference, "the operator")
