"""Cell-to-cell gain variation and readout noise (issue 16 §3) on every CPU path: the dense reference, the
blocked path and the streaming decoder (the Triton kernels: ``test_triton.py``).

Float64 throughout where paths are compared (set-up shared with ``test_cell_offset.py``: ``cell_cases``),
so that a wrong cell, a wrong ring-buffer row or a missing factor shows as a difference many orders of
magnitude above rounding (1e-16 relative).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import zero_knob_cases
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

from gaincell.attention import AnalogAttentionConfig, analog_attention
from gaincell.attention import noise as noise_module
from gaincell.attention.blocked import _BlockedAnalogAttention
from gaincell.attention.noise import cell_gains, layer_config, reset_readout_noise
from gaincell.attention.reference import analog_attention_dense


# ------------------------------------------------------------------------------------------------
# zero knobs: today's arithmetic, bit for bit
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", zero_knob_cases.CELLS)
@pytest.mark.parametrize("path", ["dense", "blocked", "decoder"])
def test_zero_variation_and_noise_are_bit_identical_to_before(path, cell):
    """Outputs and gradients equal, bit for bit, those stored from the code before these knobs existed
    (``zero_knob_cases``: exact dyadic arithmetic, so the comparison holds on any CPU)."""
    golden = torch.load(zero_knob_cases.GOLDEN)[cell]
    got = zero_knob_cases.compute((path,))[(path, cell)]
    for name, a, b in zip(("y", "dq", "dk", "dv"), got, golden):
        assert torch.equal(a, b), f"{path} {cell}: {name} differs from before (max {(a - b).abs().max():.3g})"
    assert (golden[0] != 0).float().mean() > 0.5  # the stored case has signal


def test_zero_knobs_ignore_the_seed():
    q, k, v = inputs(1, 2, 40, 8, seed=1)
    base = AnalogAttentionConfig(window=16, tile_rows=8, decay_per_step=1e-2)
    for path in PATHS:
        assert torch.equal(run(path, q, k, v, base), run(path, q, k, v, dataclasses.replace(base, noise_seed=9)))
    assert layer_config(base, 3) is base


# ------------------------------------------------------------------------------------------------
# the config: old name, old checkpoints
# ------------------------------------------------------------------------------------------------
def test_read_noise_is_an_alias_and_old_checkpoint_configs_load():
    from gaincell.model import GPTConfig

    assert AnalogAttentionConfig(read_noise=0.02) == AnalogAttentionConfig(readout_noise=0.02)
    assert dataclasses.replace(AnalogAttentionConfig(read_noise=0.02), readout_noise=0.01).readout_noise == 0.01
    old = GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=11).to_dict()
    old["analog"].pop("readout_noise"), old["analog"].pop("cell_variation"), old["analog"].pop("noise_seed")
    old["analog"]["read_noise"] = 0.03  # what checkpoints written before this change hold
    loaded = GPTConfig(**old)
    assert loaded.analog.readout_noise == 0.03 and loaded.analog.cell_variation == 0.0
    assert "read_noise" not in loaded.to_dict()["analog"]  # new checkpoints use the new name
    assert GPTConfig(**loaded.to_dict()).analog == loaded.analog


# ------------------------------------------------------------------------------------------------
# the chip
# ------------------------------------------------------------------------------------------------
def test_cell_gains_statistics_and_seeds():
    cfg = AnalogAttentionConfig(window=256, tile_rows=64, cell_variation=0.1, noise_seed=4)
    gain_k, gain_v = cell_gains(cfg, heads=4, head_dim=64, dtype=torch.float64)
    assert gain_k.shape == gain_v.shape == (4, 256, 64)
    n = gain_k.numel()
    for g in (gain_k, gain_v):
        # Mean 1 within 5 standard errors (0.1 / sqrt(n)); std 0.1 within 5 standard errors (0.1 / sqrt(2n)).
        assert abs(g.mean().item() - 1) < 5 * 0.1 / math.sqrt(n)
        assert abs(g.std().item() - 0.1) < 5 * 0.1 / math.sqrt(2 * n)
    # Independent arrays: the correlation of K and V cells is 0 within 5 / sqrt(n).
    assert abs(torch.corrcoef(torch.stack([gain_k.flatten(), gain_v.flatten()]))[0, 1].item()) < 5 / math.sqrt(n)
    again = cell_gains(dataclasses.replace(cfg), heads=4, head_dim=64, dtype=torch.float64)
    assert torch.equal(again[0], gain_k) and torch.equal(again[1], gain_v)
    other = cell_gains(dataclasses.replace(cfg, noise_seed=5), heads=4, head_dim=64, dtype=torch.float64)
    assert (other[0] - gain_k).abs().mean() > 0.05
    # float32 gains are the float64 draws rounded once
    assert torch.equal(cell_gains(cfg, 4, 64, torch.float32)[0], gain_k.float())
    assert cell_gains(AnalogAttentionConfig(), 4, 64) is None


def test_layers_get_their_own_chips():
    cfg = AnalogAttentionConfig(window=16, tile_rows=8, cell_variation=0.1, noise_seed=7)
    seeds = [layer_config(cfg, i).noise_seed for i in range(4)]
    assert len(set(seeds)) == 4 and seeds == [layer_config(cfg, i).noise_seed for i in range(4)]
    assert layer_config(dataclasses.replace(cfg, noise_seed=8), 0).noise_seed not in seeds
    from gaincell.model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, vocab_size=13, block_size=32, attention="linear_hw",
                          analog=cfg))
    assert [core.layer_analog for core in model.attention_cores()] == [layer_config(cfg, i) for i in range(3)]
    assert all(core.analog == cfg for core in model.attention_cores())  # the model-level config is kept


@pytest.mark.parametrize("cell", ["linear", "surrogate"])
def test_variation_multiplies_every_term_of_each_cell(cell):
    """Closed form, cell by cell: the variation scales c_0 too (nonlinear) and g (linear), the chip's
    row t' mod M holds key t' (the sequence wraps the window 2.5 times)."""
    cfg = closed_form_config(cell, cell_variation=0.3, noise_seed=2)
    q, k, v = inputs(1, 2, 20, 3, seed=3)
    gain_k, gain_v = cell_gains(cfg, heads=2, head_dim=3, dtype=torch.float64)
    expected = per_cell_attention(q[0], k[0], v[0], cfg, (gain_k, gain_v))
    without = per_cell_attention(q[0], k[0], v[0], cfg, (torch.ones_like(gain_k), torch.ones_like(gain_v)))
    assert (expected - without).abs().max() > 0.05  # the variation changes the answer
    for path in PATHS + ("decoder",):
        torch.testing.assert_close(run(path, q, k, v, cfg)[0], expected, rtol=1e-12, atol=1e-13, msg=path)


# ------------------------------------------------------------------------------------------------
# variation: every path computes the same chip
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("ratio", [0.6, 2.5])
def test_streaming_equals_parallel_exactly_with_variation(cell, ratio):
    """Token t is written to ring row t mod M and meets that row's cells: the decoder's quantized outputs
    equal the parallel ones bit for bit (float64: rounding differences of 1e-16 never cross a level)."""
    cfg = chip_config(cell, cell_variation=0.2, noise_seed=11)
    q, k, v = inputs(2, 3, int(ratio * cfg.window), 16, seed=int(10 * ratio))
    for path in PATHS:
        parallel = analog_attention(q, k, v, cfg, implementation=path)
        assert torch.equal(stream(cfg, q, k, v), parallel), path
    identical_cells = analog_attention(q, k, v, dataclasses.replace(cfg, cell_variation=0.0))
    assert (parallel != identical_cells).float().mean() > 0.1  # the chip matters at this variation


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_blocked_forward_and_backward_equal_the_reference_with_variation(cell):
    cfg = chip_config(cell, cell_variation=0.2, noise_seed=5)
    q, k, v = inputs(2, 2, 90, 8, seed=8)
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = [outputs_and_gradients(lambda a, b, c: analog_attention(a, b, c, cfg, implementation=path), q, k, v, dy)
               for path in PATHS]
    assert_outputs_close(*results, "the blocked path")
    assert results[0][1].abs().max() > 0


@pytest.mark.parametrize("cell", ["linear", "exact"])
def test_reference_gradient_with_variation_passes_gradcheck(cell):
    """The dense path's autograd through the varied cells (quantizers off: they are straight-through)."""
    cfg = gradcheck_config(cell, cell_variation=0.3)
    q, k, v = (x.requires_grad_() for x in inputs(1, 2, 12, 3, seed=4))
    assert torch.autograd.gradcheck(lambda a, b, c: analog_attention_dense(a, b, c, cfg), (q, k, v))


