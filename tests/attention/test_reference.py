"""The dense analog attention (gaincell.attention.reference) against the spec, written independently.

``loop_reference`` below re-derives eq. 3 to 7 and the converters (docs/attention.md) in float64 NumPy with explicit loops over queries t,
keys t' and sub-tiles (no T x T matrices, no shared code with the library), and ``loop_backward`` the
linear model's backward (docs/attention.md#gradients) the same way.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gaincell.attention import PAPER_COEFFICIENTS, AnalogAttentionConfig, analog_attention, functional
from gaincell.attention.quantize import clamp_quantize, quantization_levels, quantize, straight_through
from gaincell.attention.reference import (
    analog_attention_dense,
    hard_sigmoid,
    key_array_product,
    leakage,
    subtile_of_key,
    value_array_product,
    window_mask,
)

# Spec §10 order of the ten coefficients, re-typed here so the test does not reuse the library's table.
SPEC_ORDER = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (3, 0)]


# ------------------------------------------------------------------------------------------------
# independent float64 model: scalar / per-row loops
# ------------------------------------------------------------------------------------------------
def q_scalar(x: float, levels, lo: float, hi: float) -> float:
    """Spec §2 for one number: clamp, then clamp(step * round(x / step)), round half to even."""
    x = min(max(x, lo), hi)
    if levels is None:
        return x
    k = round(x * (levels - 1) / (hi - lo))  # Python round: half to even
    return min(max(k * (hi - lo) / (levels - 1), lo), hi)


def folded(cfg: AnalogAttentionConfig):
    """c_i per eq. 4; the linear cell as the polynomial (0, g, 0, 0) is NOT used: the loops below
    branch on the model instead, to stay independent of the library's folding."""
    c = [0.0] * 4
    for (i, j), value in zip(SPEC_ORDER, cfg.coefficients):
        c[i] += value * cfg.read_voltage ** j
    return c


def forward_tensors(q, k, v, cfg):
    """Forward pass of one head, q/k/v (T, D) float64 arrays. Returns y and the activations."""
    T, D = q.shape
    M, lam, off = cfg.window, cfg.decay_per_step, cfg.stored_offset
    Q = np.vectorize(lambda x: q_scalar(x, cfg.query_levels, 0.0, 1.0))(q)
    K = np.vectorize(lambda x: q_scalar(x, cfg.stored_levels, 0.0, cfg.stored_max))(k)
    V = np.vectorize(lambda x: q_scalar(x, cfg.stored_levels, 0.0, cfg.stored_max))(v)
    W, U = K - off, V - off
    c = folded(cfg) if cfg.coefficients is not None else None
    S, P = {}, {}
    A = {}  # (t, tile) -> (D,) unclamped sub-tile output
    y = np.zeros((T, D))
    for t in range(T):
        tiles = {}
        for tp in range(max(0, t - M + 1), t + 1):
            a = math.exp(-lam * (t - tp))
            if c is None:
                s = cfg.gain * a * float(np.dot(Q[t], W[tp]))
            else:
                s = sum(c[i] * a ** i * float(np.dot(Q[t], W[tp] ** i)) for i in range(4))
            p = min(max(s / cfg.qk_saturation, 0.0), 1.0)
            S[t, tp], P[t, tp] = s, p
            r = (tp % M) // cfg.tile_rows
            if c is None:
                contribution = cfg.gain / cfg.av_saturation * p * a * U[tp]
            else:
                contribution = sum(c[i] * p * a ** i * U[tp] ** i for i in range(4)) / cfg.av_saturation
            tiles[r] = tiles.get(r, 0.0) + contribution
        for r, a_r in tiles.items():
            A[t, r] = a_r
            y[t] += np.array([q_scalar(x, cfg.output_levels, -1.0, 1.0) for x in a_r])
    return y, dict(Q=Q, K=K, V=V, W=W, U=U, S=S, P=P, A=A)


