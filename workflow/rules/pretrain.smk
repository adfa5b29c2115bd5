# The software baselines. tiny: trained here from scratch (no pretrained weights offline);
# paper: public GPT-2 (model.init=gpt2) exported as a checkpoint without training (max_iters=0).
rule pretrain:
    """Software baseline, softmax attention (variant 1)."""
    input:
        TRAIN_INPUTS,
    output:
        ckpt("softmax"),
    params:
        cmd=train_cmd("attention=softmax", "+stage.name=softmax",
                      *(["train.max_iters=0"] if PROFILE == "paper" else [])),
        section=section(*TRAIN_SECTIONS, kind="softmax"),
    log:
        f"{LOGS}/pretrain.log",
    benchmark:
        f"{LOGS}/benchmarks/pretrain.tsv"
    threads: WF.train_threads
    resources:
        **TRAIN_RESOURCES,
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.cmd} > {log} 2>&1"


rule train_window:
    """Software sliding-window model (variant 2), fine-tuned from the baseline."""
    input:
        TRAIN_INPUTS,
        base=ckpt("softmax"),
    output:
        ckpt("softmax_window"),
    params:
        cmd=train_cmd("attention=softmax_window", "+stage.name=softmax_window", f"+stage.init_from={ckpt('softmax')}",
                      f"train.max_iters={WF.window_iters}", f"train.lr_decay_iters={WF.window_iters}",
                      f"train.learning_rate={WF.finetune_learning_rate}"),
        section=section(*TRAIN_SECTIONS, kind="softmax_window"),
    log:
        f"{LOGS}/train_window.log",
    benchmark:
        f"{LOGS}/benchmarks/train_window.tsv"
    threads: WF.train_threads
    resources:
        **TRAIN_RESOURCES,
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.cmd} > {log} 2>&1"
