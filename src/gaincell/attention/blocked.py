"""Exact analog attention without T x T matrices: the banded (blocked) PyTorch path, default on CPU.

Computes the same function as ``reference.analog_attention_dense`` (docs/attention.md, eq. 3 to 7),
forward and backward, with memory linear in T (no T x T tensor; see Backward for what is saved).

The band. Split queries and keys into blocks of ``tile_rows`` (n) positions. Because the window M is a
multiple of n, key block j lies entirely in sub-tile ``j mod (M / n)`` (docs/attention.md#second-array-product-and-sub-tiles: slot t' mod M). Query
block i sees key blocks i - L .. i with L = min(M / n, blocks - 1): the lag in blocks ``delta = i - j``
runs over 0..L. For one lag, every query block's n x n slab of S and P has the same leakage matrix
``alpha = exp(-lambda (delta n + a - b))`` and the same window mask, so a lag is one batched product over
all blocks and heads: a Python loop over L + 1 lags, not over blocks. Lags 0 and M / n (when the
sequence is longer than the window) put their keys in the same sub-tile of query block i (the newest
keys overwrite the oldest slots), so their two contributions are summed before the sub-tile's
clamp + quantize; every other lag is a sub-tile of its own.

Layout: blocks first, (blocks, B * H, n, D), so that the key blocks of one lag are a contiguous slice and
each product is a single ``bmm`` without copies. The constants of each lag (g alpha / S_sat_qk, ...)
are folded into one (n, n) matrix per product, so a slab costs few elementwise passes.

Backward. A custom autograd function saves q, k, v, the quantized operands and each sub-tile
readout's clamp mask (|A| <= 1, a 0/1 float per output element and lag). For the linear model's gradient
(the linear cell, and the nonlinear cell's surrogate, with the masks of the actual nonlinear forward
values) each lag needs two (n x n) slabs: P * g alpha / S_av for dU, and the HardSigmoid mask times the
two alpha factors for dL/dR. The forward keeps them when they take at most ``SAVED_SLABS_MAX_RATIO``
times the memory of q, k, v (then the backward is four products per lag, about one forward); beyond
that it recomputes them lag by lag, FlashAttention-style, and memory stays O(T * D).
``exact_nonlinear_grad`` differentiates the polynomial (keeping P_weighted and the mask). The nonlinear
powers 1..3 of W and U are stacked along the contracted axis so each polynomial product is one ``bmm``.

Cell variation (``cfg.cell_variation``, ``gaincell.attention.noise``): the gain factor of the cell
holding each key element is laid out in blocks like W and U; the products use gamma * W**i and
gamma * U**i (and gamma for the c_0 term), and the backward multiplies dW, dU by gamma.
Cell offsets (``cfg.cell_offset_variation``): each cell's additive offset delta, in blocks like the
gains, adds Q . delta_K^T / S_qk to the charge and P . delta_V / S_av to each sub-tile readout; the
backward adds their (exact) paths to dQ and to the pulses' gradient. With offsets the linear model's
gradient also keeps the HardSigmoid mask, and ``forward_packed`` keeps no state (the backward recomputes).
Readout noise (``cfg.readout_noise``): each sub-tile readout gets a Gaussian before its clamp +
quantize, drawn from a generator seeded once per call; the readout masks kept for the backward include
it (a backward called without the forward's state re-seeds and draws again in the same order).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .config import AnalogAttentionConfig
from .noise import gains_per_key, next_readout_seed, offsets_per_key, readout_generator
from .quantize import quantize_
from .reference import OUTPUT_RANGE, compute_dtype, validate_inputs

__all__ = ["analog_attention_blocked"]

# The forward keeps each lag's backward operands (two floats per pulse for the linear model's gradient)
# when they take at most this many times the memory of q, k, v together (the tiny profile: 2x); above it
# (long windows) the backward recomputes them, as FlashAttention does, and memory stays O(T * D).
SAVED_SLABS_MAX_RATIO = 4.0


@dataclass
class _Lag:
    """Constant (n, n) matrices of one lag (zero outside the window), in the compute dtype."""

    window_mask: Optional[torch.Tensor]  # bool, None when every entry is inside the window
    outside_mask: Optional[torch.Tensor]  # ~window_mask
    key_scale: torch.Tensor      # linear: g alpha / S_qk (S / S_qk = R * key_scale, R = Q W^T)
    value_scale: torch.Tensor    # linear: g alpha / S_av (A = (P * value_scale) @ U)
    grad_scale: torch.Tensor     # linear model's backward: value_scale * key_scale (dA . U^T -> dL/dR)
    key_pow: List[torch.Tensor]  # nonlinear: c_i alpha**i / S_qk, i = 1..3
    value_pow: List[torch.Tensor]  # nonlinear: c_i alpha**i / S_av, i = 1..3
    value_pow_stacked: Optional[torch.Tensor]  # nonlinear: value_pow as (n, 3, n), [a, i - 1, b]


@dataclass
class _Band:
    n: int                       # positions per block = tile_rows
    blocks: int                  # query (and key) blocks, ceil(T / n)
    tiles: int                   # sub-tiles of the window, M / n
    max_lag: int                 # L = min(tiles, blocks - 1), in blocks
    merged: bool                 # lag 0 and lag ``tiles`` share a sub-tile (sequence longer than window)
    lags: List[_Lag]
    coefficients: Tuple[float, float, float, float]  # cfg.folded_coefficients, computed once


@functools.lru_cache(maxsize=32)
def _band(t_len: int, cfg: AnalogAttentionConfig, dtype: torch.dtype, device) -> _Band:
    """The band's geometry and constants (cached: a model calls this with the same few shapes)."""
    n, tiles = cfg.tile_rows, cfg.tiles
    blocks = -(-t_len // n)
    max_lag = min(tiles, blocks - 1)
    offs = torch.arange(n, device=device, dtype=torch.float64)
    c = cfg.folded_coefficients
    lags = []
    for delta in range(max_lag + 1):
        lag = delta * n + offs[:, None] - offs[None, :]          # t - t' for query row a, key row b
        inside = (lag >= 0) & (lag < cfg.window)
        # As the reference: leakage in float64, then the compute dtype.
        alpha = torch.where(inside, torch.exp(-cfg.decay_per_step * lag), torch.zeros_like(lag)).to(dtype)
        powers = [alpha, alpha ** 2, alpha ** 3] if cfg.nonlinear else []
        lags.append(_Lag(
            window_mask=None if bool(inside.all()) else inside,
            outside_mask=None if bool(inside.all()) else ~inside,
            key_scale=alpha * (cfg.gain / cfg.qk_saturation),
            value_scale=alpha * (cfg.gain / cfg.av_saturation),
            grad_scale=(alpha * (cfg.gain / cfg.av_saturation)) * (alpha * (cfg.gain / cfg.qk_saturation)),
            key_pow=[p * (c[i + 1] / cfg.qk_saturation) for i, p in enumerate(powers)],
            value_pow=[p * (c[i + 1] / cfg.av_saturation) for i, p in enumerate(powers)],
            value_pow_stacked=None))
        if cfg.nonlinear:
            lags[-1].value_pow_stacked = torch.stack(lags[-1].value_pow, dim=-2)
    return _Band(n, blocks, tiles, max_lag, max_lag == tiles, lags, c)


def _blocks_source(x: torch.Tensor, blocks: int, n: int) -> torch.Tensor:
    """(B, H, T, D), any strides -> a (blocks, B, H, n, D) view (of a zero-padded copy when T < blocks * n),
    the source of one pass that writes blocks (``_to_blocks``, ``_dac_blocks``)."""
    if blocks * n > x.shape[2]:
        x = torch.nn.functional.pad(x, (0, 0, 0, blocks * n - x.shape[2]))
    return x.unflatten(2, (blocks, n)).permute(2, 0, 1, 3, 4)


def _new_blocks(x: torch.Tensor, blocks: int, n: int) -> torch.Tensor:
    """An uninitialised (blocks, B * H, n, D) tensor for x (B, H, T, D)."""
    B, H, _, D = x.shape
    return x.new_empty(blocks, B * H, n, D)


def _to_blocks(x: torch.Tensor, blocks: int, n: int) -> torch.Tensor:
    """(B, H, T, D) -> (blocks, B * H, n, D), zero-padded at the end, contiguous, a new tensor: one copy
    whatever the strides of x (a transposed view of the QKV projection's output, say)."""
    src = _blocks_source(x, blocks, n)
    out = _new_blocks(x, blocks, n)
    out.view(src.shape).copy_(src)
    return out


def _from_blocks(x: torch.Tensor, shape) -> torch.Tensor:
    B, H, T, D = shape
    blocks, _, n, _ = x.shape
    return x.transpose(0, 1).reshape(B, H, blocks * n, D)[:, :, :T]


def _from_blocks_like(x: torch.Tensor, like: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``_from_blocks(x * mask)`` (mask: None or 0/1 in blocks) as a new tensor with the layout of ``like``
    (B, H, T, D) where that is dense (as ``torch.empty_like``), in one pass. The attention's output then has
    its input's layout, so the model's head merge (transpose + contiguous) is free."""
    B, H, T, D = like.shape
    blocks, _, n, _ = x.shape
    if blocks * n != T:  # ragged: through the padded layout
        return _from_blocks(x if mask is None else x * mask, like.shape).contiguous()
    out = torch.empty_like(like)
    dst = out.unflatten(2, (blocks, n)).permute(2, 0, 1, 3, 4)
    src = x.view(dst.shape)
    if mask is None:
        dst.copy_(src)
    else:
        torch.mul(src, mask.view(dst.shape), out=dst)
    return out


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched product over the two leading dims of (m, BH, r, s) @ (m, BH, s, u): ``torch.matmul`` folds
    them into one ``bmm`` (the same kernel and values as reshaping here, with less Python per call)."""
    return torch.matmul(a, b)


def _baddbmm_(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """In place: total += a @ b over the two leading dims ((m, BH, r, s) @ (m, BH, s, u)), one ``baddbmm_``
    (the product is added in the matrix kernel: no temporary). ``total`` must be contiguous; returns it."""
    total.view(-1, *total.shape[2:]).baddbmm_(a.flatten(0, 1), b.flatten(0, 1))
    return total


def _times(gain: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """gamma * x, or x itself without cell variation (today's arithmetic exactly)."""
    return x if gain is None else gain * x


def _add_noise_(A: torch.Tensor, cfg: AnalogAttentionConfig, generator: Optional[torch.Generator]) -> torch.Tensor:
    """In place: a sub-tile readout plus its readout noise (None generator: no noise)."""
    if generator is not None:
        A.add_(torch.randn(A.shape, generator=generator, device=A.device, dtype=A.dtype), alpha=cfg.readout_noise)
    return A


def _readout_(A: torch.Tensor, cfg: AnalogAttentionConfig) -> torch.Tensor:
    """In place: the sub-tile pulse counter, clamp to [-1, 1] and quantize (the operations of
    ``quantize._quantize_forward``, so values equal the reference's bit for bit)."""
    lo, hi = OUTPUT_RANGE
    return quantize_(A.clamp_(lo, hi), cfg.output_levels, lo, hi)


def _equal_mask(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 where a == b, else 0, in a's dtype (into ``out`` if given): masks are multiplied in (``x * mask``
    equals ``torch.where(mask, x, 0)`` for finite x), a float mask about twice as fast as a bool one here."""
    return torch.eq(a, b, out=torch.empty_like(a) if out is None else out)


def _dac_blocks(x: torch.Tensor, band: _Band, levels: Optional[int], hi: float, need_mask: bool,
                out: Optional[torch.Tensor] = None, mask_out: Optional[torch.Tensor] = None):
    """A DAC on an input (B, H, T, D), in blocks: ``clamp_quantize(x, levels, 0, hi)`` (the same operations,
    in place on one copy) and, with ``need_mask``, where its clamp passes the gradient (0 <= x <= hi, as
    torch.clamp), a 0/1 mask (``_equal_mask``) in blocks; else None. ``out``, ``mask_out``: where to write."""
    src = _blocks_source(x, band.blocks, band.n)
    clamped = _new_blocks(x, band.blocks, band.n) if out is None else out
    torch.clamp(src, 0.0, hi, out=clamped.view(src.shape))
    inside = None
    if need_mask:  # x is not NaN (validated): equal exactly where the clamp left it
        inside = torch.empty_like(clamped) if mask_out is None else mask_out
        torch.eq(clamped.view(src.shape), src, out=inside.view(src.shape))
    return quantize_(clamped, levels, 0.0, hi), inside


class _Operands:
    """Quantized, offset-removed operands in blocks, with the powers the nonlinear cell needs and the
    chip's cell gains (``gain_k``, ``gain_v``: None without variation). ``Wg``, ``Ug``: gamma * W,
    gamma * U (the linear products' operands); ``W_pow``, ``U_pow`` include gamma too."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AnalogAttentionConfig,
                 band: _Band, need_masks: bool = False, slots: Optional[Tuple[torch.Tensor, ...]] = None,
                 quantized: bool = False, powers: bool = True) -> None:
        # ``dac_inside``: where each DAC's clamp passes the gradient (q, k, v), in blocks (``need_masks``).
        # ``slots``: (Q, W, U, in_q, in_k, in_v) in blocks, to write into, or (``quantized``) to take as they
        # are (a backward from ``forward_packed``'s state). ``powers``: the nonlinear cell's stacked powers.
        if quantized:
            self.Q, self.W, self.U = slots[:3]
            self.dac_inside = tuple(slots[3:])
        else:
            out = slots if slots is not None else (None,) * 6
            self.Q, in_q = _dac_blocks(q, band, cfg.query_levels, 1.0, need_masks, out[0], out[3])
            self.W, in_k = _dac_blocks(k, band, cfg.stored_levels, cfg.stored_max, need_masks, out[1], out[4])
            self.U, in_v = _dac_blocks(v, band, cfg.stored_levels, cfg.stored_max, need_masks, out[2], out[5])
            self.W.sub_(cfg.stored_offset)
            self.U.sub_(cfg.stored_offset)
            self.dac_inside = (in_q, in_k, in_v) if need_masks else None
        self.gain_k = self.gain_v = None
        gains = gains_per_key(cfg, q.shape[1], q.shape[2], q.shape[3], q.dtype, q.device)
        if gains is not None:
            self.gain_k, self.gain_v = (_to_blocks(g.expand(q.shape), band.blocks, band.n) for g in gains)
        self.offset_k = self.offset_v = None
        offsets = offsets_per_key(cfg, q.shape[1], q.shape[2], q.shape[3], q.dtype, q.device)
        if offsets is not None:
            self.offset_k, self.offset_v = (_to_blocks(o.expand(q.shape), band.blocks, band.n) for o in offsets)
        self.Wg, self.Ug = _times(self.gain_k, self.W), _times(self.gain_v, self.U)
        if cfg.nonlinear and powers:
            # [X; X**2; X**3] stacked along the key axis: one batched product gives all three powers.
            self.W_pow = _stacked_powers(self.W, self.Wg, self.gain_k)
            self.U_pow = _stacked_powers(self.U, self.Ug, self.gain_v)
            self.Q_sum = self.Q.sum(dim=-1, keepdim=True)


def _stacked_powers(X: torch.Tensor, Xg: torch.Tensor, gain: Optional[torch.Tensor]) -> torch.Tensor:
    """[gamma X; gamma X**2; gamma X**3] (blocks, BH, 3n, D), written in place into one tensor (the values
    of ``torch.cat([Xg, _times(gain, X ** 2), _times(gain, X ** 3)], dim=-2)``)."""
    n = X.shape[-2]
    out = X.new_empty(*X.shape[:-2], 3 * n, X.shape[-1])
    out[..., :n, :].copy_(Xg)
    for power in (2, 3):
        part = out[..., (power - 1) * n:power * n, :]
        torch.pow(X, power, out=part)
        if gain is not None:
            part.mul_(gain)
    return out


@dataclass
class _LagState:
    """One lag's slabs. Forward-only calls fill ``P``, ``P_weighted``, ``A``; for the backward, the
    linear cell and the surrogate keep ``P_linear`` and ``grad_scale`` (nothing else), the exact
    nonlinear gradient ``P_weighted`` and ``inside``."""

    inside: Optional[torch.Tensor]      # 0/1 (m, BH, n, n): S / S_qk within [0, 1] and key in the window
    P: Optional[torch.Tensor]           # pulse widths, zero outside the window
    P_weighted: Optional[torch.Tensor]  # value array's left operand: P * value_scale, or [P v_1 | P v_2 | P v_3]
    A: Optional[torch.Tensor]           # (m, BH, n, D) this lag's sub-tile output, before clamp/quantize
    P_linear: Optional[torch.Tensor] = None   # P * value_scale: the linear model's value-array operand
    grad_scale: Optional[torch.Tensor] = None  # dL/dR = (dA . (gamma U)^T) * grad_scale (linear model)


def _charge(ops: _Operands, band: _Band, cfg: AnalogAttentionConfig, delta: int) -> torch.Tensor:
    """S / S_qk (m, BH, n, n) of key blocks j = i - delta against query blocks i (eq. 4), no window mask."""
    m = band.blocks - delta
    Qs = ops.Q[delta:]
    X = _charge_of_cells(ops, band, cfg, delta)
    if ops.offset_k is not None:  # each cell's additive offset: Q . delta_K^T, not attenuated
        X.add_(_bmm(Qs, ops.offset_k[:m].transpose(-1, -2)), alpha=1.0 / cfg.qk_saturation)
    return X


def _charge_of_cells(ops: _Operands, band: _Band, cfg: AnalogAttentionConfig, delta: int) -> torch.Tensor:
    """``_charge`` without the cells' additive offsets."""
    m, n, lag = band.blocks - delta, band.n, band.lags[delta]
    Qs = ops.Q[delta:]
    if not cfg.nonlinear:
        return _bmm(Qs, ops.Wg[:m].transpose(-1, -2)).mul_(lag.key_scale)
    c = band.coefficients
    R = _bmm(Qs, ops.W_pow[:m].transpose(-1, -2))                          # Q . (W**i)^T, i = 1..3
    X = R[..., :n] * lag.key_pow[0]
    X.addcmul_(R[..., n:2 * n], lag.key_pow[1]).addcmul_(R[..., 2 * n:], lag.key_pow[2])
    # The i = 0 term: c_0 sum_d Q (identical cells) or c_0 Q . gamma^T.
    zeroth = ops.Q_sum[delta:] if ops.gain_k is None else _bmm(Qs, ops.gain_k[:m].transpose(-1, -2))
    return X.add_(zeroth, alpha=c[0] / cfg.qk_saturation)


def _lag_forward(ops: _Operands, band: _Band, cfg: AnalogAttentionConfig, delta: int,
                 need_grad: bool, need_output: bool = True,
                 out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                 accumulate: Optional[torch.Tensor] = None) -> _LagState:
    """Pulses and sub-tile output for key blocks j = i - delta, query blocks i = delta..blocks-1;
    ``need_grad``: also what ``_lag_backward`` needs; ``need_output``: the output A; ``out``: where to write
    the linear model's two backward slabs (``P_linear``, ``grad_scale``; ``forward_packed``'s state);
    ``accumulate``: a sub-tile readout (m, BH, n, D) the output is added into, in the product (then ``A``
    is that tensor)."""
    m, lag = band.blocks - delta, band.lags[delta]
    X = _charge(ops, band, cfg, delta)
    P = X.clamp(0.0, 1.0)
    inside = None
    if need_grad:
        # where the HardSigmoid passes the gradient (inclusive bounds, as torch.clamp); without a slot the
        # mask takes X's buffer (X is not read after this), one allocation less
        inside = _equal_mask(P, X, X if out is None else out[1])
    # The linear cell's charge without offsets is already (+-)0 outside the window (key_scale is 0 there),
    # and so is the pulse: the mask changes no value there. grad_scale is 0 outside the window too, so
    # the HardSigmoid mask needs the window only where it is used on its own (exact gradient, offsets).
    if lag.outside_mask is not None and (cfg.nonlinear or ops.offset_k is not None):
        P.masked_fill_(lag.outside_mask, 0.0)
        if need_grad and ((cfg.nonlinear and cfg.exact_nonlinear_grad) or ops.offset_k is not None):
            inside.masked_fill_(lag.outside_mask, 0.0)
    del X
    P_weighted = A = None
    if not cfg.nonlinear:
        # in place without a slot unless the V offsets read P below
        in_place = out is None and ops.offset_v is None
        P_weighted = torch.mul(P, lag.value_scale, out=out[0] if out is not None else (P if in_place else None))
        if need_output:
            A = _bmm(P_weighted, ops.Ug[:m]) if accumulate is None else _baddbmm_(accumulate, P_weighted, ops.Ug[:m])
    elif need_output or (need_grad and cfg.exact_nonlinear_grad):
        c = band.coefficients
        # [P v_1 | P v_2 | P v_3] in one product: (.., n, 1, n) * (n, 3, n) -> (.., n, 3n)
        P_weighted = (P.unsqueeze(-2) * lag.value_pow_stacked).flatten(-2)
        if need_output:
            A = _bmm(P_weighted, ops.U_pow[:m]) if accumulate is None else _baddbmm_(accumulate, P_weighted, ops.U_pow[:m])
            zeroth = P.sum(dim=-1, keepdim=True) if ops.gain_v is None else _bmm(P, ops.gain_v[:m])
            A.add_(zeroth, alpha=c[0] / cfg.av_saturation)
    if A is not None and ops.offset_v is not None:  # each cell's additive offset: P . delta_V / S_av
        A.add_(_bmm(P, ops.offset_v[:m]), alpha=1.0 / cfg.av_saturation)
    if not need_grad or (cfg.nonlinear and cfg.exact_nonlinear_grad):
        return _LagState(inside, P, P_weighted, A)
    # Linear model's gradient (linear cell, or the surrogate of docs/attention.md#gradients): keep only its
    # two operands (and, with cell offsets, the HardSigmoid mask their gradient paths need).
    P_linear = P_weighted if not cfg.nonlinear else torch.mul(P, lag.value_scale, out=P if out is None else out[0])
    keep_inside = ops.offset_k is not None
    grad_scale = inside * lag.grad_scale if keep_inside else inside.mul_(lag.grad_scale)
    return _LagState(inside if keep_inside else None, None, None, A, P_linear, grad_scale)


def _lag_backward(ops: _Operands, band: _Band, cfg: AnalogAttentionConfig, delta: int, st: _LagState,
                  dA: torch.Tensor, grads: "_Grads") -> None:
    """Accumulate this lag's share of dQ, dW, dU (blocks) given dA = dL/dA of its sub-tile output."""
    m = band.blocks - delta
    n = band.n
    lag = band.lags[delta]
    Qs, Ws, Us = ops.Q[delta:], ops.W[:m], ops.U[:m]
    gain_k = None if ops.gain_k is None else ops.gain_k[:m]
    gain_v = None if ops.gain_v is None else ops.gain_v[:m]
    if not (cfg.nonlinear and cfg.exact_nonlinear_grad):
        # Linear cell, or the nonlinear cell's surrogate: the linear model's gradient (docs/attention.md#gradients).
        grads.add_product("dU", 0, st.P_linear.transpose(-1, -2), dA, gain_v)
        # dL/dR with R = Q (gamma W)^T: through the value array (g alpha gamma / S_av), the HardSigmoid
        # mask and the key array (g alpha / S_qk): grad_scale holds the mask and both alpha factors.
        dR = _bmm(dA, ops.Ug[:m].transpose(-1, -2)).mul_(st.grad_scale)
        if ops.offset_k is not None:
            _offset_backward_linear(ops, band, cfg, delta, st, dA, dR, grads)
        grads.add_product("dQ", delta, dR, ops.Wg[:m])
        grads.add_product("dW", 0, dR.transpose(-1, -2), Qs, gain_k)
        return
    c = band.coefficients
    # Value array, exact: dP = sum_i v_i * (dA . (U**i)^T) + c_0 / S_av * sum_d dA.
    G = _bmm(dA, ops.U_pow[:m].transpose(-1, -2))
    dX = G[..., :n] * lag.value_pow[0]
    dX.addcmul_(G[..., n:2 * n], lag.value_pow[1]).addcmul_(G[..., 2 * n:], lag.value_pow[2])
    dX.add_(dA.sum(dim=-1, keepdim=True) if gain_v is None else _bmm(dA, gain_v.transpose(-1, -2)),
            alpha=c[0] / cfg.av_saturation)
    if ops.offset_v is not None:  # the V cells' offsets: dP += dA . delta_V^T / S_av
        dX.add_(_bmm(dA, ops.offset_v[:m].transpose(-1, -2)), alpha=1.0 / cfg.av_saturation)
    del G
    Hs = _bmm(st.P_weighted.transpose(-1, -2), dA)                 # (P v_i)^T . dA, i = 1..3
    grads.add("dU", 0, _times(gain_v, Hs[..., :n, :] + 2 * Us * Hs[..., n:2 * n, :]
                              + 3 * Us * Us * Hs[..., 2 * n:, :]))
    del Hs
    dX.mul_(st.inside)                                              # HardSigmoid and window
    # Key array, exact: S / S_qk = c_0 / S_qk * sum_d Q + sum_i k_i * (Q . (W**i)^T).
    dR = torch.cat([dX * lag.key_pow[0], dX * lag.key_pow[1], dX * lag.key_pow[2]], dim=-1)
    grads.add("dQ", delta, _bmm(dR, ops.W_pow[:m]))
    zeroth = dX.sum(dim=-1, keepdim=True) if gain_k is None else _bmm(dX, gain_k)
    grads.add("dQ", delta, zeroth * (c[0] / cfg.qk_saturation))
    if ops.offset_k is not None:  # the K cells' offsets: dQ += dX . delta_K / S_qk
        grads.add("dQ", delta, _bmm(dX, ops.offset_k[:m]) * (1.0 / cfg.qk_saturation))
    Xs = _bmm(dR.transpose(-1, -2), Qs)                            # (.., 3n, D)
    grads.add("dW", 0, _times(gain_k, Xs[..., :n, :] + 2 * Ws * Xs[..., n:2 * n, :]
                              + 3 * Ws * Ws * Xs[..., 2 * n:, :]))


def _offset_backward_linear(ops: _Operands, band: _Band, cfg: AnalogAttentionConfig, delta: int,
                            st: _LagState, dA: torch.Tensor, dR: torch.Tensor, grads: "_Grads") -> None:
    """The cell offsets' share of the linear model's gradient, given dR (dL/dR of R = Q (gamma W)^T through
    gamma U, updated in place): the V offsets add dA . delta_V^T / S_av to dL/dP; the K offsets pass
    the whole dL/dX (X = S / S_qk) to Q through delta_K / S_qk."""
    m, lag = band.blocks - delta, band.lags[delta]
    # dL/dX through the V offsets, inside the HardSigmoid and the window.
    dX_offset = _bmm(dA, ops.offset_v[:m].transpose(-1, -2)).mul_(st.inside).mul_(1.0 / cfg.av_saturation)
    # dL/dX in full: dR / key_scale where key_scale != 0 (the window), recomputed without dividing.
    dX = _bmm(dA, ops.Ug[:m].transpose(-1, -2)).mul_(st.inside).mul_(lag.value_scale).add_(dX_offset)
    grads.add("dQ", delta, _bmm(dX, ops.offset_k[:m]) * (1.0 / cfg.qk_saturation))
    dR.add_(dX_offset.mul_(lag.key_scale))


def _noise_generator(cfg: AnalogAttentionConfig, noise_seed: Optional[int], device) -> Optional[torch.Generator]:
    return readout_generator(noise_seed, device) if cfg.readout_noise > 0 else None


def _readout_groups(band: _Band) -> List[List[int]]:
    """The lags read through one counter each: [0, M/n] share one when the sequence is longer than the
    window (the newest keys overwrite the oldest slots), every other lag has its own."""
    lags = list(range(band.max_lag + 1))
    if band.merged:
        return [[0, band.tiles]] + [[d] for d in lags[1:-1]]
    return [[d] for d in lags]


def _geometry(t_len: int, cfg: AnalogAttentionConfig):
    """(n, blocks, tiles, max_lag, merged) of ``_band``, without tensors."""
    n, tiles = cfg.tile_rows, cfg.tiles
    blocks = -(-t_len // n)
    max_lag = min(tiles, blocks - 1)
    return n, blocks, tiles, max_lag, max_lag == tiles


def _saves(shape, cfg: AnalogAttentionConfig) -> bool:
    """Whether the forward keeps every lag's backward operands for q of ``shape`` (B, H, T, D) (else the
    backward recomputes them): when they take at most ``SAVED_SLABS_MAX_RATIO`` times q, k and v."""
    B, H, T, D = shape
    n, blocks, _, max_lag, _ = _geometry(T, cfg)
    slabs = sum(blocks - d for d in range(max_lag + 1)) * n * n
    per_entry = 2 if not (cfg.nonlinear and cfg.exact_nonlinear_grad) else 4  # floats (masks are floats too)
    per_entry += 1 if cfg.cell_offset_variation > 0 else 0  # the HardSigmoid mask
    return slabs * per_entry * B * H <= SAVED_SLABS_MAX_RATIO * 3 * B * H * T * D


def _saves_slabs(band: _Band, cfg: AnalogAttentionConfig, q: torch.Tensor) -> bool:
    return _saves(tuple(q.shape), cfg)


@dataclass
class _Saved:
    """What the forward hands the backward: the operands, each readout's clamp mask (|A| <= 1, noise
    included), and (``_saves_slabs``) each lag's backward operands, else None."""

    band: _Band
    ops: _Operands
    readout_inside: List[torch.Tensor]
    states: Optional[Dict[int, _LagState]]


def _forward(q, k, v, cfg: AnalogAttentionConfig, noise_seed: Optional[int], keep: bool = False,
             slots: Optional["_PackedViews"] = None):
    """y (B, H, T, D); with ``keep`` also the ``_Saved`` state for ``_backward``: ``(y, saved)``; ``slots``
    (with ``keep``): the tensors that state is written into (``forward_packed``)."""
    band = _band(q.shape[-2], cfg, q.dtype, q.device)
    ops = _Operands(q, k, v, cfg, band, need_masks=keep, slots=None if slots is None else slots.operands)
    noise = _noise_generator(cfg, noise_seed, q.device)
    keep_states = keep and _saves_slabs(band, cfg, q)
    states: Dict[int, _LagState] = {}
    readout_inside = []
    y = None
    for index, group in enumerate(_readout_groups(band)):
        parts = [_lag_forward(ops, band, cfg, group[0], need_grad=keep_states,
                              out=None if slots is None else slots.lags[group[0]])]
        tile = parts[0].A
        if len(group) == 2:  # the merged sub-tile: the oldest keys' contribution to the newest blocks
            d = group[1]
            parts.append(_lag_forward(ops, band, cfg, d, need_grad=keep_states,
                                      out=None if slots is None else slots.lags[d], accumulate=tile[band.tiles:]))
        _add_noise_(tile, cfg, noise)
        if keep:  # the readout clamp passes dy where |A| <= 1
            read = tile.clamp(*OUTPUT_RANGE)
            # the mask takes the readout's buffer without a slot (tile is not read after this)
            readout_inside.append(_equal_mask(read, tile, tile if slots is None else slots.readouts[index]))
            tile = quantize_(read, cfg.output_levels, *OUTPUT_RANGE)
        else:
            tile = _readout_(tile, cfg)
        if y is None:  # the first group is lag 0's: every block
            y = tile
        else:
            y[group[0]:] += tile
        for d, st in zip(group, parts):
            st.A = None
            if keep_states:
                states[d] = st
        del parts, tile
    y = _from_blocks_like(y, q)
    if not keep:
        return y
    return y, _Saved(band, ops, readout_inside, states if keep_states else None)


def _backward(q, k, v, cfg: AnalogAttentionConfig, noise_seed: Optional[int], dy: torch.Tensor,
              saved: Optional[_Saved] = None):
    """dq, dk, dv; from the forward's ``saved`` state, or (None) after recomputing it."""
    if saved is None:
        _, saved = _forward(q, k, v, cfg, noise_seed, keep=True)
    band, ops = saved.band, saved.ops
    dy_blocks = _blocks_source(dy.to(q.dtype), band.blocks, band.n)  # a view: each group reads dy once
    grads = _Grads()
    for group, inside in zip(_readout_groups(band), saved.readout_inside):
        # the readout clamp (as torch.where(inside, dy, 0)); its quantizer is straight-through
        src, dA = dy_blocks[group[0]:], torch.empty_like(inside)
        torch.mul(src, inside.view(src.shape), out=dA.view(src.shape))
        for d in group:
            st = (saved.states[d] if saved.states is not None
                  else _lag_forward(ops, band, cfg, d, need_grad=True, need_output=False))
            _lag_backward(ops, band, cfg, d, st, dA if d == group[0] else dA[band.tiles:], grads)
            del st
        del dA
    # DAC clamps pass the gradient inside their range; the quantizers are straight-through.
    return tuple(_from_blocks_like(g, x, inside)
                 for g, inside, x in zip((grads.dQ, grads.dW, grads.dU), ops.dac_inside, (q, k, v)))


class _Grads:
    """dQ, dW, dU in blocks, accumulated over the lags: ``add(name, start, value)`` adds ``value`` to blocks
    ``start:``; the first value (lag 0's, which spans every block) is taken as it is, not added to zeros."""

    def __init__(self) -> None:
        self.dQ = self.dW = self.dU = None

    def add_product(self, name: str, start: int, a: torch.Tensor, b: torch.Tensor,
                    gain: Optional[torch.Tensor] = None) -> None:
        """``add(name, start, gain * (a @ b))``; without a gain the product is accumulated in place
        (``baddbmm_``: no temporary, no separate sum pass)."""
        total = getattr(self, name)
        if total is None or gain is not None:
            self.add(name, start, _times(gain, _bmm(a, b)))
        else:
            _baddbmm_(total[start:start + a.shape[0]], a, b)

    def add(self, name: str, start: int, value: torch.Tensor) -> None:
        total = getattr(self, name)
        if total is None:
            assert start == 0, "lag 0 comes first"
            setattr(self, name, value)
        else:
            total[start:start + value.shape[0]] += value


# ----------------------------------------------------------------------------------------------------
# The forward's state as one flat tensor (for gaincell.attention.op, whose custom operator can return
# tensors only): each lag's two slabs of the linear model's gradient, then each readout's clamp mask,
# then the quantized operands Q, W, U and their DAC clamp masks (``_PackedViews``), written in place by
# the forward. Empty where nothing is kept (exact nonlinear gradient, cell offsets, or above
# SAVED_SLABS_MAX_RATIO): the backward then recomputes the forward.
# ----------------------------------------------------------------------------------------------------
def packed_state_size(shape, cfg: AnalogAttentionConfig) -> int:
    """Elements of ``forward_packed``'s state for q of ``shape`` (pure arithmetic: usable by fake tensors)."""
    B, H, T, D = shape
    if (cfg.nonlinear and cfg.exact_nonlinear_grad) or cfg.cell_offset_variation > 0 or not _saves(shape, cfg):
        return 0
    n, blocks, tiles, max_lag, merged = _geometry(T, cfg)
    slabs = sum(blocks - d for d in range(max_lag + 1))
    readouts = sum(blocks - d for d in range(max_lag + 1) if not (merged and d == tiles))
    return 2 * slabs * B * H * n * n + (readouts + 6 * blocks) * B * H * n * D


@dataclass
class _PackedViews:
    """The parts of ``forward_packed``'s flat state, as views: each lag's (P_linear, grad_scale), each
    readout's clamp mask, then the operands Q, W, U and their DAC masks (in blocks)."""

    lags: Dict[int, Tuple[torch.Tensor, torch.Tensor]]
    readouts: List[torch.Tensor]
    operands: Tuple[torch.Tensor, ...]


def _packed_views(state: torch.Tensor, band: _Band, bh: int, head_dim: int) -> _PackedViews:
    """Split ``state`` (``packed_state_size`` elements) into its ``_PackedViews``."""
    n, offset = band.n, 0

    def take(shape):
        nonlocal offset
        count = shape[0] * shape[1] * shape[2] * shape[3]
        offset += count
        return state[offset - count:offset].view(shape)
    lags = {d: (take((band.blocks - d, bh, n, n)), take((band.blocks - d, bh, n, n)))
            for d in range(band.max_lag + 1)}
    readouts = [take((band.blocks - group[0], bh, n, head_dim)) for group in _readout_groups(band)]
    operands = tuple(take((band.blocks, bh, n, head_dim)) for _ in range(6))
    assert offset == state.numel(), "state size and layout disagree"
    return _PackedViews(lags, readouts, operands)


def forward_packed(q, k, v, cfg: AnalogAttentionConfig):
    """(y, state): the forward (inputs in the compute dtype, no readout noise) and its packed state,
    written in place (no copy): what ``backward_packed`` needs without recomputing the forward."""
    size = packed_state_size(tuple(q.shape), cfg)
    if size == 0:
        return _forward(q, k, v, cfg, None), q.new_empty(0)
    state = q.new_empty(size)
    band = _band(q.shape[-2], cfg, q.dtype, q.device)
    y, _ = _forward(q, k, v, cfg, None, keep=True, slots=_packed_views(state, band, q.shape[0] * q.shape[1], q.shape[-1]))
    return y, state


def backward_packed(q, k, v, cfg: AnalogAttentionConfig, dy, state):
    """dq, dk, dv from ``forward_packed``'s state (empty: recompute)."""
    if state.numel() == 0:
        return _backward(q, k, v, cfg, None, dy)
    band = _band(q.shape[-2], cfg, q.dtype, q.device)
    views = _packed_views(state, band, q.shape[0] * q.shape[1], q.shape[-1])
    states = {d: _LagState(None, None, None, None, *slabs) for d, slabs in views.lags.items()}
    ops = _Operands(q, k, v, cfg, band, slots=views.operands, quantized=True, powers=False)
    return _backward(q, k, v, cfg, None, dy, _Saved(band, ops, views.readouts, states))


class _BlockedAnalogAttention(torch.autograd.Function):
    """Saves q, k, v, the operands and the readout masks, and (when cheap, ``_saves_slabs``) each lag's
    backward operands; otherwise the backward recomputes the lags (memory O(T * D) between the passes)."""

    @staticmethod
    def forward(ctx, q, k, v, cfg, noise_seed):
        ctx.cfg, ctx.noise_seed = cfg, noise_seed
        keep = any(ctx.needs_input_grad[:3])
        # Autocast off: the products must run in the compute dtype (a bf16 bmm would move levels).
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            out = _forward(q, k, v, cfg, noise_seed, keep=keep)
        if not keep:
            return out
        y, ctx.saved = out
        ctx.save_for_backward(q, k, v)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        q, k, v = ctx.saved_tensors
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _backward(q, k, v, ctx.cfg, ctx.noise_seed, dy, ctx.saved)
        ctx.saved = None
        return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None,
                dv if ctx.needs_input_grad[2] else None, None, None)


def analog_attention_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             cfg: AnalogAttentionConfig, check_inputs: bool = True) -> torch.Tensor:
    """Analog attention (eq. 3 to 7, docs/attention.md) on (B, H, T, D) inputs already scaled (eq. 8), banded.

    Same result as ``analog_attention_dense`` (up to float rounding order), without T x T tensors:
    time O(T * (M + tile_rows) * D), working memory O(T * tile_rows).
    Returns y (B, H, T, D) in the input dtype (half precision is computed in float32). Cell variation
    and readout noise as in the reference (the noise: the next seed of the config's stream per call).
    Memory O(T * (M + tile_rows)) saved for backward where that is at most ``SAVED_SLABS_MAX_RATIO``
    times q, k, v (then the backward costs about one forward), O(T * D) beyond. ``check_inputs=False``
    skips ``validate_inputs`` (for callers that ran it: ``functional.analog_attention``).
    """
    if check_inputs:
        validate_inputs(q, k, v, cfg)
    out_dtype = q.dtype
    dtype = compute_dtype(q.dtype)
    noise_seed = next_readout_seed(cfg) if cfg.readout_noise > 0 else None
    y = _BlockedAnalogAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype), cfg, noise_seed)
    return y.to(out_dtype)
