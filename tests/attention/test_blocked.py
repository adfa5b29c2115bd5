"""The blocked (banded) CPU path equals the dense reference: forward and dq, dk, dv, every cell model.

The reference (``analog_attention_dense``) materialises T x T and loops over sub-tiles; the blocked path
never does. Equality in float64 to 1e-12 is the contract (the two only differ in summation order).
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gaincell.attention import PAPER_COEFFICIENTS, AnalogAttentionConfig, analog_attention
from gaincell.attention import blocked as blocked_module
from gaincell.attention.blocked import analog_attention_blocked
from gaincell.attention.functional import resolve_implementation
from gaincell.attention.reference import analog_attention_dense


def make_inputs(B, H, T, D, dtype=torch.float64, seed=0):
    """q~, k~, v~ that hit every clamp: some below 0 / above the range, keys and values with per-token
    offsets so that pulses saturate for some keys and sub-tile outputs clamp for some queries."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    q = r(B, H, T, D) * 1.2 - 0.1
    k = r(B, H, T, D) * 1.1 - 0.1 + 0.3 * r(B, H, T, 1)
    v = r(B, H, T, D) * 1.1 - 0.1 + 0.4 * (r(B, H, T, 1) - 0.5)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_config(window, tile_rows, head_dim, **kw):
    """Saturations scaled with D and the tile size, so small test shapes sit in the paper's regime
    (some pulses saturated, some sub-tile readouts clamped) rather than all in the linear range."""
    kw.setdefault("qk_saturation", 80.0 * head_dim / 64)
    kw.setdefault("av_saturation", 40.0 * tile_rows / 32)
    return AnalogAttentionConfig(window=window, tile_rows=tile_rows, **kw)


def forward_backward(fn, q, k, v, cfg, dy):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    y = fn(q, k, v, cfg)
    (y * dy).sum().backward()
    return y.detach(), q.grad, k.grad, v.grad


NONLINEAR = dict(coefficients=PAPER_COEFFICIENTS)
CASES = {
    # name: (T, window, tile_rows, D, extra config)
    "linear_T>window_ragged": (150, 64, 16, 7, dict(decay_per_step=1e-2)),
    "surrogate_T>window_ragged": (150, 64, 16, 7, dict(NONLINEAR, decay_per_step=1e-2)),
    "exact_T>window_ragged": (150, 64, 16, 7, dict(NONLINEAR, exact_nonlinear_grad=True, decay_per_step=1e-2)),
    "linear_T<window": (100, 256, 32, 5, dict(decay_per_step=0.0)),
    "exact_T<window": (70, 128, 16, 3, dict(NONLINEAR, exact_nonlinear_grad=True)),
    "linear_window=one_tile": (53, 16, 16, 4, dict(decay_per_step=0.05)),
    "exact_paper_tile64": (200, 128, 64, 64, dict(NONLINEAR, exact_nonlinear_grad=True)),
    "surrogate_no_quantizers": (90, 32, 16, 6, dict(NONLINEAR, query_levels=None, stored_levels=None,
                                                     output_levels=None, decay_per_step=1e-3)),
    "linear_single_token": (1, 64, 16, 5, dict()),
}


@pytest.mark.parametrize("name", list(CASES))
def test_blocked_equals_dense_reference_forward_and_gradients(name):
    T, window, tile_rows, D, extra = CASES[name]
    cfg = make_config(window, tile_rows, D, **extra)
    q, k, v = make_inputs(2, 2, T, D)
    dy = torch.randn(2, 2, T, D, dtype=torch.float64)
    expected = forward_backward(analog_attention_dense, q, k, v, cfg, dy)
    got = forward_backward(analog_attention_blocked, q, k, v, cfg, dy)
    for label, e, g in zip(("y", "dq", "dk", "dv"), expected, got):
        scale = max(1.0, e.abs().max().item())
        assert torch.allclose(g, e, rtol=0, atol=1e-12 * scale), \
            f"{name}: {label} differs by {(g - e).abs().max().item():.3e}"
    if T > 1:  # the comparison is not vacuous: outputs and every gradient carry signal
        assert all(x.abs().max() > 1e-3 for x in expected)