def loop_reference(q, k, v, cfg):
    """(B, H, T, D) torch -> (B, H, T, D) float64 NumPy via ``forward_tensors`` per head."""
    q, k, v = (x.detach().double().numpy() for x in (q, k, v))
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            out[b, h] = forward_tensors(q[b, h], k[b, h], v[b, h], cfg)[0]
    return out


def loop_backward(q, k, v, cfg, dy):
    """Spec §8 backward of the LINEAR model (slope g) at the forward activations of ``cfg``'s model:
    exact for linear_hw, the surrogate for nonlinear_hw. One head, (T, D) arrays."""
    T, D = q.shape
    _, act = forward_tensors(q, k, v, cfg)
    g, M, lam = cfg.gain, cfg.window, cfg.decay_per_step
    Q, W, U = act["Q"], act["W"], act["U"]
    dQ, dW, dU = np.zeros((T, D)), np.zeros((T, D)), np.zeros((T, D))
    for t in range(T):
        for tp in range(max(0, t - M + 1), t + 1):
            a = math.exp(-lam * (t - tp))
            a_r = act["A"][t, (tp % M) // cfg.tile_rows]
            dA = dy[t] * ((a_r >= -1) & (a_r <= 1))  # output clamp; the quantizer is straight-through
            dP = g / cfg.av_saturation * a * float(np.dot(U[tp], dA))
            dU[tp] += g / cfg.av_saturation * act["P"][t, tp] * a * dA
            s = act["S"][t, tp]
            dS = dP / cfg.qk_saturation * (0 <= s <= cfg.qk_saturation)
            dQ[t] += g * a * dS * W[tp]
            dW[tp] += g * a * dS * Q[t]
    dq = dQ * ((q >= 0) & (q <= 1))
    dk = dW * ((k >= 0) & (k <= cfg.stored_max))
    dv = dU * ((v >= 0) & (v <= cfg.stored_max))
    return dq, dk, dv


def random_inputs(B, H, T, D, seed=0, dtype=torch.float64):
    """q~ around [0, 1] and k~, v~ around [0, 0.9], each reaching past its clamp range."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.rand(B, H, T, D, generator=gen, dtype=dtype) * 1.3 - 0.1
    k = torch.rand(B, H, T, D, generator=gen, dtype=dtype) * 1.1 - 0.1
    v = torch.rand(B, H, T, D, generator=gen, dtype=dtype) * 1.1 - 0.1
    return q, k, v


def small_cfg(nonlinear: bool, quantized: bool, leaky: bool, **kw) -> AnalogAttentionConfig:
    """Small window (4 sub-tiles of 4 keys) with saturations scaled to D = 5 so that every regime
    (HardSigmoid 0 / linear / 1, output clamp, several output levels) occurs."""
    base = dict(window=16, tile_rows=4, qk_saturation=3.0, av_saturation=1.5,
                decay_per_step=0.05 if leaky else 0.0,
                coefficients=PAPER_COEFFICIENTS if nonlinear else None)
    if not quantized:
        base.update(query_levels=None, stored_levels=None, output_levels=None)
    base.update(kw)
    return AnalogAttentionConfig(**base)


# ------------------------------------------------------------------------------------------------
# every model against the loops
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [11, 30], ids=["T<=window", "T>window"])
@pytest.mark.parametrize("leaky", [False, True], ids=["no-leak", "leak"])
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quant"])
@pytest.mark.parametrize("nonlinear", [False, True], ids=["linear_hw", "nonlinear_hw"])
def test_dense_matches_loops(nonlinear, quantized, leaky, T):
    cfg = small_cfg(nonlinear, quantized, leaky)
    q, k, v = random_inputs(1, 2, T, 5, seed=T + 7 * nonlinear)
    y = analog_attention_dense(q, k, v, cfg)
    expected = loop_reference(q, k, v, cfg)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert np.abs(expected).max() > 0.2  # the case is not trivially zero


def test_dense_matches_loops_paper_defaults_float32():
    """Paper's values (D = 64, tiles of 64 keys) and a sequence longer than the window, in float32."""
    cfg = AnalogAttentionConfig(window=128, tile_rows=64, coefficients=PAPER_COEFFICIENTS, decay_per_step=1e-3)
    q, k, v = random_inputs(1, 1, 150, 64, seed=3, dtype=torch.float32)
    y = analog_attention_dense(q, k, v, cfg)
    assert y.dtype == torch.float32
    expected = loop_reference(q, k, v, cfg)
    # float32 sums may flip an output level at a rounding boundary: allow one level on a few entries.
    diff = np.abs(y.numpy() - expected)
    assert (diff > 1e-4).mean() < 0.01 and diff.max() <= 2 / 31 + 1e-4
    assert np.unique(expected).size > 10


@pytest.mark.parametrize("D", [1, 3, 7])
def test_any_head_dim(D):
    cfg = small_cfg(nonlinear=True, quantized=True, leaky=True, qk_saturation=0.8, av_saturation=0.4)
    q, k, v = random_inputs(2, 1, 9, D, seed=D)
    np.testing.assert_allclose(analog_attention_dense(q, k, v, cfg).numpy(), loop_reference(q, k, v, cfg),
                               rtol=1e-9, atol=1e-12)


def test_half_precision_inputs_computed_in_float32():
    cfg = small_cfg(nonlinear=False, quantized=True, leaky=True)
    q, k, v = random_inputs(1, 1, 10, 5, dtype=torch.float32)
    y16 = analog_attention_dense(q.bfloat16(), k.bfloat16(), v.bfloat16(), cfg)
    assert y16.dtype == torch.bfloat16
    y32 = analog_attention_dense(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), cfg)
    torch.testing.assert_close(y16.float(), y32, atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------------------
# closed forms
# ------------------------------------------------------------------------------------------------
def test_linear_model_equals_matrix_formula():
    """Leakage off, no quantization, every clamp inactive: y = g^2 / (S_qk S_av) (tril * Q W^T) @ U."""
    cfg = AnalogAttentionConfig(window=32, tile_rows=8, query_levels=None, stored_levels=None, output_levels=None,
                                decay_per_step=0.0, qk_saturation=1e4, av_saturation=1e3)
    gen = torch.Generator().manual_seed(1)
    T, D = 20, 6
    q = torch.rand(1, 1, T, D, generator=gen, dtype=torch.float64)
    k = 0.45 + 0.45 * torch.rand(1, 1, T, D, generator=gen, dtype=torch.float64)  # W >= 0: S >= 0
    v = 0.9 * torch.rand(1, 1, T, D, generator=gen, dtype=torch.float64)
    W, U = k - 0.45, v - 0.45
    S = torch.tril(cfg.gain * q @ W.transpose(-1, -2))
    assert S.max() < cfg.qk_saturation
    expected = (cfg.gain / cfg.av_saturation) * (S / cfg.qk_saturation) @ U
    assert expected.abs().max() < 1 / cfg.tiles  # no sub-tile clamps
    torch.testing.assert_close(analog_attention_dense(q, k, v, cfg), expected, rtol=1e-12, atol=1e-15)


def test_linear_model_matrix_formula_with_clamps():
    """Leakage off, no quantization: y = sum_r clamp((g / S_av) (P * [r(t') = r]) @ U, -1, 1) with
    P = clamp(tril(g Q W^T) / S_qk, 0, 1), with the HardSigmoid and sub-tile clamps active."""
    cfg = AnalogAttentionConfig(window=24, tile_rows=8, query_levels=None, stored_levels=None, output_levels=None,
                                decay_per_step=0.0, qk_saturation=2.0, av_saturation=1.0)
    q, k, v = random_inputs(2, 2, 24, 6, seed=2)
    Q, K, V = q.clamp(0, 1), k.clamp(0, 0.9), v.clamp(0, 0.9)
    P = torch.tril(cfg.gain * Q @ (K - 0.45).transpose(-1, -2) / cfg.qk_saturation).clamp(0, 1)
    assert ((P > 0) & (P < 1)).any() and (P == 1).any()
    y = 0
    for r in range(3):
        cols = torch.zeros(24, dtype=torch.float64)
        cols[8 * r:8 * (r + 1)] = 1
        A_r = (cfg.gain / cfg.av_saturation) * (P * cols) @ (V - 0.45)
        y = y + A_r.clamp(-1, 1)
    assert (A_r.abs() > 1).any()
    torch.testing.assert_close(analog_attention_dense(q, k, v, cfg), y, rtol=1e-12, atol=1e-14)


def test_hard_sigmoid_saturates_at_qk_saturation():
    cfg = AnalogAttentionConfig()
    S = torch.tensor([-50.0, -1e-3, 0.0, 20.0, 40.0, 79.0, 80.0, 80.001, 500.0])
    expected = torch.tensor([0.0, 0.0, 0.0, 0.25, 0.5, 79 / 80, 1.0, 1.0, 1.0])
    torch.testing.assert_close(hard_sigmoid(S, cfg), expected)


def test_saturated_pulses_make_output_independent_of_charge():
    """Every S >= S_sat gives P = 1: scaling the query charge up further changes nothing."""
    cfg = AnalogAttentionConfig(window=64, tile_rows=64, decay_per_step=0.0, query_levels=None,
                                stored_levels=None, output_levels=None)
    T, D = 8, 64
    v = torch.rand(1, 1, T, D, dtype=torch.float64) * 0.9
    k = torch.full((1, 1, T, D), 0.9, dtype=torch.float64)       # W = 0.45: S = 19.3 * 0.45 * sum Q
    q_full = torch.ones(1, 1, T, D, dtype=torch.float64)          # S = 559 >> 80
    q_half = torch.full((1, 1, T, D), 0.5, dtype=torch.float64)   # S = 279 >> 80
    y_full = analog_attention_dense(q_full, k, v, cfg)
    torch.testing.assert_close(y_full, analog_attention_dense(q_half, k, v, cfg))
    # P = 1 on the causal triangle: y = clamp((g / 40) * cumsum(U), -1, 1)
    expected = ((cfg.gain / cfg.av_saturation) * torch.cumsum(v - 0.45, dim=-2)).clamp(-1, 1)
    torch.testing.assert_close(y_full, expected)


def test_leakage_and_window_mask():
    cfg = AnalogAttentionConfig(window=4, tile_rows=2, decay_per_step=0.1)
    alpha = leakage(6, cfg, dtype=torch.float64)
    for t in range(6):
        for tp in range(6):
            inside = t - 4 < tp <= t
            assert bool(window_mask(6, 4)[t, tp]) == inside
            assert alpha[t, tp].item() == pytest.approx(math.exp(-0.1 * (t - tp)) if inside else 0.0, rel=1e-14)
    assert subtile_of_key(10, cfg).tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0]


