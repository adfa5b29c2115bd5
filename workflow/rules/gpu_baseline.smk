rule gpu_baseline:
    """Attention-only decode loop latency and energy per token (NVML on a GPU; CPU fallback says so)."""
    output:
        f"{R}/hardware/gpu_baseline.json",
    params:
        cmd=stage_cmd("gpu_baseline"),
        args="",
        section=section("hardware"),
    log:
        f"{LOGS}/gpu_baseline.log",
    benchmark:
        f"{LOGS}/benchmarks/gpu_baseline.tsv"
    threads: WF.threads
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=min(1, WF.gpus_per_training),
    conda:
        ENV
    shell:
        STAGE_SHELL
