rule leakage_sweep:
    """Supplementary Fig. 6: validation loss vs leakage per step, evaluated and briefly fine-tuned at each
    value, as one Hydra multirun over attention.decay_per_step."""
    input:
        TRAIN_INPUTS,
        model=ckpt(study.LEAKAGE_RUN),
    output:
        directory(f"{R}/adapt/leakage"),
    params:
        cmd=" ".join([PY, "-m", "gaincell", "leakage_eval", "--multirun", OVR, "attention=linear_hw",
                      f"+stage.init_from={ckpt(study.LEAKAGE_RUN)}",
                      f"+stage.finetune_iters={WF.leakage_finetune_iters}",
                      "attention.decay_per_step=" + ",".join(repr(float(v)) for v in WF.leakage_values)]),
        section=section("attention", "train", "data", "model", kind="linear_hw"),
    log:
        f"{LOGS}/leakage_sweep.log",
    benchmark:
        f"{LOGS}/benchmarks/leakage_sweep.tsv"
    threads: WF.train_threads
    resources:
        **TRAIN_RESOURCES,
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.cmd} > {log} 2>&1"
