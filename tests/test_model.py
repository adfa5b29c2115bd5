"""GPT-2 model (gaincell.model): equivalence with transformers' GPT-2, causality, sliding window,
attention switching, checkpoints."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gaincell.attention import PAPER_COEFFICIENTS, AnalogAttentionConfig
from gaincell.model import GPT, CheckpointError, GPTConfig

KINDS = ("softmax", "softmax_window", "linear_hw", "nonlinear_hw")


def _analog(kind: str, window: int = 64) -> AnalogAttentionConfig:
    return AnalogAttentionConfig(window=window, coefficients=PAPER_COEFFICIENTS if kind == "nonlinear_hw" else None)


def _small(kind: str = "softmax", n_layer: int = 2, window: int = 64, block_size: int = 96, vocab: int = 100) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=128,
                         attention=kind, analog=_analog(kind, window))).eval()


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=48, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=100, eos_token_id=100)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(folder)
    return hf, folder


def test_from_pretrained_matches_transformers_logits_and_loss(hf_gpt2):
    hf, folder = hf_gpt2
    model = GPT.from_pretrained(folder).eval()
    assert model.config.vocab_size == 101 and model.config.padded_vocab_size == 128
    assert model.transformer.wte.weight.shape[0] == 128
    idx = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(1))
    # Both in float64: the two implementations sum in different orders (and CPUs' float32 kernels differ
    # by ~1e-6 on these logits); in float64 the same weights agree to ~1e-13 (64-wide contractions
    # through 2 layers, unit roundoff 1.1e-16), so 1e-10 checks the weight mapping, not the CPU.
    hf64, model = copy.deepcopy(hf).double(), model.double()
    with torch.no_grad():
        expected = hf64(idx).logits
        logits = model(idx)
        logits2, loss = model(idx[:, :-1], idx[:, 1:])
    assert logits.shape == (3, 40, 101)
    torch.testing.assert_close(logits, expected, atol=1e-10, rtol=0)
    ref_loss = F.cross_entropy(expected[:, :-1].reshape(-1, 101), idx[:, 1:].reshape(-1))
    # The loss is taken in float32 by design: a log-softmax over 101 logits and a mean over 117 targets,
    # relative error <= (101 + 117) * 2**-24 (recursive summation bounds).
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, atol=0, rtol=(101 + 117) * 2**-24)
    torch.testing.assert_close(logits2, expected[:, :-1], atol=1e-10, rtol=0)


def test_module_names_follow_nanogpt_and_weights_are_tied(hf_gpt2):
    _, folder = hf_gpt2
    model = GPT.from_pretrained(folder)
    names = dict(model.named_modules())
    for name in ("transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h.0.ln_1",
                 "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.attn.core",
                 "transformer.h.1.ln_2", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj",
                 "transformer.ln_f", "lm_head"):
        assert name in names, name
    assert model.lm_head.weight is model.transformer.wte.weight
    assert len(model.attention_cores()) == 2


def test_from_pretrained_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="cannot load GPT-2 weights"):
        GPT.from_pretrained(tmp_path / "nothing-here")


@pytest.mark.parametrize("kind", KINDS)
def test_causal_every_attention(kind):
    """Changing token t leaves every logit before t unchanged, and changes some at t."""
    model = _small(kind, block_size=96)
    idx = torch.randint(0, 100, (1, 96), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[0, 70] = (idx[0, 70] + 1) % 100
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[:, :70], b[:, :70], atol=0, rtol=0)
    assert (a[:, 70] - b[:, 70]).abs().max() > 1e-6


@pytest.mark.parametrize("kind", ["softmax_window", "linear_hw"])
def test_sliding_window_hides_keys_older_than_the_window(kind):
    """One layer, window 64: the logit at t does not depend on token t - 64, but does on t - 63."""
    model = _small(kind, n_layer=1, window=64, block_size=128)
    if kind == "linear_hw":
        for core in model.attention_cores():
            core.analog = AnalogAttentionConfig(window=64, decay_per_step=0.0)
    idx = torch.randint(0, 100, (1, 128), generator=torch.Generator().manual_seed(3))
    t = 110
    far, near = idx.clone(), idx.clone()
    far[0, t - 64] = (idx[0, t - 64] + 7) % 100
    near[0, t - 63] = (idx[0, t - 63] + 7) % 100
    with torch.no_grad():
        base, out_far, out_near = model(idx)[0, t], model(far)[0, t], model(near)[0, t]
    torch.testing.assert_close(base, out_far, atol=0, rtol=0)
    assert (base - out_near).abs().max() > 1e-7


def test_full_softmax_sees_beyond_the_window():
    model = _small("softmax", n_layer=1, block_size=128)
    idx = torch.randint(0, 100, (1, 128), generator=torch.Generator().manual_seed(3))
    far = idx.clone()
    far[0, 110 - 64] = (idx[0, 110 - 64] + 7) % 100
    with torch.no_grad():
        assert (model(idx)[0, 110] - model(far)[0, 110]).abs().max() > 1e-7


def test_set_attention_switches_every_layer_and_keeps_weights():
    model = _small("softmax")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 100, (2, 64))
    with torch.no_grad():
        soft = model(idx)
    model.set_attention("nonlinear_hw", _analog("nonlinear_hw"))
    assert [c.kind for c in model.attention_cores()] == ["nonlinear_hw"] * 2
    assert model.config.attention == "nonlinear_hw"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    with torch.no_grad():
        hw = model(idx)
    assert torch.isfinite(hw).all() and (hw - soft).abs().max() > 1e-3
    with pytest.raises(ValueError, match="coefficients"):
        model.set_attention("nonlinear_hw", AnalogAttentionConfig(window=64))


def test_hardware_model_trains_its_scalers():
    model = _small("linear_hw").train()
    idx = torch.randint(0, 100, (2, 65))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    core = model.attention_cores()[0]
    assert core.q_scale.grad is not None and core.q_scale.grad.abs().sum() > 0
    assert model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0


def test_checkpoint_roundtrip_and_mismatch_errors(tmp_path):
    model = _small("nonlinear_hw")
    path = tmp_path / "m.pt"
    torch.save(model.checkpoint_state(), path)
    loaded = GPT.from_checkpoint(path)
    assert loaded.config == model.config
    idx = torch.randint(0, 100, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), atol=0, rtol=0)
    # the same checkpoint, switched to another attention on load
    lin = GPT.from_checkpoint(path, attention="linear_hw", analog_cfg=_analog("linear_hw"))
    assert lin.attention_cores()[0].kind == "linear_hw"

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt.pt.*corrupt"):
        GPT.from_checkpoint(corrupt)
    state = model.checkpoint_state()
    state["model"]["transformer.h.0.attn.c_attn.weight"] = torch.zeros(3, 3)
    bad_shape = tmp_path / "shape.pt"
    torch.save(state, bad_shape)
    with pytest.raises(CheckpointError, match=r"shape.pt: weight transformer.h.0.attn.c_attn.weight has shape \(3, 3\)"):
        GPT.from_checkpoint(bad_shape)
    state = model.checkpoint_state()
    del state["model"]["transformer.ln_f.weight"]
    missing = tmp_path / "missing.pt"
    torch.save(state, missing)
    with pytest.raises(CheckpointError, match="missing.pt does not match.*transformer.ln_f.weight"):
        GPT.from_checkpoint(missing)
    with pytest.raises(CheckpointError, match="does not exist"):
        GPT.from_checkpoint(tmp_path / "absent.pt")


def test_forward_rejects_too_long_input():
    model = _small("softmax", block_size=32)
    with pytest.raises(ValueError, match="exceeds the model's context block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="n_embd=100 is not divisible by n_head=3"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="attention='flash'"):
        GPTConfig(attention="flash")


def test_generate_greedy_matches_argmax_rollout():
    model = _small("softmax", block_size=64)
    prompt = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(4))
    out = model.generate(prompt, 6, temperature=0)
    assert out.shape == (2, 11)
    torch.testing.assert_close(out[:, :5], prompt)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    torch.testing.assert_close(out, ids)
    torch.testing.assert_close(model.generate_recompute(prompt, 6, temperature=0), ids)
