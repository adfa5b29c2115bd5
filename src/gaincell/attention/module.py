"""`AttentionCore`: the per-head computation between a transformer's QKV and output projections.

Softmax models use PyTorch's fused scaled-dot-product attention. Hardware models add the learnable
per-head input scalers (eq. 8) and output scaler (eq. 8) around ``analog_attention``. The
scalers are the parameters the adaptation algorithm sets (eq. 9); ``capture_stats`` makes the
module record their outputs' per-head mean and standard deviation on the next forward passes.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import HW_KINDS, AnalogAttentionConfig
from .decoder import AnalogKVDecoder
from .functional import analog_attention
from .noise import layer_config
from .op import config_key, op_supports

KINDS = ("softmax", "softmax_window", "linear_hw", "nonlinear_hw")
SCALER_STAGES = ("q", "k", "v", "out")
# Eq. 8 initial values: a = 1; b_q = 0, b_k = b_v = 0.45 (the stored-voltage midpoint), b_o = 0.
_INIT_BIAS = {"q": 0.0, "k": 0.45, "v": 0.45, "out": 0.0}


def sliding_window_mask(t_query: int, t_key: int, window: Optional[int], device=None) -> torch.Tensor:
    """Boolean (t_query, t_key) mask, True where query t sees key t': t - window < t' <= t.

    Queries are the last ``t_query`` positions of a sequence of ``t_key`` keys.
    """
    q_pos = torch.arange(t_key - t_query, t_key, device=device)[:, None]
    k_pos = torch.arange(t_key, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def split_heads(qkv: torch.Tensor, n_head: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A QKV projection's output (B, T, 3 H D) -> q, k, v each (B, H, T, D) (views, unscaled)."""
    B, T, width = qkv.shape
    shape = (B, T, n_head, width // (3 * n_head))
    q, k, v = qkv.split(width // 3, dim=2)
    return q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)


def _check_split_of(qkv: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q, k, v are ``split_heads(qkv)``'s views (shape, strides, storage offsets)."""
    expected = split_heads(qkv, q.shape[1]) if qkv.dim() == 3 and q.dim() == 4 else None
    same = expected is not None and all(
        x.shape == e.shape and x.stride() == e.stride() and x.data_ptr() == e.data_ptr()
        for x, e in zip((q, k, v), expected))
    if not same:
        raise ValueError(f"AttentionCore: qkv of shape {tuple(qkv.shape)} is not the tensor q, k, v "
                         f"{tuple(q.shape)} are split from (expected q, k, v = split_heads(qkv, n_head))")


class SoftmaxKVCache:
    """Key/value ring buffer of the last ``capacity`` tokens of one softmax layer, (B, H, capacity, D)."""

    def __init__(self, capacity: int, batch: int, heads: int, head_dim: int, device=None, dtype=None) -> None:
        self.capacity = capacity
        self.k = torch.zeros(batch, heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.steps = 0

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One token: q, k, v (B, H, D) -> (B, H, D)."""
        slot = self.steps % self.capacity
        self.k[:, :, slot], self.v[:, :, slot] = k, v
        self.steps += 1
        filled = min(self.steps, self.capacity)
        # Every cached key is in the past or present of the query: no mask. The order of the keys in
        # the buffer does not change softmax attention.
        return F.scaled_dot_product_attention(q.unsqueeze(2), self.k[:, :, :filled],
                                              self.v[:, :, :filled]).squeeze(2)

    def check_finite(self) -> None:
        """Nothing to check: softmax propagates a NaN to the output, where the caller sees it."""


def _scaler_rows(a: torch.Tensor, b: torch.Tensor, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """a, b of shape (1, H, 1, 1) as contiguous (1, H, 1, width) rows: broadcasting one number per head
    against rows of D elements takes PyTorch's strided slow path (2-3x a copy of x here, most of the
    attention layer's elementwise time at the tiny shape); full rows do not."""
    return a.expand(*a.shape[:-1], width).contiguous(), b.expand(*b.shape[:-1], width).contiguous()


def _scaler_backward(dy: torch.Tensor, x: torch.Tensor, a_row: torch.Tensor, scale_shape, needs, out=None):
    """(dx, da, db) of y = a * x + b (``_scaler_rows``' a_row), each None where ``needs`` (three flags) says
    so. dx = dy * a_row bit for bit; da, db reduce over B and T first (outer dimensions, vectorised along
    D), then over D: the autograd expression's sums in another order. ``out``: where dy * x goes, and then
    dx (one buffer of x's size, not two); None allocates."""
    da = torch.mul(dy, x, out=out).sum((0, 2)).sum(-1).view(scale_shape) if needs[1] else None
    db = dy.sum((0, 2)).sum(-1).view(scale_shape) if needs[2] else None
    dx = torch.mul(dy, a_row, out=out) if needs[0] else None
    return dx, da, db


class _PerHeadAffine(torch.autograd.Function):
    """y = a * x + b with a, b of shape (1, H, 1, 1) and x (B, H, T, D) of any layout: the values of that
    autograd expression bit for bit (one product and one sum per element), and its gradients, with a and b
    broadcast as rows (``_scaler_rows``)."""

    @staticmethod
    def forward(ctx, x, a, b):
        a_row, b_row = _scaler_rows(a, b, x.shape[-1])
        ctx.save_for_backward(x, a_row)
        ctx.scale_shape = a.shape
        return torch.mul(x, a_row).add_(b_row)

    @staticmethod
    def backward(ctx, dy):
        x, a_row = ctx.saved_tensors
        # not while torch.compile traces: it refuses a non-contiguous out= (a graph break)
        out = None if torch.compiler.is_compiling() else torch.empty_like(dy)
        return _scaler_backward(dy, x, a_row, ctx.scale_shape, ctx.needs_input_grad, out)


class _PackedQKVAffine(torch.autograd.Function):
    """The q, k and v scalers (eq. 8) of one layer on its QKV projection's output (B, T, 3 H D): returns
    a_s * x_s + b_s for the views x_s of ``split_heads``, each (B, H, T, D), with the values and gradients
    of three ``_PerHeadAffine``. Why one function: its backward writes dx_s straight into the slices of
    one (B, T, 3 H D) gradient, where three separate scalers would allocate three gradients and
    autograd's split would concatenate them (a copy more)."""

    @staticmethod
    def forward(ctx, qkv, n_head, a_q, b_q, a_k, b_k, a_v, b_v):
        views = split_heads(qkv, n_head)
        rows = [_scaler_rows(a, b, views[0].shape[-1]) for a, b in ((a_q, b_q), (a_k, b_k), (a_v, b_v))]
        ctx.save_for_backward(qkv, *(a_row for a_row, _ in rows))
        ctx.n_head, ctx.scale_shape = n_head, a_q.shape
        return tuple(torch.mul(x, a_row).add_(b_row) for x, (a_row, b_row) in zip(views, rows))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        qkv, *a_rows = ctx.saved_tensors
        dqkv = torch.empty_like(qkv)
        grads = []
        for i, (x, dy, a_row, d_view) in enumerate(zip(split_heads(qkv, ctx.n_head), (dq, dk, dv), a_rows,
                                                       split_heads(dqkv, ctx.n_head))):
            # dx written into its slice of dqkv (always: the one gradient of qkv needs every slice)
            _, da, db = _scaler_backward(dy, x, a_row, ctx.scale_shape,
                                         (True,) + ctx.needs_input_grad[2 + 2 * i:4 + 2 * i], d_view)
            grads += [da, db]
        return (dqkv, None, *grads)


class AttentionCore(nn.Module):
    """q, k, v of shape (B, H, T, D) -> attention output (B, H, T, D), before the output projection.

    Args:
        kind: ``softmax`` | ``softmax_window`` | ``linear_hw`` | ``nonlinear_hw``.
        n_head: heads H (one scaler pair per head and stage).
        analog: the hardware config (its ``window`` is also the softmax_window's window). For
            ``linear_hw`` its coefficients must be None, for ``nonlinear_hw`` ten floats.
        implementation: ``auto`` | ``dense`` | ``blocked`` | ``triton`` (see ``analog_attention``).
        layer_index: the layer's place in the model: its chip and readout-noise stream are those of a
            seed derived from ``analog.noise_seed`` and this index (``layer_analog``).
    """

    def __init__(self, kind: str, n_head: int, analog: Optional[AnalogAttentionConfig] = None,
                 implementation: str = "auto", layer_index: int = 0) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"attention kind {kind!r}: expected one of {KINDS}")
        self.kind = kind
        self.n_head = n_head
        self.implementation = implementation
        self.layer_index = layer_index
        self.analog = analog if analog is not None else AnalogAttentionConfig()
        self._check_kind_matches_config()
        for stage in SCALER_STAGES:
            self.register_parameter(f"{stage}_scale", nn.Parameter(torch.ones(n_head)))
            self.register_parameter(f"{stage}_bias", nn.Parameter(torch.full((n_head,), _INIT_BIAS[stage])))
        self.capture_stats = False
        self.captured: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def analog(self) -> AnalogAttentionConfig:
        return self._analog

    @analog.setter
    def analog(self, cfg: AnalogAttentionConfig) -> None:
        self._analog = cfg
        self._update_op_config()

    @property
    def implementation(self) -> str:
        return self._implementation

    @implementation.setter
    def implementation(self, name: str) -> None:
        self._implementation = name
        self._update_op_config()

    @property
    def layer_index(self) -> int:
        return self._layer_index

    @layer_index.setter
    def layer_index(self, index: int) -> None:
        self._layer_index = index
        self._update_op_config()

    @property
    def layer_analog(self) -> AnalogAttentionConfig:
        """The config this layer's arrays run: ``analog`` with the layer's own noise seed."""
        return layer_config(self.analog, self.layer_index)

    def _update_op_config(self) -> None:
        """The custom operator's config argument (of ``layer_analog``) per device kind (False: CPU, True:
        CUDA), computed here and not while torch.compile traces; None where the operator does not apply
        (compiled code then traces the eager path)."""
        cfg = getattr(self, "_analog", None)
        name, index = getattr(self, "_implementation", None), getattr(self, "_layer_index", None)
        if cfg is None or name is None or index is None:
            return
        layer_cfg = layer_config(cfg, index)
        key = config_key(layer_cfg)
        self._op_config = {on_cuda: key if op_supports(layer_cfg, name, on_cuda) is None else None
                           for on_cuda in (False, True)}

    def _check_kind_matches_config(self) -> None:
        if self.kind == "linear_hw" and self.analog.coefficients is not None:
            raise ValueError("kind='linear_hw' needs analog.coefficients=None (the linear cell)")
        if self.kind == "nonlinear_hw" and self.analog.coefficients is None:
            raise ValueError("kind='nonlinear_hw' needs analog.coefficients (ten floats)")

    def set_kind(self, kind: str, analog: Optional[AnalogAttentionConfig] = None) -> None:
        """Switch the attention model in place (e.g. linear -> nonlinear for adaptation)."""
        if kind not in KINDS:
            raise ValueError(f"attention kind {kind!r}: expected one of {KINDS}")
        self.kind = kind
        if analog is not None:
            self.analog = analog
        self._check_kind_matches_config()

    def _scaler(self, stage: str, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """The stage's (scale, bias) as (1, H, 1, 1) tensors of ``dtype``."""
        return (getattr(self, f"{stage}_scale").view(1, -1, 1, 1).to(dtype),
                getattr(self, f"{stage}_bias").view(1, -1, 1, 1).to(dtype))

    def _scale(self, stage: str, x: torch.Tensor) -> torch.Tensor:
        y = _PerHeadAffine.apply(x, *self._scaler(stage, x.dtype))
        if self.capture_stats:
            with torch.no_grad():
                flat = y.detach().float().transpose(0, 1).reshape(y.shape[1], -1)
                self.captured[stage] = (flat.mean(dim=1), flat.std(dim=1))
        return y

    def _scaled_qkv(self, qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_scale`` of q, k, v = ``split_heads(qkv)`` (B, T, 3 H D), in one autograd function."""
        params = [p for stage in SCALER_STAGES[:3] for p in self._scaler(stage, qkv.dtype)]
        return _PackedQKVAffine.apply(qkv, self.n_head, *params)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                qkv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``qkv`` (optional): the projection output (B, T, 3 H D) whose ``split_heads`` views q, k, v are;
        the hardware kinds then run the three input scalers as one function (same values, less copying)."""
        if self.kind == "softmax":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.kind == "softmax_window":
            t = q.shape[-2]
            mask = sliding_window_mask(t, k.shape[-2], self.analog.window, device=q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if qkv is not None and not self.capture_stats and not torch.compiler.is_compiling():
            _check_split_of(qkv, q, k, v)
            return self._hardware_attention(*self._scaled_qkv(qkv))
        return self._hardware_attention(self._scale("q", q), self._scale("k", k), self._scale("v", v))

    def _hardware_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The analog attention and the output scaler on scaled q, k, v."""
        op_config = self._op_config[q.is_cuda]
        if op_config is not None and torch.compiler.is_compiling():
            # One opaque node for torch.compile (gaincell.attention.op): no graph break inside the model.
            y = torch.ops.gaincell.analog_attention(q, k, v, op_config, self.implementation)[0]
        else:
            y = analog_attention(q, k, v, self.layer_analog, implementation=self.implementation)
        return self._scale("out", y)

    # ------------------------------------------------------------------------------------------------
    # token-by-token decoding
    # ------------------------------------------------------------------------------------------------
    def new_state(self, batch: int, head_dim: int, context: int, max_steps: Optional[int] = None,
                  device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                  generator: Optional[torch.Generator] = None):
        """The decoding state of this layer for ``batch`` sequences, advanced by ``step``: the gain-cell
        K/V arrays (``AnalogKVDecoder``) for the hardware kinds, a key/value cache of the last
        ``analog.window`` tokens (``softmax_window``) or ``context`` tokens (``softmax``) otherwise."""
        if self.kind in HW_KINDS:
            return AnalogKVDecoder(self.layer_analog, batch=batch, heads=self.n_head, head_dim=head_dim,
                                   max_steps=max_steps, device=device, dtype=dtype, generator=generator)
        capacity = self.analog.window if self.kind == "softmax_window" else context
        return SoftmaxKVCache(capacity, batch, self.n_head, head_dim, device, dtype)

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state) -> torch.Tensor:
        """One token per sequence: q, k, v (B, H, 1, D) -> (B, H, 1, D), the same function as ``forward``
        at the last position; ``state`` (from ``new_state``) holds the earlier tokens and is advanced."""
        hardware = self.kind in HW_KINDS
        if hardware:
            q, k, v = self._scale("q", q), self._scale("k", k), self._scale("v", v)
        y = state.step(q[:, :, 0], k[:, :, 0], v[:, :, 0]).unsqueeze(2)
        return self._scale("out", y) if hardware else y

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state) -> torch.Tensor:
        """T tokens per sequence at once: q, k, v (B, H, T, D) -> (B, H, T, D), what T calls of ``step``
        give: the gain-cell arrays take them with ``AnalogKVDecoder.prefill`` (exactly the steps'
        outputs), a softmax cache one token at a time."""
        if self.kind not in HW_KINDS:
            return torch.stack([state.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(q.shape[2])], dim=2)
        y = state.prefill(self._scale("q", q), self._scale("k", k), self._scale("v", v))
        return self._scale("out", y)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, n_head={self.n_head}, window={self.analog.window}"
