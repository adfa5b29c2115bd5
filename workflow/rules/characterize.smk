rule characterize:
    """SPICE (PySpice + ngspice) sweeps of the gain cell, retention, energy, and the array with parasitics."""
    output:
        summary=f"{R}/device/summary.json",
    params:
        cmd=stage_cmd("characterize"),
        args="",
        section=section("device"),
    log:
        f"{LOGS}/characterize.log",
    benchmark:
        f"{LOGS}/benchmarks/characterize.tsv"
    priority: PRIORITY["characterize"]
    threads: WF.device_threads  # the SPICE process pool (device.workers), off the training's critical path
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        ENV
    shell:
        stage_shell("device.workers")
