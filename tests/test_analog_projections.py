"""Analog projections (gaincell.analog_projections): digital unchanged, the configured layers analog,
the analog model equal to the digital one with noise and quantization off, inference noise per seed,
checkpoints, generation, the Hydra group."""
from __future__ import annotations

import copy
import dataclasses
import io
import math

import pytest
import torch
from torch import nn

from gaincell.analog_projections import (
    PROJECTION_LAYERS,
    AnalogProjectionConfig,
    InferenceNoiseConfig,
    analog_layers,
    apply_inference_noise,
    calibrate_input_ranges,
    projection_config_from_dict,
    set_projections,
)
from gaincell.attention import AnalogAttentionConfig
from gaincell.attention.config import PAPER_COEFFICIENTS
from gaincell.generate import generate
from gaincell.model import GPT, GPTConfig, model_from_checkpoint_dict

VOCAB, BLOCK = 97, 48
# Every converter, clip and noise off: the tiles compute x @ W^T exactly but for the order of the sums.
IDEAL = dict(inp_res=-1, out_res=-1, out_bound=0.0, clip="none", train_weight_noise=0.0, train_output_noise=0.0,
             input_range_init_std=1e4)  # input ranges far beyond any input: nothing is clipped


def _config(projections=None, kind="softmax", n_embd=64) -> GPTConfig:
    analog = AnalogAttentionConfig(window=32, tile_rows=16,
                                   coefficients=PAPER_COEFFICIENTS if kind == "nonlinear_hw" else None)
    return GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=n_embd, attention=kind,
                     analog=analog, **({} if projections is None else {"projections": projections}))


def _model(projections=None, kind="softmax", n_embd=64, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(_config(projections, kind, n_embd)).eval()


def _tokens(n=4, seed=1, length=BLOCK):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _calibrated(cfg: AnalogProjectionConfig, kind="softmax", n_embd=64) -> GPT:
    model = _model(cfg, kind, n_embd)
    calibrate_input_ranges(model, [_tokens(seed=10 + i) for i in range(cfg.input_range_init_batches)])
    return model


# --------------------------------------------------------------------------------------------------
# digital: the model as it was
# --------------------------------------------------------------------------------------------------
def test_digital_projections_are_bit_identical_to_the_model_without_the_setting():
    """Default, explicit ``digital`` and a checkpoint config written before the setting existed (no
    ``projections`` key) build the same modules, the same weights and the same logits, bit for bit."""
    reference = _model()
    old_dict = reference.config.to_dict()
    del old_dict["projections"]
    torch.manual_seed(0)
    from_old_dict = GPT(GPTConfig(**old_dict)).eval()
    explicit = _model(AnalogProjectionConfig(kind="digital"))
    set_projections(explicit, projection_config_from_dict({"kind": "digital", "inference": {}}))
    idx = _tokens()
    with torch.no_grad():
        expected = reference(idx)
        for other in (from_old_dict, explicit):
            assert [type(m) for m in other.modules()] == [type(m) for m in reference.modules()]
            assert all(type(m) is nn.Linear for n, m in other.named_modules() if n.endswith(PROJECTION_LAYERS))
            sd, ref_sd = other.state_dict(), reference.state_dict()
            assert list(sd) == list(ref_sd) and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
            assert torch.equal(other(idx), expected)
    assert analog_layers(reference) == []


# --------------------------------------------------------------------------------------------------
# analog: exactly the configured layers
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [list(PROJECTION_LAYERS), ["mlp.c_fc"], ["attn.c_attn", "mlp.c_proj"]])
def test_analog_replaces_exactly_the_configured_layers(layers):
    digital = _model()
    model = _model(AnalogProjectionConfig(kind="analog", layers=layers))
    analog_names = {n for n, _ in analog_layers(model)}
    assert analog_names == {f"transformer.h.{i}.{layer}" for i in range(2) for layer in layers}
    for name, module in model.named_modules():
        if name in analog_names:
            assert type(module).__name__ == "AnalogLinear"
        elif isinstance(module, nn.Linear):
            assert type(module) is nn.Linear, name  # the rest stays digital, the LM head included
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied to the embedding
    # the analog layers start from the digital weights (same seed, same initialisation)
    digital_sd = digital.state_dict()
    for key, value in model.state_dict().items():
        if key in digital_sd:
            assert torch.equal(value, digital_sd[key]), key
    extra = set(model.state_dict()) - set(digital_sd)
    assert extra and all(k.rsplit(".", 1)[0] in analog_names for k in extra)  # input ranges and counters


