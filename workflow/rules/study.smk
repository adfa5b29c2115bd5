rule study_val_loss:
    """Validation loss of one variant on the same fixed batches as every other (paper Table 1 / Fig. 4)."""
    input:
        TRAIN_INPUTS,
        model=lambda w: ckpt(w.run),
    output:
        f"{R}/adapt/study/{{run}}.json",
    wildcard_constraints:
        run="|".join(v.run for v in study.VARIANTS if not v.noise_seeds),  # analog ones: analog.smk
    params:
        cmd=stage_cmd("study_eval"),
        args=lambda w: args(*stage_overrides(name=w.run, init_from=ckpt(w.run))),
        section=section("adapt", "data", "seed"),
    log:
        f"{LOGS}/study_val_loss_{{run}}.log",
    benchmark:
        f"{LOGS}/benchmarks/study_val_loss_{{run}}.tsv"
    threads: WF.threads
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=min(1, WF.gpus_per_training),
    conda:
        ENV
    shell:
        stage_shell("train.threads")
