"""Trainer (gaincell.train): schedule, learning, SIGKILL + resume reproducing the curve, DDP on CPU
(2 gloo processes == 1 process with the same global batch), NaN stop, checkpoint errors, tracking."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gaincell.config import compose
from gaincell.model import GPT, CheckpointError
from gaincell.train import BatchSampler, TrainingDiverged, WarmupCosine
from gaincell.train import run as train_run

REPO = Path(__file__).resolve().parents[1]
VOCAB = 48


def _write_data(data_dir: Path) -> None:
    """A learnable token stream: a noisy repeating pattern (so the loss falls quickly)."""
    rng = np.random.default_rng(0)
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 20000), ("val", 4000)):
        pattern = np.tile(np.arange(1, 17), n // 16 + 1)[:n]
        noise = rng.integers(0, VOCAB, n)
        tokens = np.where(rng.random(n) < 0.1, noise, pattern).astype(np.uint16)
        tokens.tofile(data_dir / f"{split}.bin")
    (data_dir / "meta.json").write_text(json.dumps({"vocab_size": VOCAB, "tokenizer": "bpe_trained",
                                                    "eot_token": 0, "train_tokens": 20000, "corpus": "synthetic"}))


def _overrides(root: Path, name: str, **extra) -> list:
    base = {
        "results_dir": str(root), "data.data_dir": str(root / "data"), "model.n_layer": 1, "model.n_head": 1,
        "model.n_embd": 64, "model.block_size": 32, "attention.window": 64, "train.batch_size": 4,
        "train.grad_accum": 1, "train.max_iters": 12, "train.warmup_iters": 2, "train.lr_decay_iters": 12,
        "train.eval_interval": 4, "train.eval_iters": 2, "train.checkpoint_interval": 4, "train.threads": 1,
        "train.progress": "false", "train.device": "cpu", "tracking.mode": "disabled", "+stage.name": name,
    }
    base.update(extra)
    return ["profile=ci"] + [f"{k}={v}" for k, v in base.items()]


@pytest.fixture()
def root(tmp_path):
    _write_data(tmp_path / "data")
    return tmp_path


def _metrics(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / "train" / name / "metrics.csv")


def _env():
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("GAINCELL_FAULT_KILL_AT_ITER", None)
    return env


def test_warmup_cosine_schedule_closed_form():
    s = WarmupCosine(learning_rate=6e-4, min_lr=6e-5, warmup_iters=10, decay_iters=110)
    assert s.lr(0) == pytest.approx(6e-4 / 11)
    assert s.lr(9) == pytest.approx(6e-4 * 10 / 11)
    assert s.lr(10) == pytest.approx(6e-4)
    assert s.lr(60) == pytest.approx((6e-4 + 6e-5) / 2)  # half way down the cosine
    assert s.lr(110) == pytest.approx(6e-5) and s.lr(500) == pytest.approx(6e-5)
    lrs = [s.lr(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_batch_sampler_windows_are_shifted_by_one(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    s = BatchSampler(tmp_path / "t.bin", 16, seed=3)
    off = s.draw(5)
    assert int(off.max()) <= 1000 - 17
    x, y = s.batch(off, torch.device("cpu"))
    assert torch.equal(y, x + 1) and torch.equal(x[:, 0], off)
    state = s.state_dict()
    a = s.draw(4)
    s.load_state_dict(state)
    assert torch.equal(s.draw(4), a)


def test_training_learns_writes_metrics_and_checkpoints(root):
    cfg = compose(_overrides(root, "soft"))
    final = train_run(cfg)
    m = _metrics(root, "soft")
    assert list(m.columns) == ["iter", "tokens", "lr", "train_loss", "val_loss", "elapsed_s"]
    assert m["iter"].tolist() == list(range(0, 13))
    assert m["tokens"].iloc[-1] == 12 * 4 * 32
    val = m.dropna(subset=["val_loss"])
    assert val["iter"].tolist() == [0, 4, 8, 12]
    assert val["val_loss"].iloc[0] == pytest.approx(math.log(VOCAB), abs=0.3)  # untrained: near uniform
    assert val["val_loss"].iloc[-1] < val["val_loss"].iloc[0] - 0.5
    assert final == root / "checkpoints" / "soft" / "final.pt" and final.is_file()
    model = GPT.from_checkpoint(final)
    assert model.config.vocab_size == VOCAB and model.config.attention == "softmax"
    summary = json.loads((root / "train" / "soft" / "metrics.summary.json").read_text())
    assert summary["iters"] == 12 and summary["final_val_loss"] == pytest.approx(val["val_loss"].iloc[-1])
    # Fine-tune a hardware model from that checkpoint: attention switched, weights carried over.
    cfg = compose(_overrides(root, "lin", **{"attention": "linear_hw", "+stage.init_from": str(final),
                                             "train.max_iters": 4}))
    lin_final = train_run(cfg)
    lin = GPT.from_checkpoint(lin_final)
    assert lin.config.attention == "linear_hw"
    assert not torch.equal(lin.attention_cores()[0].k_scale, torch.ones(1))  # scalers trained
    # Running again is a no-op: the finished run is not retrained.
    before = lin_final.stat().st_mtime_ns
    train_run(cfg)
    assert lin_final.stat().st_mtime_ns == before


def test_max_iters_zero_exports_the_initial_model(root):
    final = train_run(compose(_overrides(root, "export", **{"train.max_iters": 0})))
    m = _metrics(root, "export")
    assert m["iter"].tolist() == [0] and np.isfinite(m["val_loss"].iloc[0])
    assert GPT.from_checkpoint(final).config.n_embd == 64


def test_sigkill_then_resume_reproduces_the_uninterrupted_curve(root):
    train_run(compose(_overrides(root, "ref")))
    reference = _metrics(root, "ref")
    # Killed by SIGKILL right after iteration 7 (last checkpoint: iteration 4), in its own process.
    cmd = [sys.executable, "-m", "gaincell", "train"] + _overrides(root, "killed")
    proc = subprocess.run(cmd, env=dict(_env(), GAINCELL_FAULT_KILL_AT_ITER="7"), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpt_dir = root / "checkpoints" / "killed"
    assert (ckpt_dir / "ckpt.pt").is_file() and not (ckpt_dir / "final.pt").exists()
    assert torch.load(ckpt_dir / "ckpt.pt", weights_only=False)["iter"] == 4
    train_run(compose(_overrides(root, "killed")))
    resumed = _metrics(root, "killed")
    assert resumed["iter"].tolist() == reference["iter"].tolist()
    for col in ("train_loss", "val_loss", "lr", "tokens"):
        np.testing.assert_allclose(resumed[col].to_numpy(float), reference[col].to_numpy(float), rtol=1e-6,
                                   atol=1e-7, err_msg=col)
    a = torch.load(root / "checkpoints" / "ref" / "final.pt", weights_only=False)["model"]
    b = torch.load(ckpt_dir / "final.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_match_one_process(root):
    common = {"train.grad_accum": 2, "train.max_iters": 5, "train.eval_interval": 5, "train.checkpoint_interval": 5,
              "attention": "linear_hw", "train.grad_clip": 0.0}  # clipping would hide a gradient scale
    train_run(compose(_overrides(root, "single", **common)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "gaincell", "train"] + \
        _overrides(root, "ddp", **common)
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    single, ddp = _metrics(root, "single"), _metrics(root, "ddp")
    assert single["iter"].tolist() == ddp["iter"].tolist() == list(range(6))
    np.testing.assert_allclose(ddp["train_loss"].to_numpy(float), single["train_loss"].to_numpy(float),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ddp["val_loss"].to_numpy(float), single["val_loss"].to_numpy(float),
                               rtol=1e-5, atol=1e-6)
    assert single["train_loss"].iloc[-1] < single["train_loss"].iloc[1]  # it did train
    # Adam's update hides a gradient scale; its first moment does not: the averaged gradients agree.
    opt_single = torch.load(root / "checkpoints" / "single" / "final.pt", weights_only=False)["optimizer"]["state"]
    opt_ddp = torch.load(root / "checkpoints" / "ddp" / "final.pt", weights_only=False)["optimizer"]["state"]
    for i in opt_single:
        torch.testing.assert_close(opt_ddp[i]["exp_avg"], opt_single[i]["exp_avg"], rtol=1e-4, atol=1e-7)


def test_nan_loss_stops_naming_iteration_and_checkpoint(root):
    cfg = compose(_overrides(root, "nan", **{"train.learning_rate": 1e30, "train.min_lr": 1e30,
                                             "train.warmup_iters": 0, "train.checkpoint_interval": 1,
                                             "train.grad_clip": 0.0}))
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at iteration (\d+).*last good checkpoint is .*ckpt.pt"):
        train_run(cfg)


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(root):
    ckpt = root / "checkpoints" / "bad" / "ckpt.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"checkpoint .*bad/ckpt.pt is corrupt"):
        train_run(compose(_overrides(root, "bad")))
    # A resumable checkpoint of a run with another width, resumed under the same name.
    train_run(compose(_overrides(root, "shape", **{"train.max_iters": 2, "train.checkpoint_interval": 1})))
    (root / "checkpoints" / "shape" / "final.pt").unlink()
    with pytest.raises(CheckpointError, match=r"shape/ckpt.pt does not match this run: model_config.n_embd: "
                                              r"checkpoint has 64, this run has 128"):
        train_run(compose(_overrides(root, "shape", **{"train.max_iters": 4, "model.n_embd": 128})))
    with pytest.raises(CheckpointError, match=r"shape/ckpt.pt is at iteration 2, beyond train.max_iters=1"):
        train_run(compose(_overrides(root, "shape", **{"train.max_iters": 1})))


def test_bad_settings_are_named(root):
    with pytest.raises(ValueError, match="grad_accum=3 is not divisible"):
        from gaincell.train import DistEnv, train
        train(compose(_overrides(root, "x", **{"train.grad_accum": 3})), DistEnv(world_size=2))
    with pytest.raises(FileNotFoundError, match="meta.json does not exist"):
        train_run(compose(_overrides(root, "y", **{"data.data_dir": str(root / "nowhere")})))


def test_workflow_rerun_after_a_parameter_change_restarts_instead_of_resuming(root):
    """The pipeline passes +stage.on_mismatch=restart: the old run's ckpt.pt is set aside, not resumed."""
    train_run(compose(_overrides(root, "rerun", **{"train.max_iters": 2, "train.checkpoint_interval": 1})))
    (root / "checkpoints" / "rerun" / "final.pt").unlink()  # Snakemake removes outputs before a rerun
    train_run(compose(_overrides(root, "rerun", **{"train.max_iters": 3, "model.n_embd": 128,
                                                   "+stage.on_mismatch": "restart"})))
    ckpt_dir = root / "checkpoints" / "rerun"
    assert (ckpt_dir / "ckpt.stale.pt").is_file()
    state = torch.load(ckpt_dir / "final.pt", map_location="cpu", weights_only=False)
    assert state["model_config"]["n_embd"] == 128 and int(state["iter"]) == 3
    # Fewer iterations than the finished checkpoint: also a fresh start, not an error.
    (ckpt_dir / "final.pt").unlink()
    train_run(compose(_overrides(root, "rerun", **{"train.max_iters": 1, "model.n_embd": 128,
                                                   "+stage.on_mismatch": "restart"})))
    assert int(torch.load(ckpt_dir / "final.pt", map_location="cpu", weights_only=False)["iter"]) == 1
