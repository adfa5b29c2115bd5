SAMPLE = f"{R}/samples/{study.SAMPLE_RUN}.txt"


rule generate_sample:
    """Text generated token by token on the simulated gain-cell KV arrays (ring buffer of sub-tiles)."""
    input:
        TRAIN_INPUTS,
        model=ckpt(study.SAMPLE_RUN),
    output:
        SAMPLE,
    params:
        cmd=stage_cmd("generate", f"+stage.checkpoint={ckpt(study.SAMPLE_RUN)}", f"+stage.name={study.SAMPLE_RUN}",
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
