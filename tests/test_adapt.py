"""Adaptation (eq. 9): the update rule, the whole algorithm on a trained 2-layer model,
DDP, the ``adapt`` and ``leakage_eval`` stages and the figures built from their outputs."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gaincell import adapt
from gaincell.adapt.study_eval import study_eval
from gaincell.attention import PAPER_COEFFICIENTS, AnalogAttentionConfig
from gaincell.attention.module import SCALER_STAGES
from gaincell.data import open_tokens, sample_batches
from gaincell.model import GPT, GPTConfig

VOCAB, SEQ, PERIOD = 32, 64, 8
LINEAR = AnalogAttentionConfig(window=64, tile_rows=64)
PAPER_CELL = dataclasses.replace(LINEAR, coefficients=PAPER_COEFFICIENTS)
# The paper's cell at half the charge per unit input: a gain mismatch adaptation must absorb.
WEAK_CELL = dataclasses.replace(LINEAR, coefficients=tuple(0.5 * c for c in PAPER_COEFFICIENTS))


def periodic_batch(n: int, generator: torch.Generator):
    """Sequences repeating a random 8-token pattern: predicting them needs attention 8 tokens back."""
    pattern = torch.randint(0, VOCAB, (n, PERIOD), generator=generator)
    seq = pattern.repeat(1, (SEQ + 1) // PERIOD + 1)[:, :SEQ + 1]
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def small_gpt(attention: str = "linear_hw") -> GPT:
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=32, attention=attention,
                         analog=LINEAR, attention_implementation="dense"))


@pytest.fixture(scope="module")
def trained_linear():
    """A 2-layer linear hardware model trained (150 AdamW steps, ~2 s) on the periodic task."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = small_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        _, loss = model(*periodic_batch(16, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    assert loss.item() < 1.5, "the linear model did not learn the task: the tests below would be meaningless"
    return model.eval()


def _copy(model: GPT) -> GPT:
    other = small_gpt()
    other.load_state_dict(model.state_dict())
    return other.eval()


# --------------------------------------------------------------------------------------------------
# the update rule
# --------------------------------------------------------------------------------------------------
class AffineStages(nn.Module):
    """Stand-in for one AttentionCore: every stage is y = a x + b on fixed, skewed inputs x."""

    def __init__(self, n_head: int, inputs: torch.Tensor) -> None:
        super().__init__()
        self.n_head, self.kind = n_head, "nonlinear_hw"
        self.inputs = inputs  # (4 stages, H, N)
        for stage in SCALER_STAGES:
            self.register_parameter(f"{stage}_scale", nn.Parameter(torch.ones(n_head)))
            self.register_parameter(f"{stage}_bias", nn.Parameter(torch.zeros(n_head)))
        self.capture_stats, self.captured = False, {}

    def attention_cores(self):
        return [self]

    def forward(self, x, y):
        for si, stage in enumerate(SCALER_STAGES):
            out = getattr(self, f"{stage}_scale")[:, None] * self.inputs[si] + getattr(self, f"{stage}_bias")[:, None]
            if self.capture_stats:
                self.captured[stage] = (out.mean(dim=1), out.std(dim=1))
        return None, torch.zeros(())


def test_update_rule_converges_to_analytic_affine_scalers():
    g = torch.Generator().manual_seed(0)
    inputs = torch.empty(4, 3, 5000, dtype=torch.float64).exponential_(generator=g) * 0.7 + 0.2
    stage = AffineStages(3, inputs).double()
    target_mean = torch.tensor([[[0.5, -0.2, 0.45], [0.3, 0.45, 0.1], [0.45, 0.2, 0.6], [0.0, -1.0, 2.0]]],
                               dtype=torch.float64)
    target_std = torch.tensor([[[0.1, 0.25, 0.05], [0.2, 0.15, 0.3], [0.12, 0.08, 0.5], [1.0, 0.3, 0.02]]],
                              dtype=torch.float64)
    target = adapt.Statistics(mean=target_mean, std=target_std)
    result = adapt.adapt_scalers(stage, [(None, None)], target, adapt.AdaptSettings(tolerance=1e-10, max_iters=200),
                                 progress=False)
    assert result.converged and result.not_converged == []
    # closed form: std(a x + b) = a std(x), mean = a mean(x) + b (the std is the unbiased one both sides)
    x_mean, x_std = inputs.mean(dim=2), inputs.std(dim=2)
    a_exact = target_std[0] / x_std
    b_exact = target_mean[0] - a_exact * x_mean
    torch.testing.assert_close(result.scale_after[0], a_exact, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(result.bias_after[0], b_exact, rtol=1e-8, atol=1e-9)
    # the module's parameters hold them too
    torch.testing.assert_close(stage.q_scale.detach(), a_exact[0])
    # the first, undamped update fixes every std exactly; the means need the a-change to settle
    assert result.history[1]["worst_std_error"] < 1e-12
    assert result.history[0]["worst_mean_error"] > 0.1


def test_damping_schedule_and_settings_validation():
    s = adapt.AdaptSettings(damping_start=1.0, damping_end=0.1, damping_iters=50)
    assert s.beta(0) == 1.0
    assert s.beta(25) == pytest.approx(0.55)
    assert s.beta(50) == pytest.approx(0.1) and s.beta(500) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="tolerance"):
        adapt.AdaptSettings(tolerance=0)
    with pytest.raises(ValueError, match="damping_end"):
        adapt.AdaptSettings(damping_end=1.5)


