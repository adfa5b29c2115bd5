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


def _offline_run_dir(root, wandb_id):
    (run,) = list((root / "wandb").rglob(f"offline-run-*-{wandb_id}"))
    return run


def test_figures_tables_and_checkpoints_reach_an_offline_run_without_network(tmp_path):
    """Figures as images (with captions), tables as W&B tables, a checkpoint as a file:// reference
    artifact: all in offline mode, in a process with no network at all (its own network namespace when
    the system allows one, else every proxy pointing at a closed port)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("wandb")
    repo = Path(__file__).resolve().parents[1]
    script = f'''
import json, torch, pandas as pd, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from pathlib import Path
from gaincell.config import compose
from gaincell.figures import log_figures
from gaincell.tracking import Tracker
root = Path({str(tmp_path)!r})
cfg = compose([f"results_dir={{root}}", "tracking.mode=offline"])
out = root / "figures"; out.mkdir()
plt.plot([0, 1]); plt.savefig(out / "fig4_study.png")
table = pd.DataFrame({{"variant": ["softmax", "linear_hw"], "val_loss": [5.04, 4.94]}})
table.to_csv(out / "study_table.csv", index=False)
log_figures(cfg, {{"made": {{"fig4": {{"files": [str(out / "fig4_study.png")], "caption": "Study."}}}}}}, out)
torch.save({{"w": torch.ones(3)}}, root / "final.pt")
tr = Tracker(cfg, "linear_hw", "train")
tr.log_checkpoint(root / "final.pt", {{"iter": 3}})
tr.finish()
print("ID", tr.wandb_id)
'''
    env = dict(os.environ, PYTHONPATH=str(repo / "src"), WANDB_SILENT="true", HTTP_PROXY="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    env.pop("WANDB_MODE", None)
    isolate = ["unshare", "-rn"] if subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0 \
        else []
    proc = subprocess.run(isolate + [sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wandb_id = proc.stdout.split("ID")[-1].strip()
    runs = sorted((tmp_path / "wandb").rglob("offline-run-*"))
    assert len(runs) == 2
    figures_run = next(r for r in runs if not r.name.endswith(wandb_id))
    assert list(figures_run.rglob("media/images/figures/fig4_study_*.png"))
    (table,) = figures_run.rglob("media/table/tables/study_table_*.table.json")
    assert json.loads(table.read_text())["data"] == [["softmax", 5.04], ["linear_hw", 4.94]]
    record = next(_offline_run_dir(tmp_path, wandb_id).glob("*.wandb")).read_bytes()
    assert b"checkpoint-linear_hw" in record and (tmp_path / "final.pt").resolve().as_uri().encode() in record


def test_wandb_group_comes_from_the_environment(tmp_path, monkeypatch):
    """The workflow sets $WANDB_RUN_GROUP from a hash of the configuration: every stage joins it."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_RUN_GROUP", "tiny-0123456789abcdef")
    tr = Tracker(_cfg(tmp_path, mode="offline"), "g", "train")
    assert tr.wandb_run.group == "tiny-0123456789abcdef"
    tr.finish()
