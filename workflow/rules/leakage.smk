LEAKAGE_TAGS = [format(float(v), "g") for v in WF.leakage_values]  # file names: gaincell.adapt.leakage_tag
LEAKAGE_POINTS = expand(f"{R}/adapt/leakage/{{value}}.json", value=LEAKAGE_TAGS)


rule leakage_point:
    """Supplementary Fig. 6, one point: validation loss of the trained hardware model at one leakage per
    step, evaluated and briefly fine-tuned at that value (one job per point)."""
    input:
        TRAIN_INPUTS,
        model=ckpt(study.LEAKAGE_RUN),
    output:
        f"{R}/adapt/leakage/{{value}}.json",
    wildcard_constraints:
        value="|".join(re.escape(t) for t in LEAKAGE_TAGS),
    params:
        cmd=train_launcher("leakage_eval"),
        args=lambda w: args(f"attention={study.RUNS_BY_NAME[study.LEAKAGE_RUN].kind}",
                            *stage_overrides(init_from=ckpt(study.LEAKAGE_RUN), finetune_iters=WF.leakage_finetune_iters),
                            f"attention.decay_per_step={w.value}"),
        section=section("attention", "train", "data", "model", "adapt", "seed",
                        kind=study.RUNS_BY_NAME[study.LEAKAGE_RUN].kind),
    log:
        f"{LOGS}/leakage_{{value}}.log",
    benchmark:
        f"{LOGS}/benchmarks/leakage_{{value}}.tsv"
    threads: WF.train_threads
    resources:
        **TRAIN_RESOURCES,
    conda:
        ENV
    shell:
        STAGE_SHELL


rule leakage_sweep:
    """The leakage sweep's points (workflow.leakage_values), and only those: a point file left by another
    list of values is removed, so the figure never mixes configurations."""
    input:
        LEAKAGE_POINTS,
    output:
        f"{R}/adapt/leakage_sweep.json",
    log:
        f"{LOGS}/leakage_sweep.log",
    benchmark:
        f"{LOGS}/benchmarks/leakage_sweep.tsv"
    run:
        keep_only_points(input, output[0], log[0])
