"""Triton kernels of the analog gain-cell attention (docs/attention.md, eq. 3 to 7), FlashAttention-2 style.

What is fused, and why:
* One program owns one block of ``tile_rows`` (BLOCK) queries (forward, dQ) or keys (dK, dV). Key blocks
  are aligned to sub-tiles: key block j sits in sub-tile ``j mod (M / BLOCK)`` (slot t' mod M, docs/attention.md#second-array-product-and-sub-tiles),
  so the per-sub-tile clamp + 32-level quantization of the pulse counters happens in registers before
  the digital sum, and no (T x T) or (tiles x T x D) tensor ever reaches memory. Memory: O(T * D).
* Only the key blocks of the window are visited (i - M/BLOCK .. i): cost O(T * M * D), not O(T^2 * D).
  Block i - M/BLOCK holds the oldest keys in the same sub-tile as the newest block i; their two
  contributions are added before that sub-tile's readout.
* The DAC clamps + quantizers of q, k, v are applied at load time (no quantized copies in memory);
  leakage alpha = exp(-lambda (t - t')) is computed from positions in registers.
* No softmax bookkeeping: no running max, no rescaling; the output is a plain sum of readouts.
* The nonlinear cell is four products (eq. 4): the key-independent i = 0 term is a row sum, the
  others are tl.dot with W**i / U**i formed in registers.
* Backward: two kernels (dQ per query block; dK and dV per key block) recompute S, P and each
  sub-tile's output A (whose clamp masks the gradient needs) instead of storing them. The linear cell and
  the nonlinear surrogate (docs/attention.md#gradients) use the linear model's gradient with the masks of the actual forward
  values; EXACT differentiates the polynomial.
* One recompute for the forward and dQ kernels: both read a sub-tile through ``_subtile_readout`` (the
  key block's ``_key_block``: stored K, V after the DAC, cell gains, charge S and pulse P against the
  query block; its value-array share; the partner block's share in the merged sub-tile; readout noise),
  so the backward's clamp masks come from the forward's own arithmetic. dK/dV adds the partner through
  ``_key_block_share``. The helpers are @triton.jit functions, inlined by Triton: no call, no memory.

Cell variation (VARIED): each stored weight is loaded with the gain factor G of its cell (the chip's
(H, M, D) arrays, row t' mod M); the products use G * W**i, G * U**i and G for the c_0 term, and dW, dU
are multiplied by G. Readout noise (NOISE): each sub-tile readout gets a Gaussian from tl.randn, keyed
by the call's seed and the readout's (batch-head, query, sub-tile, column) index, so the forward and
both backward kernels draw the same noise without storing it. With both off the arithmetic is the
same operation for operation as without these options.

Rounding: round-half-to-even is written with floor (no libdevice), so the same code runs in the
interpreter (TRITON_INTERPRET=1) and on GPUs. Arithmetic is in float32 (float64 for float64 inputs);
``PREC`` is tl.dot's input precision ("ieee" exact float32; "tf32x3" near-float32 on tensor cores).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_half_even(x):
    a = tl.abs(x)
    f = tl.floor(a)
    d = a - f  # exact for |x| < 2**23
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    r = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
    return tl.where(x < 0, -r, r)


@triton.jit
def _clamp_quantize(x, lo, hi, inv_step, step, QUANT: tl.constexpr):
    """Quantization (docs/attention.md#quantization): clamp to [lo, hi], then (QUANT) clamp(step * round(x * inv_step), lo, hi)."""
    x = tl.minimum(tl.maximum(x, lo), hi)
    if QUANT:
        x = tl.minimum(tl.maximum(_round_half_even(x * inv_step) * step, lo), hi)
    return x


@triton.jit
def _in_range(x, lo, hi):
    """Where torch.clamp passes its gradient (inclusive bounds)."""
    return (x >= lo) & (x <= hi)


@triton.jit
def _load_block(ptr, rows, T, offs_d, D):
    mask = (rows < T)[:, None] & (offs_d < D)[None, :]
    return tl.load(ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _load_query(Qp, rows_m, T, offs_d, D, q_inv_step, q_step, Q_QUANT: tl.constexpr, dtype: tl.constexpr):
    q = _load_block(Qp, rows_m, T, offs_d, D).to(dtype)
    return q, _clamp_quantize(q, 0.0, 1.0, q_inv_step, q_step, Q_QUANT)


@triton.jit
def _load_stored(Xp, Gp, rows_n, T, offs_d, D, window, kv_hi, kv_inv_step, kv_step, stored_offset,
                 KV_QUANT: tl.constexpr, VARIED: tl.constexpr, dtype: tl.constexpr):
    """Raw x, the stored weight X - 0.45 V after the DAC (K or V array) and the gain factors G of the
    cells holding it (row t' mod M of the head's (M, D) array at Gp; ones, unused, without VARIED)."""
    x = _load_block(Xp, rows_n, T, offs_d, D).to(dtype)
    X = _clamp_quantize(x, 0.0, kv_hi, kv_inv_step, kv_step, KV_QUANT) - stored_offset
    if VARIED:
        G = _load_block(Gp, rows_n % window, T + window, offs_d, D).to(dtype)
    else:
        G = tl.zeros_like(X) + 1.0
    return x, X, G


@triton.jit
def _add_readout_noise(tile, noise_seed, noise_std, bh, rows_m, T, tile_index, n_tiles, offs_d, D,
                       NOISE: tl.constexpr):
    """Spec issue 16: readout noise on one sub-tile's output before its ADC (NOISE), one Philox draw per
    (batch-head, query, sub-tile, column)."""
    if NOISE:
        offset = ((bh * T + rows_m[:, None]) * n_tiles + tile_index) * D + offs_d[None, :]
        tile += noise_std * tl.randn(noise_seed, offset).to(tile.dtype)
    return tile


@triton.jit
def _charge_and_pulse(Qv, q_sum, W, G, rows_m, rows_n, window, lam, gain, qk_sat, c0, c1, c2, c3,
                      NONLINEAR: tl.constexpr, VARIED: tl.constexpr, PREC: tl.constexpr):
    """Eq. 3, 4, 6 and 7 on one (query block, key block) slab: S, P = HardSigmoid(S), alpha, window mask."""
    lag = rows_m[:, None] - rows_n[None, :]
    inside = (lag >= 0) & (lag < window)
    alpha = tl.where(inside, tl.exp(-lam * lag.to(Qv.dtype)), 0.0)
    if NONLINEAR:
        a2 = alpha * alpha
        W2 = W * W
        if VARIED:
            S = c0 * tl.dot(Qv, tl.trans(G), input_precision=PREC)
            S += (c1 * tl.dot(Qv, tl.trans(W * G), input_precision=PREC)) * alpha
            S += (c2 * tl.dot(Qv, tl.trans(W2 * G), input_precision=PREC)) * a2
            S += (c3 * tl.dot(Qv, tl.trans(W2 * W * G), input_precision=PREC)) * (a2 * alpha)
        else:
            S = c0 * q_sum[:, None] + (c1 * tl.dot(Qv, tl.trans(W), input_precision=PREC)) * alpha
            S += (c2 * tl.dot(Qv, tl.trans(W2), input_precision=PREC)) * a2
            S += (c3 * tl.dot(Qv, tl.trans(W2 * W), input_precision=PREC)) * (a2 * alpha)
    elif VARIED:
        S = (gain * tl.dot(Qv, tl.trans(W * G), input_precision=PREC)) * alpha
    else:
        S = (gain * tl.dot(Qv, tl.trans(W), input_precision=PREC)) * alpha
    P = tl.where(inside, tl.minimum(tl.maximum(S / qk_sat, 0.0), 1.0), 0.0)
    return S, P, alpha, inside


@triton.jit
def _value_array(P, alpha, U, G, gain, av_sat, c0, c1, c2, c3, NONLINEAR: tl.constexpr, VARIED: tl.constexpr,
                 PREC: tl.constexpr):
    """Eq. 4 and 7: this key block's share of its sub-tile's output A (before clamp + quantize)."""
    if NONLINEAR:
        a2 = alpha * alpha
        U2 = U * U
        if VARIED:
            A = c0 * tl.dot(P, G, input_precision=PREC) + c1 * tl.dot(P * alpha, U * G, input_precision=PREC)
            A += c2 * tl.dot(P * a2, U2 * G, input_precision=PREC)
            A += c3 * tl.dot(P * (a2 * alpha), U2 * U * G, input_precision=PREC)
        else:
            A = c0 * tl.sum(P, 1)[:, None] + c1 * tl.dot(P * alpha, U, input_precision=PREC)
            A += c2 * tl.dot(P * a2, U2, input_precision=PREC)
            A += c3 * tl.dot(P * (a2 * alpha), U2 * U, input_precision=PREC)
        A = A / av_sat
    elif VARIED:
        A = (gain / av_sat) * tl.dot(P * alpha, U * G, input_precision=PREC)
    else:
        A = (gain / av_sat) * tl.dot(P * alpha, U, input_precision=PREC)
    return A


@triton.jit
def _grad_charge(dA, S, P, alpha, inside, U, G, gain, qk_sat, av_sat, c0, c1, c2, c3,
                 EXACT: tl.constexpr, VARIED: tl.constexpr, PREC: tl.constexpr):
    """dL/dS of one slab from dL/dA of its sub-tile (value array, then HardSigmoid and window)."""
    if EXACT:
        a2 = alpha * alpha
        U2 = U * U
        if VARIED:
            dP = c0 * tl.dot(dA, tl.trans(G), input_precision=PREC)
            dP += c1 * alpha * tl.dot(dA, tl.trans(U * G), input_precision=PREC)
            dP += c2 * a2 * tl.dot(dA, tl.trans(U2 * G), input_precision=PREC)
            dP += c3 * (a2 * alpha) * tl.dot(dA, tl.trans(U2 * U * G), input_precision=PREC)
        else:
            dP = c0 * tl.sum(dA, 1)[:, None] + c1 * alpha * tl.dot(dA, tl.trans(U), input_precision=PREC)
            dP += c2 * a2 * tl.dot(dA, tl.trans(U2), input_precision=PREC)
            dP += c3 * (a2 * alpha) * tl.dot(dA, tl.trans(U2 * U), input_precision=PREC)
        dP = dP / av_sat
    elif VARIED:  # linear cell, or the nonlinear cell's surrogate (docs/attention.md#gradients)
        dP = tl.dot(dA, tl.trans(U * G), input_precision=PREC) * (alpha * (gain / av_sat))
    else:
        dP = tl.dot(dA, tl.trans(U), input_precision=PREC) * (alpha * (gain / av_sat))
    return tl.where(inside & _in_range(S / qk_sat, 0.0, 1.0), dP / qk_sat, 0.0)


@triton.jit
def _grad_query(dS, alpha, W, G, gain, c0, c1, c2, c3, EXACT: tl.constexpr, VARIED: tl.constexpr,
                PREC: tl.constexpr):
    if EXACT:
        a2 = alpha * alpha
        W2 = W * W
        if VARIED:
            dQ = c0 * tl.dot(dS, G, input_precision=PREC) + tl.dot(dS * (c1 * alpha), W * G, input_precision=PREC)
            dQ += tl.dot(dS * (c2 * a2), W2 * G, input_precision=PREC)
            dQ += tl.dot(dS * (c3 * a2 * alpha), W2 * W * G, input_precision=PREC)
        else:
            dQ = c0 * tl.sum(dS, 1)[:, None] + tl.dot(dS * (c1 * alpha), W, input_precision=PREC)
            dQ += tl.dot(dS * (c2 * a2), W2, input_precision=PREC)
            dQ += tl.dot(dS * (c3 * a2 * alpha), W2 * W, input_precision=PREC)
    elif VARIED:
        dQ = tl.dot(dS * (gain * alpha), W * G, input_precision=PREC)
    else:
        dQ = tl.dot(dS * (gain * alpha), W, input_precision=PREC)
    return dQ


@triton.jit
def _grad_key(dS, alpha, W, G, Qv, gain, c1, c2, c3, EXACT: tl.constexpr, VARIED: tl.constexpr,
              PREC: tl.constexpr):
    if EXACT:
        a2 = alpha * alpha
        dW = c1 * tl.dot(tl.trans(dS * alpha), Qv, input_precision=PREC)
        dW += (2.0 * c2) * W * tl.dot(tl.trans(dS * a2), Qv, input_precision=PREC)
        dW += (3.0 * c3) * W * W * tl.dot(tl.trans(dS * (a2 * alpha)), Qv, input_precision=PREC)
    else:
        dW = tl.dot(tl.trans(dS * (gain * alpha)), Qv, input_precision=PREC)
    if VARIED:  # every term of the cell carries its gain
        dW = dW * G
    return dW


@triton.jit
def _grad_value(dA, P, alpha, U, G, gain, av_sat, c1, c2, c3, EXACT: tl.constexpr, VARIED: tl.constexpr,
                PREC: tl.constexpr):
    if EXACT:
        a2 = alpha * alpha
        dU = c1 * tl.dot(tl.trans(P * alpha), dA, input_precision=PREC)
        dU += (2.0 * c2) * U * tl.dot(tl.trans(P * a2), dA, input_precision=PREC)
        dU += (3.0 * c3) * U * U * tl.dot(tl.trans(P * (a2 * alpha)), dA, input_precision=PREC)
        dU = dU / av_sat
    else:
        dU = (gain / av_sat) * tl.dot(tl.trans(P * alpha), dA, input_precision=PREC)
    if VARIED:
        dU = dU * G
    return dU


@triton.jit
def _key_block(Qv, q_sum, Kp, Vp, GKp, GVp, rows_m, rows_n, T, offs_d, D, window, lam, gain, qk_sat, c0, c1, c2,
               c3, stored_offset, kv_hi, kv_inv_step, kv_step, NONLINEAR: tl.constexpr, KV_QUANT: tl.constexpr,
               VARIED: tl.constexpr, PREC: tl.constexpr, dtype: tl.constexpr):
    """Key block ``rows_n`` seen by query block ``rows_m``: its stored K and V after the DAC (W, U) with
    their cells' gains (Gk, Gv), then the charge S, pulse P, leakage alpha and window mask of the slab."""
    _, W, Gk = _load_stored(Kp, GKp, rows_n, T, offs_d, D, window, kv_hi, kv_inv_step, kv_step, stored_offset,
                            KV_QUANT, VARIED, dtype)
    _, U, Gv = _load_stored(Vp, GVp, rows_n, T, offs_d, D, window, kv_hi, kv_inv_step, kv_step, stored_offset,
                            KV_QUANT, VARIED, dtype)
    S, P, alpha, inside = _charge_and_pulse(Qv, q_sum, W, Gk, rows_m, rows_n, window, lam, gain, qk_sat,
                                            c0, c1, c2, c3, NONLINEAR, VARIED, PREC)
    return W, Gk, U, Gv, S, P, alpha, inside


@triton.jit
def _key_block_share(Qv, q_sum, Kp, Vp, GKp, GVp, rows_m, rows_n, T, offs_d, D, window, lam, gain, qk_sat, av_sat,
                     c0, c1, c2, c3, stored_offset, kv_hi, kv_inv_step, kv_step, NONLINEAR: tl.constexpr,
                     KV_QUANT: tl.constexpr, VARIED: tl.constexpr, PREC: tl.constexpr, dtype: tl.constexpr):
    """Key block ``rows_n``'s share of its sub-tile's output for query block ``rows_m`` (only the output:
    for a block that shares the sub-tile and enters the readout's clamp mask)."""
    _, _, U, Gv, _, P, alpha, _ = _key_block(Qv, q_sum, Kp, Vp, GKp, GVp, rows_m, rows_n, T, offs_d, D, window, lam,
                                             gain, qk_sat, c0, c1, c2, c3, stored_offset, kv_hi, kv_inv_step, kv_step,
                                             NONLINEAR, KV_QUANT, VARIED, PREC, dtype)
    return _value_array(P, alpha, U, Gv, gain, av_sat, c0, c1, c2, c3, NONLINEAR, VARIED, PREC)


@triton.jit
def _subtile_readout(Qv, q_sum, Kp, Vp, GKp, GVp, bh, rows_m, block, partner, T, offs_d, D, window, lam, gain, qk_sat,
                     av_sat, c0, c1, c2, c3, stored_offset, kv_hi, kv_inv_step, kv_step, noise_seed, noise_std,
                     BLOCK: tl.constexpr, NONLINEAR: tl.constexpr, KV_QUANT: tl.constexpr, VARIED: tl.constexpr,
                     NOISE: tl.constexpr, PREC: tl.constexpr, dtype: tl.constexpr):
    """The sub-tile holding key block ``block`` (slots ``block mod M/BLOCK``) read by query block ``rows_m``:
    the block's slab (``_key_block``), plus the share of key block ``partner`` in the same slots when
    ``partner >= 0`` (the window's oldest keys, merged with the newest), plus the readout noise. Returns the
    slab's intermediates and the sub-tile output before the ADC (clamp + quantize)."""
    rows_n = block * BLOCK + tl.arange(0, BLOCK)
    W, Gk, U, Gv, S, P, alpha, inside = _key_block(Qv, q_sum, Kp, Vp, GKp, GVp, rows_m, rows_n, T, offs_d, D, window,
                                                   lam, gain, qk_sat, c0, c1, c2, c3, stored_offset, kv_hi,
                                                   kv_inv_step, kv_step, NONLINEAR, KV_QUANT, VARIED, PREC, dtype)
    tile = _value_array(P, alpha, U, Gv, gain, av_sat, c0, c1, c2, c3, NONLINEAR, VARIED, PREC)
    if partner >= 0:
        rows_p = partner * BLOCK + tl.arange(0, BLOCK)
        tile += _key_block_share(Qv, q_sum, Kp, Vp, GKp, GVp, rows_m, rows_p, T, offs_d, D, window, lam, gain,
                                 qk_sat, av_sat, c0, c1, c2, c3, stored_offset, kv_hi, kv_inv_step, kv_step,
                                 NONLINEAR, KV_QUANT, VARIED, PREC, dtype)
    n_tiles = window // BLOCK
    tile = _add_readout_noise(tile, noise_seed, noise_std, bh, rows_m, T, block % n_tiles, n_tiles, offs_d, D,
                              NOISE)
    return W, Gk, U, Gv, S, P, alpha, inside, tile


@triton.jit
def _subtile_adc(Qv, q_sum, Kp, Vp, GKp, GVp, bh, rows_m, block, partner, T, offs_d, D, window, lam, gain, qk_sat,
                 av_sat, c0, c1, c2, c3, stored_offset, kv_hi, kv_inv_step, kv_step, noise_seed, noise_std,
                 out_inv_step, out_step, BLOCK: tl.constexpr, NONLINEAR: tl.constexpr, KV_QUANT: tl.constexpr,
                 OUT_QUANT: tl.constexpr, VARIED: tl.constexpr, NOISE: tl.constexpr, PREC: tl.constexpr,
                 dtype: tl.constexpr):
    """The forward's digital value of one sub-tile (``_subtile_readout`` through the ADC: eq. 5)."""
    _, _, _, _, _, _, _, _, tile = _subtile_readout(
        Qv, q_sum, Kp, Vp, GKp, GVp, bh, rows_m, block, partner, T, offs_d, D, window, lam, gain, qk_sat, av_sat,
        c0, c1, c2, c3, stored_offset, kv_hi, kv_inv_step, kv_step, noise_seed, noise_std, BLOCK, NONLINEAR,
        KV_QUANT, VARIED, NOISE, PREC, dtype)
    return _clamp_quantize(tile, -1.0, 1.0, out_inv_step, out_step, OUT_QUANT)


@triton.jit
def _grad_query_of_block(dA, S, P, alpha, inside, W, Gk, U, Gv, gain, qk_sat, av_sat, c0, c1, c2, c3,
                         EXACT: tl.constexpr, VARIED: tl.constexpr, PREC: tl.constexpr):
    """One key block's contribution to dL/dQ from dL/dA of its sub-tile (through P, S, then W)."""
    dS = _grad_charge(dA, S, P, alpha, inside, U, Gv, gain, qk_sat, av_sat, c0, c1, c2, c3, EXACT, VARIED, PREC)
    return _grad_query(dS, alpha, W, Gk, gain, c0, c1, c2, c3, EXACT, VARIED, PREC)


@triton.jit
def _analog_fwd_kernel(
        Qp, Kp, Vp, Yp, GKp, GVp, T, D, H, window, lam, gain, qk_sat, av_sat, c0, c1, c2, c3, stored_offset,
        q_inv_step, q_step, kv_hi, kv_inv_step, kv_step, out_inv_step, out_step, noise_seed, noise_std,
        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, NONLINEAR: tl.constexpr, Q_QUANT: tl.constexpr,
        KV_QUANT: tl.constexpr, OUT_QUANT: tl.constexpr, VARIED: tl.constexpr, NOISE: tl.constexpr,
        PREC: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = bh * T * D
    Qp += base
    Kp += base
    Vp += base
    Yp += base
    GKp += (bh % H) * window * D  # this head's cells (read only with VARIED)
    GVp += (bh % H) * window * D
    dtype = Yp.dtype.element_ty
    rows_m = i * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    _, Qv = _load_query(Qp, rows_m, T, offs_d, D, q_inv_step, q_step, Q_QUANT, dtype)
    q_sum = tl.sum(Qv, 1)
    n_tiles = window // BLOCK

    # Sub-tile of key block i: its keys plus those of block i - n_tiles (same slots, older tokens).
    y = _subtile_adc(Qv, q_sum, Kp, Vp, GKp, GVp, bh, rows_m, i, i - n_tiles, T, offs_d, D, window, lam, gain,
                     qk_sat, av_sat, c0, c1, c2, c3, stored_offset, kv_hi, kv_inv_step, kv_step, noise_seed,
                     noise_std, out_inv_step, out_step, BLOCK, NONLINEAR, KV_QUANT, OUT_QUANT, VARIED, NOISE, PREC,
                     dtype)
    # Every other sub-tile of the window holds exactly one key block.
    for j in range(tl.maximum(i - n_tiles + 1, 0), i):
        y += _subtile_adc(Qv, q_sum, Kp, Vp, GKp, GVp, bh, rows_m, j, -1, T, offs_d, D, window, lam, gain, qk_sat,
                          av_sat, c0, c1, c2, c3, stored_offset, kv_hi, kv_inv_step, kv_step, noise_seed, noise_std,
                          out_inv_step, out_step, BLOCK, NONLINEAR, KV_QUANT, OUT_QUANT, VARIED, NOISE, PREC, dtype)

    mask = (rows_m < T)[:, None] & (offs_d < D)[None, :]
    tl.store(Yp + rows_m[:, None] * D + offs_d[None, :], y.to(Yp.dtype.element_ty), mask=mask)


@triton.jit
def _analog_bwd_dq_kernel(
        Qp, Kp, Vp, dYp, dQp, GKp, GVp, T, D, H, window, lam, gain, qk_sat, av_sat, c0, c1, c2, c3,
        stored_offset, q_inv_step, q_step, kv_hi, kv_inv_step, kv_step, noise_seed, noise_std,
        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, NONLINEAR: tl.constexpr, EXACT: tl.constexpr,
        Q_QUANT: tl.constexpr, KV_QUANT: tl.constexpr, VARIED: tl.constexpr, NOISE: tl.constexpr,
        PREC: tl.constexpr):
    """dq of one query block: recompute every sub-tile's output for its clamp mask, then dS -> dQ."""
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = bh * T * D
    Qp += base
    Kp += base
    Vp += base
    dYp += base
    dQp += base
    GKp += (bh % H) * window * D
    GVp += (bh % H) * window * D
    dtype = dQp.dtype.element_ty
    rows_m = i * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q, Qv = _load_query(Qp, rows_m, T, offs_d, D, q_inv_step, q_step, Q_QUANT, dtype)
    q_sum = tl.sum(Qv, 1)
    dy = _load_block(dYp, rows_m, T, offs_d, D).to(dtype)
    n_tiles = window // BLOCK
    dQ = tl.zeros((BLOCK, BLOCK_D), dtype=dtype)

    # The merged sub-tile (key blocks i and i - n_tiles): both outputs first, for the clamp mask.
    W, Gk, U, Gv, S, P, alpha, inside, tile = _subtile_readout(
        Qv, q_sum, Kp, Vp, GKp, GVp, bh, rows_m, i, i - n_tiles, T, offs_d, D, window, lam, gain, qk_sat, av_sat,
        c0, c1, c2, c3, stored_offset, kv_hi, kv_inv_step, kv_step, noise_seed, noise_std, BLOCK, NONLINEAR,
        KV_QUANT, VARIED, NOISE, PREC, dtype)
    dA = tl.where(_in_range(tile, -1.0, 1.0), dy, 0.0)
    dQ += _grad_query_of_block(dA, S, P, alpha, inside, W, Gk, U, Gv, gain, qk_sat, av_sat, c0, c1, c2, c3, EXACT,
                               VARIED, PREC)
    if i >= n_tiles:  # recomputed rather than kept alive through the block above (register pressure)
        old_rows = (i - n_tiles) * BLOCK + tl.arange(0, BLOCK)
        W, Gk, U, Gv, S, P, alpha, inside = _key_block(Qv, q_sum, Kp, Vp, GKp, GVp, rows_m, old_rows, T, offs_d, D,
                                                       window, lam, gain, qk_sat, c0, c1, c2, c3, stored_offset,
                                                       kv_hi, kv_inv_step, kv_step, NONLINEAR, KV_QUANT, VARIED,
                                                       PREC, dtype)
        dQ += _grad_query_of_block(dA, S, P, alpha, inside, W, Gk, U, Gv, gain, qk_sat, av_sat, c0, c1, c2, c3,
                                   EXACT, VARIED, PREC)

    for j in range(tl.maximum(i - n_tiles + 1, 0), i):
        W, Gk, U, Gv, S, P, alpha, inside, tile = _subtile_readout(
            Qv, q_sum, Kp, Vp, GKp, GVp, bh, rows_m, j, -1, T, offs_d, D, window, lam, gain, qk_sat, av_sat,
            c0, c1, c2, c3, stored_offset, kv_hi, kv_inv_step, kv_step, noise_seed, noise_std, BLOCK, NONLINEAR,
            KV_QUANT, VARIED, NOISE, PREC, dtype)
        dA = tl.where(_in_range(tile, -1.0, 1.0), dy, 0.0)
        dQ += _grad_query_of_block(dA, S, P, alpha, inside, W, Gk, U, Gv, gain, qk_sat, av_sat, c0, c1, c2, c3,
                                   EXACT, VARIED, PREC)

    dq = tl.where(_in_range(q, 0.0, 1.0), dQ, 0.0)  # DAC clamp; the quantizer is straight-through
    mask = (rows_m < T)[:, None] & (offs_d < D)[None, :]
    tl.store(dQp + rows_m[:, None] * D + offs_d[None, :], dq.to(dQp.dtype.element_ty), mask=mask)


@triton.jit
def _analog_bwd_dkdv_kernel(
        Qp, Kp, Vp, dYp, dKp, dVp, GKp, GVp, T, D, H, window, lam, gain, qk_sat, av_sat, c0, c1, c2, c3,
        stored_offset, q_inv_step, q_step, kv_hi, kv_inv_step, kv_step, noise_seed, noise_std,
        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, NONLINEAR: tl.constexpr, EXACT: tl.constexpr,
        Q_QUANT: tl.constexpr, KV_QUANT: tl.constexpr, VARIED: tl.constexpr, NOISE: tl.constexpr,
        PREC: tl.constexpr):
    """dk, dv of one key block j: visit the query blocks j .. j + M/BLOCK that see it."""
    j = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = bh * T * D
    Qp += base
    Kp += base
    Vp += base
    dYp += base
    dKp += base
    dVp += base
    GKp += (bh % H) * window * D
    GVp += (bh % H) * window * D
    dtype = dKp.dtype.element_ty
    rows_n = j * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    k, W, Gk = _load_stored(Kp, GKp, rows_n, T, offs_d, D, window, kv_hi, kv_inv_step, kv_step, stored_offset,
                            KV_QUANT, VARIED, dtype)
    v, U, Gv = _load_stored(Vp, GVp, rows_n, T, offs_d, D, window, kv_hi, kv_inv_step, kv_step, stored_offset,
                            KV_QUANT, VARIED, dtype)
    n_tiles = window // BLOCK
    n_blocks = tl.cdiv(T, BLOCK)
    dW = tl.zeros((BLOCK, BLOCK_D), dtype=dtype)
    dU = tl.zeros((BLOCK, BLOCK_D), dtype=dtype)
    for i in range(j, tl.minimum(j + n_tiles, n_blocks - 1) + 1):
        rows_m = i * BLOCK + tl.arange(0, BLOCK)
        _, Qv = _load_query(Qp, rows_m, T, offs_d, D, q_inv_step, q_step, Q_QUANT, dtype)
        q_sum = tl.sum(Qv, 1)
        dy = _load_block(dYp, rows_m, T, offs_d, D).to(dtype)
        S, P, alpha, inside = _charge_and_pulse(Qv, q_sum, W, Gk, rows_m, rows_n, window, lam, gain, qk_sat,
                                                c0, c1, c2, c3, NONLINEAR, VARIED, PREC)
        tile = _value_array(P, alpha, U, Gv, gain, av_sat, c0, c1, c2, c3, NONLINEAR, VARIED, PREC)
        # The other key block sharing this sub-tile for query block i, if any: j - n_tiles when i == j,
        # i when i == j + n_tiles. Its output joins the clamp mask only.
        partner = tl.where(i == j, j - n_tiles, tl.where(i - j == n_tiles, i, -1))
        if partner >= 0:
            rows_p = partner * BLOCK + tl.arange(0, BLOCK)
            tile += _key_block_share(Qv, q_sum, Kp, Vp, GKp, GVp, rows_m, rows_p, T, offs_d, D, window, lam, gain,
                                     qk_sat, av_sat, c0, c1, c2, c3, stored_offset, kv_hi, kv_inv_step, kv_step,
                                     NONLINEAR, KV_QUANT, VARIED, PREC, dtype)
        tile = _add_readout_noise(tile, noise_seed, noise_std, bh, rows_m, T, j % n_tiles, n_tiles, offs_d, D,
                                  NOISE)
        dA = tl.where(_in_range(tile, -1.0, 1.0), dy, 0.0)
        dU += _grad_value(dA, P, alpha, U, Gv, gain, av_sat, c1, c2, c3, EXACT, VARIED, PREC)
        dS = _grad_charge(dA, S, P, alpha, inside, U, Gv, gain, qk_sat, av_sat, c0, c1, c2, c3, EXACT, VARIED,
                          PREC)
        dW += _grad_key(dS, alpha, W, Gk, Qv, gain, c1, c2, c3, EXACT, VARIED, PREC)

    mask = (rows_n < T)[:, None] & (offs_d < D)[None, :]
    dk = tl.where(_in_range(k, 0.0, kv_hi), dW, 0.0)
    dv = tl.where(_in_range(v, 0.0, kv_hi), dU, 0.0)
    tl.store(dKp + rows_n[:, None] * D + offs_d[None, :], dk.to(dKp.dtype.element_ty), mask=mask)
    tl.store(dVp + rows_n[:, None] * D + offs_d[None, :], dv.to(dVp.dtype.element_ty), mask=mask)