def test_same_seed_same_chip_different_seed_different_chip():
    q, k, v = inputs(1, 2, 40, 8, seed=2)
    cfg = AnalogAttentionConfig(window=16, tile_rows=8, output_levels=None, cell_variation=0.1, noise_seed=1)
    assert_seed_decides(q, k, v, cfg, other_seed=2)


# ------------------------------------------------------------------------------------------------
# readout noise: fresh per readout, the same statistics on every path
# ------------------------------------------------------------------------------------------------
def _read_tiles(tokens, cfg):
    """Sub-tiles read for each query t: those holding a key, min(t // tile_rows + 1, M / tile_rows)."""
    t = torch.arange(tokens)
    return torch.clamp(t // cfg.tile_rows + 1, max=cfg.tiles).to(torch.float64)


@pytest.mark.parametrize("path", ["dense", "blocked", "decoder"])
def test_readout_noise_has_the_stated_statistics(path):
    """y_noisy - y_clean = the sum over the read sub-tiles of N(0, sigma^2) (output quantizer off, readouts
    far inside [-1, 1] so the ADC clamp never acts): divided by sigma * sqrt(tiles read) it is N(0, 1),
    independent across queries, columns and calls."""
    sigma = 0.01
    cfg = AnalogAttentionConfig(window=32, tile_rows=8, output_levels=None, av_saturation=400.0)
    noisy = dataclasses.replace(cfg, readout_noise=sigma, noise_seed=3)
    q, k, v = inputs(2, 2, 48, 16, seed=5)
    clean = run(path, q, k, v, cfg)
    assert clean.abs().max() < 0.2  # with 4 tiles, the noise (40 sigma away) never reaches the clamp
    scale = sigma * _read_tiles(48, cfg).sqrt()[:, None]
    z = torch.stack([(run(path, q, k, v, noisy) - clean) / scale for _ in range(4)])  # four calls
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n), f"mean {z.mean():.3g} over {n} readouts"
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n), f"std {z.std():.4f} over {n} readouts"
    # Fresh per readout: successive queries and successive calls are uncorrelated.
    for a, b in ((z[:, :, :, 1:], z[:, :, :, :-1]), (z[1:], z[:-1])):
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(a.numel()), f"correlation {r:.3g}"


