"""The study defined once (gaincell.study): the table is consistent, and the Snakefile's training rules,
the CI output check and the figures all come from it."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gaincell import study, workflow_check
from gaincell.config import compose
from gaincell.figures import adapt as adapt_figures

REPO = Path(__file__).resolve().parents[1]


def test_table_rule_names_and_outputs_are_the_pipeline_contract():
    rules = {r.name: r.rule for r in study.RUNS}
    assert rules["softmax"] == "pretrain" and rules["linear_hw"] == "train_linear"
    assert rules["nonlinear_finetuned"] == "finetune" and rules["softmax_window"] == "train_window"
    assert {r.rule for r in study.runs("adapt")} == {"adapt"}
    assert study.checkpoint("softmax") == "checkpoints/softmax/final.pt"
    assert study.checkpoint("nonlinear_adapted") == "checkpoints/nonlinear_adapted/ckpt.pt"
    with pytest.raises(KeyError, match="unknown run 'nope'"):
        study.checkpoint("nope")


def test_bad_runs_are_refused_with_the_run_named():
    with pytest.raises(ValueError, match="run 'x': training 'fit'"):
        study.Run("x", "softmax", "fit")
    with pytest.raises(ValueError, match="run 'y': an adapt run needs a start"):
        study.Run("y", "nonlinear_hw", "adapt")
    assert study.Run("z", "linear_hw").rule == "train_z"


def test_iterations_follow_the_profile():
    cfg = compose(["profile=ci"])
    wf = cfg.workflow
    runs = study.RUNS_BY_NAME
    assert runs["linear_hw"].max_iters(cfg) == wf.linear_iters == runs["linear_hw"].lr_decay_iters(cfg)
    # the early run follows the full run's schedule, stopped early (the paper's earlier checkpoint)
    assert runs["linear_hw_early"].max_iters(cfg) == wf.linear_early_iters
    assert runs["linear_hw_early"].lr_decay_iters(cfg) == wf.linear_iters
    assert runs["nonlinear_finetuned"].max_iters(cfg) == wf.linear_iters - wf.linear_early_iters
    assert runs["softmax"].max_iters(cfg) is None                      # trained from scratch: the profile's
    assert runs["softmax"].max_iters(compose(["profile=paper"])) == 0  # public GPT-2: exported untrained


def test_consumers_read_the_one_table():
    assert adapt_figures.STUDY_VARIANTS is study.VARIANTS
    assert workflow_check.VARIANTS == [v.run for v in study.VARIANTS]
    assert set(workflow_check.TRAINED_RUNS) | set(workflow_check.ADAPTED_RUNS) | set(workflow_check.CONVERTED_RUNS) \
        == set(study.RUNS_BY_NAME)
    assert [v.number for v in study.VARIANTS] == list(range(1, len(study.VARIANTS) + 1))


def test_snakefile_generates_one_rule_per_training_run(tmp_path):
    """Every trainer run is a rule with the table's name, output and iteration count; adapt runs go
    through the wildcard rule with their mode."""
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--forceall", "--cores", "2",
                          "--config", "profile=ci", f"overrides=results_dir={tmp_path}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    cfg = compose(["profile=ci", f"results_dir={tmp_path}"])
    jobs = re.split(r"\n(?=rule |localrule )", out.stdout)
    for run in study.RUNS:
        job = next((j for j in jobs if re.search(rf"^(local)?rule {run.rule}:", j)
                    and f"+stage.name={run.name} " in j), None)
        assert job is not None, f"no job of rule {run.rule} for run {run.name}"
        assert f"{cfg.results_dir}/{study.checkpoint(run.name)}" in job
        if run.training == "adapt":
            assert f"+stage.mode={run.mode}" in job
        elif run.max_iters(cfg) is not None:
            assert f"train.max_iters={run.max_iters(cfg)} " in job
        if run.start:
            assert f"+stage.init_from={cfg.results_dir}/{study.checkpoint(run.start)}" in job


def test_iteration_bookkeeping_counts_every_run_a_checkpoint_starts_from():
    """Iterations behind each checkpoint: its own plus those of its start chain (adaptation and
    calibration add none), in closed form from the profile's settings."""
    for profile in ("tiny", "ci"):
        cfg = compose([f"profile={profile}"])
        pre, lin, early, win = (cfg.train.max_iters, cfg.workflow.linear_iters, cfg.workflow.linear_early_iters,
                                cfg.workflow.window_iters)
        iters = {row.run: study.chain_iters(row.run, cfg) for row in study.TABLE_ROWS}
        assert iters["softmax"] == pre and iters["softmax_window"] == pre + win
        assert iters["linear_hw_init"] == pre                      # calibrated, untrained
        assert iters["linear_hw"] == pre + lin
        # the fair baseline and the fine-tuned variant 6 have exactly the linear chain's length
        assert iters["softmax_long"] == iters["nonlinear_finetuned"] == pre + lin == iters["linear_hw_uncalibrated"]
        assert iters["nonlinear_mapped"] == iters["nonlinear_adapted"] == iters["nonlinear_adapted_paper"] == pre + lin
        assert study.own_iters("nonlinear_finetuned", cfg) == lin - early
        assert study.tokens_per_iter(cfg) == cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size
    paper = compose(["profile=paper"])  # the public GPT-2 is exported untrained: its pretraining is not counted
    assert study.chain_iters("softmax", paper) == 0 and study.chain_iters("linear_hw", paper) == 13000


