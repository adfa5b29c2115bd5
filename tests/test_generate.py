"""Incremental (token-by-token) generation against the model's parallel forward pass."""
from __future__ import annotations

import warnings

import pytest
import torch

from gaincell.attention import AnalogAttentionConfig
from gaincell.attention.config import PAPER_COEFFICIENTS
from gaincell.generate import BeyondContextWarning, generate
from gaincell.model import GPT, GPTConfig

VOCAB, BLOCK, WINDOW = 97, 96, 32


def _model(kind: str, block_size: int = BLOCK, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    analog = AnalogAttentionConfig(window=WINDOW, tile_rows=16, decay_per_step=2e-3,
                                   coefficients=PAPER_COEFFICIENTS if kind == "nonlinear_hw" else None)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                          attention=kind, analog=analog)).eval()
    if kind.endswith("_hw"):
        # Spread the scaled inputs over the DAC ranges (a randomly initialised projection is ~N(0, 0.1)),
        # so that the analog arrays produce real, multi-level outputs rather than a quantized zero.
        with torch.no_grad():
            for core in model.attention_cores():
                core.q_scale.fill_(4.0), core.q_bias.fill_(0.5)
                core.k_scale.fill_(3.0), core.v_scale.fill_(3.0)
                core.out_scale.fill_(2.0)
    return model


def _incremental_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    state = model.start_decoding(batch=idx.shape[0])
    return torch.stack([model.step(idx[:, t], state) for t in range(idx.shape[1])], dim=1)


@pytest.mark.parametrize("kind", ["softmax", "softmax_window", "linear_hw", "nonlinear_hw"])
def test_incremental_logits_equal_full_forward_longer_than_window(kind):
    """Within the context (90 tokens <= 96) but nearly 3x the window of 32: every position's logits."""
    model = _model(kind)
    idx = torch.randint(0, VOCAB, (2, 90), generator=torch.Generator().manual_seed(1))
    outputs = []
    hooks = [core.register_forward_hook(lambda m, i, o: outputs.append(o)) for core in model.attention_cores()]
    with torch.no_grad():
        full = model(idx)
    for h in hooks:
        h.remove()
    if kind.endswith("_hw"):  # the analog attention really contributes: many non-zero, varied outputs
        y = torch.cat([o.flatten() for o in outputs])
        assert (y != y.flatten()[0]).float().mean() > 0.5
    torch.testing.assert_close(_incremental_logits(model, idx), full, rtol=1e-5, atol=1e-5)


