rule fit:
    """Third-order polynomial fit of the simulated cell response (docs/attention.md#cell-coefficients normalisation)."""
    input:
        rules.characterize.output.summary,
    output:
        f"{R}/fit/coefficients.json",
    params:
        cmd=stage_cmd("fit"),
        args="",
        section=section("device", "fit"),
    log:
        f"{LOGS}/fit.log",
    benchmark:
        f"{LOGS}/benchmarks/fit.tsv"
    priority: PRIORITY["fit"]
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        STAGE_SHELL
