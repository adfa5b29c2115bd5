"""Signal-health diagnostics (gaincell.diagnose): exact counts on hand-made tensors, ablations checked
against an independently modified model, paired statistics against numpy."""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from gaincell import diagnose
from gaincell.attention import AnalogAttentionConfig
from gaincell.model import GPT, GPTConfig

# No leakage: every charge below is a closed form.
CELL = AnalogAttentionConfig(window=64, tile_rows=64, decay_per_step=0.0)


def _bhtd(values, t_len=4, d=2) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 1, t_len, d)


def test_clipped_fractions_and_level_occupancy_are_counted_exactly():
    # q: 2 of 8 below 0, 3 above 1; k: 1 below 0, 1 above 0.9; v: all inside.
    q = _bhtd([-0.5, -0.1, 1.5, 1.01, 2.0, 0.0, 1.0, 0.5])
    k = _bhtd([-0.2, 0.95, 0.46, 0.46, 0.9, 0.0, 0.3, 0.6])
    v = _bhtd([0.46] * 8)
    c = diagnose.signal_counts(q, k, v, CELL)
    frac = {n: (c[n] / c[f"{n}_of"]).item() for n in diagnose.FRACTIONS}
    assert frac["q_low"] == 2 / 8 and frac["q_high"] == 3 / 8
    assert frac["k_low"] == 1 / 8 and frac["k_high"] == 1 / 8
    assert frac["v_low"] == 0 and frac["v_high"] == 0
    # Query levels (16 on [0, 1], step 1/15): 0 <- {-0.5, -0.1, 0.0}; 15 <- {1.5, 1.01, 2.0, 1.0}; 0.5 -> 7.5
    # rounds half to even -> 8.
    expected_q = torch.zeros(16, dtype=torch.float64)
    expected_q[0], expected_q[15], expected_q[8] = 3, 4, 1
    assert torch.equal(c["q_levels"][0], expected_q)
    # Stored levels (8 on [0, 0.9], step 0.9/7): 0.46 -> 3.58 -> 4; 0.3 -> 2.33 -> 2;
    # 0.6 -> 4.67 -> 5; clipped -0.2 / 0.95 -> 0 / 7.
    expected_k = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2], dtype=torch.float64)
    assert torch.equal(c["k_levels"][0], expected_k)
    assert torch.equal(c["v_levels"][0], torch.tensor([0, 0, 0, 0, 8, 0, 0, 0], dtype=torch.float64))


def test_zero_charge_gives_zero_pulses_and_zero_readouts():
    """Keys at the offset (W = 0) store nothing: S = 0, every in-window pulse is 0, every readout 0."""
    t_len, d = 6, 4
    q = torch.rand(2, 3, t_len, d)
    k = torch.full((2, 3, t_len, d), 0.45)
    v = torch.rand(2, 3, t_len, d) * 0.9
    c = diagnose.signal_counts(q, k, v, CELL)
    pairs = t_len * (t_len + 1) // 2 * 2  # causal in-window pairs per head: 21 per sequence, 2 sequences
    assert torch.equal(c["hs_zero_of"], torch.full((3,), float(pairs)))
    assert torch.equal(c["hs_zero"], c["hs_zero_of"]) and c["hs_sat"].sum() == 0
    assert torch.equal(c["readout_zero"], c["readout_zero_of"]) and c["readout_sat"].sum() == 0
    assert torch.equal(c["output_zero"], c["output_zero_of"])


def test_saturated_pulses_and_adc_saturation_follow_the_closed_form():
    """Q = 1, K = V = 0.9 (W = U = 0.45), D = 64: S = 19.3 * 64 * 0.45 = 556 > S_sat = 80, so every
    pulse is 1; query t then reads A = (19.3 / 40) * 0.45 * (t + 1) per feature, >= 1 for t >= 4."""
    t_len, d = 8, 64
    q = torch.ones(1, 1, t_len, d)
    k = v = torch.full((1, 1, t_len, d), 0.9)
    c = diagnose.signal_counts(q, k, v, CELL)
    assert c["hs_sat"].item() == c["hs_sat_of"].item() == t_len * (t_len + 1) / 2
    assert c["hs_zero"].item() == 0
    per_query = 19.3 / 40 * 0.45
    saturating = sum(per_query * (t + 1) >= 1 for t in range(t_len))
    assert saturating == 4
    assert c["readout_sat"].item() == saturating * d and c["readout_sat_of"].item() == t_len * d
    assert c["readout_zero"].item() == 0 and c["output_zero"].item() == 0


def test_readouts_of_subtiles_without_visible_keys_are_not_counted():
    """Window 128 in two sub-tiles of 64: queries t < 64 see no key of the second sub-tile."""
    cell = dataclasses.replace(CELL, window=128)
    t_len = 80
    q = torch.rand(1, 1, t_len, 2)
    k = v = torch.full((1, 1, t_len, 2), 0.45)
    c = diagnose.signal_counts(q, k, v, cell)
    # first sub-tile: every query; second: queries 64..79 (they see keys 64..t)
    assert c["readout_zero_of"].item() == (t_len + (t_len - 64)) * 2


def _tiny_gpt(attention="softmax") -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=1, n_embd=64, attention=attention,
                         analog=CELL, attention_implementation="dense"))


def test_zero_ablation_equals_the_model_without_attention_projections():
    model = _tiny_gpt()
    seqs = torch.randint(0, 16, (6, 9))
    with diagnose.ablated_attention(model, [None, None]):
        ablated = diagnose.sequence_losses(model, seqs, batch_size=4)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for block in reference.transformer.h:
            block.attn.c_proj.weight.zero_()   # attention's only contribution left: c_proj's bias
    torch.testing.assert_close(ablated, diagnose.sequence_losses(reference, seqs, batch_size=6),
                               rtol=0, atol=1e-12)
    # Hooks are removed on exit: the model is as before.
    torch.testing.assert_close(diagnose.sequence_losses(model, seqs, 6),
                               diagnose.sequence_losses(copy.deepcopy(model), seqs, 6), rtol=0, atol=0)


def test_mean_ablation_uses_each_cores_mean_output():
    model = _tiny_gpt("linear_hw")
    seqs = torch.randint(0, 16, (5, 9))
    means = diagnose.core_output_means(model, seqs, batch_size=2)
    outputs = []
    hook = model.attention_cores()[1].register_forward_hook(lambda m, a, o: outputs.append(o.double()))
    diagnose.sequence_losses(model, seqs, batch_size=5)
    hook.remove()
    torch.testing.assert_close(means[1], outputs[0].mean(dim=(0, 2)), rtol=1e-12, atol=1e-12)
    share = diagnose.attention_share(model, seqs, batch_size=5)
    assert set(share) == {"zero", "mean"} and share["zero"]["n"] == 5


def test_paired_stats_match_numpy():
    a, b = torch.tensor([2.0, 2.5, 3.0, 2.2]), torch.tensor([1.9, 2.1, 2.9, 2.25])
    d = (a - b).numpy().astype(np.float64)
    s = diagnose.paired_stats(a, b)
    assert s["mean"] == pytest.approx(d.mean(), rel=1e-6)
    assert s["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(4), rel=1e-6)


def test_validation_sequences_are_disjoint_and_named_when_too_many():
    tokens = np.arange(100, dtype=np.uint16)
    seqs = diagnose.validation_sequences(tokens, block_size=9, n_sequences=10)
    assert seqs.shape == (10, 10) and len(set(seqs.flatten().tolist())) == 100
    with pytest.raises(ValueError, match="n_sequences=11: expected 1..10"):
        diagnose.validation_sequences(tokens, block_size=9, n_sequences=11)
