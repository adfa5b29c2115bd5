"""Hardware cost model of the analog gain-cell attention, and GPU/CPU attention baselines.

    from gaincell.hardware import HardwareParameters, estimate
    est = estimate(HardwareParameters.paper(), window=1024, head_dim=64, heads=12)
    est.latency_per_token_ns, est.energy_per_head_per_token_nj, est.energy_breakdown_nj, ...

Stages: ``hardware_estimates`` (:mod:`gaincell.hardware.stage`) and ``gpu_baseline``
(:mod:`gaincell.hardware.gpu_baseline`).
"""
from gaincell.hardware.costmodel import (
    PAPER_ENERGY_PER_HEAD_PER_TOKEN_NJ,
    PAPER_LATENCY_PER_TOKEN_NS,
    TECHNOLOGIES,
    CellTechnology,
    HardwareEstimate,
    HardwareParameters,
    cell_technology,
    estimate,
    load_device_summary,
)

__all__ = ["HardwareParameters", "HardwareEstimate", "estimate", "CellTechnology", "TECHNOLOGIES",
           "cell_technology", "load_device_summary", "PAPER_LATENCY_PER_TOKEN_NS",
           "PAPER_ENERGY_PER_HEAD_PER_TOKEN_NJ"]