def test_incremental_differs_when_the_window_is_wrong():
    """Sanity of the test above: the same weights with a larger analog window give other logits."""
    model = _model("linear_hw")
    idx = torch.randint(0, VOCAB, (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
    model.set_attention("linear_hw", AnalogAttentionConfig(window=64, tile_rows=16, decay_per_step=2e-3))
    assert (_incremental_logits(model, idx) - full)[:, WINDOW:].abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["softmax", "linear_hw"])
def test_greedy_generation_equals_the_recomputing_sampler(kind):
    model = _model(kind)
    prompt = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    ours = generate(model, prompt, max_new_tokens=60, temperature=0)
    reference = model.generate_recompute(prompt, max_new_tokens=60, temperature=0)
    assert ours.shape == (2, 80)
    assert torch.equal(ours, reference)


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = _model("nonlinear_hw")
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    a = generate(model, prompt, 30, temperature=1.0, seed=7)
    b = generate(model, prompt, 30, temperature=1.0, seed=7)
    c = generate(model, prompt, 30, temperature=1.0, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(generate(model, prompt, 30, temperature=1.0, top_k=1, seed=9),
                       generate(model, prompt, 30, temperature=0))
    assert torch.equal(model.generate(prompt, 30, temperature=1.0, seed=7), a)  # GPT.generate delegates


@pytest.mark.parametrize("kind", ["softmax", "softmax_window", "nonlinear_hw"])
def test_beyond_the_context_repeats_the_last_position_and_warns(kind):
    block = 48
    model = _model(kind, block_size=block)
    positions = []
    hook = model.transformer.wpe.register_forward_hook(lambda m, i, o: positions.extend(i[0].flatten().tolist()))
    prompt = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))
    with pytest.warns(BeyondContextWarning, match="beyond its trained positions"):
        ids, info = generate(model, prompt, max_new_tokens=3 * block, temperature=0.8, seed=0, return_info=True)
    hook.remove()
    assert ids.shape == (1, 10 + 3 * block)
    assert info["beyond_context"] and "block_size=48" in info["warnings"][0]
    assert "position 47" in info["warnings"][0]
    assert positions == [min(p, block - 1) for p in range(10 + 3 * block - 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", BeyondContextWarning)  # within the context: no warning
        _, info = generate(model, prompt, max_new_tokens=block - 10, temperature=0, return_info=True)
    assert not info["beyond_context"]


def test_softmax_cache_keeps_the_last_block_size_tokens():
    """Past the context, full softmax attends to the last block_size tokens (its trained span): the
    logits after 2 x block_size tokens do not depend on the first tokens."""
    block = 24
    model = _model("softmax", block_size=block)
    gen = torch.Generator().manual_seed(6)
    tail = torch.randint(0, VOCAB, (1, 2 * block), generator=gen)
    heads = [torch.randint(0, VOCAB, (1, 5), generator=gen) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BeyondContextWarning)
        last = [_incremental_logits(model, torch.cat([h, tail], dim=1))[:, -1] for h in heads]
    torch.testing.assert_close(last[0], last[1])


def test_bad_arguments_fail_clearly():
    model = _model("softmax")
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="int64 token ids"):
        generate(model, prompt.float(), 2)
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        generate(model, prompt, -1)
    with pytest.raises(ValueError, match="temperature=-0.5"):
        generate(model, prompt, 2, temperature=-0.5)
    with pytest.raises(ValueError, match="top_k=0"):
        generate(model, prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="no tokens"):
        generate(model, prompt[:, :0], 2)
    assert torch.equal(generate(model, prompt, 0), prompt)


def _data_dir_with_tokenizer(root):
    """A data folder as prepare_data writes it (meta.json + a byte-level BPE trained on a few lines)."""
    import json

    from gaincell.data import train_bpe_tokenizer

    data_dir = root / "data"
    text = ["ROMEO: But soft, what light through yonder window breaks?",
            "JULIET: O Romeo, Romeo, wherefore art thou Romeo?"] * 20
    tokenizer = train_bpe_tokenizer(text, vocab_size=300, out_path=data_dir / "tokenizer.json")
    (data_dir / "meta.json").write_text(json.dumps({"tokenizer": "bpe_trained", "vocab_size": tokenizer.vocab_size,
                                                     "eot_token": tokenizer.eot_token}))
    return data_dir, tokenizer


def test_cli_stage_prints_and_writes_the_sample(tmp_path, capsys):
    import json

    from gaincell.config import compose
    from gaincell.generate import run

    data_dir, tokenizer = _data_dir_with_tokenizer(tmp_path)
    torch.manual_seed(0)
    analog = AnalogAttentionConfig(window=32, tile_rows=16)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32,
                          attention="linear_hw", analog=analog))
    checkpoint = tmp_path / "ckpt.pt"
    torch.save(model.checkpoint_state(), checkpoint)

    cfg = compose([f"results_dir={tmp_path}", f"+stage.checkpoint={checkpoint}", "+stage.prompt=ROMEO:",
                   "+stage.max_new_tokens=60", "+stage.temperature=0.9", "+stage.top_k=20", "+stage.seed=3",
                   "+stage.name=demo", "+stage.device=cpu"])
    with pytest.warns(BeyondContextWarning):
        result = run(cfg)
    out = capsys.readouterr().out
    text = (tmp_path / "samples" / "demo.txt").read_text()
    assert text.startswith("ROMEO:") and text.rstrip("\n") == result["text"]
    assert result["text"] in out and "beyond its trained positions" in out
    meta = json.loads((tmp_path / "samples" / "demo.json").read_text())
    assert meta["new_tokens"] == 60 and meta["attention"] == "linear_hw" and meta["beyond_context"]
    # The same seed through the Python API gives the same continuation.
    prompt_ids = tokenizer.encode("ROMEO:")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BeyondContextWarning)
        ids = generate(GPT.from_checkpoint(checkpoint), torch.tensor([prompt_ids]), 60, temperature=0.9,
                       top_k=20, seed=3)
    assert result["text"] == "ROMEO:" + tokenizer.decode(ids[0, len(prompt_ids):].tolist())

    with pytest.raises(ValueError, match=r"\+stage.checkpoint"):
        run(compose([f"results_dir={tmp_path}"]))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        run(compose([f"results_dir={tmp_path}", f"+stage.checkpoint={tmp_path / 'missing.pt'}"]))


