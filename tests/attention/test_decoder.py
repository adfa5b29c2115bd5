"""The streaming decoder (gain-cell K/V arrays as a ring buffer) against the parallel computation."""
from __future__ import annotations

import math

import pytest
import torch

from gaincell.attention import AnalogAttentionConfig, AnalogKVDecoder, analog_attention
from gaincell.attention.config import PAPER_COEFFICIENTS

OUTPUT_STEP = 2.0 / 31.0  # one level of the 32-level pulse counter on [-1, 1] (docs/attention.md#quantization)


def _inputs(batch, heads, tokens, dim, seed):
    """Scaled inputs spread over (and a little beyond) the DAC ranges, so that clamps, several
    quantization levels and both signs of the stored weights all occur."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(batch, heads, tokens, dim, generator=g) * 1.1 - 0.05
    k = 0.45 + 0.3 * torch.randn(batch, heads, tokens, dim, generator=g)
    v = 0.45 + 0.3 * torch.randn(batch, heads, tokens, dim, generator=g)
    return q, k, v


def _stream(cfg, q, k, v, **kwargs):
    batch, heads, tokens, dim = q.shape
    decoder = AnalogKVDecoder(cfg, batch=batch, heads=heads, head_dim=dim, **kwargs)
    return torch.stack([decoder.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(tokens)], dim=2)


CELLS = {"linear": None, "nonlinear": PAPER_COEFFICIENTS}


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("ratio", [1.5, 3.0])
def test_streaming_equals_parallel_quantized(cell, ratio):
    """Token by token over 1.5x and 3x the window (ring buffer wrapped, slots t' mod M in their sub-tiles,
    leakage on): identical quantized outputs, except where float rounding flips one level."""
    # A strong leakage (alpha falls to ~0.5 across the window) so that wrong ages would show.
    cfg = AnalogAttentionConfig(window=64, tile_rows=16, decay_per_step=1e-2, coefficients=CELLS[cell])
    tokens = int(ratio * cfg.window)
    q, k, v = _inputs(2, 3, tokens, 32, seed=int(ratio * 10) + len(cell))
    parallel = analog_attention(q, k, v, cfg)
    streamed = _stream(cfg, q, k, v)
    assert streamed.shape == parallel.shape
    # The test must see real signal: most outputs non-zero, several levels in use.
    assert (parallel != 0).float().mean() > 0.5
    assert parallel.abs().max() > 3 * OUTPUT_STEP
    diff = (streamed - parallel).abs()
    flipped = diff > 1e-5
    assert flipped.float().mean() <= 1e-3, f"{int(flipped.sum())} of {diff.numel()} outputs differ"
    assert diff.max() <= OUTPUT_STEP + 1e-5, f"largest difference {diff.max():.4g} exceeds one level"


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_streaming_equals_parallel_unquantized_float(cell):
    """Without the quantizers the two computations agree to float rounding."""
    cfg = AnalogAttentionConfig(window=64, tile_rows=16, decay_per_step=5e-3, coefficients=CELLS[cell],
                                query_levels=None, stored_levels=None, output_levels=None)
    q, k, v = _inputs(1, 2, 150, 16, seed=7)
    parallel = analog_attention(q, k, v, cfg)
    streamed = _stream(cfg, q, k, v)
    torch.testing.assert_close(streamed, parallel, rtol=1e-5, atol=1e-6)


def test_window_evicts_the_oldest_key_and_leakage_ages_it():
    """Closed form, one head: a key is seen for exactly M steps, attenuated by exp(-lambda * age)."""
    window, dim, decay = 16, 8, 0.05
    # Stored levels off: the 0.45 V offset is not one of the 8 DAC levels.
    cfg = AnalogAttentionConfig(window=window, tile_rows=8, decay_per_step=decay, stored_levels=None,
                                output_levels=None)
    decoder = AnalogKVDecoder(cfg, batch=1, heads=1, head_dim=dim)
    query = torch.ones(1, 1, dim)
    # Token 0 stores K = V = 0.9 V (W = U = 0.45 V); every later token stores the offset (W = U = 0).
    high, mid = torch.full((1, 1, dim), 0.9), torch.full((1, 1, dim), 0.45)
    outputs = [decoder.step(query, high, high)]
    outputs += [decoder.step(query, mid, mid) for _ in range(window + 2)]
    g = cfg.gain
    for age, y in enumerate(outputs):
        alpha = math.exp(-decay * age)
        pulse = min(max(g * alpha * dim * 0.45 / cfg.qk_saturation, 0.0), 1.0)
        expected = g / cfg.av_saturation * pulse * alpha * 0.45 if age < window else 0.0
        assert y[0, 0, 0].item() == pytest.approx(expected, rel=1e-5, abs=1e-7), f"age {age}"
    assert decoder.steps == window + 3 and decoder.write_pointer == 3 and decoder.filled_slots == window


def test_single_token_closed_form_quantized():
    """Spec §2-§6 by hand for one token, D = 8, full-scale key and value: y = round(A / step) * step."""
    cfg = AnalogAttentionConfig(window=64, decay_per_step=0.0)
    decoder = AnalogKVDecoder(cfg, batch=1, heads=1, head_dim=8)
    q = torch.full((1, 1, 8), 0.97)  # quantizes to 1.0 (16 levels on [0, 1])
    k = torch.full((1, 1, 8), 0.88)  # quantizes to 0.9 V (8 levels on [0, 0.9])
    y = decoder.step(q, k, k)
    charge = 19.3 * 8 * 1.0 * 0.45
    readout = 19.3 / 40 * (charge / 80) * 0.45
    expected = round(readout / OUTPUT_STEP) * OUTPUT_STEP
    assert expected == pytest.approx(6 / 31)
    torch.testing.assert_close(y, torch.full((1, 1, 8), expected))


def test_nonlinear_key_independent_term_reads_empty_keys_as_zero():
    """The i = 0 term c_0 * sum_d Q is present for stored keys only; slots never written read 0."""
    cfg = AnalogAttentionConfig(window=32, tile_rows=8, coefficients=PAPER_COEFFICIENTS,
                                decay_per_step=0.0, stored_levels=None, output_levels=None)
    decoder = AnalogKVDecoder(cfg, batch=1, heads=1, head_dim=4)
    q = torch.full((1, 1, 4), 0.4)
    mid = torch.full((1, 1, 4), 0.45)  # W = U = 0: only the i = 0 terms remain
    y = decoder.step(q, mid, mid)
    c0 = cfg.folded_coefficients[0]
    q_level = round(0.4 / (1 / 15)) / 15
    pulse = min(c0 * 4 * q_level / cfg.qk_saturation, 1.0)
    torch.testing.assert_close(y, torch.full((1, 1, 4), c0 * pulse / cfg.av_saturation))


def test_batch_and_heads_are_independent():
    cfg = AnalogAttentionConfig(window=32, tile_rows=8, decay_per_step=1e-3)
    q, k, v = _inputs(2, 2, 40, 8, seed=3)
    together = _stream(cfg, q, k, v)
    for b in range(2):
        for h in range(2):
            alone = _stream(cfg, q[b:b + 1, h:h + 1], k[b:b + 1, h:h + 1], v[b:b + 1, h:h + 1])
            torch.testing.assert_close(together[b:b + 1, h:h + 1], alone)


def test_reset_starts_a_new_sequence():
    cfg = AnalogAttentionConfig(window=32, tile_rows=8)
    q, k, v = _inputs(1, 1, 20, 8, seed=4)
    decoder = AnalogKVDecoder(cfg, batch=1, heads=1, head_dim=8)
    first = [decoder.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(20)]
    decoder.reset()
    assert decoder.steps == 0
    second = [decoder.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(20)]
    torch.testing.assert_close(torch.stack(first), torch.stack(second))


def test_float64_state_follows_the_inputs():
    cfg = AnalogAttentionConfig(window=32, tile_rows=8, output_levels=None)
    q, k, v = (x.double() for x in _inputs(1, 1, 10, 8, seed=5))
    y = _stream(cfg, q, k, v)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, analog_attention(q, k, v, cfg))


def test_wrong_heads_dim_batch_and_max_steps_fail_clearly():
    cfg = AnalogAttentionConfig(window=32, tile_rows=8)
    decoder = AnalogKVDecoder(cfg, batch=2, heads=3, head_dim=8, max_steps=2)
    ok = torch.rand(2, 3, 8)
    with pytest.raises(ValueError, match="4 heads.*heads=3"):
        decoder.step(torch.rand(2, 4, 8), ok, ok)
    with pytest.raises(ValueError, match="head dimension 16.*head_dim=8"):
        decoder.step(ok, torch.rand(2, 3, 16), ok)
    with pytest.raises(ValueError, match="batch 1.*batch=2"):
        decoder.step(ok, ok, torch.rand(1, 3, 8))
    with pytest.raises(ValueError, match="expected one token"):
        decoder.step(torch.rand(2, 3, 5, 8), ok, ok)
    decoder.step(ok, ok, ok)
    decoder.step(ok, ok, ok)
    with pytest.raises(RuntimeError, match="step 3 exceeds.*max_steps=2"):
        decoder.step(ok, ok, ok)
    with pytest.raises(ValueError, match="heads=0"):
        AnalogKVDecoder(cfg, batch=1, heads=0, head_dim=8)
    with pytest.raises(ValueError, match="max_steps=0"):
        AnalogKVDecoder(cfg, batch=1, heads=1, head_dim=8, max_steps=0)


def test_nan_input_is_refused_at_once_on_cpu():
    cfg = AnalogAttentionConfig(window=16, tile_rows=8)
    decoder = AnalogKVDecoder(cfg, batch=1, heads=2, head_dim=4)
    ok = torch.full((1, 2, 4), 0.5)
    decoder.step(ok, ok, ok)
    bad = ok.clone()
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"step 1: q, k or v contains NaN \(q 0, k 1, v 0 values\)"):
        decoder.step(ok, bad, ok)
    assert decoder.steps == 1  # nothing was written


def test_nan_flag_on_an_accelerator_is_read_lazily_and_names_the_step():
    """Off the CPU the step only records the first bad step in a device flag (no host synchronisation);
    ``check_finite`` reads it. Exercised on CPU by switching the decoder to the deferred check."""
    cfg = AnalogAttentionConfig(window=16, tile_rows=8)
    decoder = AnalogKVDecoder(cfg, batch=1, heads=2, head_dim=4)
    ok = torch.full((1, 2, 4), 0.5)
    decoder.step(ok, ok, ok)
    decoder._defer_nan_check = True
    decoder.check_finite()
    bad = ok.clone()
    bad[0, 0, 0] = float("nan")
    for x in (ok, bad, ok, bad):  # steps 1..4: the first bad one is step 2
        decoder.step(x, ok, ok)
    with pytest.raises(ValueError, match="inputs of step 2 .* contain NaN"):
        decoder.check_finite()
    decoder.reset()
    decoder.step(ok, ok, ok)
    decoder.check_finite()  # a new sequence starts clean


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("variation", [0.0, 0.1])
@pytest.mark.parametrize("gathers", [True, False])
def test_prefill_equals_token_by_token_exactly(cell, variation, gathers, monkeypatch):
    """``prefill`` of a prompt (in several chunks, after earlier steps, past the window) gives exactly the
    outputs and the state of stepping the same tokens one by one."""
    from gaincell.attention import decoder as decoder_module

    cfg = AnalogAttentionConfig(window=32, tile_rows=8, decay_per_step=1e-2, coefficients=CELLS[cell],
                                cell_variation=variation, noise_seed=4)
    q, k, v = _inputs(2, 3, 90, 16, seed=11)
    stepped = AnalogKVDecoder(cfg, batch=2, heads=3, head_dim=16)
    expected = torch.stack([stepped.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(90)], dim=2)
    # chunks of 7 tokens: a chunk boundary inside the window and the wrap-around
    monkeypatch.setattr(decoder_module, "PREFILL_CHUNK_ELEMENTS", 7 * len(CELLS) * 2 * 3 * 32 * 16)
    monkeypatch.setattr(decoder_module, "PREFILL_GATHERS_ON_CPU", gathers)  # True: the accelerators' path
    filled = AnalogKVDecoder(cfg, batch=2, heads=3, head_dim=16)
    first = torch.stack([filled.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(5)], dim=2)
    got = torch.cat([first, filled.prefill(q[:, :, 5:60], k[:, :, 5:60], v[:, :, 5:60]),
                     filled.prefill(q[:, :, 60:], k[:, :, 60:], v[:, :, 60:])], dim=2)
    assert (expected != 0).float().mean() > 0.5
    assert torch.equal(got, expected)
    assert filled.steps == stepped.steps == 90
    assert torch.equal(filled._stored_k, stepped._stored_k) and torch.equal(filled._stored_v, stepped._stored_v)
    # and the next step after a prefill equals the next step after stepping
    x = torch.full((2, 3, 16), 0.4)
    assert torch.equal(filled.step(x, x, x), stepped.step(x, x, x))


def test_prefill_rejects_wrong_shapes_and_respects_max_steps():
    cfg = AnalogAttentionConfig(window=16, tile_rows=8)
    decoder = AnalogKVDecoder(cfg, batch=1, heads=2, head_dim=4, max_steps=10)
    with pytest.raises(ValueError, match="prefill takes q, k, v of shape"):
        decoder.prefill(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))
    x = torch.full((1, 2, 11, 4), 0.5)
    with pytest.raises(RuntimeError, match="exceeds this decoder's max_steps=10"):
        decoder.prefill(x, x, x)
    assert decoder.steps == 0


@pytest.mark.parametrize("levels, lo, hi", [(32, -1.0, 1.0), (33, -1.0, 1.0), (8, 0.0, 0.9), (16, 0.0, 1.0),
                                            (6, -0.3, 0.3), (11, -0.8, 0.8), (16, -1.1, 1.1), (7, 0.1, 0.9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_converter_without_its_first_clamp_only_where_that_changes_nothing(levels, lo, hi, dtype):
    """``_first_clamp_redundant`` allows skipping the input clamp of a quantizer only where the result is
    the clamped quantizer's for every input: checked on values dense around both ends and far outside;
    and it must say False for converters where skipping would change an output (some are such)."""
    from gaincell.attention.decoder import _converter, _first_clamp_redundant, _quantize_

    converter = _converter(levels, lo, hi, dtype, "cpu")
    span = hi - lo
    x = torch.cat([torch.linspace(lo - 2 * span, hi + 2 * span, 20001, dtype=dtype),
                   torch.tensor([lo, hi, 0.0, -0.0, float("inf"), -float("inf")], dtype=dtype),
                   torch.nextafter(torch.tensor([lo, hi], dtype=dtype), torch.tensor([-9.0, 9.0], dtype=dtype))])
    clamped = _quantize_(x.clone(), converter, clamp_first=True)
    unclamped = _quantize_(x.clone(), converter, clamp_first=False)
    same = torch.equal(clamped, unclamped) and torch.equal(torch.signbit(clamped), torch.signbit(unclamped))
    assert same == _first_clamp_redundant(converter)


def test_some_converters_need_their_first_clamp():
    """The check is not vacuous: some converters need their first clamp (a bound at 0 always does)."""
    from gaincell.attention.decoder import _converter, _first_clamp_redundant

    assert not _first_clamp_redundant(_converter(8, 0.0, 0.9, torch.float32, "cpu"))
    assert not _first_clamp_redundant(_converter(6, -0.3, 0.3, torch.float32, "cpu"))  # 0.3 -> 2.5 -> 2 levels
    assert _first_clamp_redundant(_converter(32, -1.0, 1.0, torch.float32, "cpu"))


@pytest.mark.parametrize("settings", [{}, dict(stored_max=1.0, stored_levels=9, query_levels=17),
                                      dict(stored_levels=6, stored_max=0.3, stored_offset=0.15),
                                      dict(stored_offset=0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_dac_equals_the_reference_converters_bit_for_bit(settings, dtype):
    """The decoder's one-pass DAC (its first clamp skipped where redundant) gives the reference's
    Q, K - offset, V - offset exactly, sign of zero included, for inputs far outside the ranges."""
    from gaincell.attention.reference import dac_inputs

    cfg = AnalogAttentionConfig(window=16, tile_rows=8, **settings)
    decoder = AnalogKVDecoder(cfg, batch=1, heads=1, head_dim=8)
    x = torch.linspace(-1.5, 2.5, 4001, dtype=dtype)
    x = torch.cat([x, -x, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-30, -1e-30], dtype=dtype)])
    decoder.step(*(torch.zeros(1, 1, 8, dtype=dtype),) * 3)  # allocates the state in ``dtype``
    got = decoder._dac_inputs_(torch.stack([x, x, x]).view(3, 1, 1, -1).clone())
    query, key, value = dac_inputs(x, x, x, cfg)
    expected = torch.stack([query, key - cfg.stored_offset, value - cfg.stored_offset]).view(3, 1, 1, -1)
    assert torch.equal(got, expected)
    assert torch.equal(torch.signbit(got), torch.signbit(expected))