def test_table_rows_and_claims_name_runs_of_the_study():
    rows = [row.run for row in study.TABLE_ROWS]
    assert len(rows) == len(set(rows)) and set(rows) <= set(study.RUNS_BY_NAME)
    assert {"softmax_long", "linear_hw_uncalibrated"} <= set(rows)
    assert all(c.worse in rows and c.better in rows for c in study.CLAIMS)
    # the paper's three orderings on the profile's own cell, each repeated on every other cell (4 vs 5, 5 vs 3)
    own = {c.name for c in study.CLAIMS if c.kind == "ordering" and "," not in c.name}
    assert own == {"4 worse than 5", "5 worse than 3", "6 better than 5"}
    for cell in study.CELLS:
        assert {c.name for c in study.CLAIMS if c.name.endswith(f"cell '{cell}'")} == {
            f"4 worse than 5, cell '{cell}'", f"5 worse than 3, cell '{cell}'"}
    # the linear runs start from the calibrated model, the ablation from the softmax baseline
    assert study.RUNS_BY_NAME["linear_hw"].start == "linear_hw_init" == study.RUNS_BY_NAME["linear_hw_early"].start
    assert study.RUNS_BY_NAME["linear_hw_init"].mode == "calibrate"
    assert study.RUNS_BY_NAME["linear_hw_uncalibrated"].start == "softmax"


def test_second_seed_rows_follow_the_switch_and_mirror_their_first_seed_chain():
    """With workflow.second_seed off no replicate run is asked for; on, variants 1, 3, 5 come twice, the
    replicate chain is the first one's with ``train.seed`` changed, and each seed-2 claim has a seed-1 twin."""
    tiny, paper = compose(["profile=tiny"]), compose(["profile=paper"])
    assert tiny.workflow.second_seed and not paper.workflow.second_seed
    off = {r.run for r in study.table_rows(paper.workflow.second_seed)}
    on = {r.run for r in study.table_rows(tiny.workflow.second_seed)}
    assert on - off == {"softmax_seed2", "linear_hw_seed2", "nonlinear_adapted_seed2"}
    assert not any(study.in_use(r.name, False) for r in study.RUNS if r.name.endswith(study.SEED2))
    assert not any(c.worse.endswith(study.SEED2) or c.better.endswith(study.SEED2) for c in study.claims(False))
    assert {c.name for c in study.claims(True)} - {c.name for c in study.claims(False)} == {
        "5 worse than 3, seed 2", "3 close to 1, seed 2"}
    for name in ("softmax", "linear_hw_init", "linear_hw", "nonlinear_adapted"):
        first, second = study.RUNS_BY_NAME[name], study.RUNS_BY_NAME[name + study.SEED2]
        assert (second.kind, second.training, second.mode) == (first.kind, first.training, first.mode)
        assert second.start == (first.start + study.SEED2 if first.start else None)
        assert study.chain_iters(second.name, tiny) == study.chain_iters(name, tiny)
        if second.training == "train":
            assert second.overrides == (f"train.seed={study.SECOND_SEED}",)
            assert study.SECOND_SEED != tiny.train.seed
    names = {c.name for c in study.claims(True)}
    assert all(n[:-len(", seed 2")] in names for n in names if n.endswith(", seed 2"))
