"""Hydra around the stages: one output folder per invocation, multirun jobs that never share a run
folder, and tab completion of the overrides after the stage name."""
import os
import subprocess
import sys

from gaincell import cli


def test_each_invocation_gets_its_own_output_folder_named_for_the_job(tmp_path):
    for _ in range(2):  # back to back, within the same second
        cli.main(["print_config", f"results_dir={tmp_path}", "+stage.name=run_a"])
    cli.main(["print_config", f"results_dir={tmp_path}"])
    folders = sorted(p.relative_to(tmp_path / "logs" / "hydra") for p in (tmp_path / "logs" / "hydra").glob("*/*"))
    assert [f.parts[0] for f in folders] == ["print_config", "print_config_run_a", "print_config_run_a"]
    assert len(set(folders)) == 3


def test_multirun_jobs_get_their_own_run_names(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_resolve", lambda stage: lambda cfg: seen.append(str(cfg.stage.name)))
    cli.main(["train", "--multirun", f"results_dir={tmp_path}", "+stage.name=sweep",
              "train.learning_rate=1e-3,2e-3,3e-3"])
    assert seen == ["sweep-0", "sweep-1", "sweep-2"]
    seen.clear()
    cli.main(["train", f"results_dir={tmp_path}", "+stage.name=single"])  # a single run keeps its name
    assert seen == ["single"]


def _complete(line):
    env = dict(os.environ, COMP_LINE=line, COMP_POINT=str(len(line)))
    run = subprocess.run([sys.executable, "-m", "gaincell", "-sc", "query=bash"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_tab_completion_of_stages_and_overrides():
    assert _complete("gaincell tr") == ["train"]
    assert "attention.window=" in _complete("gaincell train attention.w")
    assert {"linear_hw", "nonlinear_hw"} <= {c.split("=")[-1] for c in _complete("gaincell train attention=")}
    install = subprocess.run([sys.executable, "-m", "gaincell", "-sc", "install=bash"], capture_output=True,
                             text=True, timeout=120)
    assert install.returncode == 0 and install.stdout.rstrip().endswith("-F hydra_bash_completion gaincell")
