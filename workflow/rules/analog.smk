# The fully analog transformer (beyond the paper): every block projection on analog weight tiles
# (aihwkit-lightning, gaincell.analog_projections) beside the gain-cell attention. Runs fully_analog
# (converted, rule analog_convert) and fully_analog_hwa (hardware-aware trained: a training rule generated
# from gaincell.study like the others); their study losses are means over inference-noise seeds.
ANALOG_VARIANTS = [v.run for v in study.VARIANTS if v.noise_seeds]
_CONVERT_RUNS = study.runs("convert")


for _run in _CONVERT_RUNS:

    rule:
        name:
            _run.rule
        input:
            TRAIN_INPUTS,
            fit_input(_run.overrides) if _run.kind == "nonlinear_hw" else [],
            base=ckpt(_run.start),
        output:
            ckpt(_run.name),
        params:
            cmd=stage_cmd("analog_convert"),
            args=args(f"attention={_run.kind}", *stage_overrides(name=_run.name, init_from=ckpt(_run.start)),
                      *_run.overrides),
            section=section("attention", "adapt", "data", "seed", kind=_run.kind, extra=_run.overrides),
        log:
            f"{LOGS}/{_run.rule}.log",
        benchmark:
            f"{LOGS}/benchmarks/{_run.rule}.tsv"
        priority: PRIORITY.get(_run.rule, 0)
        threads: WF.threads
        resources:
            mem_mb=8000,
            runtime=60,
            gpu=min(1, WF.gpus_per_training),
        conda:
            ENV
        shell:
            stage_shell("train.threads")

    workflow.get_rule(_run.rule).docstring = _run.doc


rule analog_val_loss:
    """Validation loss of a fully analog variant on the study's fixed batches: noise-free and at every
    inference-noise seed (projections.inference), the noise drawn when the model is loaded."""
    input:
        TRAIN_INPUTS,
        model=lambda w: ckpt(w.run),
    output:
        f"{R}/adapt/study/{{run}}.json",
    wildcard_constraints:
        run="|".join(ANALOG_VARIANTS),
    params:
        cmd=stage_cmd("analog_eval"),
        args=lambda w: args("projections=analog", *stage_overrides(name=w.run, init_from=ckpt(w.run))),
        section=section("adapt", "data", "projections", "seed"),
    log:
        f"{LOGS}/analog_val_loss_{{run}}.log",
    benchmark:
        f"{LOGS}/benchmarks/analog_val_loss_{{run}}.tsv"
    threads: WF.threads
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=min(1, WF.gpus_per_training),
    conda:
        ENV
    shell:
        stage_shell("train.threads")
