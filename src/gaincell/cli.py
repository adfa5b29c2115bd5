"""One command line for every stage: ``python -m gaincell <stage> [hydra overrides]``.

The stage name is the first argument; everything after it is handed to Hydra, so overrides
(``attention.window=512``), profiles (``profile=paper``) and multirun sweeps (``--multirun``) work
as in any Hydra application. Each stage is a function ``run(cfg: DictConfig)`` in the package.

Each invocation gets its own Hydra output folder, ``logs/hydra/<stage>[_<run name>]/<time to the
microsecond>``. In a multirun sweep, stages that write a named run (``train``, ``adapt``) append the job
number to the run name, so the sweep's jobs never share a checkpoint folder. Tab completion:
``eval "$(gaincell -sc install=bash)"``, then ``gaincell train attention.<TAB>``.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Dict, List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from gaincell.config import config_dir, register_configs

# stage name -> "module:function". Lower layers are imported lazily, only for the stage that runs.
STAGES: Dict[str, str] = {
    "characterize": "gaincell.device.stage:characterize",
    "fit": "gaincell.fit:run",
    "prepare_data": "gaincell.data:run",
    "train": "gaincell.train:run",
    "adapt": "gaincell.adapt.stage:run",
    "study_eval": "gaincell.adapt.study_eval:study_eval",
    "evaluate": "gaincell.evaluate.stage:run",
    "leakage_eval": "gaincell.adapt.leakage:leakage_eval",
    "variation_eval": "gaincell.variation:variation_eval",
    "analog_convert": "gaincell.analog_stage:convert",
    "analog_eval": "gaincell.analog_stage:evaluate",
    "diagnose": "gaincell.diagnose:run",
    "study_table": "gaincell.comparisons:run",
    "hardware_estimates": "gaincell.hardware.stage:run",
    "derive_decay": "gaincell.hardware.decay:run",
    "gpu_baseline": "gaincell.hardware.gpu_baseline:run",
    "generate": "gaincell.generate:run",
    "figures": "gaincell.figures:run",
    "print_config": "gaincell.cli:print_config",
}


def print_config(cfg) -> None:
    """Print the fully composed and resolved config (a sanity check of overrides)."""
    print(OmegaConf.to_yaml(cfg, resolve=True))


def _resolve(stage: str) -> Callable:
    if stage not in STAGES:
        known = ", ".join(sorted(STAGES))
        raise SystemExit(f"gaincell: unknown stage {stage!r}; expected one of: {known}")
    module_name, func_name = STAGES[stage].split(":")
    return getattr(importlib.import_module(module_name), func_name)


# Stages that write a run named by +stage.name (default: the attention kind): renamed per multirun job.
NAMED_RUN_STAGES = ("train", "adapt")
SHELL_COMPLETION = ("-sc", "--shell-completion")


def stage_overrides(**settings: object) -> List[str]:
    """``+stage.<key>=<value>`` overrides: the extras of one stage (input and output names, modes)."""
    return [f"+stage.{key}={value}" for key, value in settings.items()]


def _job_name(stage: str, overrides: List[str]) -> str:
    """Hydra's job name (and output folder): the stage, and the run name when one is given."""
    names = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("stage.name=")]
    return f"{stage}_{names[-1]}" if names else stage


def _name_multirun_job(cfg) -> None:
    """In a multirun sweep, give each job's run its own name (``<name>-<job number>``)."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    with open_dict(cfg):
        base = cfg.stage.get("name") or str(cfg.attention.kind)
        cfg.stage.name = f"{base}-{hydra_cfg.job.num}"


def _completion_line(line: str) -> str:
    """COMP_LINE without the stage word, so Hydra completes the overrides as for any Hydra app."""
    words = line.split(" ")
    if len(words) > 2 and words[1] in STAGES:
        return " ".join(words[:1] + words[2:])
    return line


def _run_hydra(stage: str, args: List[str], func: Callable) -> None:
    register_configs()

    def _task(cfg: DictConfig) -> None:
        if stage in NAMED_RUN_STAGES:
            _name_multirun_job(cfg)
        func(cfg)

    app = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(_task)
    old_argv = sys.argv
    # argv[0] is the program name Hydra's completion script registers; the stage travels in the job name
    sys.argv = ["gaincell"] + args
    try:
        app()
    finally:
        sys.argv = old_argv


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nstages: " + ", ".join(sorted(STAGES)))
        print("lm_eval: lm-evaluation-harness's CLI with the gaincell model (gaincell.evaluate.harness_cli)")
        return
    if argv[0] in SHELL_COMPLETION:
        line = os.environ.get("COMP_LINE")
        words = (line or "").split(" ")
        if line is not None and len(words) == 2:  # completing the stage itself
            print(" ".join(s for s in sorted(STAGES) if s.startswith(words[1])))
            return
        if line is not None:
            os.environ["COMP_LINE"] = _completion_line(line)
        _run_hydra("completion", argv, print_config)
        return
    stage, overrides = argv[0], argv[1:]
    if stage == "lm_eval":  # lm-evaluation-harness's own CLI, not a Hydra stage
        from gaincell.evaluate.harness_cli import main as lm_eval_main  # noqa: PLC0415 (imports lm-evaluation-harness)

        lm_eval_main(overrides)
        return
    func = _resolve(stage)
    if not any(o.startswith("hydra.job.name=") for o in overrides):
        overrides = overrides + [f"hydra.job.name={_job_name(stage, overrides)}"]
    _run_hydra(stage, overrides, func)


if __name__ == "__main__":
    main()
