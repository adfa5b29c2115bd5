"""Scaler calibration (gaincell.adapt.calibration): the affine update in closed form, and a whole model whose
scaled inputs land in the DAC ranges the targets ask for."""
from __future__ import annotations

import torch

from gaincell import diagnose
from gaincell.adapt import calibration
from gaincell.attention import AnalogAttentionConfig
from gaincell.model import GPT, GPTConfig

VOCAB, SEQ = 32, 64
CELL = AnalogAttentionConfig(window=64, tile_rows=64)


def test_exact_affine_gives_the_target_moments():
    x = torch.randn(10_000, dtype=torch.float64) * 3.0 + 1.5
    scale, bias = torch.tensor(0.7, dtype=torch.float64), torch.tensor(-0.2, dtype=torch.float64)
    y = scale * x + bias
    new_scale, new_bias = calibration.exact_affine(scale, bias, y.mean(), y.std(unbiased=False),
                                                   torch.tensor(0.45, dtype=torch.float64),
                                                   torch.tensor(0.2, dtype=torch.float64))
    z = new_scale * x + new_bias
    assert abs(z.mean().item() - 0.45) < 1e-12 and abs(z.std(unbiased=False).item() - 0.2) < 1e-12
    # a constant stage keeps its scale and only shifts
    s, b = calibration.exact_affine(scale, bias, torch.tensor(3.0), torch.tensor(0.0), torch.tensor(0.5),
                                    torch.tensor(0.2))
    assert s == scale and abs(b.item() - (-0.2 + 0.5 - 3.0)) < 1e-12


def _clipped(model, batches):
    """Per layer: fraction of q~ outside [0, 1] and of k~, v~ outside [0, 0.9], on ``batches``."""
    sequences = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in batches])
    health = diagnose.signal_health(model, sequences, batch_size=len(batches[0][0]))
    return [{s: float((h[f"{s}_low"] + h[f"{s}_high"]).max()) for s in "qkv"} for h in health]


def test_calibration_puts_synthetic_inputs_into_the_dac_ranges():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=128,
                          attention="softmax", analog=CELL, attention_implementation="dense"))
    with torch.no_grad():  # wide q, k, v: most of them outside the DAC ranges with the initial scalers
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(20.0)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        t = torch.randint(0, VOCAB, (4, SEQ + 1), generator=g)
        batches.append((t[:, :-1], t[:, 1:]))
    softmax_out = calibration.output_statistics(model, batches)
    model.set_attention("linear_hw", CELL)
    before = _clipped(model, batches)
    targets = calibration.CalibrationTargets()
    result = calibration.calibrate_scalers(model, batches, targets, softmax_out)
    # Every stage's statistics on the calibration batches are the targets (float32 parameters: ~1e-7
    # relative; 1e-5 absolute leaves a margin).
    mean_err, std_err = calibration.target_errors(result["after"], targets, softmax_out)
    assert mean_err < 1e-5 and std_err < 1e-5
    assert calibration.target_errors(result["before"], targets, softmax_out)[1] > 0.5
    # Chebyshev: whatever the distribution, at most 1/k^2 of the values lie k std or more from the mean;
    # q~ in [0, 1] (k = 2.5), k~ and v~ in [0, 0.9] (k = 2.25).
    after = _clipped(model, batches)
    for layer_before, layer_after in zip(before, after):
        assert layer_before["q"] > 0.5 and layer_before["k"] > 0.5
        assert layer_after["q"] <= 1 / 2.5 ** 2
        assert layer_after["k"] <= 1 / 2.25 ** 2 and layer_after["v"] <= 1 / 2.25 ** 2


def test_a_constant_stage_is_not_rescaled_even_with_float_rounding_in_its_std():
    """A head whose pulses are all 0 outputs a constant; its measured std is float32 rounding (~1e-9).
    Rescaling that to the target std would multiply the scaler by ~1e8 (the NaN seen in the ci run):
    both equation 9 and the calibration keep the scale."""
    from gaincell.adapt.algorithm import Statistics, equation_9

    mean, std = torch.tensor([[0.03]], dtype=torch.float64), torch.tensor([[1.8e-9]], dtype=torch.float64)
    target = Statistics(mean=torch.tensor([[0.0]], dtype=torch.float64), std=torch.tensor([[0.17]], dtype=torch.float64))
    scale, bias = torch.tensor([[1.3]], dtype=torch.float64), torch.tensor([[0.1]], dtype=torch.float64)
    new_scale, new_bias = equation_9(scale, bias, Statistics(mean=mean, std=std), target, beta=1.0)
    assert new_scale.item() == 1.3 and abs(new_bias.item() - (0.1 - 0.03)) < 1e-15
    s, b = calibration.exact_affine(scale, bias, mean, std, target.mean, target.std)
    assert s.item() == 1.3 and abs(b.item() - (0.0 - (0.03 - 0.1))) < 1e-15
    # a small but real spread is rescaled
    s, _ = calibration.exact_affine(scale, bias, mean, torch.tensor([[1e-4]], dtype=torch.float64),
                                    target.mean, target.std)
    assert abs(s.item() - 1.3 * 0.17 / 1e-4) < 1e-6


def test_scalers_get_their_own_learning_rate_group():
    """train.scaler_learning_rate: the hardware scalers in their own AdamW group whose rate keeps its ratio
    to the scheduled rate (the trainer sets lr x lr_scale every step)."""
    from gaincell.train import make_optimizer, set_trainable_scalers

    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=128,
                          attention="linear_hw", analog=CELL, attention_implementation="dense"))
    set_trainable_scalers(model)
    opt = make_optimizer(model, 6e-4, 0.1, (0.9, 0.95), torch.device("cpu"), scaler_lr=6e-3)
    scalers = {id(p) for core in model.attention_cores() for p in core.parameters(recurse=False)}
    own = [g for g in opt.param_groups if g.get("lr_scale")]
    assert len(own) == 1 and {id(p) for p in own[0]["params"]} == scalers
    assert own[0]["lr"] == 6e-3 and abs(own[0]["lr_scale"] - 10.0) < 1e-12 and own[0]["weight_decay"] == 0.0
    others = [p for g in opt.param_groups if not g.get("lr_scale") for p in g["params"]]
    assert not scalers & {id(p) for p in others} and len(others) + len(scalers) == len(list(model.parameters()))
    # without it: no separate group
    assert not any(g.get("lr_scale") for g in make_optimizer(model, 6e-4, 0.1, (0.9, 0.95),
                                                              torch.device("cpu")).param_groups)
