SAMPLE = f"{R}/samples/{study.SAMPLE_RUN}.txt"


rule generate_sample:
    """Text generated token by token on the simulated gain-cell KV arrays (ring buffer of sub-tiles)."""
    input:
        TRAIN_INPUTS,
        model=ckpt(study.SAMPLE_RUN),
    output:
        SAMPLE,
    params:
        cmd=stage_cmd("generate"),
        args=args(*stage_overrides(checkpoint=ckpt(study.SAMPLE_RUN), name=study.SAMPLE_RUN,
                                   max_new_tokens=WF.sample_tokens, seed=0)),
        section=section("data"),
    log:
        f"{LOGS}/generate_sample.log",
    benchmark:
        f"{LOGS}/benchmarks/generate_sample.tsv"
    threads: 1  # one token at a time: the stage runs one torch thread (+stage.threads)
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    shell:
        STAGE_SHELL
