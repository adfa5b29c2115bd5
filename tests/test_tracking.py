"""Tracker (gaincell.tracking): local CSV rows and columns, resume truncation, W&B offline run."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from gaincell.config import compose
from gaincell.tracking import Tracker


def _cfg(tmp_path, mode="disabled"):
    return compose([f"results_dir={tmp_path}", f"tracking.mode={mode}", "tracking.csv_flush_s=1000"])


def test_csv_has_fixed_columns_first_then_new_ones(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    tr = Tracker(_cfg(tmp_path), "run", "train", step_name="iter", columns=["loss", "lr"])
    tr.log({"lr": 0.1, "loss": 2.0}, step=1)
    tr.log({"loss": 1.5, "note": "a,b"}, step=2)
    assert not tr.csv_path.exists()  # throttled: written at flush/finish
    tr.summary({"final_loss": 1.5})
    tr.finish()
    assert tr.csv_path == tmp_path / "logs" / "tracking" / "train" / "run.csv"
    df = pd.read_csv(tr.csv_path)
    assert list(df.columns) == ["iter", "loss", "lr", "note"]
    assert df["loss"].tolist() == [2.0, 1.5] and pd.isna(df["lr"].iloc[1]) and df["note"].iloc[1] == "a,b"
    assert json.loads(tr.summary_path.read_text()) == {"final_loss": 1.5}


def test_resume_step_keeps_rows_up_to_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    path = tmp_path / "m.csv"
    tr = Tracker(_cfg(tmp_path), "run", "train", csv_path=path, step_name="iter")
    for i in range(1, 8):
        tr.log({"loss": 10.0 - i}, step=i)
    tr.finish()
    resumed = Tracker(_cfg(tmp_path), "run", "train", csv_path=path, step_name="iter", resume_step=4)
    resumed.log({"loss": 0.5}, step=5)
    resumed.finish()
    df = pd.read_csv(path)
    assert df["iter"].tolist() == [1, 2, 3, 4, 5] and df["loss"].tolist() == [9, 8, 7, 6, 0.5]


def test_disabled_rank_writes_nothing(tmp_path):
    tr = Tracker(_cfg(tmp_path), "run", "train", enabled=False)
    tr.log({"x": 1}, step=1)
    tr.finish()
    assert not tr.csv_path.exists()


def test_bad_mode_is_named(tmp_path, monkeypatch):
    # in the config: refused when composed, naming the allowed values (a choice field of the schema)
    with pytest.raises(Exception, match="tracking.mode=cloud") as info:
        compose([f"results_dir={tmp_path}", "tracking.mode=cloud"])
    assert "Invalid value 'cloud', expected one of [offline, online, disabled]" in str(info.value.__cause__)
    # from the environment ($WANDB_MODE wins over the config): refused by the tracker
    monkeypatch.setenv("WANDB_MODE", "cloud")
    with pytest.raises(ValueError, match="tracking.mode='cloud'"):
        Tracker(compose([f"results_dir={tmp_path}"]), "r", "train")


def test_wandb_offline_run_records_config_and_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path, mode="offline")
    tr = Tracker(cfg, "offline-run", "train", step_name="iter")
    assert tr.wandb_run is not None and tr.wandb_run.config["model"]["n_layer"] == cfg.model.n_layer
    tr.log({"loss": 1.0}, step=1)
    tr.finish()
    runs = list((tmp_path / "wandb").rglob(f"offline-run-*-{tr.wandb_id}"))
    assert runs and list(runs[0].glob("*.wandb"))
