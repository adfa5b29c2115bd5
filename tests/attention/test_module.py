"""AttentionCore: the four attention kinds, the per-head scalers (eq. 8) and statistics capture."""
from __future__ import annotations

import math

import pytest
import torch

from gaincell.attention import PAPER_COEFFICIENTS, AnalogAttentionConfig, AttentionCore
from gaincell.attention.module import sliding_window_mask
from gaincell.attention.reference import analog_attention_dense

B, H, T, D = 2, 3, 12, 8


def qkv(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) * 0.5 for _ in range(3)]


def naive_softmax_attention(q, k, v, window=None):
    """Loops over queries: softmax over the keys t - window < t' <= t of q.k / sqrt(D)."""
    out = torch.zeros_like(q)
    for t in range(q.shape[-2]):
        lo = 0 if window is None else max(0, t - window + 1)
        scores = q[..., t:t + 1, :] @ k[..., lo:t + 1, :].transpose(-1, -2) / math.sqrt(q.shape[-1])
        out[..., t, :] = (torch.softmax(scores, dim=-1) @ v[..., lo:t + 1, :])[..., 0, :]
    return out


def test_softmax_matches_naive():
    q, k, v = qkv()
    core = AttentionCore("softmax", H).double()
    torch.testing.assert_close(core(q, k, v), naive_softmax_attention(q, k, v))


def test_softmax_window_matches_naive():
    q, k, v = qkv(1)
    core = AttentionCore("softmax_window", H, AnalogAttentionConfig(window=4, tile_rows=2)).double()
    out = core(q, k, v)
    torch.testing.assert_close(out, naive_softmax_attention(q, k, v, window=4))
    assert not torch.allclose(out, naive_softmax_attention(q, k, v))  # the window matters at T = 12


def test_sliding_window_mask():
    mask = sliding_window_mask(5, 5, 3)
    for t in range(5):
        for tp in range(5):
            assert bool(mask[t, tp]) == (t - 3 < tp <= t)
    # queries are the last rows of a longer key sequence
    assert sliding_window_mask(2, 5, None).tolist() == [[True] * 4 + [False], [True] * 5]


def test_scalers_initialised_to_spec_values():
    core = AttentionCore("linear_hw", H, AnalogAttentionConfig(window=16, tile_rows=4))
    expected_bias = {"q": 0.0, "k": 0.45, "v": 0.45, "out": 0.0}
    for stage, bias in expected_bias.items():
        assert torch.equal(getattr(core, f"{stage}_scale").data, torch.ones(H))
        assert torch.allclose(getattr(core, f"{stage}_bias").data, torch.full((H,), bias))
    assert len(list(core.parameters())) == 8


@pytest.mark.parametrize("kind", ["linear_hw", "nonlinear_hw"])
def test_scalers_applied_per_head(kind):
    cfg = AnalogAttentionConfig(window=8, tile_rows=4, qk_saturation=20.0, av_saturation=3.0,
                                coefficients=PAPER_COEFFICIENTS if kind == "nonlinear_hw" else None)
    core = AttentionCore(kind, H, cfg, implementation="dense").double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for stage, bias in (("q", 0.0), ("k", 0.45), ("v", 0.45), ("out", 0.0)):  # distinct per head
            getattr(core, f"{stage}_scale").copy_(0.5 + 0.5 * torch.rand(H, generator=gen, dtype=torch.float64))
            getattr(core, f"{stage}_bias").copy_(bias + 0.2 * torch.rand(H, generator=gen, dtype=torch.float64) - 0.1)
    q, k, v = (x.abs() for x in qkv(2))
    out = core(q, k, v)
    for h in range(H):
        def s(stage, x):
            return getattr(core, f"{stage}_scale")[h] * x + getattr(core, f"{stage}_bias")[h]
        y_h = analog_attention_dense(s("q", q[:, h:h + 1]), s("k", k[:, h:h + 1]), s("v", v[:, h:h + 1]), cfg)
        torch.testing.assert_close(out[:, h:h + 1], s("out", y_h))
    # per head, not shared: head 0's output changes when only head 1's scaler does
    with torch.no_grad():
        core.k_bias[1] += 0.2
    out2 = core(q, k, v)
    assert torch.equal(out2[:, 0], out[:, 0]) and not torch.equal(out2[:, 1], out[:, 1])


def test_gradients_reach_scalers():
    core = AttentionCore("nonlinear_hw", H, AnalogAttentionConfig(window=8, tile_rows=4, qk_saturation=20.0,
                                                                  av_saturation=3.0,
                                                                  coefficients=PAPER_COEFFICIENTS))
    q, k, v = (x.float().abs() for x in qkv(4))
    core(q, k, v).square().sum().backward()
    for name, p in core.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("layout", ["BHTD", "BTHD"])
