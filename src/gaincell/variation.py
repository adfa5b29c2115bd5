"""The ``variation_eval`` stage: one point of the "how precise must the cell be?" sweep (issue 16 §3).

    python -m gaincell variation_eval --multirun attention.cell_variation=0,0.01,0.1 \\
        +stage.knob=cell_variation +stage.models=[nonlinear_adapted,nonlinear_finetuned]

Validation loss of each trained nonlinear model (``+stage.models``: run names, run folders or checkpoint
files) when its analog attention gets cell-to-cell gain variation (``attention.cell_variation``, one gain
factor per physical cell, fixed per chip), cell offsets (``attention.cell_offset_variation``, one additive
c_0 per physical cell in the units of the cells' folded c_i, fixed per chip; each point records the models'
c_1, ``folded_c1``, to convert a measured spread) or readout noise (``attention.readout_noise``, Gaussian on each
sub-tile readout before its ADC, fresh per readout), on the study's fixed validation batches. The other
knob keeps the checkpoint's value (0). Each model is evaluated on ``+stage.chips`` chips (noise seeds
``attention.noise_seed + k``): the spread over chips is the uncertainty of the point.

One JSON per point: ``results/<profile>/adapt/variation/<knob>_<format(value, 'g')>.json``. No training
happens here: the sweep asks how the trained models tolerate an imprecise cell.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Dict, List

import numpy as np

from gaincell.adapt.algorithm import attention_cores
from gaincell.adapt.inputs import (
    core_kinds,
    distributed_job,
    fixed_batches,
    load_model,
    resolve_checkpoint,
    results_dir,
)
from gaincell.adapt.losses import batch_losses
from gaincell.attention.config import HW_KINDS
from gaincell.config import VariationStage, stage_settings
from gaincell.io import atomic_write_json

log = logging.getLogger(__name__)

KNOBS = ("cell_variation", "cell_offset_variation", "readout_noise")


def variation_tag(knob: str, value: float) -> str:
    """File name (without .json) of one sweep point: ``cell_variation_0.01``."""
    return f"{knob}_{format(float(value), 'g')}"


def variation_eval(cfg: Any) -> Dict[str, Any]:
    """One job of the variation / readout-noise sweep (see the module docstring)."""
    stage = stage_settings(cfg, VariationStage)
    knob = stage.knob
    if knob not in KNOBS:
        raise ValueError(f"+stage.knob={knob!r}: expected one of {', '.join(KNOBS)}")
    models: List[str] = list(stage.models)
    if not models:
        raise ValueError("+stage.models is required: the nonlinear models (run names or checkpoints) to evaluate")
    chips = int(stage.chips)
    if chips < 1:
        raise ValueError(f"+stage.chips={chips}: expected an integer >= 1")
    value = float(cfg.attention[knob])
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"attention.{knob}={value!r}: expected a finite number >= 0")
    seed0 = int(cfg.attention.noise_seed)
    row: Dict[str, Any] = {"knob": knob, "value": value, "chips": chips, "noise_seeds": [seed0 + k for k in range(chips)],
                           "models": {}}
    with distributed_job(cfg) as env:
        for name in models:
            source = resolve_checkpoint(cfg, name)
            model = load_model(source, env.device, cfg.attention.implementation)
            kinds = core_kinds(attention_cores(model))
            if len(kinds) != 1 or kinds[0] not in HW_KINDS:
                raise ValueError(f"{source} holds attention {kinds}: the variation study needs a hardware model "
                                 f"({' or '.join(HW_KINDS)})")
            base = model.attention_cores()[0].analog
            val = fixed_batches(cfg, model, "val")
            per_chip = []
            for k in range(chips):
                model.set_attention(kinds[0], dataclasses.replace(base, **{knob: value, "noise_seed": seed0 + k}))
                per_chip.append(float(np.mean(batch_losses(model, val, env.device))))
            mean = float(np.mean(per_chip))
            sem = float(np.std(per_chip, ddof=1) / math.sqrt(chips)) if chips > 1 else None
            row["models"][name] = {"source": str(source), "kind": kinds[0], "val_loss": mean,
                                   "val_loss_chip_sem": sem, "val_loss_per_chip": per_chip,
                                   "val_batches": len(val), "output_levels": base.output_levels,
                                   # c_1 of the model's cells: the unit of cell_offset_variation
                                   "folded_c1": float(base.folded_coefficients[1])}
            log.info("variation %s=%g: %s validation loss %.4f over %d chip(s)", knob, value, name, mean, chips)
            del model
        if env.rank == 0:
            atomic_write_json(results_dir(cfg) / "adapt" / "variation" / f"{variation_tag(knob, value)}.json", row)
    return row
