rule characterize:
    """SPICE (PySpice + ngspice) sweeps of the gain cell, retention, energy, and the array with parasitics."""
    output:
        summary=f"{R}/device/summary.json",
    params:
        cmd=stage_cmd('characterize'),
        section=section("device"),
    log:
        f"{LOGS}/characterize.log",
    benchmark:
        f"{LOGS}/benchmarks/characterize.tsv"
    threads: 16  # the SPICE process pool; Snakemake lowers it to --cores
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../../envs/device.yaml"
    shell:
        "{params.cmd} > {log} 2>&1"
