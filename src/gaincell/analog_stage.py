"""Stages of the fully analog transformer (analog projections + gain-cell attention).

``analog_convert``: a trained checkpoint (``+stage.init_from``) with its configured projections made
analog (``projections=analog``) and each tile's input range calibrated on training batches (no weight
changes), saved as ``checkpoints/<+stage.name>/final.pt`` (the study's ``fully_analog``; hardware-aware
training, ``fully_analog_hwa``, continues from it in the ordinary ``train`` stage).

``analog_eval``: validation loss of an analog checkpoint on the study's fixed batches (those of
the ``study_eval`` stage), once without inference noise and once per noise seed of
``projections.inference.seeds``, the noise drawn when the model is loaded
(:func:`gaincell.analog_projections.apply_inference_noise`). Writes ``adapt/study/<name>.json``:
``val_loss`` the mean over seeds, ``val_loss_spread`` their sample standard deviation,
``val_batch_losses`` the seed-averaged loss of every batch (for paired comparisons with the other
variants), ``val_loss_noise_free`` and the noise settings with their sources.

    python -m gaincell analog_convert projections=analog attention=nonlinear_hw +stage.name=fully_analog \\
        +stage.init_from=results/tiny/checkpoints/nonlinear_finetuned/final.pt
    python -m gaincell analog_eval projections=analog +stage.init_from=results/tiny/checkpoints/fully_analog/final.pt
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from gaincell.adapt.inputs import distributed_job, fixed_batches, load_model, resolve_checkpoint, results_dir
from gaincell.adapt.losses import batch_losses
from gaincell.analog_projections import (
    analog_layers,
    apply_inference_noise,
    calibrate_input_ranges,
    describe_noise,
    inference_noise_from_settings,
    parameters_by_kind,
    projection_config_from_dict,
    set_projections,
)
from gaincell.config import AnalogConvertStage, StudyEvalStage, stage_settings
from gaincell.data import open_tokens, sample_batches
from gaincell.io import atomic_save_torch, atomic_write_json

log = logging.getLogger(__name__)


def convert(cfg: Any) -> Path:
    """Stage ``analog_convert`` (see the module docstring); returns the checkpoint written."""
    stage = stage_settings(cfg, AnalogConvertStage)
    source = resolve_checkpoint(cfg, stage.init_from)
    if not stage.name:
        raise ValueError("+stage.name is required: the run name of the analog model (checkpoints/<name>/final.pt)")
    projections = projection_config_from_dict(cfg.projections)
    if not projections.analog:
        raise ValueError("analog_convert needs projections=analog (the projections group is 'digital')")
    with distributed_job(cfg) as env:
        torch.manual_seed(int(cfg.seed))
        start = time.perf_counter()
        model = load_model(source, env.device, str(cfg.attention.implementation))
        if analog_layers(model):
            raise ValueError(f"{source} already holds analog projections: convert a digital checkpoint")
        set_projections(model, projections)
        model.to(env.device)
        fixed_batches(cfg, model, "val")  # the data's vocabulary is the model's (clear error otherwise)
        bs, block = int(cfg.adapt.batch_size), int(model.config.block_size)
        batches = sample_batches(open_tokens(cfg.data.data_dir, "train"), projections.input_range_init_batches,
                                 bs, block, seed=int(cfg.seed), vocab_size=int(model.config.vocab_size),
                                 source=f"{cfg.data.data_dir}/train.bin")
        layers = calibrate_input_ranges(model, [x for x, _ in batches])
        ranges = {n: [round(float(r), 4) for r in layer.input_range.detach()] for n, layer in analog_layers(model)}
        info = {"source": str(source), "layers": layers, "calibration_batches": len(batches),
                "calibration_tokens": len(batches) * bs * block, "input_ranges": ranges,
                **parameters_by_kind(model), "seconds": round(time.perf_counter() - start, 2)}
        out = results_dir(cfg) / "checkpoints" / stage.name / "final.pt"
        if env.rank == 0:
            state = model.checkpoint_state()
            state.update({"analog_convert": info, "run_name": stage.name})
            atomic_save_torch(state, out)
    print(f"analog_convert[{stage.name}]: {layers} analog layers ({info['analog_weights']} analog weights, "
          f"{info['digital_weights']} digital), input ranges from {len(batches)} batches, {info['seconds']} s -> {out}")
    return out


def _seed_losses(source: Path, cfg: Any, device: torch.device, batches: List, noise: Any, seed: int) -> List[float]:
    """Per-batch losses of the checkpoint programmed with the inference noise of one seed."""
    model = load_model(source, device, str(cfg.attention.implementation))
    apply_inference_noise(model, noise, seed)
    return batch_losses(model, batches, device)


def evaluate(cfg: Any) -> Dict[str, Any]:
    """Stage ``analog_eval`` (see the module docstring); returns the summary written."""
    stage = stage_settings(cfg, StudyEvalStage)
    source = resolve_checkpoint(cfg, stage.init_from)
    name = stage.name or source.parent.name
    noise = inference_noise_from_settings(cfg.projections)
    with distributed_job(cfg) as env:
        torch.manual_seed(int(cfg.seed))
        start = time.perf_counter()
        model = load_model(source, env.device, str(cfg.attention.implementation))
        if not analog_layers(model):
            raise ValueError(f"{source} has no analog projections: evaluate it with the study_eval stage")
        batches = fixed_batches(cfg, model, "val")  # the study's batches, the same for every variant
        noise_free = batch_losses(model, batches, env.device)
        per_seed = {int(s): _seed_losses(source, cfg, env.device, batches, noise, int(s)) for s in noise.seeds}
        seed_means = np.array([np.mean(v) for v in per_seed.values()])
        spread = float(seed_means.std(ddof=1)) if len(seed_means) > 1 else float("nan")
        summary: Dict[str, Any] = {
            "name": name, "mode": "analog_eval", "source": str(source), "profile": str(cfg.profile),
            "eval_batches": len(batches), "batch_size": int(cfg.adapt.batch_size),
            "block_size": int(model.config.block_size),
            "val_loss": float(seed_means.mean()), "val_ppl": math.exp(float(seed_means.mean())),
            "val_loss_spread": spread,  # sample std over the noise seeds (0 would mean no noise was applied)
            "val_loss_seeds": {str(s): float(m) for s, m in zip(per_seed, seed_means)},
            "val_batch_losses": np.mean(np.array(list(per_seed.values())), axis=0).tolist(),  # seed-averaged
            "val_batch_losses_by_seed": {str(s): v for s, v in per_seed.items()},
            "val_loss_noise_free": float(np.mean(noise_free)), "val_batch_losses_noise_free": noise_free,
            "noise": describe_noise(model.config.projections, noise), **parameters_by_kind(model),
            "seconds": round(time.perf_counter() - start, 2),
        }
        out = results_dir(cfg) / "adapt" / "study" / f"{name}.json"
        if env.rank == 0:
            atomic_write_json(out, summary)
    print(f"analog_eval[{name}]: val loss {summary['val_loss']:.4f} +- {spread:.4f} (std over {len(seed_means)} "
          f"noise seeds), noise-free {summary['val_loss_noise_free']:.4f}, {summary['seconds']} s -> {out}")
    return summary