@pytest.mark.parametrize("kind", ["linear_hw", "nonlinear_hw"])
def test_incremental_equals_full_forward_with_cell_variation_per_layer(kind):
    """Each layer's decoder uses that layer's chip (seed derived from the configured seed and the layer
    index), as the parallel forward does: float64 logits agree to rounding; one chip for all layers would not."""
    import dataclasses

    from gaincell.attention.noise import layer_config

    model = _model(kind).double()
    chip = dataclasses.replace(model.config.analog, cell_variation=0.2, noise_seed=5)
    model.set_attention(kind, chip)
    idx = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)
    torch.testing.assert_close(_incremental_logits(model, idx), full, rtol=1e-10, atol=1e-10)
    assert layer_config(chip, 0) != layer_config(chip, 1)
    for core in model.attention_cores():  # the same chip in every layer: other logits
        core.layer_index = 0
    assert (_incremental_logits(model, idx) - full).abs().max() > 1e-3


def test_generate_refuses_nan_attention_inputs():
    model = _model("linear_hw")
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, seed=0)


def test_generate_refuses_another_tokenizer_and_a_missing_gpu(tmp_path):
    from gaincell.config import compose
    from gaincell.data import TokenizerMismatch, tokenizer_fingerprint, train_bpe_tokenizer
    from gaincell.generate import run

    data_dir, tokenizer = _data_dir_with_tokenizer(tmp_path)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=16)
    state = GPT(config).checkpoint_state()
    state["tokenizer"] = tokenizer_fingerprint(data_dir)
    checkpoint = tmp_path / "ckpt.pt"
    torch.save(state, checkpoint)
    args = [f"results_dir={tmp_path}", f"+stage.checkpoint={checkpoint}", "+stage.max_new_tokens=2"]
    run(compose(args + ["+stage.device=cpu"]))
    train_bpe_tokenizer(["Some other text entirely, to train another tokenizer."] * 30, vocab_size=300,
                        out_path=data_dir / "tokenizer.json")
    with pytest.raises(TokenizerMismatch, match=r"ckpt.pt was trained with tokenizer sha256 \w{12} .* has "
                                                r"tokenizer sha256 \w{12} \(.*data/tokenizer.json\)"):
        run(compose(args + ["+stage.device=cpu"]))
    if not torch.cuda.is_available():  # a missing GPU is named as such, not as a corrupt checkpoint
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            run(compose(args + ["+stage.device=cuda"]))
        with pytest.raises(RuntimeError, match=r"cannot load checkpoint .*ckpt.pt onto cuda: no CUDA GPU"):
            GPT.from_checkpoint(checkpoint, map_location="cuda")


@pytest.mark.parametrize("kind", ["softmax", "linear_hw", "nonlinear_hw"])
def test_prompt_prefill_equals_stepping_the_prompt(kind):
    """``GPT.prefill`` (the prompt at once, longer than the window) leaves the same state and
    gives the same next-token logits as stepping the prompt; the steps after it agree too. (The analog
    arrays' prefill is exact, tests/attention/test_decoder.py; the projections run batched here, so
    float32 rounding of the linear layers may differ in the last bits.)"""
    model = _model(kind)
    idx = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(3))
    stepped = model.start_decoding(batch=2)
    step_logits = [model.step(idx[:, t], stepped) for t in range(70)][-1]
    filled = model.start_decoding(batch=2)
    torch.testing.assert_close(model.prefill(idx, filled), step_logits, rtol=1e-5, atol=1e-5)
    assert filled.position == stepped.position == 70
    nxt = torch.tensor([5, 7])
    torch.testing.assert_close(model.step(nxt, filled), model.step(nxt, stepped), rtol=1e-5, atol=1e-5)