def test_scaler_function_equals_the_autograd_expression(layout):
    """The scalers' autograd function gives the values and dx of a * x + b bit for bit (same operations per
    element), and da, db within float32 summation error of the float64 autograd expression, also for the
    transposed layout the model passes."""
    from gaincell.attention.module import _PerHeadAffine

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 64, 16, generator=gen)
    if layout == "BTHD":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    a, b = torch.randn(1, 2, 1, 1, generator=gen), torch.randn(1, 2, 1, 1, generator=gen)
    dy = torch.randn(4, 2, 64, 16, generator=gen)
    results = []
    for fn, dtype in ((lambda x, a, b: a * x + b, torch.float32), (lambda x, a, b: a * x + b, torch.float64),
                      (_PerHeadAffine.apply, torch.float32)):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, a, b)]
        y = fn(*leaves)
        y.backward(dy.to(dtype))
        results.append([y.detach()] + [t.grad for t in leaves])
    expression, exact, got = results
    assert torch.equal(expression[0], got[0]) and torch.equal(expression[1], got[1])  # y, dx
    # da, db: sums of N = B * T * D float32 terms per head, in some order: rounding errors of a random
    # walk, about sqrt(N) * eps * sum |terms| (the worst case N * eps * sum |terms| is as large as da here);
    # 4x that as the tolerance. A wrong axis or factor is off by O(1) of the value.
    n_terms, eps = 4 * 64 * 16, torch.finfo(torch.float32).eps
    for name, index, terms in (("da", 2, dy * x), ("db", 3, dy)):
        bound = 4 * n_terms ** 0.5 * eps * terms.abs().sum((0, 2, 3), keepdim=True).double()
        assert ((got[index].double() - exact[index]).abs() <= bound).all(), name
        assert exact[index].abs().min() > 10 * bound.max(), name  # the gradients carry signal
    assert got[2].shape == a.shape and got[3].shape == b.shape


def test_capture_stats_per_head():
    core = AttentionCore("linear_hw", H, AnalogAttentionConfig(window=8, tile_rows=4))
    with torch.no_grad():
        core.k_scale.copy_(torch.tensor([1.0, 2.0, 3.0]))
    q, k, v = (x.float() for x in qkv(5))
    core(q, k, v)
    assert core.captured == {}
    core.capture_stats = True
    out = core(q, k, v)
    assert set(core.captured) == {"q", "k", "v", "out"}
    for stage, x in (("q", q), ("k", k), ("v", v), ("out", out)):
        mean, std = core.captured[stage]
        assert mean.shape == std.shape == (H,)
        a = getattr(core, f"{stage}_scale").detach()
        b = getattr(core, f"{stage}_bias").detach()
        for h in range(H):
            scaled = x[:, h] if stage == "out" else a[h] * x[:, h] + b[h]
            # Two float32 means of the same n values summed in different orders: each is within
            # (n - 1) * 2**-24 * mean|x| of the exact mean (recursive summation bound).
            n = scaled.numel()
            assert mean[h].item() == pytest.approx(scaled.double().mean().item(),
                                                   abs=2 * (n - 1) * 2**-24 * scaled.abs().mean().item())
            assert std[h].item() == pytest.approx(scaled.std().item(), rel=1e-5)


def test_set_kind_and_config_checks():
    core = AttentionCore("linear_hw", H, AnalogAttentionConfig(window=8, tile_rows=4))
    q, k, v = (x.float() for x in qkv(6))
    y_linear = core(q, k, v)
    core.set_kind("nonlinear_hw", AnalogAttentionConfig(window=8, tile_rows=4, coefficients=PAPER_COEFFICIENTS))
    assert core.kind == "nonlinear_hw" and core.analog.nonlinear
    assert not torch.equal(core(q, k, v), y_linear)
    with pytest.raises(ValueError, match="attention kind 'flash'"):
        AttentionCore("flash", H)
    with pytest.raises(ValueError, match="linear_hw"):
        AttentionCore("linear_hw", H, AnalogAttentionConfig(coefficients=PAPER_COEFFICIENTS))
    with pytest.raises(ValueError, match="nonlinear_hw"):
        AttentionCore("nonlinear_hw", H, AnalogAttentionConfig())


@pytest.mark.parametrize("kind", ["linear_hw", "nonlinear_hw"])
def test_packed_qkv_scalers_equal_the_separate_ones_bit_for_bit(kind):
    """``AttentionCore(q, k, v, qkv=...)`` (the three input scalers as one function on the projection's
    output) gives the output and the gradients (of the projection output and of every scaler) of the
    call without ``qkv``, equal bit for bit; and refuses a qkv that q, k, v are not the views of."""
    from gaincell.attention.module import split_heads

    cfg = AnalogAttentionConfig(window=8, tile_rows=4, qk_saturation=20.0, av_saturation=3.0,
                                coefficients=PAPER_COEFFICIENTS if kind == "nonlinear_hw" else None)
    gen = torch.Generator().manual_seed(5)
    projection = 0.5 * torch.rand(3, 24, 3 * H * 8, generator=gen)
    dy = torch.randn(3, H, 24, 8, generator=gen)
    results = []
    for packed in (False, True):
        core = AttentionCore(kind, H, cfg)
        with torch.no_grad():
            for p in core.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
        qkv = projection.clone().requires_grad_()
        y = core(*split_heads(qkv, H), qkv=qkv if packed else None)
        y.backward(dy)
        results.append([y.detach(), qkv.grad] + [p.grad for _, p in sorted(core.named_parameters())])
    assert results[0][0].abs().sum() > 0 and results[0][1].abs().sum() > 0
    for want, got in zip(*results):
        assert torch.equal(want, got)
    core = AttentionCore(kind, H, cfg)
    q, k, v = split_heads(projection, H)
    with pytest.raises(ValueError, match="is not the tensor q, k, v"):
        core(q, k, v, qkv=projection.clone())
    with pytest.raises(ValueError, match="is not the tensor q, k, v"):
        core(k, q, v, qkv=projection)
