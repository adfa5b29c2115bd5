"""Analog gain-cell attention (docs/attention.md) as plain functions on tensors.

    from gaincell.attention import AnalogAttentionConfig, analog_attention
    y = analog_attention(q, k, v, AnalogAttentionConfig(window=128))   # (B, H, T, D) -> (B, H, T, D)

Modules: ``config`` (the dataclass), ``reference`` (dense oracle), ``functional`` (dispatch to the
fastest exact path), ``blocked`` (CPU path), ``kernels`` (Triton), ``decoder`` (streaming KV arrays),
``module`` (``AttentionCore`` with the learnable scalers, for models).
"""
from .config import COEFFICIENT_ORDER, PAPER_COEFFICIENTS, AnalogAttentionConfig, fold_coefficients
from .decoder import AnalogKVDecoder
from .functional import analog_attention
from .module import KINDS, AttentionCore

__all__ = ["AnalogAttentionConfig", "analog_attention", "AnalogKVDecoder", "AttentionCore", "KINDS",
           "PAPER_COEFFICIENTS", "COEFFICIENT_ORDER", "fold_coefficients"]