@pytest.mark.parametrize("kind", ["softmax", "nonlinear_hw"])
def test_ideal_analog_tiles_equal_the_digital_model(kind):
    """Noise, quantization and clipping off, the analog model's logits are the digital model's.

    Run in float64: the only difference left is the order of the sums (tiles of 256 inputs whose partial
    sums add digitally, vs one dot product), a relative rounding error of about K * 2**-53 ~ 1e-13 for
    K <= 256-term sums, carried through 2 layers and the LM head: 1e-9 absolute on logits of order 1 is
    far above it, and far below any quantization step (the 8-bit ADC changes logits by ~1e-2, tested below).
    """
    cfg = AnalogProjectionConfig(kind="analog", max_input_size=256, **IDEAL)
    digital = _model(kind=kind, n_embd=128).double()
    model = _model(cfg, kind=kind, n_embd=128)
    calibrate_input_ranges(model, [_tokens(seed=10 + i) for i in range(cfg.input_range_init_batches)])
    model = model.double()
    idx = _tokens()
    with torch.no_grad():
        expected, got = digital(idx), model(idx)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=0)
    # the MLP's second projection (512 inputs) really is split over two tiles
    assert analog_layers(model)[3][1].in_sizes == [256, 256]

    quantized = _model(dataclasses.replace(cfg, inp_res=254, out_res=254, out_bound=14.0), kind=kind, n_embd=128)
    calibrate_input_ranges(quantized, [_tokens(seed=10 + i) for i in range(cfg.input_range_init_batches)])
    with torch.no_grad():
        assert (quantized.double()(idx) - expected).abs().max() > 1e-4  # the converters do act


def test_input_ranges_are_calibrated_from_data_and_training_continues_from_them():
    cfg = AnalogProjectionConfig(kind="analog")
    model = _calibrated(cfg)
    ranges = [layer.input_range.detach().clone() for _, layer in analog_layers(model)]
    assert all(bool((r > 0.1).all()) and bool((r != 3.0).all()) for r in ranges)  # not the library's 3.0 default
    for _, layer in analog_layers(model):
        assert torch.equal(layer.input_range_update_idx, torch.full_like(layer.input_range_update_idx, 4.0))
    # LayerNorm outputs (std ~1 per token) feed c_attn: the range is init_std x their std, about 18
    c_attn = analog_layers(model)[0][1]
    assert 10 < float(c_attn.input_range.detach()[0]) < 30
    # a training forward neither re-initialises the ranges (counter reached init_from_data) ...
    model.train()
    _, loss = model(_tokens(), _tokens(seed=2))
    loss.backward()
    for r, (_, layer) in zip(ranges, analog_layers(model)):
        assert torch.equal(layer.input_range.detach(), r)
        assert layer.input_range.grad is not None  # ... but learns them
    with pytest.raises(ValueError, match="batches given"):
        calibrate_input_ranges(_model(cfg), [_tokens()])


def test_clipping_runs_once_per_weight_update_in_training_only():
    cfg = AnalogProjectionConfig(kind="analog", clip_sigma=1.0)
    model = _calibrated(cfg)
    layer = analog_layers(model)[0][1]
    before = layer.weight.detach().clone()
    with torch.no_grad():
        model(_tokens())                      # evaluation: untouched
    assert torch.equal(layer.weight, before)
    model.train()
    model(_tokens())[0].sum().backward()      # first training forward: clipped at 1 std per column
    clipped = layer.weight.detach().clone()
    bound = before.std(dim=1, keepdim=True)
    torch.testing.assert_close(clipped, before.clamp(-bound, bound))
    model(_tokens())                          # a second micro-batch of the same step: not clipped again
    assert torch.equal(layer.weight, clipped)
    with torch.no_grad():
        layer.weight.add_(0.01)               # an optimizer step changes the weights ...
    model(_tokens())                          # ... so the next training forward clips again
    assert not torch.equal(layer.weight, clipped + 0.01)