def test_inputs_exercise_every_clamp():
    """The shapes above hit the HardSigmoid at both ends and the sub-tile readout clamp."""
    T, window, tile_rows, D, extra = CASES["surrogate_T>window_ragged"]
    cfg = make_config(window, tile_rows, D, **extra)
    q, k, v = make_inputs(2, 2, T, D)
    band = blocked_module._band(T, cfg, q.dtype, q.device)
    ops = blocked_module._Operands(q, k, v, cfg, band)
    pulses, outputs = [], []
    for delta in range(band.max_lag + 1):
        st = blocked_module._lag_forward(ops, band, cfg, delta, need_grad=False)
        mask = band.lags[delta].window_mask
        inside = mask.expand_as(st.P) if mask is not None else torch.ones_like(st.P, dtype=torch.bool)
        pulses.append(st.P[inside])
        outputs.append(st.A.flatten())
    P, A = torch.cat(pulses), torch.cat(outputs)
    assert 0.05 < (P == 0).double().mean() < 0.95
    assert 0.05 < (P == 1).double().mean() < 0.95
    assert 0.05 < (A.abs() > 1).double().mean() < 0.95


def test_merged_subtile_matters():
    """For T > window with a ragged excess, lags 0 and M/n share a sub-tile: reading them through two
    separate counters (the wrong model) changes the result, so the equality above is informative."""
    T, window, tile_rows, D, extra = CASES["linear_T>window_ragged"]
    cfg = make_config(window, tile_rows, D, **extra)
    q, k, v = make_inputs(1, 2, T, D)
    right = analog_attention_blocked(q, k, v, cfg)
    band = blocked_module._band(T, cfg, q.dtype, q.device)
    assert band.merged
    ops = blocked_module._Operands(q, k, v, cfg, band)
    wrong = torch.zeros_like(ops.Q)
    for delta in range(band.max_lag + 1):  # every lag through its own counter
        A = blocked_module._lag_forward(ops, band, cfg, delta, need_grad=False).A
        wrong[delta:] += blocked_module._readout_(A, cfg)
    wrong = blocked_module._from_blocks(wrong, q.shape)
    assert (wrong - right).abs().max() > 0.05


def test_float32_and_half_inputs():
    T, window, tile_rows, D, extra = CASES["surrogate_T>window_ragged"]
    cfg = make_config(window, tile_rows, D, **extra)
    q, k, v = make_inputs(1, 2, T, D, dtype=torch.float32)
    y_ref, y = analog_attention_dense(q, k, v, cfg), analog_attention_blocked(q, k, v, cfg)
    assert y.dtype == torch.float32
    # Float32 rounding order may flip a readout level (2/31) in rare elements, never more.
    diff = (y - y_ref).abs()
    assert (diff > 1e-5).double().mean() < 1e-3 and diff.max() < 3 * 2 / 31
    yb = analog_attention_blocked(q.bfloat16(), k.bfloat16(), v.bfloat16(), cfg)
    assert yb.dtype == torch.bfloat16
    yb_ref = analog_attention_dense(q.bfloat16(), k.bfloat16(), v.bfloat16(), cfg)
    assert (yb.float() - yb_ref.float()).abs().max() < 3 * 2 / 31


