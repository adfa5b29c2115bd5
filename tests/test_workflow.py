"""The Snakemake workflow: the DAG builds for every profile, overrides reach the stages, a parameter
change reruns exactly the rules that depend on it, bad --config keys and choice values fail in a dry run,
the results folder is locked, and the lint and HTML report work."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gaincell import results_lock, study
from gaincell.figures import docstring_captions

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(SNAKEMAKE + list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def dry_run(*args: str) -> str:
    run = snakemake("-n", "--forceall", "--cores", "2", "--quiet", "rules", *args)  # (-n: nothing is written)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout + run.stderr


@pytest.mark.parametrize("profile", ["tiny", "ci", "paper"])
def test_dag_builds(profile, tmp_path):
    out = dry_run("--config", f"profile={profile}", f"overrides=results_dir={tmp_path}")
    for rule in ["characterize", "fit", "pretrain", "train_linear", "adapt", "finetune", "evaluate",
                 "gpu_baseline", "hardware_estimates", "figures", "leakage_point", "leakage_sweep",
                 "generate_sample"]:
        assert rule in out, f"rule {rule} missing from the {profile} DAG"


def test_misspelt_config_key_and_choice_value_fail_in_a_dry_run():
    bad_key = snakemake("-n", "--cores", "1", "--config", "profle=paper")
    assert bad_key.returncode != 0 and "'profle' was unexpected" in bad_key.stdout + bad_key.stderr, bad_key.stdout
    bad_choice = snakemake("-n", "--cores", "1", "--config", "profile=ci", "overrides=attention.kind=softmx")
    assert bad_choice.returncode != 0
    assert "Invalid value 'softmx', expected one of [softmax, softmax_window, linear_hw, nonlinear_hw]" in \
        bad_choice.stdout + bad_choice.stderr, bad_choice.stdout


def test_printed_commands_carry_the_overrides(tmp_path):
    """-p shows each rule's effective command, the pipeline's overrides written out in it."""
    run = snakemake("-n", "-p", "--forceall", "--cores", "2", "--config", "profile=ci",
                    f"overrides=results_dir={tmp_path} attention.window=64 train.eval_iters=3")
    assert run.returncode == 0, run.stderr
    commands = [line for line in run.stdout.splitlines() if line.startswith("Shell command: ")
                and "None" not in line]
    assert len(commands) >= 20 and not any("$" in c for c in commands[:-1] if "srun" not in c)
    for command in commands:
        assert f"profile=ci results_dir={tmp_path} attention.window=64 train.eval_iters=3" in command, command


def test_slurm_profile_one_job_per_leakage_point_and_multinode_training(tmp_path):
    run = snakemake("-n", "-p", "--forceall", "--workflow-profile", "workflow/profiles/slurm", "--config",
                    "profile=paper", f"overrides=results_dir={tmp_path} workflow.nodes_per_training=2 "
                    "workflow.leakage_values=[0.0,0.001]")
    assert run.returncode == 0, run.stderr
    assert len(re.findall(r"^rule leakage_point:", run.stdout, flags=re.M)) == 2
    train = [line for line in run.stdout.splitlines() if " -m gaincell train " in line]
    assert train and all("srun --nodes=2" in c and "--rdzv_backend=c10d" in c and "--nnodes=2" in c
                         and "--standalone" not in c for c in train), train


# --------------------------------------------------------------------------------------------------
# reruns: the whole ci DAG, its outputs made as empty files and marked done (--touch), then dry runs
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def touched_results(tmp_path_factory):
    """A results folder whose every output exists and is recorded as made with the ci defaults."""
    out = tmp_path_factory.mktemp("touched") / "results"
    plan = snakemake("-n", "--forceall", "--cores", "2", "--config", "profile=ci", f"overrides=results_dir={out}")
    assert plan.returncode == 0, plan.stderr
    for line in plan.stdout.splitlines():
        if line.strip().startswith("output: "):
            for path in line.split("output: ", 1)[1].split(", "):
                p = Path(path)
                if p.name == "figures":
                    p.mkdir(parents=True, exist_ok=True)
                else:
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(b"")
    touch = snakemake("--touch", "--forceall", "--cores", "1", "--config", "profile=ci",
                      f"overrides=results_dir={out}")
    assert touch.returncode == 0, touch.stderr
    return out


def rerun_jobs(results: Path, overrides: str) -> dict:
    """rule -> number of jobs a dry run with --rerun-triggers params would run after these overrides."""
    run = snakemake("-n", "--cores", "2", "--rerun-triggers", "params", "--config", "profile=ci",
                    f"overrides=results_dir={results} {overrides}")
    assert run.returncode == 0, run.stderr
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", run.stdout, flags=re.M)
            if m.group(1) != "total"}


def test_run_time_only_settings_rerun_nothing(touched_results):
    assert rerun_jobs(touched_results, "") == {}
    jobs = rerun_jobs(touched_results, "train.progress=false train.threads=2 data.num_proc=1 device.workers=3 "
                                       "data.cache_dir=/elsewhere device.model_cache_dir=/other "
                                       "tracking.mode=disabled workflow.train_threads=2")
    assert jobs == {}, jobs


def test_top_level_seed_reruns_the_rules_that_read_it(touched_results):
    jobs = rerun_jobs(touched_results, "seed=7")
    # the stages drawing their batches from the top-level seed, and what depends on them: every training
    # run (train.seed follows the top-level seed), every adapt run and the study evaluations; the
    # second-seed replicate's training runs set train.seed themselves (study.SECOND_SEED)
    own_seed = [r for r in study.runs("train") if f"train.seed={study.SECOND_SEED}" in r.overrides]
    assert {r.name for r in own_seed} == {"softmax" + study.SEED2, "linear_hw" + study.SEED2}
    for rule in [r.rule for r in study.runs() if r not in own_seed]:
        assert rule in jobs, (rule, jobs)
    assert jobs.get("adapt") == len(study.runs("adapt")) and jobs.get("study_val_loss") == 6, jobs
    assert jobs.get("leakage_point") == 3, jobs
    for untouched in ("characterize", "fit", "prepare_data", "gpu_baseline"):
        assert untouched not in jobs, jobs
    # a seed of its own (the data split) reruns only what reads it and what follows
    jobs = rerun_jobs(touched_results, "data.seed=7")
    assert "prepare_data" in jobs and "characterize" not in jobs and "gpu_baseline" not in jobs, jobs


def test_a_training_setting_reruns_training_and_everything_after_it(touched_results):
    jobs = rerun_jobs(touched_results, "train.learning_rate=5e-4")
    for rule in [r.rule for r in study.runs()] + ["evaluate", "leakage_point", "figures"]:
        assert rule in jobs, (rule, jobs)
    for untouched in ("characterize", "fit", "prepare_data", "gpu_baseline", "hardware_estimates"):
        assert untouched not in jobs, jobs


def test_html_report_has_figure_captions_and_tables(touched_results, tmp_path):
    figures = touched_results / "figures"
    png = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"
           b"\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef\x00\x00\x00\x00IEND"
           b"\xaeB`\x82")
    (figures / "device_retention.png").write_bytes(png)
    (figures / "adapt_convergence.png").write_bytes(png)  # its docstring holds RST markup (|x|, a*b)
    (figures / "study_table.csv").write_text("variant,val_loss\nsoftmax,5.038\n")
    report = tmp_path / "report.html"
    run = snakemake("--cores", "1", "--config", "profile=ci", f"overrides=results_dir={touched_results}",
                    "--report", str(report), timeout=600)
    assert run.returncode == 0, run.stderr
    assert "ERROR/" not in run.stdout + run.stderr, run.stderr  # captions render without docutils errors
    html = report.read_text()
    first_words = " ".join(docstring_captions()["device_retention"].split()[:6])
    assert first_words in html and "study_table.csv" in html


# --------------------------------------------------------------------------------------------------
# one writer per results folder
# --------------------------------------------------------------------------------------------------
def test_a_second_run_on_a_locked_results_folder_fails_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from gaincell import results_lock; h = results_lock.acquire(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(120)"), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(results_lock.ResultsFolderBusy, match=f"another run .*\"pid\": {holder.pid}"):
            results_lock.acquire(tmp_path)
        run = snakemake("--cores", "1", "--config", "profile=ci", f"overrides=results_dir={tmp_path}", "--",
                        f"{tmp_path}/hardware/gpu_baseline.json")
        assert run.returncode != 0 and "is being written by another run" in run.stdout + run.stderr
        assert not (tmp_path / "hardware" / "gpu_baseline.json").exists()
    finally:
        holder.kill()
        holder.wait()
    results_lock.acquire(tmp_path).close()  # released when its process ended


def test_changing_a_parameter_reruns_exactly_the_rules_that_depend_on_it(tmp_path):
    """A real run of one rule: the override reaches the stage; a hardware knob reruns gpu_baseline, a
    training knob does not."""
    base = ["--cores", "1", "--rerun-triggers", "params", "--config", "profile=ci"]
    out = str(tmp_path / "results")
    target = f"{out}/hardware/gpu_baseline.json"

    def call(overrides, *extra):
        return snakemake(*base, f"overrides=results_dir={out} {overrides}", *extra, "--", target, timeout=600)

    first = call("hardware.baseline_cpu_steps=8 hardware.baseline_cpu_runs=1")
    assert first.returncode == 0, first.stdout + first.stderr
    result = json.loads((tmp_path / "results" / "hardware" / "gpu_baseline.json").read_text())
    assert "(8 steps" in result["note"], result["note"]
    same = call("hardware.baseline_cpu_steps=8 hardware.baseline_cpu_runs=1 train.max_iters=3", "-n")
    assert same.returncode == 0 and "Nothing to be done" in same.stdout, same.stdout
    changed = call("hardware.baseline_cpu_steps=9 hardware.baseline_cpu_runs=1", "-n")
    assert changed.returncode == 0 and "rule gpu_baseline:" in changed.stdout, changed.stdout
    assert "Params have changed" in changed.stdout


def test_lint_is_clean():
    run = snakemake("--lint", "--config", "profile=ci")
    assert run.returncode == 0 and "in a good condition" in run.stdout + run.stderr, run.stdout
