# Shared by every rule: the composed Hydra config, the results folder, and how a stage is called.
import hashlib
import os
import shlex
import sys
import time

from omegaconf import OmegaConf

from gaincell import study
from gaincell.config import compose

PROFILE = str(config.get("profile", "tiny"))
# Extra Hydra overrides for every stage, e.g. --config overrides="attention.window=512 train.max_iters=50"
USER_OVERRIDES = shlex.split(str(config.get("overrides", "")))
OVERRIDES = [f"profile={PROFILE}"] + USER_OVERRIDES
CFG = compose(OVERRIDES)
R = CFG.results_dir  # results/<profile>
LOGS = f"{R}/logs"
try:  # with --use-conda each rule runs `python` from its envs/*.yaml environment
    from snakemake.settings.types import DeploymentMethod

    USE_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
except Exception:  # pragma: no cover - older Snakemake
    USE_CONDA = False
PY = "python" if USE_CONDA else shlex.quote(sys.executable)
WF = CFG.workflow
# Rules see the user's overrides through the environment, not in their command line: a command is a
# param, and params trigger reruns (--rerun-triggers params), which must follow only the config sections
# a rule depends on (its `section` param), not every override given.
for _override in USER_OVERRIDES:
    if any(c.isspace() for c in _override):
        raise ValueError(f"override {_override!r} contains whitespace: give values without spaces")
os.environ["GAINCELL_OVERRIDES"] = " ".join(USER_OVERRIDES)
OVR = f"profile={shlex.quote(PROFILE)} $GAINCELL_OVERRIDES"

# One W&B group per pipeline invocation (not a param: it must not trigger reruns).
os.environ.setdefault("WANDB_RUN_GROUP", f"{PROFILE}-{time.strftime('%Y%m%d-%H%M%S')}")
os.environ.setdefault("WANDB_MODE", str(CFG.tracking.mode))

wildcard_constraints:
    run="[A-Za-z0-9_.-]+",


# The attention settings each kind actually reads (softmax ignores the hardware knobs).
ATTENTION_KEYS = {"softmax": ["kind"], "softmax_window": ["kind", "window"]}


def section(*names, kind=None, extra=()):
    """A param value that changes exactly when one of these config sections changes (--rerun-triggers
    params). With ``kind``, the attention section counts only the settings that attention kind reads.
    ``extra``: a run's own Hydra overrides; the top-level sections they name count too."""
    names = list(dict.fromkeys(list(names) + [o.lstrip("+~").split("=")[0].split(".")[0] for o in extra]))
    parts = []
    for name in names:
        node = OmegaConf.select(CFG, name)
        node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        if name == "attention" and kind is not None:
            node = dict(node, kind=kind)
            keys = ATTENTION_KEYS.get(kind)
            node = {k: node[k] for k in keys} if keys else node
        parts.append(OmegaConf.to_yaml(OmegaConf.create({name: node})))
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]


def stage_cmd(stage, *extra):
    """Shell command of one stage with the pipeline's overrides plus rule-specific ones."""
    return " ".join([PY, "-m", "gaincell", stage, OVR] + [shlex.quote(e) for e in extra])


def train_launcher():
    """torchrun on GPUs (paper profile), the plain interpreter on CPU."""
    if WF.gpus_per_training > 0:
        return f"{PY} -m torch.distributed.run --standalone --nproc_per_node={WF.gpus_per_training} -m gaincell"
    return f"{PY} -m gaincell"


def train_cmd(*extra):
    # on_mismatch=restart: a rerun after a parameter change must not resume the old run's ckpt.pt
    return " ".join([train_launcher(), "train", OVR, "+stage.on_mismatch=restart"] + [shlex.quote(e) for e in extra])


def ckpt(run, training=None):
    """A run's checkpoint (``final.pt`` of the trainer, ``ckpt.pt`` of an adaptation; study.RUNS)."""
    if training is None:
        return f"{R}/{study.checkpoint(run)}"
    return f"{R}/checkpoints/{run}/{study.TRAINING[training]}"


def run_overrides(run):
    """The Hydra overrides that make one run of the study table (gaincell.study.RUNS)."""
    out = [f"attention={run.kind}", f"+stage.name={run.name}"]
    if run.start:
        out.append(f"+stage.init_from={ckpt(run.start)}")
    if run.training == "adapt":
        out.append(f"+stage.mode={run.mode}")
    else:
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
TRAIN_RESOURCES = dict(mem_mb=16000, runtime=720, gpu=WF.gpus_per_training)
FIT_INPUT = [f"{R}/fit/coefficients.json"] if CFG.attention.coefficients == "fitted" else []
# The linear hardware model's gain g: attention.gain=null with the fitted cell takes the fit's slope
# (gaincell.attention.config.resolve_gain), so every hardware training run waits for the fit.
GAIN_INPUT = FIT_INPUT if CFG.attention.gain is None else []
# The models of the variation / readout-noise sweep (workflow/rules/variation.smk): variants 5 and 6.
VARIATION_MODELS = ("nonlinear_adapted", "nonlinear_finetuned")
