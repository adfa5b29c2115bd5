"""The Triton kernels equal the dense reference (forward and dq, dk, dv), on CPU through the interpreter.

``TRITON_INTERPRET=1`` only takes effect if set before triton is imported, so the CPU check runs in a
subprocess with that environment (safe under pytest-xdist, whatever else this process imported). The
interpreter costs milliseconds per program instance: the shapes are small but cover every branch
(T > window with a ragged excess so the merged sub-tile occurs, T < window, one-tile window, D not a
power of two, tile 64, quantizers off, several heads and batches, float32 and float64).
On a CUDA machine the same comparison also runs on the GPU at larger sizes.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

_COMMON = textwrap.dedent('''
    import torch
    from gaincell.attention import PAPER_COEFFICIENTS, AnalogAttentionConfig
    from gaincell.attention.reference import analog_attention_dense
    from gaincell.attention.kernels import analog_attention_triton

    def make_inputs(B, H, T, D, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)
        q = r(B, H, T, D) * 1.2 - 0.1
        k = r(B, H, T, D) * 1.1 - 0.1 + 0.3 * r(B, H, T, 1)
        v = r(B, H, T, D) * 1.1 - 0.1 + 0.4 * (r(B, H, T, 1) - 0.5)
        return q.to(dtype), k.to(dtype), v.to(dtype)

    def make_config(window, tile_rows, head_dim, **kw):
        kw.setdefault("qk_saturation", 80.0 * head_dim / 64)
        kw.setdefault("av_saturation", 40.0 * tile_rows / 32)
        return AnalogAttentionConfig(window=window, tile_rows=tile_rows, **kw)

    def forward_backward(fn, q, k, v, cfg, dy):
        q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
        y = fn(q, k, v, cfg)
        (y * dy).sum().backward()
        return [y.detach(), q.grad, k.grad, v.grad]

    NL = dict(coefficients=PAPER_COEFFICIENTS)
    def compare(cases, device="cpu"):
        results = {}
        for name, (B, H, T, window, tile, D, dtype, extra) in cases.items():
            cfg = make_config(window, tile, D, **extra)
            q, k, v = (x.to(device) for x in make_inputs(B, H, T, D, getattr(torch, dtype)))
            dy = torch.randn(B, H, T, D, dtype=torch.float64).to(q.dtype).to(device)
            expected = forward_backward(analog_attention_dense, q, k, v, cfg, dy)
            got = forward_backward(analog_attention_triton, q, k, v, cfg, dy)
            results[name] = {label: dict(max_abs=(g.double() - e.double()).abs().max().item(),
                                         frac_off=((g.double() - e.double()).abs() > 1e-4).double().mean().item(),
                                         scale=e.double().abs().max().item(), dtype=str(g.dtype))
                             for label, e, g in zip(("y", "dq", "dk", "dv"), expected, got)}
        return results
''')

_INTERPRETED_CASES = '''
cases = {
    # name: (B, H, T, window, tile_rows, D, dtype, extra config)
    "linear_T>window_ragged": (1, 2, 70, 32, 16, 7, "float64", dict(decay_per_step=1e-2)),
    "surrogate_T>window_ragged": (2, 1, 70, 32, 16, 7, "float64", dict(NL, decay_per_step=1e-2)),
    "exact_T>window_ragged": (1, 1, 70, 32, 16, 7, "float64", dict(NL, exact_nonlinear_grad=True,
                                                                   decay_per_step=1e-2)),
    "exact_T<window": (1, 1, 40, 64, 16, 5, "float64", dict(NL, exact_nonlinear_grad=True, decay_per_step=0.0)),
    "linear_window=one_tile": (1, 1, 37, 16, 16, 4, "float64", dict(decay_per_step=0.05)),
    "surrogate_no_quantizers": (1, 1, 50, 32, 16, 6, "float64", dict(NL, query_levels=None, stored_levels=None,
                                                                     output_levels=None)),
    "linear_tile64_float32": (1, 1, 150, 64, 64, 64, "float32", dict()),
    # Cell variation (issue 16): per-head chips (H = 2), ring rows t' mod M over a wrapped window.
    "linear_varied": (1, 2, 70, 32, 16, 7, "float64", dict(decay_per_step=1e-2, cell_variation=0.2, noise_seed=4)),
    "surrogate_varied": (2, 2, 70, 32, 16, 7, "float64", dict(NL, decay_per_step=1e-2, cell_variation=0.2)),
    "exact_varied": (1, 2, 70, 32, 16, 7, "float64", dict(NL, exact_nonlinear_grad=True, decay_per_step=1e-2,
                                                           cell_variation=0.2, noise_seed=1)),
}
print("RESULTS" + json.dumps(compare(cases)))
'''

# Readout noise: the kernels' draws differ from the reference's, so check (a) its statistics, as the CPU
# paths' in test_noise.py, and (b) that the backward kernels re-draw the forward's noise: the gradient
# along random directions equals the central difference of the forward under the same noise seed.
_NOISE_SCRIPT = '''
import dataclasses, math
from gaincell.attention.kernels.triton_attention import _TritonAnalogAttention
from gaincell.attention.noise import reset_readout_noise

def noise_statistics(sigma=0.01, calls=3):
    cfg = make_config(32, 16, 8, output_levels=None, av_saturation=400.0)
    noisy = dataclasses.replace(cfg, readout_noise=sigma, noise_seed=3)
    q, k, v = make_inputs(2, 2, 64, 8, torch.float64)
    clean = analog_attention_triton(q, k, v, cfg)
    read_tiles = torch.clamp(torch.arange(64) // 16 + 1, max=2).double()
    z = torch.stack([(analog_attention_triton(q, k, v, noisy) - clean) / (sigma * read_tiles.sqrt()[:, None])
                     for _ in range(calls)])
    corr = lambda a, b: torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
    reset_readout_noise()
    first = analog_attention_triton(q, k, v, noisy)
    reset_readout_noise()
    return dict(n=z.numel(), mean=z.mean().item(), std=z.std().item(), clean_max=clean.abs().max().item(),
                corr_query=corr(z[:, :, :, 1:], z[:, :, :, :-1]), corr_call=corr(z[1:], z[:-1]),
                n_query=z[:, :, :, 1:].numel(), n_call=z[1:].numel(),
                reproducible=bool(torch.equal(analog_attention_triton(q, k, v, noisy), first)))

def directional_derivatives(cell, h=1e-6):
    extra = dict(NL, exact_nonlinear_grad=True) if cell == "exact" else {}
    cfg = make_config(32, 16, 5, query_levels=None, stored_levels=None, output_levels=None, av_saturation=1.0,
                      decay_per_step=1e-2, readout_noise=0.3, cell_variation=0.2, **extra)
    q, k, v = make_inputs(1, 2, 50, 5, torch.float64, seed=2)
    f = lambda a, b, c: _TritonAnalogAttention.apply(a, b, c, cfg, "ieee", 777)
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    y = f(*leaves)
    (y * dy).sum().backward()
    out = dict(clamped=(y.detach().abs() > 1).double().mean().item())
    g = torch.Generator().manual_seed(5)
    for n, name in enumerate("qkv"):
        direction = torch.randn(q.shape, generator=g, dtype=torch.float64)
        plus = [x.clone() for x in (q, k, v)]
        minus = [x.clone() for x in (q, k, v)]
        plus[n] += h * direction
        minus[n] -= h * direction
        numeric = ((f(*plus) - f(*minus)) * dy).sum().item() / (2 * h)
        out[name] = (numeric, (leaves[n].grad * direction).sum().item())
    return out

print("RESULTS" + json.dumps(dict(statistics=noise_statistics(),
                                  linear=directional_derivatives("linear"), exact=directional_derivatives("exact"))))
'''


def _run_interpreted(script: str, timeout_s: float = 240) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", "import json\n" + _COMMON + script], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"interpreted kernels failed:\n{proc.stderr[-4000:]}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS"))
    return json.loads(line[len("RESULTS"):])


def _check(results: dict, atol_float64: float = 1e-10) -> None:
    failures = []
    for name, per_output in results.items():
        for label, r in per_output.items():
            if r["dtype"] == "torch.float64":
                ok = r["max_abs"] <= atol_float64 * max(1.0, r["scale"])
            else:  # float32: rounding order may flip a rare readout level / clamp mask, nothing more
                ok = r["frac_off"] < 2e-3 and r["max_abs"] < 0.25 * max(1.0, r["scale"])
            if not ok:
                failures.append(f"{name}.{label}: {r}")
            assert r["scale"] > 1e-3, f"{name}.{label} is ~0: the comparison would be vacuous"
    assert not failures, "kernels differ from the reference:\n" + "\n".join(failures)


def test_interpreted_kernels_equal_reference():
    _check(_run_interpreted(_INTERPRETED_CASES))


def test_interpreted_kernels_readout_noise():
    """Statistics as on the CPU paths (test_noise.py): (y_noisy - y_clean) / (sigma sqrt(sub-tiles read)) is
    N(0, 1), uncorrelated across queries and calls, reproducible from the seed; the backward kernels use
    the forward's draws (directional derivatives, float64, noise 0.3 so that the ADC clamp acts)."""
    r = _run_interpreted(_NOISE_SCRIPT)
    st = r["statistics"]
    assert st["clean_max"] < 0.2 and st["reproducible"]
    assert abs(st["mean"]) < 5 / st["n"] ** 0.5, st
    assert abs(st["std"] - 1) < 5 / (2 * st["n"]) ** 0.5, st
    assert abs(st["corr_query"]) < 5 / st["n_query"] ** 0.5 and abs(st["corr_call"]) < 5 / st["n_call"] ** 0.5, st
    for cell in ("linear", "exact"):
        assert r[cell]["clamped"] > 0.01, r[cell]  # the noise moves readouts across the clamp
        for name in "qkv":
            numeric, analytic = r[cell][name]
            # Central difference, h = 1e-6, float64: truncation ~h^2 and rounding ~1e-16 / h, both << 1e-6.
            assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (cell, name, numeric, analytic)