# --------------------------------------------------------------------------------------------------
# inference noise
# --------------------------------------------------------------------------------------------------
def test_inference_noise_differs_between_seeds_and_repeats_at_one_seed():
    base = _calibrated(AnalogProjectionConfig(kind="analog"), kind="nonlinear_hw")
    idx = _tokens()
    with torch.no_grad():
        clean = base(idx)
    noise = InferenceNoiseConfig()
    outputs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        model = copy.deepcopy(base)
        assert apply_inference_noise(model, noise, seed) == 8
        rng_before = torch.get_rng_state()
        with torch.no_grad():
            outputs[name] = model(idx)
        assert torch.equal(torch.get_rng_state(), rng_before)  # the noise has its own random streams
        assert not any(layer.training for _, layer in analog_layers(model))
    assert torch.equal(outputs["a"], outputs["b"])
    assert (outputs["a"] - outputs["c"]).abs().max() > 1e-3
    assert (outputs["a"] - clean).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="already programmed"):
        apply_inference_noise(model, noise, 2)


def test_programming_noise_has_the_configured_std_per_column():
    """W' - clip(W) ~ N(0, (0.05 max|W_i|)^2) per output column i; over 128 x 512 draws the sample std
    has a relative standard error 1/sqrt(2N) < 0.3 %, so 3 % is a wide margin."""
    model = _calibrated(AnalogProjectionConfig(kind="analog", clip="none"), n_embd=128)
    layer = analog_layers(model)[3][1]  # mlp.c_proj: 128 columns x 512 inputs
    weight = layer.weight.detach().clone()
    apply_inference_noise(model, InferenceNoiseConfig(programming_noise=0.05, output_noise=0.0), seed=3)
    z = (layer.weight.detach() - weight) / (0.05 * weight.abs().amax(dim=1, keepdim=True))
    assert abs(float(z.std()) - 1.0) < 0.03 and abs(float(z.mean())) < 0.03


def test_output_noise_has_the_library_units_and_is_fresh_on_every_forward():
    """With converters off, a tile's read-out noise is N(0, (out_noise x input_range x max|W|)^2) for a
    single tile (the library's training-time formula, applied in evaluation)."""
    cfg = AnalogProjectionConfig(kind="analog", **IDEAL)
    model = _calibrated(cfg)
    layer = analog_layers(model)[0][1]   # c_attn: one tile of 64 inputs
    x = torch.randn(64, 200, 64)
    with torch.no_grad():
        clean = layer(x)
    apply_inference_noise(model, InferenceNoiseConfig(programming_noise=0.0, output_noise=0.04), seed=0)
    with torch.no_grad():
        first, second = layer(x), layer(x)
    expected = 0.04 * float(layer.input_range.detach()[0]) * float(layer.weight.detach().abs().max())
    assert abs(float((first - clean).std()) / expected - 1) < 0.02  # 2.5e6 draws: SE 0.05 %
    assert (first - second).abs().min() > 0  # fresh noise on every forward


