"""Projections on analog weight tiles in the cost model: literature inputs, closed-form counts, and the
attention-only estimate left exactly as it was."""
from __future__ import annotations

import pytest

from gaincell.hardware.costmodel import (
    AnalogTileParameters,
    HardwareParameters,
    attention_share,
    estimate,
    estimate_projections,
)


def test_attention_estimate_is_unchanged_by_the_projection_model():
    """estimate() has no projection term: the paper's 12-head design point is 6.15 nJ per head and
    73.8 nJ per token, as published (paper Fig. 5), and 66 ns (Fig. 2c timing chain)."""
    est = estimate(HardwareParameters.paper(), window=1024, head_dim=64, heads=12)
    assert est.energy_per_head_per_token_nj == pytest.approx(6.15, rel=1e-12)
    assert est.energy_per_token_nj == pytest.approx(73.8, rel=1e-12)
    assert est.latency_per_token_ns == pytest.approx(66.0, rel=1e-12)
    assert not any("projection" in k for k in est.to_dict())


def test_hermes_tile_figures_follow_from_the_published_chip_totals():
    """63.1 TOPS at 9.76 TOPS/W over 64 cores of 256 x 256 (Le Gallo et al. 2023), 1 MAC = 2 ops."""
    one = AnalogTileParameters.hermes_one_phase()
    assert one.energy_per_mac_j == pytest.approx(0.2049e-12, rel=1e-3)     # 2 / 9.76e12 J
    assert one.mvm_latency_ns == pytest.approx(132.9, rel=1e-3)            # 131,072 ops / (63.1e12 / 64) s
    four = AnalogTileParameters.hermes_four_phase()
    assert four.energy_per_mac_j == pytest.approx(0.8065e-12, rel=1e-3)    # 2 / 2.48e12 J
    assert four.mvm_latency_ns == pytest.approx(521.0, rel=1e-3)           # 16.1 TOPS
    with pytest.raises(ValueError, match="energy_per_mac_j"):
        AnalogTileParameters(energy_per_mac_j=0.0)


def test_gpt2_projection_costs_in_closed_form():
    """GPT-2 124M (d = 768, 12 layers): 12 d^2 = 7,077,888 MACs per layer per token; tiles of 256 x 256:
    QKV 3 x 9, out 3 x 3, fc 3 x 12, proj 12 x 3 = 108; four MVMs in sequence per layer."""
    tiles = AnalogTileParameters.hermes_one_phase()
    p = estimate_projections(tiles, d_model=768, layers=12)
    assert p.macs_per_token_per_layer == 12 * 768 ** 2 == 7_077_888
    assert p.tiles_per_layer == 108
    assert p.energy_per_token_nj == pytest.approx(7_077_888 * 2 / 9.76e12 * 1e9)
    assert p.energy_breakdown_nj["mlp_fc"] == pytest.approx(4 * p.energy_breakdown_nj["attention_out"])
    assert p.energy_all_layers_nj == pytest.approx(12 * p.energy_per_token_nj)
    assert p.latency_all_layers_ns == pytest.approx(12 * 4 * tiles.mvm_latency_ns)
    att = estimate(HardwareParameters.paper(), window=1024, head_dim=64, heads=12, layers=12)
    share = attention_share(att, p)
    assert share["attention_energy_nj"] == pytest.approx(12 * 73.8)
    assert share["attention_energy_share"] == pytest.approx(885.6 / (885.6 + 7_077_888 * 12 * 2 / 9.76e12 * 1e9))
    assert 0.04 < share["attention_energy_share"] < 0.06   # the attention is ~5 % of a fully analog token
    with pytest.raises(ValueError, match="layers"):
        attention_share(estimate(HardwareParameters.paper(), window=1024, head_dim=64, heads=12), p)
    with pytest.raises(ValueError, match="d_model"):
        estimate_projections(tiles, d_model=0)
