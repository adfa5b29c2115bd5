"""Dense reference of the analog gain-cell attention (docs/attention.md; eq. 3 to 7).

The oracle every faster path is tested against: it materialises the T x T matrices (charge ``S``,
pulse widths ``P``, leakage ``alpha``) and loops over the window's sub-tiles, one step of the spec per
line. Memory is O(B * H * T * T): fine for T up to a few thousand on CPU in float32.

The building blocks are public so that tests (e.g. against the authors' SPICE arrays) and other
implementations exercise the same cell model:

    dac_inputs            docs/attention.md#quantization   clamp + quantize q~, k~, v~ -> Q, K, V
    window_mask, leakage  eq. 6   which keys a query sees; alpha = exp(-lambda (t - t'))
    key_array_product     eq. 4   S = sum_i c_i alpha**i (Q . W**i)     (linear: g alpha Q . W)
    hard_sigmoid          eq. 3   P = clamp(S / S_sat_qk, 0, 1)
    value_array_product   docs/attention.md#second-array-product-and-sub-tiles   A = sum_i c_i (P alpha**i) . U**i / S_sat_av  (one sub-tile)
    subtile_of_key        docs/attention.md#second-array-product-and-sub-tiles   r(t') = (t' mod M) // tile_rows
    read_out_subtiles     docs/attention.md#second-array-product-and-sub-tiles   y = sum_r quant(clamp(A_r, -1, 1), 32 levels on [-1, 1])
    add_readout_noise     issue 16  A_r + readout_noise * N(0, 1) before the output ADC

Cell variation (``cfg.cell_variation``, ``gaincell.attention.noise``): the optional ``cell_gain``
argument of the two array products is the gain factor of the cell holding each key's element (per key,
broadcast over the batch); it multiplies every term of the cell, c_0 included. Cell offsets
(``cfg.cell_offset_variation``): the optional ``cell_offset`` argument is each cell's additive offset
delta (a random c_0 of that cell), added to the cell's output: ``+ Q . delta`` on the K array,
``+ P . delta / S_sat_av`` on the V array (neither attenuated by leakage, nor a stored-weight term).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from .config import AnalogAttentionConfig
from .noise import gains_per_key, next_readout_seed, offsets_per_key, readout_generator
from .quantize import clamp, clamp_quantize, straight_through

__all__ = ["validate_inputs", "dac_inputs", "window_mask", "leakage", "key_array_product", "hard_sigmoid",
           "value_array_product", "subtile_of_key", "add_readout_noise", "analog_attention_dense"]

OUTPUT_RANGE = (-1.0, 1.0)  # pulse-counter readout range of one sub-tile (docs/attention.md#second-array-product-and-sub-tiles)


def validate_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AnalogAttentionConfig) -> None:
    """One-line ValueError/TypeError for inputs no implementation can take (shared by all paths)."""
    if not isinstance(cfg, AnalogAttentionConfig):
        raise TypeError(f"cfg is a {type(cfg).__name__}: expected gaincell.attention.AnalogAttentionConfig")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} is a {type(x).__name__}: expected a torch.Tensor of shape (B, H, T, D)")
        if x.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(x.shape)} ({x.dim()} dims): expected 4 dims (B, H, T, D)")
        if not x.is_floating_point():
            raise ValueError(f"{name} has dtype {x.dtype}: expected a floating-point tensor")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v shapes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         f"expected the same (B, H, T, D)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    # One reduction per tensor and one host sync: a sum is NaN if an element is NaN (or +inf meets -inf);
    # only then look element by element (and let inf-only inputs pass, as before).
    if not bool(torch.isnan(q.sum() + k.sum() + v.sum())):
        return
    for name, x in (("q", q), ("k", k), ("v", v)):
        if torch.isnan(x).any():
            raise ValueError(f"{name} contains NaN ({int(torch.isnan(x).sum())} of {x.numel()} values): "
                             f"expected finite inputs")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32 (the oracle's precision); others as given."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dac_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AnalogAttentionConfig
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DAC / storage (docs/attention.md#quantization): Q = quant(clamp(q~, 0, 1), 16), K, V = quant(clamp(., 0, 0.9 V), 8).

    Straight-through quantizers; the clamps pass gradients only inside their range.
    """
    Q = clamp_quantize(q, cfg.query_levels, 0.0, 1.0)
    K = clamp_quantize(k, cfg.stored_levels, 0.0, cfg.stored_max)
    V = clamp_quantize(v, cfg.stored_levels, 0.0, cfg.stored_max)
    return Q, K, V


def window_mask(t_len: int, window: int, device=None) -> torch.Tensor:
    """Boolean (T, T) mask, True where query t sees key t': t - window < t' <= t (eq. 6)."""
    t = torch.arange(t_len, device=device)
    lag = t[:, None] - t[None, :]
    return (lag >= 0) & (lag < window)


