"""The Snakemake workflow: the DAG builds for every profile, overrides reach the rules, and a parameter
change reruns exactly the rules that depend on it."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def dry_run(*args: str) -> str:
    run = subprocess.run(SNAKEMAKE + ["-n", "--forceall", "--cores", "2", "--quiet", "rules", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout + run.stderr


@pytest.mark.parametrize("profile", ["tiny", "ci", "paper"])
def test_dag_builds(profile):
    out = dry_run("--config", f"profile={profile}")
    for rule in ["characterize", "fit", "pretrain", "train_linear", "adapt", "finetune", "evaluate",
                 "gpu_baseline", "hardware_estimates", "figures", "leakage_sweep", "generate_sample"]:
        assert rule in out, f"rule {rule} missing from the {profile} DAG"


def test_overrides_reach_the_stage_commands():
    run = subprocess.run(SNAKEMAKE + ["-n", "-p", "--forceall", "--cores", "2", "--config", "profile=ci",
                                      "overrides=attention.window=128 train.max_iters=7"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "attention.window=128" in run.stdout and "train.max_iters=7" in run.stdout
