"""The custom operator (gaincell.attention.op) computes exactly what the eager call does, and lets
torch.compile trace a hardware-attention GPT without a graph break."""
import pytest
import torch

from gaincell.attention import PAPER_COEFFICIENTS, AnalogAttentionConfig, analog_attention
from gaincell.attention.op import analog_attention_op, config_from_key, config_key, op_supports
from gaincell.model import GPT, GPTConfig

CONFIGS = {
    "linear": AnalogAttentionConfig(window=32, tile_rows=16, decay_per_step=1e-2),
    "surrogate": AnalogAttentionConfig(window=32, tile_rows=16, coefficients=PAPER_COEFFICIENTS),
    "exact": AnalogAttentionConfig(window=32, tile_rows=16, coefficients=PAPER_COEFFICIENTS,
                                   exact_nonlinear_grad=True),
    "cell_variation": AnalogAttentionConfig(window=32, tile_rows=16, coefficients=PAPER_COEFFICIENTS,
                                            cell_variation=0.1, noise_seed=3),
}


def _inputs(T=45, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(2, 3, T, D, generator=g) * 1.2 - 0.1
    k = torch.rand(2, 3, T, D, generator=g) * 1.1 - 0.1
    v = torch.rand(2, 3, T, D, generator=g) * 1.1 - 0.1
    dy = torch.randn(2, 3, T, D, generator=g)
    return q, k, v, dy


def _value_and_grads(fn, q, k, v, dy):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    y = fn(q, k, v)
    y.backward(dy)
    return y.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("implementation", ["blocked", "auto"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_op_equals_eager_bit_for_bit(name, implementation):
    cfg = CONFIGS[name]
    q, k, v, dy = _inputs()
    # a non-contiguous q (as the model's head split gives) exercises the layouts
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    eager = _value_and_grads(lambda *a: analog_attention(*a, cfg, implementation=implementation), q, k, v, dy)
    op = _value_and_grads(lambda *a: analog_attention_op(*a, cfg, implementation=implementation), q, k, v, dy)
    # the operator's packed forward state is used (linear, surrogate) or empty (exact: recomputed)
    from gaincell.attention.blocked import packed_state_size
    assert (packed_state_size(tuple(q.shape), cfg) > 0) == (name != "exact")
    for label, e, o in zip(("y", "dq", "dk", "dv"), eager, op):
        assert e.abs().max() > 1e-3, f"{label} is ~0: the comparison would be vacuous"
        assert torch.equal(e, o), f"{name}/{implementation} {label}: max diff {(e - o).abs().max().item()}"


def test_opcheck_schema_fake_and_autograd_registration():
    q, k, v, _ = _inputs(T=20, D=4)
    key = config_key(CONFIGS["surrogate"])
    for x in (q, k, v):
        x.requires_grad_()
    torch.library.opcheck(torch.ops.gaincell.analog_attention.default, (q, k, v, key, "blocked"))


def test_config_key_round_trips_and_unsupported_calls_are_refused():
    for cfg in CONFIGS.values():
        assert config_from_key(config_key(cfg)) == cfg
    noisy = AnalogAttentionConfig(window=32, tile_rows=16, readout_noise=0.1)
    assert "readout_noise=0.1" in op_supports(noisy)
    with pytest.raises(ValueError, match="readout_noise=0.1"):
        analog_attention_op(*_inputs()[:3], noisy)
    assert "implementation 'dense'" in op_supports(CONFIGS["linear"], "dense")
    with pytest.raises(TypeError, match="AnalogAttentionConfig"):
        config_key({"window": 32})


def test_a_key_from_another_state_layout_is_refused():
    """A graph compiled against another layout of the op's state (cached on disk) carries another version in
    its config argument: the op refuses it instead of reading the state wrongly."""
    import json

    fields = json.loads(config_key(CONFIGS["linear"]))
    fields["_state_layout_version"] -= 1
    with pytest.raises(ValueError, match="state layout version"):
        config_from_key(json.dumps(fields, sort_keys=True))
    del fields["_state_layout_version"]  # keys from before the version existed
    with pytest.raises(ValueError, match="state layout version None"):
        config_from_key(json.dumps(fields, sort_keys=True))


def _tiny_gpt(kind):
    torch.manual_seed(0)
    analog = AnalogAttentionConfig(window=32, tile_rows=16,
                                   coefficients=PAPER_COEFFICIENTS if kind == "nonlinear_hw" else None)
    return GPT(GPTConfig(vocab_size=96, block_size=48, n_layer=2, n_head=2, n_embd=32, attention=kind,
                         analog=analog))


@pytest.mark.parametrize("kind", ["linear_hw", "nonlinear_hw"])
def test_compiled_hardware_model_has_no_graph_break_and_equals_eager(kind):
    torch._dynamo.reset()
    model = _tiny_gpt(kind)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 96, (2, 48), generator=g), torch.randint(0, 96, (2, 48), generator=g)

    def loss_of(m):
        return m(x, y)[1]

    explained = torch._dynamo.explain(loss_of)(model)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1
    ops = [str(n.target) for gm in explained.graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count("gaincell.analog_attention") == 2  # one opaque node per layer

    # fullgraph=True raises on any break; aot_eager also builds the backward graph through the op's
    # registered autograd without needing a C++ compiler.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.zero_grad()
    eager_loss = loss_of(model)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled_loss = loss_of(compiled)
    compiled_loss.backward()
    # The attention op is bit-exact (test above); the compiled graph decomposes LayerNorm, GELU and the
    # cross-entropy into primitives whose float32 sums run in another order: ~1e-7 relative.
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=0)
    for (name, p), e in zip(model.named_parameters(), eager_grads):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    torch._dynamo.reset()