def test_unsupported_configs_fall_back_with_a_warning_and_cpu_tensors_are_rejected(monkeypatch):
    from gaincell.attention import AnalogAttentionConfig
    from gaincell.attention.blocked import analog_attention_blocked
    from gaincell.attention.kernels import INTERPRET, analog_attention_triton, triton_attention

    monkeypatch.setattr(triton_attention, "_warned", set())
    q, k, v = (torch.rand(1, 2, 20, 4) for _ in range(3))
    cfg = AnalogAttentionConfig(window=16, tile_rows=8)  # not a tl.dot block size
    with pytest.warns(RuntimeWarning, match="tile_rows=8"):
        y = analog_attention_triton(q, k, v, cfg)
    assert torch.equal(y, analog_attention_blocked(q, k, v, cfg))
    with pytest.raises(ValueError, match="dot_precision='fp8'"):
        analog_attention_triton(q, k, v, AnalogAttentionConfig(window=16, tile_rows=16), dot_precision="fp8")
    if INTERPRET:
        pytest.skip("this process runs triton in interpreter mode")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        analog_attention_triton(q, k, v, AnalogAttentionConfig(window=16, tile_rows=16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU check is interpreted)")
def test_gpu_kernels_equal_reference():
    namespace: dict = {}
    exec(_COMMON, namespace)
    NL = namespace["NL"]
    cases = {
        "linear": (2, 3, 1000, 256, 64, 64, "float32", dict()),
        "surrogate": (2, 3, 1000, 256, 64, 64, "float32", dict(NL)),
        "exact": (2, 3, 1000, 256, 64, 64, "float32", dict(NL, exact_nonlinear_grad=True)),
        "exact_ragged_D": (1, 2, 333, 128, 64, 48, "float32", dict(NL, exact_nonlinear_grad=True)),
        "linear_varied": (2, 3, 1000, 256, 64, 64, "float32", dict(cell_variation=0.1)),
        "exact_varied_ragged_D": (1, 2, 333, 128, 64, 48, "float32", dict(NL, exact_nonlinear_grad=True,
                                                                          cell_variation=0.1)),
    }
    _check(namespace["compare"](cases, device="cuda"))


def test_interpreted_kernels_without_variation_or_noise_are_bit_identical_to_before():
    """The dyadic cases of ``zero_knob_cases`` (exact arithmetic): outputs and gradients equal, bit for
    bit, those stored from the code before cell variation and readout noise existed."""
    script = (f"import sys\nsys.path.insert(0, {str(os.path.dirname(__file__))!r})\n" + textwrap.dedent('''
        import zero_knob_cases
        golden = torch.load(zero_knob_cases.GOLDEN)
        got = zero_knob_cases.compute(("triton",))
        print("RESULTS" + json.dumps({cell: [bool(torch.equal(a, b)) for a, b in zip(got[("triton", cell)], golden[cell])]
                                      for cell in zero_knob_cases.CELLS}))
    '''))
    assert _run_interpreted(script) == {cell: [True] * 4 for cell in ("linear", "surrogate", "exact")}
