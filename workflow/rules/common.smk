# Shared by every rule: the composed Hydra config, the results folder, and how a stage is called.
import hashlib
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from gaincell import results_lock, study
from gaincell.attention.config import FITTED_SETS
from gaincell.cli import stage_overrides
from gaincell.config import RUNTIME_ONLY_KEYS, compose
from gaincell.figures import docstring_captions as figure_captions
from gaincell.io import atomic_write_json

min_version("9.0")
validate(config, "../schemas/config.schema.yaml")  # Snakemake's own --config keys: profile, overrides

PROFILE = str(config.get("profile", "tiny"))
# Extra Hydra overrides for every stage, e.g. --config overrides="attention.window=512 train.max_iters=50"
USER_OVERRIDES = shlex.split(str(config.get("overrides", "")))
OVERRIDES = [f"profile={PROFILE}", *USER_OVERRIDES]
try:
    CFG = compose(OVERRIDES)
except Exception as err:  # Hydra's message names the override; its cause says what was expected
    detail = str(err.__cause__ or "").splitlines()
    raise WorkflowError(f"bad --config overrides: {err}" + (f": {detail[0]}" if detail else "")) from None
R = CFG.results_dir  # results/<profile>
LOGS = f"{R}/logs"
ENV = "../../envs/gaincell.yaml"  # the conda environment of every rule (snakemake --use-conda)
try:
    from snakemake.settings.types import DeploymentMethod

    USE_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
except (ImportError, AttributeError):  # pragma: no cover - a Snakemake without deployment settings
    USE_CONDA = False
# With --use-conda the environment's python runs this checkout's source; otherwise this interpreter.
SRC = os.path.join(workflow.basedir, "src")
PY = f"env PYTHONPATH={shlex.quote(SRC)} python" if USE_CONDA else shlex.quote(sys.executable)
WF = CFG.workflow
# Each stage's command is `{params.cmd} {resources.overrides} {params.args}`, i.e. the launcher and stage, the
# pipeline's overrides, the rule's own overrides. The pipeline's overrides are a (string) resource of
# every rule, set in the Snakefile: Snakemake expands them into the command it prints (-p) and runs, but,
# unlike params, resources do not trigger reruns (--rerun-triggers params), which must follow only the
# config sections a rule reads (its `section` param), not every override given.
OVR = shlex.join(OVERRIDES)
STAGE_SHELL = "{params.cmd} {resources.overrides} {params.args} > {log} 2>&1"


def stage_shell(threads_key, stage_extra=False):
    """STAGE_SHELL with the job's granted cores passed to the stage as ``threads_key`` (a run-time-only
    setting, or with ``stage_extra`` the stage's own +stage.<key>: the rule declares its cores from the
    workflow config, the stage uses exactly those)."""
    key = stage_overrides(**{threads_key: "{threads}"})[0] if stage_extra else f"{threads_key}={{threads}}"
    return f"{{params.cmd}} {{resources.overrides}} {key} {{params.args}} > {{log}} 2>&1"


def plain_config(name=None, cfg=None):
    """The resolved config (``cfg``, default the pipeline's), or one top-level section of it, as plain values
    without the run-time-only settings (gaincell.config.RUNTIME_ONLY_KEYS: threads, progress bars, workers,
    cache folders)."""
    cfg = CFG if cfg is None else cfg
    node = cfg if name is None else OmegaConf.select(cfg, name)
    if not OmegaConf.is_config(node):
        return node
    plain = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    for key in RUNTIME_ONLY_KEYS:
        top, _, leaf = key.partition(".")
        if name is None:
            plain.get(top, {}).pop(leaf, None)
        elif top == name:
            plain.pop(leaf, None)
    return plain