def test_pooled_statistics_equal_statistics_of_all_values(trained_linear):
    g = torch.Generator().manual_seed(5)
    batches = [periodic_batch(4, g) for _ in range(3)]
    pooled = adapt.measure_statistics(trained_linear, batches)
    x = torch.cat([b[0] for b in batches])
    values = adapt.capture_values(trained_linear, trained_linear.attention_cores(), (x, x), [1], head=1,
                                  max_values=10**9)
    for si, stage in enumerate(SCALER_STAGES):
        v = torch.from_numpy(values[(1, stage)]).double()
        assert pooled.mean[1, si, 1].item() == pytest.approx(v.mean().item(), abs=2e-6)
        assert pooled.std[1, si, 1].item() == pytest.approx(v.std().item(), rel=1e-4)


# --------------------------------------------------------------------------------------------------
# the algorithm on a trained 2-layer model
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", [PAPER_CELL, WEAK_CELL], ids=["paper_cell", "weak_cell"])
def test_adapted_nonlinear_model_matches_linear_statistics(trained_linear, cell):
    g = torch.Generator().manual_seed(2)
    calibration = [periodic_batch(16, g) for _ in range(2)]
    linear = _copy(trained_linear)
    target = adapt.measure_statistics(linear, calibration)
    model = _copy(trained_linear)
    model.set_attention("nonlinear_hw", cell)
    before = adapt.measure_statistics(model, calibration)
    assert (before.std - target.std).abs().max() > 1e-2, "the nonlinear cell should change the statistics"
    result = adapt.adapt_scalers(model, calibration, target, adapt.AdaptSettings(), progress=False)
    assert result.converged, result.not_converged[:3]
    assert result.updates < 30
    # measured afresh, independently of the algorithm's own bookkeeping
    after = adapt.measure_statistics(model, calibration)
    assert (after.mean - target.mean).abs().max() < 1e-4
    assert (after.std - target.std).abs().max() < 1e-4
    assert all(c.kind == "nonlinear_hw" for c in model.attention_cores())


def test_adaptation_lowers_the_loss_of_a_mismatched_cell(trained_linear):
    g = torch.Generator().manual_seed(3)
    calibration = [periodic_batch(16, g) for _ in range(2)]
    held_out = [periodic_batch(16, g) for _ in range(2)]
    linear_loss = adapt.mean_loss(trained_linear, held_out)
    target = adapt.measure_statistics(trained_linear, calibration)
    model = _copy(trained_linear)
    model.set_attention("nonlinear_hw", WEAK_CELL)
    mapped_loss = adapt.mean_loss(model, held_out)
    adapt.adapt_scalers(model, calibration, target, adapt.AdaptSettings(), progress=False)
    adapted_loss = adapt.mean_loss(model, held_out)
    assert mapped_loss > linear_loss + 0.1  # the mismatch hurts ...
    assert adapted_loss < mapped_loss - 0.1  # ... and adaptation recovers most of it, on unseen batches
    assert abs(adapted_loss - linear_loss) < 0.5 * (mapped_loss - linear_loss)


def test_non_convergence_is_reported_with_the_worst_scalers(trained_linear):
    g = torch.Generator().manual_seed(4)
    calibration = [periodic_batch(8, g)]
    target = adapt.measure_statistics(trained_linear, calibration)
    model = _copy(trained_linear)
    model.set_attention("nonlinear_hw", WEAK_CELL)
    result = adapt.adapt_scalers(model, calibration, target, adapt.AdaptSettings(max_iters=1), progress=False)
    assert not result.converged and result.updates == 1 and len(result.history) == 2
    worst = result.not_converged[0]
    assert set(worst) >= {"layer", "head", "stage", "mean_error", "std_error"}
    assert worst["worst_abs_error"] == pytest.approx(max(result.history[-1]["worst_mean_error"],
                                                         result.history[-1]["worst_std_error"]))


