rule prepare_data:
    """Corpus download/extraction, tokenizer (trained BPE or GPT-2 BPE), uint16 token shards, held-out text."""
    output:
        meta=f"{R}/data/meta.json",
        train=f"{R}/data/train.bin",
        val=f"{R}/data/val.bin",
        eval_text=f"{R}/data/eval_text.txt",
    params:
        cmd=stage_cmd("prepare_data"),
        args="",
        section=section("data"),
    log:
        f"{LOGS}/prepare_data.log",
    benchmark:
        f"{LOGS}/benchmarks/prepare_data.tsv"
    priority: PRIORITY["prepare_data"]
    threads: WF.data_threads  # tokenization processes (data.num_proc)
    resources:
        mem_mb=16000,
        runtime=240,
    conda:
        ENV
    shell:
        stage_shell("data.num_proc")
