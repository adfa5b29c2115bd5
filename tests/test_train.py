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
    (data_dir / "tokenizer.json").write_text('{"stand-in": "the trainer only hashes this file"}')
    (data_dir / "meta.json").write_text(json.dumps({"vocab_size": VOCAB, "tokenizer": "bpe_trained",
                                                    "eot_token": 0, "train_tokens": 20000, "val_tokens": 4000,
                                                    "dtype": "uint16", "corpus": "synthetic",
                                                    "tokenizer_file": "tokenizer.json"}))


def _overrides(root: Path, name: str, **extra) -> list:
    base = {
        "results_dir": str(root), "data.data_dir": str(root / "data"), "model.n_layer": 1, "model.n_head": 1,
        "model.n_embd": 64, "model.block_size": 32, "attention.window": 64, "train.batch_size": 4,
        "train.grad_accum": 1, "train.max_iters": 12, "train.warmup_iters": 2, "train.lr_decay_iters": 12,
        "train.eval_interval": 4, "train.eval_iters": 2, "train.checkpoint_interval": 4, "train.threads": 1,
        "train.progress": "false", "train.device": "cpu", "tracking.mode": "disabled", "+stage.name": name,
        "attention.gain": 19.3,  # the linear cell's slope given, not taken from a fit result
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
    cfg = compose(_overrides(root, "lin", **{"attention": "linear_hw", "+stage.init_from": "soft",  # run name
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
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "gaincell", "train"] + \
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
    with pytest.raises(CheckpointError, match=r"shape/ckpt.pt does not match this run: the checkpoint is at "
                                              r"iteration 2, beyond train.max_iters=1"):
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


# --------------------------------------------------------------------------------------------------
# reruns after a change: every setting that changes the result retrains; run-time settings do not
# --------------------------------------------------------------------------------------------------
# 3 steps (warmup 1, cosine over 4): the first three rates depend on learning_rate, min_lr, warmup and decay.
RERUN_BASE = {"attention": "linear_hw", "train.max_iters": 3, "train.lr_decay_iters": 4, "train.warmup_iters": 1,
              "train.eval_interval": 3, "train.checkpoint_interval": 3, "+stage.on_mismatch": "restart"}

# (override, value, config key that records it). Each changes the trained weights or the recorded curve.
RESULT_SETTINGS = [
    ("train.learning_rate", 2e-3, "train.learning_rate"), ("train.min_lr", 1e-5, "train.min_lr"),
    ("train.warmup_iters", 0, "train.warmup_iters"), ("train.lr_decay_iters", 5, "train.lr_decay_iters"),
    ("train.max_iters", 4, "train.max_iters"), ("train.weight_decay", 0.0, "train.weight_decay"),
    ("train.beta1", 0.8, "train.beta1"), ("train.beta2", 0.99, "train.beta2"),
    ("train.grad_clip", 0.5, "train.grad_clip"),
    ("train.batch_size", 2, "train.batch_size"), ("train.grad_accum", 2, "train.grad_accum"),
    ("train.eval_interval", 1, "train.eval_interval"), ("train.eval_iters", 1, "train.eval_iters"),
    ("train.log_interval", 2, "train.log_interval"), ("train.dtype", "bfloat16", "train.dtype"),
    ("train.seed", 7, "train.seed"), ("model.dropout", 0.1, "model.dropout"), ("model.n_layer", 2, "model.n_layer"),
    ("model.bias", False, "model.bias"), ("model.pad_vocab_multiple", 16, "model.pad_vocab_multiple"),
    ("model.block_size", 16, "model.block_size"), ("attention", "softmax", "attention.kind"),
    ("attention.decay_per_step", 1e-3, "attention.decay_per_step"), ("attention.gain", 10.0, "attention.gain"),
    ("attention.output_levels", 16, "attention.output_levels"),
    ("attention.query_levels", "null", "attention.query_levels"),
]
# Settings that only change how the run executes (gaincell.train.RUNTIME_TRAIN_KEYS and friends).
RUNTIME_SETTINGS = [("train.progress", "true"), ("train.threads", 0), ("train.checkpoint_interval", 1),
                    ("train.compile", "true"), ("train.device", "auto"), ("attention.implementation", "dense"),
                    ("data.num_proc", 7), ("data.cache_dir", "/nonexistent/cache"), ("tracking.csv_flush_s", 1.0),
                    ("+stage.on_mismatch", "error")]


@pytest.fixture(scope="module")
def finished_base(tmp_path_factory):
    """A finished 2-iteration linear_hw run, copied into each test's results folder."""
    root = tmp_path_factory.mktemp("base")
    _write_data(root / "data")
    train_run(compose(_overrides(root, "base", **RERUN_BASE)))
    return root


def _rerun(finished_base, tmp_path, key, value):
    import shutil

    shutil.copytree(finished_base, tmp_path, dirs_exist_ok=True)
    final = tmp_path / "checkpoints" / "base" / "final.pt"
    before = final.stat().st_mtime_ns
    settings = dict(RERUN_BASE, **{key: value})
    train_run(compose(_overrides(tmp_path, "base", **settings)))
    return final, before


@pytest.mark.parametrize("key,value,recorded", RESULT_SETTINGS, ids=[s[0] + "=" + str(s[1]) for s in RESULT_SETTINGS])
def test_a_changed_result_setting_retrains(finished_base, tmp_path, key, value, recorded):
    final, before = _rerun(finished_base, tmp_path, key, value)
    state = torch.load(final, map_location="cpu", weights_only=False)
    assert final.stat().st_mtime_ns != before, f"{key}={value}: the finished run was kept ('already finished')"
    section, name = recorded.split(".")
    expected = None if value == "null" else value
    assert state["config"][section][name] == expected
    assert state["iter"] == state["config"]["train"]["max_iters"]


@pytest.mark.parametrize("key,value", RUNTIME_SETTINGS, ids=[s[0] + "=" + str(s[1]) for s in RUNTIME_SETTINGS])
def test_a_changed_runtime_setting_keeps_the_finished_run(finished_base, tmp_path, key, value):
    final, before = _rerun(finished_base, tmp_path, key, value)
    assert final.stat().st_mtime_ns == before


def test_a_changed_starting_checkpoint_or_tokenizer_retrains(root):
    """Same path, other content: the starting checkpoint and the tokenizer count by SHA-256."""
    from gaincell.data import TokenizerMismatch

    settings = dict(RERUN_BASE, **{"attention": "softmax"})
    base = train_run(compose(_overrides(root, "start", **settings)))
    ft = dict(RERUN_BASE, **{"+stage.init_from": str(base)})
    final = train_run(compose(_overrides(root, "ft", **ft)))
    assert torch.load(final, weights_only=False)["tokenizer"]["sha256"]
    stamp = final.stat().st_mtime_ns
    train_run(compose(_overrides(root, "ft", **ft)))
    assert final.stat().st_mtime_ns == stamp  # unchanged inputs: not retrained
    train_run(compose(_overrides(root, "start", **dict(settings, **{"train.learning_rate": 2e-3}))))  # same path
    train_run(compose(_overrides(root, "ft", **ft)))
    assert final.stat().st_mtime_ns != stamp
    # A retrained tokenizer of the same size: the base retrains; fine-tuning the old base is refused.
    (root / "data" / "tokenizer.json").write_text('{"another": "tokenizer of the same size"}')
    with pytest.raises(TokenizerMismatch, match=r"start/final.pt was trained with tokenizer sha256 \w+ .* has "
                                                r"tokenizer sha256 \w+ .*tokenizer.json"):
        train_run(compose(_overrides(root, "ft", **ft)))
    stamp = base.stat().st_mtime_ns
    train_run(compose(_overrides(root, "start", **dict(settings, **{"train.learning_rate": 2e-3}))))
    assert base.stat().st_mtime_ns != stamp
    train_run(compose(_overrides(root, "ft", **ft)))


# --------------------------------------------------------------------------------------------------
# resume after changing the run length: the learning rate follows the new schedule
# --------------------------------------------------------------------------------------------------
def _assert_same_curve(a: pd.DataFrame, b: pd.DataFrame, columns=("lr", "train_loss")) -> None:
    assert a["iter"].tolist() == b["iter"].tolist()
    for col in columns:
        np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-6, atol=1e-7,
                                   err_msg=col)


def test_extending_a_run_follows_the_curve_of_a_fresh_longer_run(root):
    """Warmup 4, decay following max_iters: a 4-step run used only warmup rates, which a 12-step run shares,
    so it is extended to 12 steps, on the 12-step cosine (a restored scheduler would decay to min_lr at 4)."""
    common = {"train.warmup_iters": 4, "train.lr_decay_iters": "null", "train.eval_interval": 4,
              "train.checkpoint_interval": 4}
    train_run(compose(_overrides(root, "fresh", **dict(common, **{"train.max_iters": 12}))))
    train_run(compose(_overrides(root, "grown", **dict(common, **{"train.max_iters": 4}))))
    train_run(compose(_overrides(root, "grown", **dict(common, **{"train.max_iters": 12}))))
    fresh, grown = _metrics(root, "fresh"), _metrics(root, "grown")
    _assert_same_curve(grown, fresh, ("lr", "train_loss", "val_loss"))
    assert grown["lr"].iloc[5] > 2 * 6e-5  # past the old length: still on the long cosine, not at min_lr
    state = torch.load(root / "checkpoints" / "grown" / "final.pt", weights_only=False)
    assert state["iter"] == 12 and "scheduler" not in state


def test_a_run_cannot_continue_on_a_changed_schedule(root):
    """Past warmup the cosine depends on its length: a checkpoint of the 12-step decay cannot become a
    16-step run; by hand that is an error naming the first differing rate, in the workflow a fresh start
    whose curve is the fresh 16-step run's."""
    train_run(compose(_overrides(root, "fresh16", **{"train.max_iters": 16, "train.lr_decay_iters": 16})))
    train_run(compose(_overrides(root, "sched", **{"train.max_iters": 12})))
    with pytest.raises(CheckpointError, match=r"sched/ckpt.pt does not match this run: learning rate at "
                                              r"iteration 3: checkpoint used .* decay 12 -> 16 iterations"):
        train_run(compose(_overrides(root, "sched", **{"train.max_iters": 16, "train.lr_decay_iters": 16})))
    train_run(compose(_overrides(root, "sched", **{"train.max_iters": 16, "train.lr_decay_iters": 16,
                                                   "+stage.on_mismatch": "restart"})))
    _assert_same_curve(_metrics(root, "sched"), _metrics(root, "fresh16"), ("lr", "train_loss", "val_loss"))


def test_schedule_mismatch_compares_the_rates_used():
    from gaincell.train import schedule_mismatch

    old = {"learning_rate": 6e-4, "min_lr": 6e-5, "warmup_iters": 10, "decay_iters": 100, "max_iters": 50}
    assert schedule_mismatch(old, WarmupCosine(6e-4, 6e-5, 10, 100), 100, 50) is None  # longer run, same decay
    assert schedule_mismatch(old, WarmupCosine(6e-4, 6e-5, 10, 200), 200, 10) is None  # still in warmup
    assert schedule_mismatch(old, WarmupCosine(6e-4, 6e-5, 10, 200), 200, 11) is None  # lr(10) = peak in both
    assert "iteration 11" in schedule_mismatch(old, WarmupCosine(6e-4, 6e-5, 10, 200), 200, 12)
    assert "iteration 0" in schedule_mismatch(old, WarmupCosine(5e-4, 6e-5, 10, 100), 100, 1)
    assert "beyond train.max_iters=40" in schedule_mismatch(old, WarmupCosine(6e-4, 6e-5, 10, 100), 40, 50)


# --------------------------------------------------------------------------------------------------
# SIGTERM (SLURM time limit): checkpoint, exit, resume
# --------------------------------------------------------------------------------------------------
def test_sigterm_writes_a_checkpoint_then_exits_and_the_rerun_resumes(root):
    import signal

    settings = {"train.max_iters": 60, "train.lr_decay_iters": 60, "train.eval_interval": 4,
                "train.checkpoint_interval": 1000}
    train_run(compose(_overrides(root, "uncut", **settings)))
    cmd = [sys.executable, "-m", "gaincell", "train"] + _overrides(root, "cut", **settings)
    proc = subprocess.Popen(cmd, env=dict(_env(), PYTHONUNBUFFERED="1"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "iter 4:" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=120)[0]
    out = "".join(lines) + rest
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    ckpt_dir = root / "checkpoints" / "cut"
    state = torch.load(ckpt_dir / "ckpt.pt", weights_only=False)
    assert 4 <= state["iter"] < 60 and not state["finished"], out[-2000:]  # no interval checkpoint before 1000
    assert not (ckpt_dir / "final.pt").exists()
    assert f"SIGTERM: checkpoint written at iteration {state['iter']}" in out
    train_run(compose(_overrides(root, "cut", **settings)))
    _assert_same_curve(_metrics(root, "cut"), _metrics(root, "uncut"), ("lr", "train_loss", "val_loss"))


def test_a_truncated_shard_stops_training_naming_the_file(root):
    (root / "data" / "val.bin").write_bytes((root / "data" / "val.bin").read_bytes()[:4000])
    with pytest.raises(ValueError, match=r"data/val.bin holds 2000 tokens but meta.json records val_tokens=4000"):
        train_run(compose(_overrides(root, "short")))


def test_the_final_checkpoint_is_a_wandb_reference_artifact(root, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb = pytest.importorskip("wandb")
    final = train_run(compose(_overrides(root, "tracked", **{"train.max_iters": 2, "tracking.mode": "offline"})))
    wandb.teardown()  # the W&B service writes the offline record asynchronously: flush it
    (record,) = (root / "wandb").rglob("offline-run-*/*.wandb")
    data = record.read_bytes()
    assert b"checkpoint-tracked" in data and final.resolve().as_uri().encode() in data
