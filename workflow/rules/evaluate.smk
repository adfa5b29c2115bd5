rule evaluate:
    """Downstream tasks through lm-evaluation-harness for one model variant (local tasks offline)."""
    input:
        TRAIN_INPUTS,
        rules.prepare_data.output.eval_text,
        model=lambda w: ckpt(w.run),
    output:
        f"{R}/eval/{{run}}/results.csv",
    wildcard_constraints:
        run="|".join(VARIANTS),
    params:
        cmd=stage_cmd("evaluate"),
        args=lambda w: args(*stage_overrides(name=w.run, checkpoint=ckpt(w.run))),
        section=section("eval", "data"),
    log:
        f"{LOGS}/evaluate_{{run}}.log",
    benchmark:
        f"{LOGS}/benchmarks/evaluate_{{run}}.tsv"
    threads: WF.threads
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=min(1, WF.gpus_per_training),
    conda:
        ENV
    shell:
        STAGE_SHELL
