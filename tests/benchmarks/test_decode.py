"""benchmarks/decode.py at a tiny size: it runs, writes its CSV and JSON, and its prefill timing checks
that gathering and stepping give the same outputs (so the CPU choice in ``prefill`` is a speed choice)."""
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("decode_benchmark", REPO / "benchmarks" / "decode.py")
decode = importlib.util.module_from_spec(spec)
sys.modules["decode_benchmark"] = decode
spec.loader.exec_module(decode)


def test_decode_benchmark_writes_ratios_and_prefill_times(tmp_path):
    out = tmp_path / "decode.csv"
    decode.main(["--window", "16", "--tile-rows", "8", "--heads", "2", "--head-dim", "8", "--steps", "40",
                 "--buckets", "4", "--prefill-tokens", "20", "--out", str(out)])
    summary = json.loads(out.with_suffix(".json").read_text())
    ratios = summary["ratio_to_softmax_ring_window"]
    assert ratios["softmax_ring_window"] == 1.0
    assert set(ratios) == {"analog_linear", "analog_nonlinear", "softmax_ring_window", "softmax_full_cache"}
    assert all(r > 0 for r in ratios.values())
    assert set(summary["prefill"]) == {f"analog_{cell}_{how}_ms" for cell in ("linear", "nonlinear")
                                       for how in ("gathered", "stepped")}
    assert summary["threads"] == 1 and summary["prefill_tokens"] == 20
    assert decode.decoder_module.PREFILL_GATHERS_ON_CPU is False  # restored after the timing


def test_ring_baseline_is_softmax_over_the_last_window():
    """The reference step: SDPA of the query over exactly the last ``window`` keys and values."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(30, 1, 2, 8, generator=g) for _ in range(3))
    ring = decode.RingSoftmaxCache(1, 2, 8, window=8, device="cpu", dtype=torch.float32)
    for t in range(30):
        y = ring.step(q[t], k[t], v[t])
        lo = max(0, t - 7)
        keys, values = k[lo:t + 1].permute(1, 2, 0, 3), v[lo:t + 1].permute(1, 2, 0, 3)
        expected = F.scaled_dot_product_attention(q[t].unsqueeze(2), keys, values).squeeze(2)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)  # key order differs: float rounding