def leakage(t_len: int, cfg: AnalogAttentionConfig, dtype=torch.float32, device=None) -> torch.Tensor:
    """alpha[t, t'] = exp(-lambda (t - t')) inside the window, 0 outside (eq. 6); (T, T)."""
    t = torch.arange(t_len, device=device, dtype=torch.float64)
    lag = t[:, None] - t[None, :]
    alpha = torch.exp(-cfg.decay_per_step * lag)
    alpha = torch.where(window_mask(t_len, cfg.window, device), alpha, torch.zeros_like(alpha))
    return alpha.to(dtype)


def _times(cell_gain: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """gamma * x, or x itself without cell variation (no operation: today's arithmetic exactly)."""
    return x if cell_gain is None else cell_gain * x


def _needs_surrogate(cfg: AnalogAttentionConfig, *tensors: torch.Tensor) -> bool:
    return (cfg.nonlinear and not cfg.exact_nonlinear_grad and torch.is_grad_enabled()
            and any(t.requires_grad for t in tensors))


def key_array_product(Q: torch.Tensor, W: torch.Tensor, cfg: AnalogAttentionConfig,
                      alpha: Optional[torch.Tensor] = None, cell_gain: Optional[torch.Tensor] = None,
                      cell_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 4 and 7 with each cell's additive offset: ``_key_array_product`` + Q @ delta^T (``cell_offset``
    broadcastable to W; None: no offset, today's arithmetic exactly). Its gradient is exact on every cell model."""
    S = _key_array_product(Q, W, cfg, alpha, cell_gain)
    return S if cell_offset is None else S + Q @ cell_offset.transpose(-1, -2)


def _key_array_product(Q: torch.Tensor, W: torch.Tensor, cfg: AnalogAttentionConfig,
                       alpha: Optional[torch.Tensor] = None, cell_gain: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
    """Eq. 4 and 7: the K array's charge S[t, t'] from queries Q (..., T, D) and stored weights
    W = K - 0.45 V (..., T', D); ``alpha`` (T, T') leakage, None for none. No window mask applied.

    Linear cell: g * alpha * Q @ W^T. Nonlinear: sum_i c_i * alpha**i * Q @ (W**i)^T, where the i = 0
    term, c_0 * sum_d Q[t, d], ignores the key and is not attenuated. With the surrogate gradient
    (default, docs/attention.md#gradients) the backward is the linear cell's. ``cell_gain`` (broadcastable to W; None: 1)
    multiplies each cell's terms: W**i -> gamma * W**i, and the i = 0 term becomes c_0 * Q @ gamma^T.
    """
    linear = None
    if not cfg.nonlinear or _needs_surrogate(cfg, Q, W):
        linear = cfg.gain * (Q @ _times(cell_gain, W).transpose(-1, -2))
        if alpha is not None:
            linear = linear * alpha
        if not cfg.nonlinear:
            return linear
    c = cfg.folded_coefficients
    grad_context = torch.no_grad() if linear is not None else contextlib.nullcontext()
    with grad_context:
        if cell_gain is None:
            S = (c[0] * Q.sum(dim=-1, keepdim=True)).expand(*Q.shape[:-1], W.shape[-2])
        else:
            S = c[0] * (Q @ cell_gain.transpose(-1, -2))
        for i in (1, 2, 3):
            term = c[i] * (Q @ _times(cell_gain, W ** i).transpose(-1, -2))
            S = S + (term if alpha is None else term * alpha ** i)
    return S if linear is None else straight_through(S, linear)


def hard_sigmoid(S: torch.Tensor, cfg: AnalogAttentionConfig) -> torch.Tensor:
    """Eq. 3: pulse width P = clamp(S / S_sat_qk, 0, 1), in units of T_max."""
    return clamp(S / cfg.qk_saturation, 0.0, 1.0)


def value_array_product(P: torch.Tensor, U: torch.Tensor, cfg: AnalogAttentionConfig,
                        alpha: Optional[torch.Tensor] = None, cell_gain: Optional[torch.Tensor] = None,
                        cell_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 4 and 7 with each cell's additive offset: ``_value_array_product`` + P @ delta / S_sat_av
    (``cell_offset`` broadcastable to U; None: no offset, today's arithmetic exactly)."""
    A = _value_array_product(P, U, cfg, alpha, cell_gain)
    return A if cell_offset is None else A + (P @ cell_offset) / cfg.av_saturation


def _value_array_product(P: torch.Tensor, U: torch.Tensor, cfg: AnalogAttentionConfig,
                         alpha: Optional[torch.Tensor] = None, cell_gain: Optional[torch.Tensor] = None
                         ) -> torch.Tensor:
    """Eq. 4 and 7: one V (sub-)array's output A[t, d] from pulse widths P (..., T, T') and stored
    weights U = V - 0.45 V (..., T', D); ``alpha`` (T, T') leakage, None for none. Not clamped.

    Linear: (g / S_sat_av) (P * alpha) @ U. Nonlinear: (1 / S_sat_av) sum_i c_i (P * alpha**i) @ U**i
    (the i = 0 term c_0 * sum_t' P[t, t'] is neither key- nor leakage-dependent). Surrogate gradient
    as in ``key_array_product``; ``cell_gain`` (broadcastable to U) as there: U**i -> gamma * U**i, and the
    i = 0 term becomes c_0 * P @ gamma.
    """
    linear = None
    if not cfg.nonlinear or _needs_surrogate(cfg, P, U):
        linear = (cfg.gain / cfg.av_saturation) * ((P if alpha is None else P * alpha) @ _times(cell_gain, U))
        if not cfg.nonlinear:
            return linear
    c = cfg.folded_coefficients
    grad_context = torch.no_grad() if linear is not None else contextlib.nullcontext()
    with grad_context:
        if cell_gain is None:
            A = (c[0] * P.sum(dim=-1, keepdim=True)).expand(*P.shape[:-1], U.shape[-1])
        else:
            A = c[0] * (P @ cell_gain)
        for i in (1, 2, 3):
            weighted = P if alpha is None else P * alpha ** i
            A = A + c[i] * (weighted @ _times(cell_gain, U ** i))
        A = A / cfg.av_saturation
    return A if linear is None else straight_through(A, linear)


def subtile_of_key(t_len: int, cfg: AnalogAttentionConfig, device=None) -> torch.Tensor:
    """Sub-tile (docs/attention.md#second-array-product-and-sub-tiles) r(t') = (t' mod M) // tile_rows holding key t' (memory slot t' mod M); (T,)."""
    return (torch.arange(t_len, device=device) % cfg.window) // cfg.tile_rows


def add_readout_noise(A: torch.Tensor, cfg: AnalogAttentionConfig, generator: Optional[torch.Generator],
                      read: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A sub-tile readout before its ADC: A + readout_noise * N(0, 1), fresh per element (0: A itself).

    ``read`` (broadcastable to A): where the readout happens (False: a sub-tile that holds no key yet for
    that query is not read, and stays 0)."""
    if cfg.readout_noise == 0:
        return A
    noise = torch.randn(A.shape, generator=generator, device=A.device, dtype=A.dtype)
    if read is not None:
        noise = noise * read
    return A + cfg.readout_noise * noise


def analog_attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AnalogAttentionConfig,
                           *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Analog attention (eq. 3 to 7, docs/attention.md) on (B, H, T, D) inputs already scaled (eq. 8).

    Returns y (B, H, T, D) before the output scaler (eq. 8), in the input dtype. With
    ``cfg.cell_variation`` (and ``cfg.cell_offset_variation``) the cells of the chip ``cfg.noise_seed`` (key t' in ring row t' mod M); with
    ``cfg.readout_noise`` noise drawn from ``generator``, or when None from the next seed of the
    config's readout-noise stream (``gaincell.attention.noise``).
    """
    validate_inputs(q, k, v, cfg)
    out_dtype = q.dtype
    dtype = compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    t_len, device = q.shape[-2], q.device

    Q, K, V = dac_inputs(q, k, v, cfg)                      # quantization
    W = K - cfg.stored_offset
    U = V - cfg.stored_offset
    mask = window_mask(t_len, cfg.window, device)           # eq. 6
    alpha = leakage(t_len, cfg, dtype, device)
    gain_k, gain_v = gains_per_key(cfg, q.shape[1], t_len, q.shape[3], dtype, device) or (None, None)
    offset_k, offset_v = offsets_per_key(cfg, q.shape[1], t_len, q.shape[3], dtype, device) or (None, None)
    if cfg.readout_noise > 0 and generator is None:
        generator = readout_generator(next_readout_seed(cfg), device)

    S = key_array_product(Q, W, cfg, alpha, gain_k, offset_k)  # eq. 4, 7
    P = hard_sigmoid(S, cfg)                                # eq. 3
    P = torch.where(mask, P, torch.zeros_like(P))           # keys outside the window: no pulse

    # Eq. 4 and 7 per sub-tile: the keys of each sub-tile; only sub-tiles that hold a key (an empty one reads exactly 0).
    slot_tile = subtile_of_key(t_len, cfg, device)
    used_tiles = min(cfg.tiles, -(-t_len // cfg.tile_rows))
    y = torch.zeros_like(Q)
    for r in range(used_tiles):
        keys = torch.nonzero(slot_tile == r).squeeze(-1)
        A_r = value_array_product(P[..., keys], U[..., keys, :], cfg, alpha[:, keys],
                                  None if gain_v is None else gain_v[..., keys, :],
                                  None if offset_v is None else offset_v[..., keys, :])
        # Sub-tile r is read for queries t >= its first key, r * tile_rows (it holds a key from then on).
        read = (torch.arange(t_len, device=device) >= r * cfg.tile_rows).to(dtype)[:, None]
        A_r = add_readout_noise(A_r, cfg, generator, read)
        y = y + clamp_quantize(A_r, cfg.output_levels, *OUTPUT_RANGE)
    return y.to(out_dtype)
