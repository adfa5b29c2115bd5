rule hardware_estimates:
    """Latency, energy and area of the analog attention (paper parameters and our SPICE numbers), sweeps."""
    input:
        device=rules.characterize.output.summary,
    output:
        f"{R}/hardware/estimates.json",
    params:
        cmd=stage_cmd("hardware_estimates"),
        args="",
        section=section("hardware", "device", "model", "attention"),
    log:
        f"{LOGS}/hardware_estimates.log",
    benchmark:
        f"{LOGS}/benchmarks/hardware_estimates.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        STAGE_SHELL
