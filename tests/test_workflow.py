"""The Snakemake workflow: the DAG builds for every profile, overrides reach the stages, and a parameter
change reruns exactly the rules that depend on it."""
import json
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


def test_changing_a_parameter_reruns_exactly_the_rules_that_depend_on_it(tmp_path):
    """--rerun-triggers params: a hardware knob reruns gpu_baseline; a training knob does not."""
    base = ["--cores", "1", "--rerun-triggers", "params", "--config", "profile=ci"]
    out = str(tmp_path / "results")
    target = f"{out}/hardware/gpu_baseline.json"

    def call(overrides, *extra):
        return subprocess.run(SNAKEMAKE + base + [f"overrides=results_dir={out} {overrides}", *extra, "--", target],
                              cwd=REPO, capture_output=True, text=True, timeout=600)

    first = call("hardware.baseline_cpu_steps=8 hardware.baseline_cpu_runs=1")
    assert first.returncode == 0, first.stdout + first.stderr
    # the override reached the stage (through the environment, not the command line)
    result = json.loads((tmp_path / "results" / "hardware" / "gpu_baseline.json").read_text())
    assert "(8 steps" in result["note"], result["note"]
    same = call("hardware.baseline_cpu_steps=8 hardware.baseline_cpu_runs=1 train.max_iters=3", "-n")
    assert same.returncode == 0 and "Nothing to be done" in same.stdout, same.stdout
    changed = call("hardware.baseline_cpu_steps=9 hardware.baseline_cpu_runs=1", "-n")
    assert changed.returncode == 0 and "rule gpu_baseline:" in changed.stdout, changed.stdout
    assert "Params have changed" in changed.stdout
