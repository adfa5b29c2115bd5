"""``analog_attention``: the analog gain-cell attention (docs/attention.md) on tensors, dispatched
to one of its exact implementations.

    dense    gaincell.attention.reference.analog_attention_dense   (T x T matrices; the oracle)
    blocked  gaincell.attention.blocked.analog_attention_blocked   (CPU, memory O(T * tile))
    triton   gaincell.attention.kernels.analog_attention_triton    (GPU kernels)
    auto     triton on CUDA tensors when the kernels import, else blocked when it imports, else dense
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch

from .config import AnalogAttentionConfig
from .reference import analog_attention_dense, validate_inputs

IMPLEMENTATIONS = ("auto", "dense", "blocked", "triton")
_MODULES = {"blocked": ("gaincell.attention.blocked", "analog_attention_blocked"),
            "triton": ("gaincell.attention.kernels", "analog_attention_triton")}


def _load(name: str) -> Callable:
    module_name, function_name = _MODULES[name]
    return getattr(importlib.import_module(module_name), function_name)


@functools.lru_cache(maxsize=None)
def _available(name: str) -> bool:
    try:
        _load(name)
    except (ImportError, AttributeError):
        return False
    return True


def resolve_implementation(implementation: str, on_cuda: bool) -> str:
    """The implementation ``analog_attention`` runs for ``implementation`` (resolves ``auto``)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: expected one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    if on_cuda and _available("triton"):
        return "triton"
    if _available("blocked"):
        return "blocked"
    return "dense"


def analog_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AnalogAttentionConfig,
                     implementation: str = "auto") -> torch.Tensor:
    """Analog attention (eq. 3 to 7, docs/attention.md) of q, k, v (B, H, T, D), already through the input scalers (eq. 8).

    Returns y (B, H, T, D) before the output scaler (eq. 8). Every implementation computes the same
    function; inputs are validated here once (4-D, equal shapes, same device, no NaN).
    """
    name = resolve_implementation(implementation, bool(getattr(q, "is_cuda", False)))
    validate_inputs(q, k, v, cfg)
    if torch.is_autocast_enabled(q.device.type):
        # bf16/fp16 products would move values across quantization levels: the analog math runs in
        # float32 (at least) whatever the surrounding autocast region, and returns the input dtype.
        out_dtype = q.dtype
        work = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(device_type=q.device.type, enabled=False):
            y = analog_attention(q.to(work), k.to(work), v.to(work), cfg, implementation=name)
        return y.to(out_dtype)
    if name == "dense":
        return analog_attention_dense(q, k, v, cfg)
    try:
        fn = _load(name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"implementation={name!r} is not available here ({err}); "
                          f"use implementation='dense' or 'auto'") from err
    if name == "blocked":
        return fn(q, k, v, cfg, check_inputs=False)  # validated above: once per call
    return fn(q, k, v, cfg)