def test_readout_noise_is_reproducible_from_its_seed():
    q, k, v = inputs(1, 2, 40, 8, seed=6)
    cfg = AnalogAttentionConfig(window=16, tile_rows=8, readout_noise=0.05, noise_seed=1)
    for path in PATHS + ("decoder",):
        reset_readout_noise()
        first, second = run(path, q, k, v, cfg), run(path, q, k, v, cfg)
        assert not torch.equal(first, second)  # fresh noise per call
        reset_readout_noise()
        assert torch.equal(run(path, q, k, v, cfg), first) and torch.equal(run(path, q, k, v, cfg), second)
        reset_readout_noise()
        assert not torch.equal(run(path, q, k, v, dataclasses.replace(cfg, noise_seed=2)), first)
    generator = torch.Generator().manual_seed(0)  # the decoder's own generator, when given
    a = stream(cfg, q, k, v, generator=generator)
    assert torch.equal(stream(cfg, q, k, v, generator=torch.Generator().manual_seed(0)), a)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_blocked_backward_redraws_the_forward_noise(cell):
    """gradcheck of the blocked function with one noise seed: its recomputing backward must see the same
    noisy readouts (hence the same ADC clamp masks) as its forward. The noise is large (0.3) and the
    readouts span the clamp, so different draws would give different gradients."""
    cfg = AnalogAttentionConfig(window=16, tile_rows=4, decay_per_step=1e-2, query_levels=None, stored_levels=None,
                                output_levels=None, qk_saturation=4.0, av_saturation=1.0, readout_noise=0.3,
                                cell_variation=0.2, **CELLS[cell])
    q, k, v = (x.requires_grad_() for x in inputs(1, 2, 24, 3, seed=9))
    y = _BlockedAnalogAttention.apply(q, k, v, cfg, 1234)
    assert torch.equal(y, _BlockedAnalogAttention.apply(q, k, v, cfg, 1234))
    assert ((y - _BlockedAnalogAttention.apply(q, k, v, cfg, 99)).abs() > 1e-3).any()
    clean = analog_attention_dense(q, k, v, dataclasses.replace(cfg, readout_noise=0.0)).detach()
    assert (clean.abs() > 0.5).any()  # readouts reach the clamp region
    if cfg.nonlinear and not cfg.exact_nonlinear_grad:
        pytest.skip("the surrogate gradient is not the forward's derivative (docs/attention.md#gradients)")
    assert torch.autograd.gradcheck(lambda a, b, c: _BlockedAnalogAttention.apply(a, b, c, cfg, 1234), (q, k, v))


def test_readout_noise_streams_are_independent_per_seed():
    reset_readout_noise()
    a = [noise_module.next_readout_seed(AnalogAttentionConfig(noise_seed=1)) for _ in range(3)]
    b = noise_module.next_readout_seed(AnalogAttentionConfig(noise_seed=2))
    assert len(set(a)) == 3 and b not in a
    reset_readout_noise()
    assert noise_module.next_readout_seed(AnalogAttentionConfig(noise_seed=1)) == a[0]
