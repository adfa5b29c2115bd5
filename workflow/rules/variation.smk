rule variation_sweep:
    """How precise must the cell be? Validation loss of the adapted and the fine-tuned nonlinear models
    versus cell-to-cell gain variation and versus readout noise (issue 16 §3): two Hydra multiruns of
    variation_eval, one job per value, no training."""
    input:
        TRAIN_INPUTS,
        models=[ckpt(run) for run in VARIATION_MODELS],
    output:
        directory(f"{R}/adapt/variation"),
    params:
        cmd=" && ".join(
            " ".join([PY, "-m", "gaincell", "variation_eval", "--multirun", OVR, f"+stage.knob={knob}",
                      "+stage.models=[" + ",".join(VARIATION_MODELS) + "]", f"+stage.chips={WF.variation_chips}",
                      f"attention.{knob}=" + ",".join(repr(float(v)) for v in values)])
            for knob, values in (("cell_variation", WF.variation_values),
                                 ("readout_noise", WF.readout_noise_values))),
        section=section("attention", "adapt", "data", "model", kind="nonlinear_hw"),
    log:
        f"{LOGS}/variation_sweep.log",
    benchmark:
        f"{LOGS}/benchmarks/variation_sweep.tsv"
    threads: WF.train_threads
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../../envs/train.yaml"
    shell:
        "({params.cmd}) > {log} 2>&1"
