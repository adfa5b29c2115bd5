rule train_linear:
    """Linear intermediate hardware model (variant 3), fine-tuned from the baseline."""
    input:
        TRAIN_INPUTS,
        GAIN_INPUT,
        base=ckpt("softmax"),
    output:
        ckpt("linear_hw"),
    params:
        cmd=train_cmd("attention=linear_hw", "+stage.name=linear_hw", f"+stage.init_from={ckpt('softmax')}",
                      f"train.max_iters={WF.linear_iters}", f"train.lr_decay_iters={WF.linear_iters}",
                      f"train.learning_rate={WF.finetune_learning_rate}"),
        section=section(*TRAIN_SECTIONS, kind="linear_hw"),
    log:
        f"{LOGS}/train_linear.log",
    benchmark:
        f"{LOGS}/benchmarks/train_linear.tsv"
    threads: WF.train_threads
    resources:
        **TRAIN_RESOURCES,
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.cmd} > {log} 2>&1"


rule train_linear_early:
    """The shorter linear run (paper: 3,000 iterations) that variant 6 adapts and then fine-tunes.

    Same schedule as train_linear (lr_decay_iters), stopped early, as the paper's earlier checkpoint."""
    input:
        TRAIN_INPUTS,
        GAIN_INPUT,
        base=ckpt("softmax"),
    output:
        ckpt("linear_hw_early"),
    params:
        cmd=train_cmd("attention=linear_hw", "+stage.name=linear_hw_early", f"+stage.init_from={ckpt('softmax')}",
                      f"train.max_iters={WF.linear_early_iters}", f"train.lr_decay_iters={WF.linear_iters}",
                      f"train.learning_rate={WF.finetune_learning_rate}"),
        section=section(*TRAIN_SECTIONS, kind="linear_hw"),
    log:
        f"{LOGS}/train_linear_early.log",
    benchmark:
        f"{LOGS}/benchmarks/train_linear_early.tsv"
    threads: WF.train_threads
    resources:
        **TRAIN_RESOURCES,
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.cmd} > {log} 2>&1"
