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


class _PerHeadAffine(torch.autograd.Function):
    """y = a * x + b with a, b of shape (1, H, 1, 1) and x (B, H, T, D) of any layout: the values of that
    autograd expression bit for bit (one product and one sum per element), and its gradients.

    Why not the expression itself: broadcasting one number per head against rows of D elements takes
    PyTorch's strided slow path (2-3x a copy of x here, most of the attention layer's elementwise time
    at the tiny shape); a and b are broadcast as contiguous (1, H, 1, D) rows instead. The gradients of
    a and b reduce over B and T first (outer dimensions, vectorised along D), then over D: the same sums
    in another order (float rounding aside)."""

    @staticmethod
    def forward(ctx, x, a, b):
        a_row = a.expand(*a.shape[:-1], x.shape[-1]).contiguous()
        ctx.save_for_backward(x, a_row)
        ctx.scale_shape = a.shape
        return torch.mul(x, a_row).add_(b.expand_as(a_row).contiguous())

    @staticmethod
    def backward(ctx, dy):
        x, a_row = ctx.saved_tensors
        da = db = dx = None
        # dy * x is written into the buffer that then takes dx (one allocation of x's size, not two); not
        # while torch.compile traces (it refuses a non-contiguous out=, a graph break)
        buffer = None if torch.compiler.is_compiling() else torch.empty_like(dy)
        if ctx.needs_input_grad[1]:
            da = torch.mul(dy, x, out=buffer).sum((0, 2)).sum(-1).view(ctx.scale_shape)
        if ctx.needs_input_grad[2]:
            db = dy.sum((0, 2)).sum(-1).view(ctx.scale_shape)
        if ctx.needs_input_grad[0]:
            dx = torch.mul(dy, a_row, out=buffer)
        return dx, da, db


class _PackedQKVAffine(torch.autograd.Function):
    """The q, k and v scalers (eq. 8) of one layer on its QKV projection's output (B, T, 3 H D): returns
    a_s * x_s + b_s for s = q, k, v, each (B, H, T, D) (a view-layout like ``split_heads``'), with the
    values and gradients of three ``_PerHeadAffine`` on the three views. Why one function: its backward
    writes a_s * dy_s straight into the slices of one (B, T, 3 H D) gradient, where three separate
    scalers would allocate three gradients and autograd's split would concatenate them (a copy more)."""

    @staticmethod
    def forward(ctx, qkv, n_head, a_q, b_q, a_k, b_k, a_v, b_v):
        B, T, width = qkv.shape
        views = qkv.view(B, T, 3, n_head, width // (3 * n_head)).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        rows = [(a.expand(*a.shape[:-1], views.shape[-1]).contiguous(),
                 b.expand(*b.shape[:-1], views.shape[-1]).contiguous())
                for a, b in ((a_q, b_q), (a_k, b_k), (a_v, b_v))]
        ctx.save_for_backward(qkv, *(a_row for a_row, _ in rows))
        ctx.n_head, ctx.scale_shape = n_head, a_q.shape
        return tuple(torch.mul(x, a_row).add_(b_row) for x, (a_row, b_row) in zip(views, rows))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        qkv, *a_rows = ctx.saved_tensors
        B, T, width = qkv.shape
        shape = (B, T, 3, ctx.n_head, width // (3 * ctx.n_head))
        views = qkv.view(shape).permute(2, 0, 3, 1, 4)
        dqkv = qkv.new_empty(qkv.shape)
        d_views = dqkv.view(shape).permute(2, 0, 3, 1, 4)
        grads = []
        for x, dy, a_row, d_view in zip(views, (dq, dk, dv), a_rows, d_views):
            if dy is None:
                d_view.zero_()
                grads += [None, None]
                continue
            # the _PerHeadAffine backward, dy * x taking the slice that then holds dx
            da = torch.mul(dy, x, out=d_view).sum((0, 2)).sum(-1).view(ctx.scale_shape)
            db = dy.sum((0, 2)).sum(-1).view(ctx.scale_shape)
            torch.mul(dy, a_row, out=d_view)
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

    def _scale(self, stage: str, x: torch.Tensor) -> torch.Tensor:
        a = getattr(self, f"{stage}_scale").view(1, -1, 1, 1).to(x.dtype)
        b = getattr(self, f"{stage}_bias").view(1, -1, 1, 1).to(x.dtype)
        y = _PerHeadAffine.apply(x, a, b)
        if self.capture_stats:
            with torch.no_grad():
                flat = y.detach().float().transpose(0, 1).reshape(y.shape[1], -1)
                self.captured[stage] = (flat.mean(dim=1), flat.std(dim=1))
        return y

    def _scaled_qkv(self, qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_scale`` of q, k, v = ``split_heads(qkv)`` (B, T, 3 H D), in one autograd function."""
        params = []
        for stage in SCALER_STAGES[:3]:
            params += [getattr(self, f"{stage}_scale").view(1, -1, 1, 1).to(qkv.dtype),
                       getattr(self, f"{stage}_bias").view(1, -1, 1, 1).to(qkv.dtype)]
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
