"""Stage ``derive_decay``: the leakage per token step of the attention model from our own circuit.

``attention.decay_per_step: derived`` asks for lambda = L * delta_t / tau (eq. 5's leakage per step,
docs/attention.md#window-and-leakage) with every factor from this pipeline: the token period ``L * delta_t`` (``L`` layers,
``delta_t`` the cost model's latency per token and layer for the profile's own attention: window, head
dimension, heads) of the ``simulated`` parameter set, and the retention time constant ``tau`` our SPICE
measured (``retention_tau_s`` of ``results/<profile>/device/summary.json``). Writes
``results/<profile>/hardware/decay_per_step.json``, which the attention reads
(``gaincell.attention.config.resolve_decay_per_step``). The default stays the paper's 1.56e-4.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict

from gaincell.hardware.costmodel import HardwareParameters, estimate
from gaincell.io import atomic_write_json


def derive_decay(device_summary_path: Path, window: int, head_dim: int, heads: int, layers: int,
                 tile_rows: int) -> Dict[str, Any]:
    """lambda per token step from the simulated set's latency and the measured retention (see module doc)."""
    params = HardwareParameters.simulated(device_summary_path).replace(tile_rows=int(tile_rows))
    est = estimate(params, window=window, head_dim=head_dim, heads=heads, layers=layers)
    token_period_s = layers * est.latency_per_token_ns * 1e-9
    return {"decay_per_step": token_period_s / params.retention_tau_s,
            "token_period_s": token_period_s, "latency_per_token_per_layer_ns": est.latency_per_token_ns,
            "layers": layers, "window": window, "head_dim": head_dim, "heads": heads,
            "retention_tau_s": params.retention_tau_s,
            "sources": {"latency": "cost model, simulated parameter set (our SPICE array latency, the paper's "
                                   "timing chain otherwise)",
                        "retention_tau_s": params.source_of("retention_tau_s")},
            "formula": "lambda = layers x latency per token and layer / tau (eq. 5)"}


def run(cfg: Any) -> Dict[str, Any]:
    """Stage ``derive_decay``: write ``hardware/decay_per_step.json`` for the profile's model."""
    n_head, n_embd = int(cfg.model.n_head), int(cfg.model.n_embd)
    result = derive_decay(Path(str(cfg.hardware.device_summary_path)), window=int(cfg.attention.window),
                          head_dim=n_embd // n_head, heads=n_head, layers=int(cfg.model.n_layer),
                          tile_rows=int(cfg.attention.tile_rows))
    result["created_unix_s"] = time.time()
    out = Path(str(cfg.attention.derived_decay_path))
    atomic_write_json(out, result)
    print(f"derive_decay: lambda = {result['layers']} x {result['latency_per_token_per_layer_ns']:.4g} ns / "
          f"{result['retention_tau_s']:.4g} s = {result['decay_per_step']:.4g} per token step -> {out}")
    return result
