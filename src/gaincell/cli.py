"""One command line for every stage: ``python -m gaincell <stage> [hydra overrides]``.

The stage name is the first argument; everything after it is handed to Hydra, so overrides
(``attention.window=512``), profiles (``profile=paper``) and multirun sweeps (``--multirun``) work
as in any Hydra application. Each stage is a function ``run(cfg: DictConfig)`` in the package.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, List, Optional

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
    "hardware_estimates": "gaincell.hardware.stage:run",
    "gpu_baseline": "gaincell.hardware.gpu_baseline:run",
    "generate": "gaincell.generate:run",
    "figures": "gaincell.figures:run",
    "print_config": "gaincell.cli:print_config",
}


def print_config(cfg) -> None:
    """Print the fully composed and resolved config (a sanity check of overrides)."""
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(cfg, resolve=True))


def _resolve(stage: str) -> Callable:
    if stage not in STAGES:
        known = ", ".join(sorted(STAGES))
        raise SystemExit(f"gaincell: unknown stage {stage!r}; expected one of: {known}")
    module_name, func_name = STAGES[stage].split(":")
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nstages: " + ", ".join(sorted(STAGES)))
        return
    stage, overrides = argv[0], argv[1:]
    func = _resolve(stage)

    import hydra
    from omegaconf import DictConfig

    from gaincell.config import config_dir, register_configs

    register_configs()

    def _task(cfg: DictConfig) -> None:
        func(cfg)

    app = hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(_task)
    old_argv = sys.argv
    sys.argv = [f"gaincell {stage}"] + overrides
    try:
        app()
    finally:
        sys.argv = old_argv


if __name__ == "__main__":
    main()
