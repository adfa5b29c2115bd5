VARIATION_TAGS = [f"{knob}_{format(float(v), 'g')}"            # file names: gaincell.variation.variation_tag
                  for knob, values in (("cell_variation", WF.variation_values),
                                       ("readout_noise", WF.readout_noise_values),
                                       ("cell_offset_variation", WF.offset_variation_values)) for v in values]
VARIATION_POINTS = expand(f"{R}/adapt/variation/{{tag}}.json", tag=VARIATION_TAGS)


rule variation_point:
    """How precise must the cell be? One point: validation loss of the adapted and the fine-tuned nonlinear
    models at one cell-to-cell gain variation, one cell offset spread or one readout noise (issue 16 §3);
    no training."""
    input:
        TRAIN_INPUTS,
        models=[ckpt(run) for run in VARIATION_MODELS],
    output:
        f"{R}/adapt/variation/{{knob}}_{{value}}.json",
    wildcard_constraints:
        knob="cell_variation|cell_offset_variation|readout_noise",
        value="[0-9.e+-]+",
    params:
        cmd=train_launcher("variation_eval"),
        args=lambda w: args(*stage_overrides(knob=w.knob, models="[" + ",".join(VARIATION_MODELS) + "]",
                                             chips=WF.variation_chips),
                            f"attention.{w.knob}={w.value}"),
        section=section("attention", "data", "model", "adapt", "seed", kind="nonlinear_hw"),
    log:
        f"{LOGS}/variation_{{knob}}_{{value}}.log",
    benchmark:
        f"{LOGS}/benchmarks/variation_{{knob}}_{{value}}.tsv"
    threads: WF.train_threads
    resources:
        **TRAIN_RESOURCES,
    conda:
        ENV
    shell:
        STAGE_SHELL


rule variation_sweep:
    """The variation / readout-noise sweep's points (workflow.variation_values, workflow.readout_noise_values),
    and only those: a point file left by another list of values is removed."""
    input:
        VARIATION_POINTS,
    output:
        f"{R}/adapt/variation_sweep.json",
    log:
        f"{LOGS}/variation_sweep.log",
    benchmark:
        f"{LOGS}/benchmarks/variation_sweep.tsv"
    run:
        keep_only_variation_points(input, output[0], log[0])
