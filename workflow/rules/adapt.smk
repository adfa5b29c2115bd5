rule adapt:
    """Equation 9: a <- a*sigma_L/sigma_NL, b <- b + mu_L - mu_NL until the statistics match."""
    input:
        FIT_INPUT,
        TRAIN_INPUTS,
        linear=lambda w: ckpt(ADAPT_RUNS[w.run][0]),
    output:
        adapted("{run}"),
        f"{R}/adapt/{{run}}/summary.json",
    wildcard_constraints:
        run="|".join(ADAPT_RUNS),
    params:
        cmd=lambda w: stage_cmd("adapt", "attention=nonlinear_hw", f"+stage.name={w.run}",
                                f"+stage.init_from={ckpt(ADAPT_RUNS[w.run][0])}",
                                f"+stage.mode={ADAPT_RUNS[w.run][1]}"),
        section=section("attention", "adapt", "data", "model", "train", kind="nonlinear_hw"),
    log:
        f"{LOGS}/adapt_{{run}}.log",
    benchmark:
        f"{LOGS}/benchmarks/adapt_{{run}}.tsv"
    threads: WF.train_threads
    resources:
        mem_mb=16000,
        runtime=120,
        gpu=min(1, WF.gpus_per_training),
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.cmd} > {log} 2>&1"
