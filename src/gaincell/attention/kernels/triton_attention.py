"""Autograd function and launches of the analog-attention Triton kernels (``analog_kernels.py``).

Grid: one program per block of ``tile_rows`` queries (forward, dQ) or keys (dK/dV), times B * H.
Memory: q, k, v saved for backward; nothing of size T x T or tiles x T x D anywhere.

``TRITON_INTERPRET=1`` must be in the environment before triton is first imported (triton decides at
kernel-decoration time); the kernels then run on CPU tensors through NumPy (slow: test sizes only), with
a single launch configuration (autotuning does not work in the interpreter).
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple

import torch
import triton

from ..blocked import analog_attention_blocked
from ..config import AnalogAttentionConfig
from ..noise import cell_gains, next_readout_seed
from ..reference import OUTPUT_RANGE, compute_dtype, validate_inputs
from . import analog_kernels as _k

__all__ = ["analog_attention_triton", "triton_supports", "INTERPRET", "DOT_PRECISIONS"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")
# Exact float32 by default; "tf32x3" (three TF32 tensor-core passes, about float32 accuracy) is faster.
DEFAULT_DOT_PRECISION = os.environ.get("GAINCELL_TRITON_DOT_PRECISION", "ieee")
_warned: set = set()  # fallback reasons already reported


def _tuned(kernel, key):
    if INTERPRET:
        return kernel
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2)]
    return triton.autotune(configs=configs, key=key)(kernel)


_KEY = ["D", "window", "NONLINEAR", "VARIED", "NOISE", "PREC"]
_fwd = _tuned(_k._analog_fwd_kernel, _KEY)
_bwd_dq = _tuned(_k._analog_bwd_dq_kernel, _KEY + ["EXACT"])
_bwd_dkdv = _tuned(_k._analog_bwd_dkdv_kernel, _KEY + ["EXACT"])


def triton_supports(cfg: AnalogAttentionConfig, head_dim: Optional[int] = None) -> Optional[str]:
    """None when the kernels can run ``cfg`` (and head dimension ``head_dim``); else why not (one line)."""
    n = cfg.tile_rows
    if cfg.cell_offset_variation > 0:
        return (f"cell_offset_variation={cfg.cell_offset_variation}: the Triton kernels do not model cell offsets "
                f"(expected 0; the blocked and dense paths do)")
    if n < 16 or n > 128 or n & (n - 1):
        return f"tile_rows={n}: the Triton kernels need a power of two in [16, 128] (one tl.dot block)"
    if head_dim is not None and head_dim > 256:
        return f"head dimension D={head_dim}: the Triton kernels hold a (tile_rows x D) block in registers, D <= 256"
    return None


def _quantizer(levels: Optional[int], lo: float, hi: float) -> Tuple[float, float, bool]:
    """(1 / step, step, on) as in quantize._quantize_forward: reciprocal computed in double."""
    if levels is None:
        return 1.0, 1.0, False
    return (levels - 1) / (hi - lo), (hi - lo) / (levels - 1), True


def _launch_args(cfg: AnalogAttentionConfig, q: torch.Tensor, noise_seed: Optional[int]):
    """Scalars, the chip's gain arrays (GKp, GVp: (H, M, D); q itself, never read, without variation)
    and compile-time constants of one launch."""
    _, H, t_len, head_dim = q.shape
    c = cfg.folded_coefficients
    q_inv, q_step, q_on = _quantizer(cfg.query_levels, 0.0, 1.0)
    kv_inv, kv_step, kv_on = _quantizer(cfg.stored_levels, 0.0, cfg.stored_max)
    gains = cell_gains(cfg, H, head_dim, q.dtype, q.device)
    scalars = dict(T=t_len, D=head_dim, H=H, window=cfg.window, lam=cfg.decay_per_step, gain=cfg.gain,
                   qk_sat=cfg.qk_saturation, av_sat=cfg.av_saturation, c0=c[0], c1=c[1], c2=c[2], c3=c[3],
                   stored_offset=cfg.stored_offset, q_inv_step=q_inv, q_step=q_step, kv_hi=cfg.stored_max,
                   kv_inv_step=kv_inv, kv_step=kv_step, noise_seed=noise_seed or 0, noise_std=cfg.readout_noise,
                   GKp=gains[0] if gains is not None else q, GVp=gains[1] if gains is not None else q)
    consts = dict(BLOCK=cfg.tile_rows, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                  NONLINEAR=cfg.nonlinear, Q_QUANT=q_on, KV_QUANT=kv_on, VARIED=gains is not None,
                  NOISE=noise_seed is not None)
    return scalars, consts


class _TritonAnalogAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cfg, precision, noise_seed):
        B, H, T, D = q.shape
        scalars, consts = _launch_args(cfg, q, noise_seed)
        out_inv, out_step, out_on = _quantizer(cfg.output_levels, *OUTPUT_RANGE)
        y = torch.empty_like(q)
        grid = (triton.cdiv(T, cfg.tile_rows), B * H)
        _fwd[grid](q, k, v, y, **scalars, out_inv_step=out_inv, out_step=out_step, OUT_QUANT=out_on,
                   PREC=precision, **consts)
        ctx.cfg, ctx.precision, ctx.noise_seed = cfg, precision, noise_seed
        ctx.save_for_backward(q, k, v)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        q, k, v = ctx.saved_tensors
        cfg = ctx.cfg
        B, H, T, D = q.shape
        scalars, consts = _launch_args(cfg, q, ctx.noise_seed)  # the forward's noise, drawn again
        exact = cfg.nonlinear and cfg.exact_nonlinear_grad
        dy = dy.to(q.dtype).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grid = (triton.cdiv(T, cfg.tile_rows), B * H)
        _bwd_dq[grid](q, k, v, dy, dq, **scalars, EXACT=exact, PREC=ctx.precision, **consts)
        _bwd_dkdv[grid](q, k, v, dy, dk, dv, **scalars, EXACT=exact, PREC=ctx.precision, **consts)
        return dq, dk, dv, None, None, None


def analog_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AnalogAttentionConfig,
                            dot_precision: Optional[str] = None) -> torch.Tensor:
    """Analog attention (eq. 3 to 7, docs/attention.md) of q, k, v (B, H, T, D) by the fused Triton kernels.

    Same function as ``analog_attention_dense`` (forward and backward), with time O(T * M * D) and
    memory O(T * D). Inputs must be CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``).
    Half precision is computed in float32, as in the reference; the output has the input dtype.
    ``dot_precision``: tl.dot input precision, one of ``DOT_PRECISIONS`` (default ``ieee``, or the
    environment's ``GAINCELL_TRITON_DOT_PRECISION``). What the kernels do not support (see
    ``triton_supports``) falls back, with a one-time warning, to the blocked path.
    """
    validate_inputs(q, k, v, cfg)
    problem = triton_supports(cfg, q.shape[-1])
    if problem is not None:
        # Fall back to an exact path that supports it, so that implementation="auto" never fails.
        fallback = analog_attention_blocked
        if problem not in _warned:
            warnings.warn(f"analog_attention_triton: {problem}; using {fallback.__name__} instead",
                          RuntimeWarning, stacklevel=2)
            _warned.add(problem)
        return fallback(q, k, v, cfg)
    precision = dot_precision or DEFAULT_DOT_PRECISION
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision={precision!r}: expected one of {DOT_PRECISIONS}")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError(f"analog_attention_triton: the tensors are on {q.device}; the Triton kernels need "
                           f"CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, for tests). "
                           f"On CPU use implementation='blocked'")
    out_dtype = q.dtype
    dtype = compute_dtype(q.dtype)
    if dtype == torch.float64:
        precision = "ieee"  # tensor-core precisions are float32-only
    noise_seed = next_readout_seed(cfg) if cfg.readout_noise > 0 else None
    y = _TritonAnalogAttention.apply(q.to(dtype).contiguous(), k.to(dtype).contiguous(),
                                     v.to(dtype).contiguous(), cfg, precision, noise_seed)
    return y.to(out_dtype)
