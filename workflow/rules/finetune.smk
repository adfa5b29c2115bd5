rule finetune:
    """Variant 6: the adapted early linear model fine-tuned as a nonlinear model (surrogate gradient)."""
    input:
        FIT_INPUT,
        TRAIN_INPUTS,
        base=adapted("nonlinear_adapted_early"),
    output:
        ckpt("nonlinear_finetuned"),
    params:
        cmd=train_cmd("attention=nonlinear_hw", "+stage.name=nonlinear_finetuned",
                      f"+stage.init_from={adapted('nonlinear_adapted_early')}",
                      f"train.max_iters={WF.linear_iters - WF.linear_early_iters}",
                      f"train.lr_decay_iters={WF.linear_iters - WF.linear_early_iters}",
                      f"train.learning_rate={WF.finetune_learning_rate}"),
        section=section(*TRAIN_SECTIONS, kind="nonlinear_hw"),
    log:
        f"{LOGS}/finetune.log",
    benchmark:
        f"{LOGS}/benchmarks/finetune.tsv"
    threads: WF.train_threads
    resources:
        **TRAIN_RESOURCES,
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.cmd} > {log} 2>&1"
