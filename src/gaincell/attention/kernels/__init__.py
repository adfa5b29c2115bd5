"""Fused Triton kernels of the analog gain-cell attention (GPU; on CPU only under ``TRITON_INTERPRET=1``).

    from gaincell.attention.kernels import analog_attention_triton
    y = analog_attention_triton(q, k, v, cfg)     # CUDA tensors (B, H, T, D); same result as the reference

``analog_kernels.py`` holds the kernels (forward, backward dQ, backward dK/dV; see its header for what is
fused), ``triton_attention.py`` the autograd function and launch logic. Importing this package needs
``triton`` (the ``gpu`` extra); the dispatcher falls back to the blocked path when it is missing.
"""
from .triton_attention import INTERPRET, analog_attention_triton, triton_supports

__all__ = ["analog_attention_triton", "triton_supports", "INTERPRET"]