def digest(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# One W&B group per configuration (not a param: it must not trigger reruns): reruns of the same
# configuration log into one group, a changed setting into another.
os.environ.setdefault("WANDB_RUN_GROUP", f"{PROFILE}-{digest({k: v for k, v in plain_config().items() if k not in ('tracking', 'stage')})}")
os.environ.setdefault("WANDB_MODE", str(CFG.tracking.mode))


# Passed on to jobs under a cluster executor (and required to be set, which the lines above ensure).
envvars:
    "WANDB_MODE",
    "WANDB_RUN_GROUP",

wildcard_constraints:
    run="[A-Za-z0-9_.-]+",


# The attention settings each kind actually reads (softmax ignores the hardware knobs).
ATTENTION_KEYS = {"softmax": ["kind"], "softmax_window": ["kind", "window"]}


def section(*names, kind=None, extra=()):
    """A param value that changes exactly when a setting of these config sections changes (--rerun-triggers
    params), run-time-only settings aside. ``seed`` names the top-level seed. With ``kind``, the attention
    section counts only the settings that attention kind reads. ``extra``: a run's own Hydra overrides;
    the top-level sections they name count too."""
    names = list(dict.fromkeys(list(names) + [o.lstrip("+~").split("=")[0].split(".")[0] for o in extra]))
    # the run's overrides applied (a config group such as cell=paper changes the sections it sets)
    cfg = compose(OVERRIDES + list(extra)) if extra else None
    parts = {}
    for name in names:
        node = plain_config(name, cfg)
        if name == "attention" and kind is not None:
            node = dict(node, kind=kind)
            keys = ATTENTION_KEYS.get(kind)
            node = {k: node[k] for k in keys} if keys else node
        parts[name] = node
    return digest(parts)


def stage_cmd(stage):
    """Launcher and stage of a rule's command (`python -m gaincell <stage>`)."""
    return f"{PY} -m gaincell {stage}"


def args(*extra):
    """A rule's own Hydra overrides, shell-quoted (they follow the pipeline's overrides, so they win)."""
    return " ".join(shlex.quote(str(e)) for e in extra)


def train_launcher(stage):
    """The plain interpreter on CPU; torchrun on GPUs (paper profile), on one machine (--standalone) or,
    with workflow.nodes_per_training > 1, on every node of the SLURM allocation (srun starts one torchrun
    per node; they meet at a c10d rendezvous on the allocation's first node)."""
    gpus, nodes = int(WF.gpus_per_training), int(WF.nodes_per_training)
    if gpus <= 0:
        return f"{PY} -m gaincell {stage}"
    if nodes <= 1:
        return f"{PY} -m torch.distributed.run --standalone --nproc_per_node={gpus} -m gaincell {stage}"
    head = "$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)"
    return (f"srun --nodes={nodes} --ntasks-per-node=1 {PY} -m torch.distributed.run --nnodes={nodes} "
            f"--nproc_per_node={gpus} --rdzv_backend=c10d --rdzv_endpoint={head}:29500 "
            f"--rdzv_id=\"$SLURM_JOB_ID\" -m gaincell {stage}")


def ckpt(run, training=None):
    """A run's checkpoint (``final.pt`` of the trainer, ``ckpt.pt`` of an adaptation; study.RUNS)."""
    if training is None:
        return f"{R}/{study.checkpoint(run)}"
    return f"{R}/checkpoints/{run}/{study.TRAINING[training]}"


def run_overrides(run):
    """The Hydra overrides that make one run of the study table (gaincell.study.RUNS)."""
    extras = dict(name=run.name, init_from=ckpt(run.start)) if run.start else dict(name=run.name)
    if run.training == "adapt":
        extras["mode"] = run.mode
    else:
        # on_mismatch=restart: a rerun after a parameter change must not resume the old run's ckpt.pt
        extras = dict(on_mismatch="restart", **extras)
    out = [f"attention={run.kind}", *stage_overrides(**extras)]
    if run.training == "train":
        iters, decay = run.max_iters(CFG), run.lr_decay_iters(CFG)
        out += [f"train.max_iters={iters}"] if iters is not None else []
        out += [f"train.lr_decay_iters={decay}"] if decay is not None else []
        out += [f"train.learning_rate={WF.finetune_learning_rate}"] if run.start else []
    return out + list(run.overrides)


# The model variants of the study (paper Table 1 / Fig. 4), evaluated and compared.
VARIANTS = list(study.VARIANT_RUNS)

# Inputs shared by the training-like rules: the token shards, and the fitted cell when the nonlinear
# model uses the pipeline's own fit.
TRAIN_INPUTS = [f"{R}/data/meta.json"]
TRAIN_SECTIONS = ("data", "model", "train", "attention")
TRAIN_RESOURCES = dict(mem_mb=16000, runtime=720, gpu=WF.gpus_per_training, nodes=max(1, WF.nodes_per_training))
def fit_input(extra=()):
    """The fit's coefficients.json when the cell of a run (its own ``cell=`` override, else the profile's
    ``attention.coefficients``) is read from the pipeline's fit (``fitted``, ``fitted_trimmed``)."""
    cells = [o.split("=", 1)[1] for o in extra if o.startswith("cell=")]
    coefficients = cells[-1] if cells else CFG.attention.coefficients
    return [f"{R}/fit/coefficients.json"] if str(coefficients) in FITTED_SETS else []


FIT_INPUT = fit_input()
# The linear hardware model's gain g: attention.gain=null with the fitted cell takes the fit's slope
# (gaincell.attention.config.resolve_gain), so every hardware training run waits for the fit.
GAIN_INPUT = FIT_INPUT if CFG.attention.gain is None else []

# Scheduling: among ready jobs Snakemake starts the highest priority first. The critical path (the data
# and the fitted cell, then the longest chain of study runs: pretrain -> train_linear_early -> adapt ->
# finetune -> ...) goes first; everything else (hardware, evaluations, sweeps) fills the idle cores.
PRIORITY = {"prepare_data": 100, "characterize": 90, "fit": 90, "adapt": 50 + 5 * max(study.chain_length(r.name) for r in study.runs("adapt"))}
PRIORITY.update({r.rule: 50 + 5 * study.chain_length(r.name) for r in study.RUNS if r.training != "adapt"})

# Light rules run on the submitting machine under a cluster executor (SLURM), not as jobs.
localrules: all, fit, hardware_estimates, figures, leakage_sweep, variation_sweep


# Only one pipeline run writes a results folder at a time, wherever it was started from (Snakemake's own
# lock is per working directory). Taken when jobs are about to run (not for -n, --lint or --report).
RESULTS_LOCK = []
RUN_RECORD = Path(LOGS) / "pipeline_run.json"  # start and end of the run (benchmarks/pipeline_schedule.py)


def record_run(**times):
    record = dict(profile=PROFILE, overrides=USER_OVERRIDES, cores=workflow.cores, **times)
    if "end" in times and RUN_RECORD.is_file():
        record = {**json.loads(RUN_RECORD.read_text()), **times}
    atomic_write_json(RUN_RECORD, record)


onstart:
    RESULTS_LOCK.append(results_lock.acquire(R))
    record_run(start=time.time())


onsuccess:
    record_run(end=time.time())


def keep_only_points(points, index_path, log_path):
    """Remove point files of adapt/leakage/ that are not among ``points`` (left by another list of
    values), then write the sweep's index."""
    keep = {Path(p).resolve() for p in points}
    stale = [p for p in Path(f"{R}/adapt/leakage").glob("*.json") if p.resolve() not in keep]
    for p in stale:
        p.unlink()
    atomic_write_json(Path(index_path), {"values": [float(v) for v in WF.leakage_values],
                                         "points": list(points), "removed_stale": [str(p) for p in stale]})
    Path(log_path).write_text(f"{len(points)} points; removed {len(stale)} stale: {[str(p) for p in stale]}\n")

# The models of the variation / readout-noise sweep (workflow/rules/variation.smk): variants 5 and 6.
VARIATION_MODELS = ("nonlinear_adapted", "nonlinear_finetuned")


def keep_only_variation_points(points, index_path, log_path):
    """Remove point files of adapt/variation/ that are not among ``points``, then write the sweep's index."""
    keep = {Path(p).resolve() for p in points}
    stale = [p for p in Path(f"{R}/adapt/variation").glob("*.json") if p.resolve() not in keep]
    for p in stale:
        p.unlink()
    atomic_write_json(Path(index_path), {"points": list(points), "removed_stale": [str(p) for p in stale]})
    Path(log_path).write_text(f"{len(points)} points; removed {len(stale)} stale: {[str(p) for p in stale]}\n")

# attention.decay_per_step=derived: the hardware training runs read the derive_decay stage's value.
DERIVED_DECAY = str(CFG.attention.derived_decay_path)
DECAY_INPUT = [DERIVED_DECAY] if str(CFG.attention.decay_per_step) == "derived" else []
