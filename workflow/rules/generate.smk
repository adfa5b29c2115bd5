SAMPLE = f"{R}/samples/nonlinear_finetuned.txt"


rule generate_sample:
    """Text generated token by token on the simulated gain-cell KV arrays (ring buffer of sub-tiles)."""
    input:
        TRAIN_INPUTS,
        model=ckpt("nonlinear_finetuned"),
    output:
        SAMPLE,
    params:
        cmd=stage_cmd("generate", f"+stage.checkpoint={ckpt('nonlinear_finetuned')}", "+stage.name=nonlinear_finetuned",
                      f"+stage.max_new_tokens={WF.sample_tokens}", "+stage.seed=0"),
    log:
        f"{LOGS}/generate_sample.log",
    benchmark:
        f"{LOGS}/benchmarks/generate_sample.tsv"
    threads: WF.threads
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.cmd} > {log} 2>&1"
