# gaincell: one command reproduces every figure.  snakemake --cores all [--config profile=paper overrides="a.b=c ..."]
# Thin on purpose: the Hydra tree (config/) is the single source of every parameter; this file composes it,
# and each rule under workflow/rules/ calls `python -m gaincell <stage>` with the same overrides.
report: "workflow/report/workflow.rst"
include: "workflow/rules/common.smk"
include: "workflow/rules/characterize.smk"
include: "workflow/rules/fit.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/leakage.smk"
include: "workflow/rules/variation.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/study.smk"
include: "workflow/rules/analog.smk"
include: "workflow/rules/diagnose.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/gpu_baseline.smk"
include: "workflow/rules/hardware_estimates.smk"
include: "workflow/rules/decay.smk"
include: "workflow/rules/figures.smk"


rule all:
    input:
        FIGURES_DONE,
        SAMPLE,
    default_target: True


# The pipeline's overrides reach every stage command as the string resource `overrides` (see STAGE_SHELL
# in common.smk): printed with the command, never a rerun trigger.
for _rule in workflow.rules:
    _rule.resources["overrides"] = OVR
