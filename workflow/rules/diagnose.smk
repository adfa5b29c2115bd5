# The study table (gaincell.study.table_rows): every row's model on the same fixed validation sequences
# (per-sequence losses, attention share, signal health), then the table, the paper's claims with paired
# standard errors and the per-cell adaptation summary.
TABLE_RUNS = [row.run for row in study.table_rows(bool(WF.second_seed))]
STUDY_TABLE = [f"{R}/diagnose/{name}.csv" for name in ("study_table", "claims", "cells", "health")]


rule diagnose:
    """Per-sequence validation losses, attention share (zero / mean ablation) and signal health of one model."""
    input:
        TRAIN_INPUTS,
        model=lambda w: ckpt(w.run),
    output:
        f"{R}/diagnose/{{run}}.json",
    wildcard_constraints:
        run="|".join(TABLE_RUNS),
    params:
        cmd=stage_cmd("diagnose"),
        args=lambda w: args(*stage_overrides(name=w.run, checkpoint=ckpt(w.run))),
        section=section("diagnose", "data"),
    log:
        f"{LOGS}/diagnose_{{run}}.log",
    benchmark:
        f"{LOGS}/benchmarks/diagnose_{{run}}.tsv"
    threads: WF.threads
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=min(1, WF.gpus_per_training),
    conda:
        ENV
    shell:
        stage_shell("train.threads")


rule study_table:
    """The study table, the paper's orderings with paired SEs, and how much adaptation recovers per cell."""
    input:
        expand(f"{R}/diagnose/{{run}}.json", run=TABLE_RUNS),
    output:
        STUDY_TABLE,
        f"{R}/diagnose/summary.json",
    params:
        cmd=stage_cmd("study_table"),
        args="",
        # what the table reads from the config: the diagnose section, and each row's iterations and tokens
        section=section("diagnose") + digest({"iterations": {r: study.chain_iters(r, CFG) for r in TABLE_RUNS},
                                              "tokens_per_iter": study.tokens_per_iter(CFG),
                                              "cell": str(CFG.attention.coefficients),
                                              "second_seed": bool(WF.second_seed)}),
    log:
        f"{LOGS}/study_table.log",
    benchmark:
        f"{LOGS}/benchmarks/study_table.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        STAGE_SHELL
