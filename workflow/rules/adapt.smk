# Variants 4 and 5 (and the input of 6): the linear model mapped onto the nonlinear gain-cell model.
FIT_INPUT = [rules.fit.output[0]] if CFG.attention.coefficients == "fitted" else []


def adapted(run):
    return f"{R}/checkpoints/{run}/ckpt.pt"


ADAPT_RUNS = {  # output run -> (linear checkpoint it starts from, mode)
    "nonlinear_mapped": ("linear_hw", "map_only"),        # variant 4: no adaptation
    "nonlinear_adapted": ("linear_hw", "adapt"),          # variant 5: adapted, no fine-tuning
    "nonlinear_adapted_early": ("linear_hw_early", "adapt"),  # input of variant 6
}


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
        section=section("attention", "adapt", "data"),
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
