# Every training and adaptation run of the study, generated from the table in gaincell.study (RUNS): one
# rule per trainer run, named as in the table (pretrain, train_window, train_linear, train_linear_early,
# finetune, ...), and one wildcard rule `adapt` for the equation 9 runs.
for _run in study.runs("train"):

    rule:
        name:
            _run.rule
        input:
            TRAIN_INPUTS,
            fit_input(_run.overrides) if _run.kind == "nonlinear_hw" else GAIN_INPUT if _run.kind == "linear_hw" else [],
            DECAY_INPUT if _run.kind in ("linear_hw", "nonlinear_hw") else [],
            base=[ckpt(_run.start)] if _run.start else [],
        output:
            ckpt(_run.name),
        params:
            cmd=train_launcher("train"),
            args=args(*run_overrides(_run)),
            section=section(*TRAIN_SECTIONS, kind=_run.kind, extra=_run.overrides),
        log:
            f"{LOGS}/{_run.rule}.log",
        benchmark:
            f"{LOGS}/benchmarks/{_run.rule}.tsv"
        priority: PRIORITY.get(_run.rule, 0)
        threads: WF.train_threads
        resources:
            **TRAIN_RESOURCES,
        conda:
            ENV
        shell:
            STAGE_SHELL

    workflow.get_rule(_run.rule).docstring = _run.doc


rule adapt:
    """Equation 9: a <- a*sigma_L/sigma_NL, b <- b + mu_L - mu_NL until the statistics match (study.RUNS
    with training="adapt"; mode map_only keeps the linear scalers)."""
    input:
        lambda w: fit_input(study.RUNS_BY_NAME[w.run].overrides),
        TRAIN_INPUTS,
        linear=lambda w: ckpt(study.RUNS_BY_NAME[w.run].start),
    output:
        ckpt("{run}", "adapt"),
        f"{R}/adapt/{{run}}/summary.json",
    wildcard_constraints:
        run="|".join(r.name for r in study.runs("adapt")),
    params:
        cmd=stage_cmd("adapt"),
        args=lambda w: args(*run_overrides(study.RUNS_BY_NAME[w.run])),
        section=lambda w: section("attention", "adapt", "data", "model", "train", "seed",
                                  kind=study.RUNS_BY_NAME[w.run].kind, extra=study.RUNS_BY_NAME[w.run].overrides),
    log:
        f"{LOGS}/adapt_{{run}}.log",
    benchmark:
        f"{LOGS}/benchmarks/adapt_{{run}}.tsv"
    priority: PRIORITY["adapt"]
    threads: WF.train_threads
    resources:
        mem_mb=16000,
        runtime=120,
        gpu=min(1, WF.gpus_per_training),
    conda:
        ENV
    shell:
        STAGE_SHELL
