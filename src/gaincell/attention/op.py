"""The analog attention as a ``torch.library`` custom operator, so that ``torch.compile`` sees one opaque
node per attention layer instead of tracing (and breaking on) the dispatch, validation and banding code.

    y = torch.ops.gaincell.analog_attention(q, k, v, config_key(cfg), "auto")

Forward: ``gaincell::analog_attention`` validates the inputs once and runs the blocked path (computed in
float32 or float64 whatever the autocast region, as ``functional.analog_attention``) on the actual
tensors at run time; it returns y and the forward's state for the backward as one flat tensor
(``blocked.forward_packed``: the lags' backward slabs, the readout masks and the quantized operands,
written in place; not differentiable, and its gradient is never materialised). Backward (registered autograd): ``gaincell::analog_attention_backward``
computes dq, dk, dv from q, k, v, dy and that state (``blocked.backward_packed``), so values and
gradients are bit for bit those of the eager call. Both have fake (meta) implementations giving the output shapes and layouts, for tracing.
The operator covers the blocked path (``OP_IMPLEMENTATIONS``; the dense oracle is left to autograd,
and autograd cannot run inside an operator's implementation).

The configuration travels as a JSON string (custom operators take tensors, numbers and strings, not
dataclasses); ``config_key`` and ``config_from_key`` convert, the latter cached. ``AttentionCore`` uses
this operator only while ``torch.compile`` traces it (eager calls keep the direct path) and only where
``op_supports`` says so: no readout noise (its per-call seed would not reach the operator's backward;
cell variation, fixed per chip, is fine) and a path the operator covers.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Optional, Tuple

import torch

from . import blocked
from .config import AnalogAttentionConfig
from .functional import resolve_implementation
from .reference import compute_dtype, validate_inputs

__all__ = ["config_key", "config_from_key", "op_supports", "analog_attention_op", "OP_IMPLEMENTATIONS"]

OP_IMPLEMENTATIONS = ("blocked",)  # the paths whose backward the operator calls directly


# Version of ``blocked.forward_packed``'s state layout, carried in the operator's config argument: a graph
# compiled (and cached on disk by inductor) against another layout has another constant, so never matches.
STATE_LAYOUT_VERSION = 2
_VERSION_FIELD = "_state_layout_version"


def config_key(cfg: AnalogAttentionConfig) -> str:
    """The config as a canonical JSON string (every field, sorted keys, and the state layout's version):
    the operator's argument."""
    if not isinstance(cfg, AnalogAttentionConfig):
        raise TypeError(f"cfg is a {type(cfg).__name__}: expected gaincell.attention.AnalogAttentionConfig")
    return json.dumps({**dataclasses.asdict(cfg), _VERSION_FIELD: STATE_LAYOUT_VERSION}, sort_keys=True)


@functools.lru_cache(maxsize=64)
def config_from_key(key: str) -> AnalogAttentionConfig:
    """Inverse of ``config_key`` (cached: a model has a few distinct configs)."""
    fields = json.loads(key)
    version = fields.pop(_VERSION_FIELD, None)
    if version != STATE_LAYOUT_VERSION:
        raise ValueError(f"operator config with state layout version {version!r}: expected {STATE_LAYOUT_VERSION} "
                         f"(a graph compiled with another gaincell; clear the torch.compile cache)")
    return AnalogAttentionConfig(**fields)


def op_supports(cfg: AnalogAttentionConfig, implementation: str = "auto", on_cuda: bool = False) -> Optional[str]:
    """None when the operator computes ``cfg`` exactly as the eager path does; else why not (one line)."""
    if cfg.readout_noise > 0:
        return (f"readout_noise={cfg.readout_noise}: each call draws the next seed of a stream, which the "
                f"operator's backward would not see")
    name = resolve_implementation(implementation, on_cuda)
    if name not in OP_IMPLEMENTATIONS:
        return f"implementation {name!r}: the operator covers {OP_IMPLEMENTATIONS}"
    return None


def _laid_out_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x with the layout the fake implementations promise, ``torch.empty_like(like)``'s: the blocked path
    already writes its outputs so (the input's layout where that is dense, so the model's head merge costs
    no copy); a copy only where it did not (a ragged sequence)."""
    target = torch.empty_like(like)
    if x.stride() == target.stride():
        return x
    return target.copy_(x)


@torch.library.custom_op("gaincell::analog_attention", mutates_args=())
def _analog_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: str,
                         implementation: str) -> Tuple[torch.Tensor, torch.Tensor]:
    cfg = config_from_key(config)
    problem = op_supports(cfg, implementation, q.is_cuda)
    if problem is not None:
        raise ValueError(f"gaincell::analog_attention: {problem}")
    validate_inputs(q, k, v, cfg)
    dtype = compute_dtype(q.dtype)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        y, state = blocked.forward_packed(q.to(dtype), k.to(dtype), v.to(dtype), cfg)
    return _laid_out_like(y.to(q.dtype), q), state


@_analog_attention_op.register_fake
def _(q, k, v, config, implementation):
    cfg = config_from_key(config)
    size = blocked.packed_state_size(tuple(q.shape), cfg)
    return torch.empty_like(q), q.new_empty(size, dtype=compute_dtype(q.dtype))


@torch.library.custom_op("gaincell::analog_attention_backward", mutates_args=())
def _analog_attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dy: torch.Tensor,
                                  state: torch.Tensor, config: str, implementation: str
                                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = config_from_key(config)
    dtype = compute_dtype(q.dtype)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        grads = blocked.backward_packed(q.to(dtype), k.to(dtype), v.to(dtype), cfg, dy.to(dtype), state)
    return tuple(_laid_out_like(g.to(x.dtype), x) for g, x in zip(grads, (q, k, v)))


@_analog_attention_backward_op.register_fake
def _(q, k, v, dy, state, config, implementation):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, config, implementation = inputs
    ctx.save_for_backward(q, k, v, output[1])
    # The state is not differentiable, and its gradient is not materialised (a zero tensor the size of the
    # state per call): the backward gets dstate = None (and dy = None where y was not used).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.config, ctx.implementation = config, implementation


def _backward(ctx, dy, dstate):
    if dy is None:
        return None, None, None, None, None
    q, k, v, state = ctx.saved_tensors
    dq, dk, dv = torch.ops.gaincell.analog_attention_backward(q, k, v, dy, state, ctx.config, ctx.implementation)
    return dq, dk, dv, None, None


_analog_attention_op.register_autograd(_backward, setup_context=_setup_context)


def analog_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AnalogAttentionConfig,
                        implementation: str = "auto") -> torch.Tensor:
    """``analog_attention`` through the custom operator (same result, forward and backward)."""
    problem = op_supports(cfg, implementation, bool(getattr(q, "is_cuda", False)))
    if problem is not None:
        raise ValueError(f"analog_attention_op: {problem}; call gaincell.attention.analog_attention instead")
    return torch.ops.gaincell.analog_attention(q, k, v, config_key(cfg), implementation)[0]