# --------------------------------------------------------------------------------------------------
# checkpoints, training set-up, generation
# --------------------------------------------------------------------------------------------------
def test_analog_checkpoint_rebuilds_the_analog_layers_from_the_stored_config():
    cfg = AnalogProjectionConfig(kind="analog", layers=["attn.c_attn", "mlp.c_fc"], out_bound=10.0)
    model = _calibrated(cfg, kind="linear_hw")
    buffer = io.BytesIO()
    torch.save(model.checkpoint_state(), buffer)
    buffer.seek(0)
    loaded = model_from_checkpoint_dict(torch.load(buffer, weights_only=False)).eval()
    assert loaded.config.projections == cfg
    assert {n for n, _ in analog_layers(loaded)} == {n for n, _ in analog_layers(model)}
    assert all(layer.rpu_config.forward.out_bound == 10.0 for _, layer in analog_layers(loaded))
    idx = _tokens()
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_set_projections_converts_digital_models_and_refuses_other_analog_settings():
    model = _model()
    cfg = AnalogProjectionConfig(kind="analog")
    set_projections(model, cfg)
    assert len(analog_layers(model)) == 8 and model.config.projections == cfg
    set_projections(model, cfg)  # the same settings: nothing to do
    with pytest.raises(ValueError, match="out_bound"):
        set_projections(model, dataclasses.replace(cfg, out_bound=3.0))
    with pytest.raises(ValueError, match="projections.layers"):
        AnalogProjectionConfig(kind="analog", layers=["lm_head"])
    with pytest.raises(ValueError, match="unknown keys"):
        projection_config_from_dict({"kind": "analog", "inp_bits": 8})


@pytest.mark.parametrize("kind", ["softmax", "nonlinear_hw"])
def test_streaming_decoder_runs_the_analog_layers(kind):
    """Token by token through the analog layers: with ideal tiles the logits are the parallel forward's
    (float32, other matmul shapes: 1e-5 as in test_generate); with 8-bit converters a rounding difference
    can move a value across a quantization edge, so most (not all) positions agree exactly."""
    idx = _tokens(n=2, length=40)
    for overrides, share in ((IDEAL, 1.0), ({}, 0.9)):
        model = _calibrated(AnalogProjectionConfig(kind="analog", **overrides), kind=kind)
        state = model.start_decoding(batch=2)
        with torch.no_grad():
            full = model(idx)
            steps = torch.stack([model.step(idx[:, t], state) for t in range(idx.shape[1])], dim=1)
        agree = ((steps - full).abs() <= 1e-5 + 1e-5 * full.abs()).all(dim=-1)
        assert float(agree.float().mean()) >= share, overrides
    out = generate(model, idx[:, :8], max_new_tokens=10, temperature=0)
    assert out.shape == (2, 18) and int(out.max()) < VOCAB


def test_hydra_group_selects_the_projections(tmp_path):
    from gaincell.config import compose

    assert compose(["projections=digital"]).projections.kind == "digital"
    cfg = compose(["projections=analog", "projections.inference.seeds=[4,5]"])
    model_cfg = projection_config_from_dict(cfg.projections)
    assert model_cfg == AnalogProjectionConfig(kind="analog")
    assert list(cfg.projections.inference.seeds) == [4, 5]
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="inp_res"):  # typed schema: an int, not a word
        compose(["projections=analog", "projections.inp_res=eight"])
    assert math.isclose(cfg.projections.inference.programming_noise, 0.05)


def test_lm_eval_wrapper_loads_an_analog_checkpoint(tmp_path):
    """lm-eval's model (GaincellLM) given an analog checkpoint path scores with the analog layers."""
    pytest.importorskip("lm_eval")
    import torch.nn.functional as F
    from lm_eval.api.instance import Instance

    from gaincell.evaluate.lm import GaincellLM

    class Chars:  # one token per character, end-of-text = 0
        eot_token, vocab_size = 0, VOCAB

        def encode(self, text):
            return [1 + ord(c) % (VOCAB - 1) for c in text]

        def decode(self, ids):
            return "".join(chr(96 + i % 26) for i in ids)

    model = _calibrated(AnalogProjectionConfig(kind="analog"))
    path = tmp_path / "analog.pt"
    torch.save(model.checkpoint_state(), path)
    lm = GaincellLM(str(path), Chars(), batch_size=2, device="cpu", dtype="float32")
    assert len(analog_layers(lm.model)) == 8
    context, continuation = "to be or not", " to be"
    (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    tokens = Chars().encode(context + continuation)  # a non-empty context: no end-of-text prefix
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([tokens[:-1]]))[0].float(), dim=-1)
    n = len(continuation)
    expected = sum(float(logp[t - 1, tokens[t]]) for t in range(len(tokens) - n, len(tokens)))
    assert ll == pytest.approx(expected, abs=1e-4)  # float32 sums of 6 log-probs, other batch shapes: ~1e-6
