rule derive_decay:
    """attention.decay_per_step=derived: leakage per token step from the cost model's latency (simulated
    set) and our SPICE-measured retention (gaincell.hardware.decay); the hardware models train with it."""
    input:
        device=rules.characterize.output.summary,
    output:
        DERIVED_DECAY,
    params:
        cmd=stage_cmd("derive_decay"),
        args="",
        section=section("hardware", "device", "model", "attention"),
    log:
        f"{LOGS}/derive_decay.log",
    benchmark:
        f"{LOGS}/benchmarks/derive_decay.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        STAGE_SHELL