def test_autocast_does_not_lower_the_precision():
    """Under CPU bf16 autocast the products still run in float32 (same result as without)."""
    T, window, tile_rows, D, extra = CASES["surrogate_T>window_ragged"]
    cfg = make_config(window, tile_rows, D, **extra)
    q, k, v = (x.requires_grad_() for x in make_inputs(1, 2, T, D, dtype=torch.float32))
    y = analog_attention_blocked(q, k, v, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_autocast = analog_attention_blocked(q, k, v, cfg)
    assert y_autocast.dtype == torch.float32 and torch.equal(y, y_autocast)
    (g,) = torch.autograd.grad(y.sum(), q)
    (g_autocast,) = torch.autograd.grad(y_autocast.sum(), q)
    assert torch.equal(g, g_autocast)


def test_gradcheck_against_finite_differences():
    """Independent of the reference: the custom backward is the derivative (quantizers off, so the
    function is piecewise smooth; linear cell and the exact nonlinear gradient)."""
    for extra in (dict(), dict(NONLINEAR, exact_nonlinear_grad=True)):
        cfg = make_config(32, 16, 3, query_levels=None, stored_levels=None, output_levels=None,
                          decay_per_step=0.02, **extra)
        q, k, v = (x.requires_grad_() for x in make_inputs(1, 1, 40, 3, seed=3))
        assert torch.autograd.gradcheck(lambda a, b, c: analog_attention_blocked(a, b, c, cfg), (q, k, v),
                                        eps=1e-6, atol=1e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_linear_in_T_and_no_T_by_T_tensor():
    cfg = make_config(64, 16, 8)
    largest = {}
    for T in (512, 2048):
        q, k, v = (x.requires_grad_() for x in make_inputs(1, 1, T, 8))
        with _LargestTensor() as probe:
            analog_attention_blocked(q, k, v, cfg).sum().backward()
        largest[T] = probe.largest
        assert probe.largest < T * T / 8, f"T={T}: a tensor of {probe.largest} elements (T^2 = {T * T})"
    assert largest[2048] <= 4 * largest[512] * 1.01  # grows like T, not T^2


def test_auto_dispatch_uses_blocked_on_cpu():
    assert resolve_implementation("auto", on_cuda=False) == "blocked"
    cfg = make_config(32, 16, 4)
    q, k, v = make_inputs(1, 1, 50, 4)
    assert torch.equal(analog_attention(q, k, v, cfg), analog_attention_blocked(q, k, v, cfg))


def test_bad_input_is_rejected():
    cfg = make_config(32, 16, 4)
    q, k, v = make_inputs(1, 1, 40, 4)
    with pytest.raises(ValueError, match="shapes differ"):
        analog_attention_blocked(q, k[:, :, :30], v, cfg)
    with pytest.raises(ValueError, match="NaN"):
        analog_attention_blocked(q.clone().fill_(math.nan), k, v, cfg)


@pytest.mark.parametrize("name", ["linear_T>window_ragged", "surrogate_T>window_ragged", "exact_T>window_ragged",
                                  "exact_T<window"])
def test_saved_and_recomputed_backward_agree_with_the_reference(name, monkeypatch):
    """The backward either keeps each lag's operands from the forward or recomputes them
    (``SAVED_SLABS_MAX_RATIO``): both are the reference's gradient, and they are the same numbers."""
    T, window, tile_rows, D, extra = CASES[name]
    cfg = make_config(window, tile_rows, D, **extra)
    q, k, v = make_inputs(2, 2, T, D)
    dy = torch.randn(2, 2, T, D, dtype=torch.float64)
    expected = forward_backward(analog_attention_dense, q, k, v, cfg, dy)
    results = {}
    for ratio in (0.0, math.inf):
        monkeypatch.setattr(blocked_module, "SAVED_SLABS_MAX_RATIO", ratio)
        band = blocked_module._band(T, cfg, q.dtype, q.device)
        assert blocked_module._saves_slabs(band, cfg, q) == (ratio > 0)
        results[ratio] = forward_backward(analog_attention_blocked, q, k, v, cfg, dy)
        for label, e, g in zip(("y", "dq", "dk", "dv"), expected, results[ratio]):
            scale = max(1.0, e.abs().max().item())
            assert torch.allclose(g, e, rtol=0, atol=1e-12 * scale), f"{name} ratio {ratio}: {label}"
    assert all(torch.equal(a, b) for a, b in zip(results[0.0], results[math.inf]))
