"""Quantizers and clamps with the gradients of docs/attention.md#quantization, docs/attention.md#gradients, shared by every attention path.

* ``quantize``: forward ``clamp(step * round(x / step), lo, hi)`` with ``step = (hi - lo) / (levels - 1)``
  (zero is always a level, round half to even); backward passes the gradient unchanged (straight-through).
* ``clamp``: ``torch.clamp`` whose gradient is zero outside ``[lo, hi]``.
* ``clamp_quantize``: the DAC / ADC model: clamp, then quantize.
* ``straight_through``: forward ``value``, backward that of ``surrogate`` (the surrogate gradient of the
  nonlinear cell, docs/attention.md#gradients).

The forward values are bit-exact: a level is always ``k * step`` for an integer ``k`` (or ``lo``/``hi``
when clamped), so tests can compare quantized tensors with their level grid by equality.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["quantization_step", "quantization_levels", "quantize", "clamp", "clamp_quantize",
           "quantize_", "straight_through"]


def _check_levels(levels: int, lo: float, hi: float) -> None:
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 2:
        raise ValueError(f"levels={levels!r}: expected an integer >= 2 (or None to disable the quantizer)")
    if not hi > lo:
        raise ValueError(f"quantizer range [{lo}, {hi}]: expected lo < hi")


def quantization_step(levels: int, lo: float, hi: float) -> float:
    """Distance between neighbouring levels: (hi - lo) / (levels - 1)."""
    _check_levels(levels, lo, hi)
    return (hi - lo) / (levels - 1)


def quantization_levels(levels: int, lo: float, hi: float, dtype=torch.float64, device=None) -> torch.Tensor:
    """Every value ``quantize`` can return, sorted: ``clamp(k * step, lo, hi)`` for the integers k that
    reach [lo, hi] (with their clamped neighbours, so a saturated input maps to exactly ``lo``/``hi``).

    For [0, 1] or [0, 0.9] these are ``levels`` values; for [-1, 1] with 32 levels they are 33:
    ``k * 2/31`` for ``|k| <= 15`` plus +-1 (docs/attention.md#quantization).
    """
    step = quantization_step(levels, lo, hi)
    k = torch.arange(math.floor(lo / step) - 1, math.ceil(hi / step) + 2, device=device).to(dtype)
    return torch.unique(torch.clamp(k * step, lo, hi))


def _quantize_forward(x: torch.Tensor, levels: int, lo: float, hi: float) -> torch.Tensor:
    step = (hi - lo) / (levels - 1)
    # x * (1 / step) with the reciprocal computed in double: for [-1, 1] / 32 levels it is 15.5 exactly,
    # so x = +-1 rounds (half to even) to +-16 and clamps back to +-1 (a saturated reading stays
    # saturated); x / step in float32 would give 15.4999 and drop a saturated value to 15/15.5.
    index = torch.round(x * ((levels - 1) / (hi - lo)))
    return torch.clamp(index * step, lo, hi)


def quantize_(x: torch.Tensor, levels: Optional[int], lo: float, hi: float) -> torch.Tensor:
    """In place, no autograd: ``x`` replaced by ``_quantize_forward(x, ...)``, the same operations in the
    same order (so the same values bit for bit) without allocating; ``levels=None``: ``x`` unchanged.
    For the hot paths that own ``x`` (the blocked attention's operands and sub-tile readouts)."""
    if levels is None:
        return x
    step = (hi - lo) / (levels - 1)
    return x.mul_((levels - 1) / (hi - lo)).round_().mul_(step).clamp_(lo, hi)


def quantize(x: torch.Tensor, levels: Optional[int], lo: float, hi: float) -> torch.Tensor:
    """Uniform quantizer of docs/attention.md#quantization, straight-through in the backward pass; ``levels=None``: identity."""
    if levels is None:
        return x
    _check_levels(levels, lo, hi)
    with torch.no_grad():
        q = _quantize_forward(x, levels, lo, hi)
    # q + (x - x.detach()) is exactly q in the forward pass (x - x == +0 for finite x) and has the
    # gradient of x in the backward pass; it also works under double backward and torch.compile.
    return straight_through(q, x)


def clamp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clamp to [lo, hi]; the gradient is that of torch.clamp (1 inside, 0 outside the range)."""
    return torch.clamp(x, lo, hi)


def clamp_quantize(x: torch.Tensor, levels: Optional[int], lo: float, hi: float) -> torch.Tensor:
    """DAC / ADC: clamp to [lo, hi], then quantize with ``levels`` levels (None: clamp only)."""
    return quantize(clamp(x, lo, hi), levels, lo, hi)


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Forward: exactly ``value`` (detached). Backward: the gradient of ``surrogate``.

    Both must have the same shape. Used for the quantizers (surrogate = identity) and for the
    nonlinear cell's surrogate gradient (surrogate = the linear cell's product, docs/attention.md#gradients).
    """
    if not surrogate.requires_grad:
        return value.detach()
    return value.detach() + (surrogate - surrogate.detach())
