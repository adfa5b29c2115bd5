FIGURES_DONE = f"{R}/figures"


rule figures:
    """Every paper figure and table at the profile's scale, into results/<profile>/figures/."""
    input:
        rules.fit.output,
        rules.hardware_estimates.output,
        rules.gpu_baseline.output,
        rules.leakage_sweep.output,
        rules.variation_sweep.output,
        expand(f"{R}/eval/{{run}}/results.csv", run=VARIANTS),
        expand(f"{R}/adapt/study/{{run}}.json", run=VARIANTS),
        expand(f"{R}/adapt/{{run}}/summary.json", run=[r.name for r in study.runs("adapt") if study.in_use(r.name, bool(WF.second_seed))]),
        ckpt(study.SAMPLE_RUN),
        STUDY_TABLE,
    output:
        figures=report(
            directory(FIGURES_DONE),
            patterns=["{name}.png", "{name}.csv"],
            caption="../report/figure.rst",
            category=lambda w: "Tables" if w.get("name", "").endswith("_table") else "Figures",
        ),
    log:
        f"{LOGS}/figures.log",
    benchmark:
        f"{LOGS}/benchmarks/figures.tsv"
    threads: WF.figure_threads
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        cmd=stage_cmd("figures"),
        args="",
        # the report's caption of each figure: its function's docstring (read from source, no import)
        captions=figure_captions(),
    conda:
        ENV
    shell:
        stage_shell("workers", stage_extra=True)