def test_zeroth_order_term_ignores_key_and_leakage():
    """Spec §4: the i = 0 term c_0 sum_d Q is neither key- nor leakage-dependent."""
    coeffs = [0.0] * 10
    coeffs[0] = 2.0  # C[0][0]: c_0 = 2, every other c_i = 0
    cfg = AnalogAttentionConfig(coefficients=coeffs)
    Q = torch.rand(5, 3, dtype=torch.float64)
    W = torch.rand(4, 3, dtype=torch.float64) - 0.45
    alpha = torch.rand(5, 4, dtype=torch.float64)
    S = key_array_product(Q, W, cfg, alpha)
    torch.testing.assert_close(S, 2.0 * Q.sum(-1, keepdim=True).expand(5, 4))
    P = torch.rand(5, 4, dtype=torch.float64)
    A = value_array_product(P, W, cfg, alpha)
    torch.testing.assert_close(A, 2.0 * P.sum(-1, keepdim=True).expand(5, 3) / cfg.av_saturation)


# ------------------------------------------------------------------------------------------------
# sequences longer than the window (docs/attention.md#second-array-product-and-sub-tiles)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nonlinear", [False, True])
def test_excess_multiple_of_tile_rows_matches_window_alone(nonlinear):
    cfg = small_cfg(nonlinear, quantized=True, leaky=True, qk_saturation=2.0, av_saturation=0.5)
    q, k, v = random_inputs(1, 2, 24, 5, seed=11)  # T - M = 8 = 2 tiles of 4
    last = analog_attention_dense(q, k, v, cfg)[..., -1, :]
    alone = analog_attention_dense(q[..., -16:, :], k[..., -16:, :], v[..., -16:, :], cfg)[..., -1, :]
    torch.testing.assert_close(last, alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("nonlinear", [False, True])
def test_other_excess_changes_subtile_membership(nonlinear):
    """T - M = 6: sub-tile 1 holds keys {6, 7, 20, 21} of the last query's window, not four neighbours,
    so the per-tile readout (clamp + quantization) differs from the window fed alone."""
    cfg = small_cfg(nonlinear, quantized=True, leaky=True, qk_saturation=2.0, av_saturation=0.5)
    q, k, v = random_inputs(1, 2, 22, 5, seed=11)
    assert subtile_of_key(22, cfg)[[6, 7, 20, 21]].tolist() == [1, 1, 1, 1]
    last = analog_attention_dense(q, k, v, cfg)[..., -1, :]
    alone = analog_attention_dense(q[..., -16:, :], k[..., -16:, :], v[..., -16:, :], cfg)[..., -1, :]
    assert (last - alone).abs().max() > 1e-3
    # ... and without the per-tile nonlinearity (no quantization, no clamp reached) they agree again.
    cfg_flat = small_cfg(nonlinear, quantized=False, leaky=True, qk_saturation=2.0, av_saturation=50.0)
    last = analog_attention_dense(q, k, v, cfg_flat)[..., -1, :]
    alone = analog_attention_dense(q[..., -16:, :], k[..., -16:, :], v[..., -16:, :], cfg_flat)[..., -1, :]
    torch.testing.assert_close(last, alone, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# quantizers (docs/attention.md#quantization)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels,lo,hi,expected", [
    (16, 0.0, 1.0, [k / 15 for k in range(16)]),
    (8, 0.0, 0.9, [k * 0.9 / 7 for k in range(8)]),
    (32, -1.0, 1.0, [-1.0] + [k * 2 / 31 for k in range(-15, 16)] + [1.0]),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantizer_lands_on_levels(levels, lo, hi, expected, dtype):
    x = torch.linspace(lo - 0.5, hi + 0.5, 20001, dtype=dtype)
    y = clamp_quantize(x, levels, lo, hi)
    grid = quantization_levels(levels, lo, hi, dtype=dtype)
    assert torch.isin(y, grid).all()
    assert torch.unique(y).numel() == len(expected)
    np.testing.assert_allclose(torch.unique(y).double().numpy(), expected, rtol=0, atol=1e-7)
    # nearest level from below-half-step (no level is more than step/2 away, except the saturations)
    step = (hi - lo) / (levels - 1)
    inside = (x >= lo) & (x <= hi) & (x.abs() < hi - step / 2)
    assert ((y - x)[inside].abs() <= step / 2 + 1e-6).all()


def test_output_quantizer_saturation_and_zero():
    x = torch.tensor([-3.0, -1.0, -0.999, -0.5, 0.0, 0.01, 0.99, 1.0, 2.0])
    y = clamp_quantize(x, 32, -1.0, 1.0)
    step = torch.tensor(2 / 31)
    assert y[0] == -1 and y[1] == -1 and y[7] == 1 and y[8] == 1  # saturated stays +-1
    assert y[2] == -15 * step and y[6] == 15 * step                # 0.99 -> 15 * 2/31, not 1
    assert y[3] == -8 * step and y[4] == 0 and y[5] == 0


def test_quantizer_rounds_half_to_even_and_none_is_identity():
    x = torch.tensor([0.125, 0.375, 0.625, 0.875])  # exactly half-way on the 5-level grid of [0, 1]
    assert quantize(x, 5, 0.0, 1.0).tolist() == [0.0, 0.5, 0.5, 1.0]
    x = torch.rand(100)
    assert quantize(x, None, 0.0, 1.0) is x


def test_quantizer_rejects_bad_levels():
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="levels"):
            quantize(torch.zeros(3), bad, 0.0, 1.0)


def test_straight_through_gradients():
    x = torch.linspace(-0.5, 1.5, 41, dtype=torch.float64, requires_grad=True)
    quantize(x, 16, 0.0, 1.0).backward(torch.arange(41.0, dtype=torch.float64))
    assert torch.equal(x.grad, torch.arange(41.0, dtype=torch.float64))  # quantizer: identity backward
    x.grad = None
    clamp_quantize(x, 16, 0.0, 1.0).sum().backward()
    assert torch.equal(x.grad, ((x >= 0) & (x <= 1)).double())         # clamp: zero outside [0, 1]
    value, surrogate = torch.randn(5), torch.randn(5, requires_grad=True)
    out = straight_through(value, 3 * surrogate)
    assert torch.equal(out, value)
    out.sum().backward()
    assert torch.equal(surrogate.grad, torch.full((5,), 3.0))


def test_quantized_model_outputs_are_sums_of_levels():
    cfg = small_cfg(nonlinear=True, quantized=True, leaky=True)
    q, k, v = random_inputs(1, 1, 16, 5, seed=5)  # T = window: 4 sub-tiles
    y = analog_attention_dense(q, k, v, cfg)
    # each y is a sum of 4 levels in {k * 2/31} U {+-1}; 31 * y / 2 is then an integer or an integer +- 0.5
    twice = (31 * y).round()
    assert torch.allclose(31 * y, twice, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# gradients (docs/attention.md#gradients)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("leaky", [False, True])
def test_gradcheck_unquantized_linear(leaky):
    cfg = small_cfg(nonlinear=False, quantized=False, leaky=leaky, window=4, tile_rows=2,
                    qk_saturation=0.8, av_saturation=0.5)
    gen = torch.Generator().manual_seed(4)
    q = (0.05 + 0.9 * torch.rand(1, 2, 7, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    k = (0.05 + 0.8 * torch.rand(1, 2, 7, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    v = (0.05 + 0.8 * torch.rand(1, 2, 7, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: analog_attention_dense(a, b, c, cfg), (q, k, v),
                                    eps=1e-6, atol=1e-7)


def test_gradcheck_exact_nonlinear_gradient():
    cfg = small_cfg(nonlinear=True, quantized=False, leaky=True, window=4, tile_rows=2,
                    qk_saturation=1.5, av_saturation=1.0, exact_nonlinear_grad=True)
    gen = torch.Generator().manual_seed(6)
    inputs = [(0.05 + 0.8 * torch.rand(1, 1, 6, 3, generator=gen, dtype=torch.float64)).requires_grad_()
              for _ in range(3)]
    assert torch.autograd.gradcheck(lambda a, b, c: analog_attention_dense(a, b, c, cfg), inputs,
                                    eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("model", ["linear", "nonlinear_surrogate", "linear_float"])
def test_gradient_matches_loop_backward(model):
    """Autograd of the dense model (quantizers straight-through, clamps cut) equals the hand-written
    linear backward of docs/attention.md#gradients at the model's own forward activations."""
    cfg = small_cfg(nonlinear=model.startswith("nonlinear"), quantized=model != "linear_float", leaky=True)
    q, k, v = random_inputs(1, 1, 22, 4, seed=9)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    dy = torch.randn(1, 1, 22, 4, dtype=torch.float64)
    analog_attention_dense(q, k, v, cfg).backward(dy)
    expected = loop_backward(q[0, 0].detach().numpy(), k[0, 0].detach().numpy(), v[0, 0].detach().numpy(),
                             cfg, dy[0, 0].numpy())
    for got, want in zip((q.grad[0, 0], k.grad[0, 0], v.grad[0, 0]), expected):
        assert np.abs(want).max() > 1e-3
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


def test_surrogate_differs_from_exact_gradient_but_forward_is_identical():
    cfg = small_cfg(nonlinear=True, quantized=True, leaky=True)
    cfg_exact = small_cfg(nonlinear=True, quantized=True, leaky=True, exact_nonlinear_grad=True)
    q, k, v = random_inputs(1, 1, 12, 4, seed=2)
    grads, outs = [], []
    for c in (cfg, cfg_exact):
        qq = q.clone().requires_grad_()
        y = analog_attention_dense(qq, k, v, c)
        y.sum().backward()
        grads.append(qq.grad)
        outs.append(y.detach())
    assert torch.equal(outs[0], outs[1])
    with torch.no_grad():
        assert torch.equal(analog_attention_dense(q, k, v, cfg), outs[0])
    assert (grads[0] - grads[1]).abs().max() > 1e-3


def test_surrogate_per_dot_product_is_linear_gradient():
    """Both array products of the nonlinear cell back-propagate exactly like the linear cell (slope g)."""
    nl = AnalogAttentionConfig(coefficients=PAPER_COEFFICIENTS)
    lin = AnalogAttentionConfig()
    gen = torch.Generator().manual_seed(8)
    Q, W = torch.rand(6, 4, generator=gen, dtype=torch.float64), torch.rand(5, 4, generator=gen, dtype=torch.float64) - .45
    alpha = torch.rand(6, 5, generator=gen, dtype=torch.float64)
    G = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    for fn in (key_array_product, value_array_product):
        x, w = (Q, W) if fn is key_array_product else (alpha.clone(), W)
        grads = []
        for c in (nl, lin):
            a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
            out = fn(a, b, c, alpha)
            out.backward(G if fn is key_array_product else torch.ones_like(out))
            grads.append((a.grad, b.grad, out.detach()))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-13, atol=0)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-13, atol=0)
        assert not torch.allclose(grads[0][2], grads[1][2])  # while the forward values are the cells' own


# ------------------------------------------------------------------------------------------------
# dispatch and input checks
# ------------------------------------------------------------------------------------------------
def test_dispatch_dense_and_auto():
    cfg = small_cfg(nonlinear=False, quantized=True, leaky=True)
    q, k, v = random_inputs(1, 1, 10, 5)
    torch.testing.assert_close(analog_attention(q, k, v, cfg, implementation="dense"),
                               analog_attention_dense(q, k, v, cfg), rtol=0, atol=0)
    expected = "blocked" if functional._available("blocked") else "dense"
    assert functional.resolve_implementation("auto", on_cuda=False) == expected
    with pytest.raises(ValueError, match="implementation='fast'"):
        analog_attention(q, k, v, cfg, implementation="fast")


@pytest.mark.parametrize("impl", ["dense", "auto"])
def test_bad_inputs_give_clear_errors(impl):
    cfg = AnalogAttentionConfig(window=8, tile_rows=4)
    q = torch.rand(1, 2, 8, 4)
    with pytest.raises(ValueError, match="shapes differ"):
        analog_attention(q, torch.rand(1, 2, 8, 5), q, cfg, implementation=impl)
    with pytest.raises(ValueError, match="4 dims"):
        analog_attention(q[0], q[0], q[0], cfg, implementation=impl)
    bad = q.clone()
    bad[0, 1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="k contains NaN"):
        analog_attention(q, bad, q, cfg, implementation=impl)
    with pytest.raises(ValueError, match="dtype"):
        analog_attention(q, q, q.long(), cfg, implementation=impl)
    with pytest.raises(TypeError, match="AnalogAttentionConfig"):
        analog_attention(q, q, q, {"window": 8}, implementation=impl)


@pytest.mark.parametrize("implementation", ["dense", "blocked"])
def test_autocast_does_not_change_the_quantized_result(implementation):
    """Inside a bf16 autocast region (training on GPU) the analog math still runs in float32."""
    from gaincell.attention import analog_attention

    cfg = AnalogAttentionConfig(window=128, decay_per_step=1e-3)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.rand(1, 2, 150, 64, generator=g) for _ in range(3))
    expected = analog_attention(q, k, v, cfg, implementation=implementation)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = analog_attention(q, k, v, cfg, implementation=implementation)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