# --------------------------------------------------------------------------------------------------
# DDP: statistics all-reduced, identical scalers on every rank
# --------------------------------------------------------------------------------------------------
def _ddp_model_and_batches():
    torch.manual_seed(11)
    model = small_gpt()
    with torch.no_grad():  # an untrained model with q, k, v spread over the DAC ranges
        for block in model.transformer.h:
            block.attn.c_attn.weight.normal_(0.0, 0.25)
    g = torch.Generator().manual_seed(12)
    return model.eval(), [periodic_batch(4, g) for _ in range(4)]


def _adapt_for_test(model, batches):
    target = adapt.measure_statistics(model, batches)
    model.set_attention("nonlinear_hw", PAPER_CELL)
    return adapt.adapt_scalers(model, batches, target, adapt.AdaptSettings(max_iters=40), progress=False)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, batches = _ddp_model_and_batches()
        result = _adapt_for_test(model, batches[rank::world])  # each rank sees only its share
        torch.save({"scale": result.scale_after, "bias": result.bias_after, "updates": result.updates,
                    "converged": result.converged}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_end_with_identical_scalers_equal_to_one_process(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0["scale"], r1["scale"]) and torch.equal(r0["bias"], r1["bias"])
    assert r0["updates"] == r1["updates"]
    model, batches = _ddp_model_and_batches()
    single = _adapt_for_test(model, batches)  # one process on the union of both shares
    assert single.updates > 1 and single.converged == r0["converged"]
    torch.testing.assert_close(r0["scale"], single.scale_after, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(r0["bias"], single.bias_after, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# the stages, bad input, figures
# --------------------------------------------------------------------------------------------------
def _write_results(root: Path, model: GPT, vocab: int = VOCAB) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    g = torch.Generator().manual_seed(9)
    for split, n in (("train", 16), ("val", 4)):  # documents of 512 tokens, each one repeated pattern
        pattern = torch.randint(0, VOCAB, (n, PERIOD), generator=g)
        pattern.repeat(1, 512 // PERIOD).flatten().numpy().astype(np.uint16).tofile(data / f"{split}.bin")
    (data / "meta.json").write_text(json.dumps({"vocab_size": vocab, "tokenizer": "bpe_trained"}))
    ckpt = root / "checkpoints" / "linear_hw" / "final.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save(model.checkpoint_state(), ckpt)
    return ckpt


def _cfg(root: Path, *extra: str):
    from gaincell.config import compose

    return compose(["profile=ci", f"results_dir={root}", "attention=nonlinear_hw", "attention.coefficients=paper",
                    "attention.window=64", "attention.implementation=dense", "model.block_size=64",
                    "train.device=cpu", "tracking.mode=disabled", "adapt.calibration_batches=2",
                    "adapt.batch_size=8", "adapt.eval_batches=2", *extra])


def test_adapt_stage_outputs_modes_and_figures(trained_linear, tmp_path):
    from gaincell.figures import adapt as figs

    ckpt = _write_results(tmp_path, trained_linear)
    s = adapt.run(_cfg(tmp_path, f"+stage.init_from={ckpt}", "+stage.name=nonlinear_adapted"))
    out = tmp_path / "adapt" / "nonlinear_adapted"
    assert s["converged"] and s["worst_mean_error"] < 1e-4 and s["worst_std_error"] < 1e-4
    assert json.loads((out / "summary.json").read_text())["iterations"] == s["iterations"]
    import pandas as pd

    history = pd.read_csv(out / "history.csv")
    assert len(history) == s["iterations"] + 1 and history["worst_std_error"].iloc[-1] < 1e-4
    stats = pd.read_csv(out / "stats.csv")
    assert len(stats) == 2 * 4 * 2 and (stats["std_error_after"].abs() < 1e-4).all()
    assert (out / "histograms.csv").is_file()
    adapted = GPT.from_checkpoint(tmp_path / "checkpoints" / "nonlinear_adapted" / "ckpt.pt")
    assert adapted.config.attention == "nonlinear_hw"
    assert adapted.config.analog.coefficients == PAPER_COEFFICIENTS
    assert torch.allclose(adapted.attention_cores()[1].out_scale.double(),
                          torch.tensor(stats[(stats.layer == 1) & (stats.stage == "out")]["scale_after"].to_numpy()))
    # the same validation batches for every variant: the linear loss equals the evaluate mode's
    s_map = adapt.run(_cfg(tmp_path, f"+stage.init_from={ckpt}", "+stage.name=nonlinear_mapped",
                           "+stage.mode=map_only"))
    assert s_map["iterations"] == 0 and s_map["val_loss"] == pytest.approx(s["val_loss_mapped"])
    s_eval = adapt.run(_cfg(tmp_path, f"+stage.init_from={ckpt}", "+stage.name=linear_hw", "+stage.mode=evaluate"))
    assert s_eval["val_loss"] == pytest.approx(s["val_loss_linear"])
    assert (tmp_path / "adapt" / "study" / "linear_hw.json").is_file()
    # the study_eval stage is the evaluate mode under its own name: the same batches, the same numbers
    s_study = study_eval(_cfg(tmp_path, f"+stage.init_from={ckpt}", "+stage.name=linear_hw"))
    assert s_study["val_batch_losses"] == s_eval["val_batch_losses"]

    figdir = tmp_path / "figures"
    paths = figs.fig_adapt_statistics(tmp_path, figdir) + figs.fig_adapt_convergence(tmp_path, figdir) + \
        figs.fig_study(tmp_path, figdir)
    names = {p.name for p in paths}
    assert {"adapt_statistics_nonlinear_adapted.png", "adapt_convergence.png", "study_variants.png",
            "study_table.csv"} <= names
    table = pd.read_csv(figdir / "study_table.csv")
    assert table.set_index("variant").loc[4, "val_loss"] == pytest.approx(s_map["val_loss"])


def test_adapt_stage_rejects_bad_input(trained_linear, tmp_path):
    ckpt = _write_results(tmp_path, trained_linear)
    soft = small_gpt("softmax")
    soft_path = tmp_path / "checkpoints" / "softmax" / "final.pt"
    soft_path.parent.mkdir(parents=True)
    torch.save(soft.checkpoint_state(), soft_path)
    with pytest.raises(ValueError, match=r"attention \['softmax'\].*linear hardware model"):
        adapt.run(_cfg(tmp_path, f"+stage.init_from={soft_path}", "+stage.name=x"))
    (tmp_path / "data" / "meta.json").write_text(json.dumps({"vocab_size": 50257}))
    with pytest.raises(ValueError, match="vocabulary is 50257 tokens.*model's is 32"):
        adapt.run(_cfg(tmp_path, f"+stage.init_from={ckpt}", "+stage.name=x"))
    with pytest.raises(ValueError, match="contains token id 3[01] but the model's vocabulary has 30"):
        sample_batches(open_tokens(tmp_path / "data", "train"), 4, 8, SEQ, seed=0, vocab_size=30)
    with pytest.raises(FileNotFoundError, match="init_from"):
        adapt.run(_cfg(tmp_path, f"+stage.init_from={tmp_path / 'nope.pt'}", "+stage.name=x"))
    with pytest.raises(ValueError, match="mode"):
        adapt.run(_cfg(tmp_path, f"+stage.init_from={ckpt}", "+stage.name=x", "+stage.mode=adapt_fast"))
    with pytest.raises(ValueError, match=r"\+stage.nmae: not a setting of this stage"):
        adapt.run(_cfg(tmp_path, f"+stage.init_from={ckpt}", "+stage.nmae=x"))


def test_leakage_eval_with_and_without_fine_tuning(trained_linear, tmp_path):
    from gaincell.figures import adapt as figs

    ckpt = _write_results(tmp_path, trained_linear)
    common = ("attention=linear_hw", f"+stage.init_from={ckpt}", "train.batch_size=4", "train.eval_iters=1",
              "train.progress=false")
    rows = {}
    for value, ft in (("0.0", 0), ("0.1", 2)):
        rows[value] = adapt.leakage_eval(_cfg(tmp_path, *common, f"attention.decay_per_step={value}",
                                              f"+stage.finetune_iters={ft}"))
    assert (tmp_path / "adapt" / "leakage" / "0.json").is_file() and (tmp_path / "adapt" / "leakage" / "0.1.json").is_file()
    # a key 60 tokens back keeps exp(-0.1 * 60) = 0.25% of its charge: the model trained without leakage suffers
    assert rows["0.1"]["val_loss"] > rows["0.0"]["val_loss"] + 0.5
    assert rows["0.1"]["attenuation_at_window"] == pytest.approx(math.exp(-0.1 * 63))
    assert rows["0.0"]["val_loss_finetuned"] is None
    assert rows["0.1"]["val_loss_finetuned"] is not None and math.isfinite(rows["0.1"]["val_loss_finetuned"])
    assert (tmp_path / "checkpoints" / "leakage_0.1" / "final.pt").is_file()
    assert [p.name for p in figs.fig_leakage(tmp_path, tmp_path / "figures")] == ["leakage.png", "leakage.pdf"]
