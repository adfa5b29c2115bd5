"""The ``adapt`` stage: a trained linear hardware model onto the nonlinear gain-cell model.

    python -m gaincell adapt attention=nonlinear_hw +stage.init_from=<linear ckpt> +stage.name=<run> \\
        [+stage.mode=adapt|map_only]

``mode=adapt`` (default) runs eq. 9 (:func:`gaincell.adapt.algorithm.adapt_scalers`) on
``adapt.calibration_batches`` fixed training batches; ``mode=map_only`` switches to the nonlinear cell
and keeps the linear model's scalers (the study's variant 4); ``mode=evaluate`` is the ``study_eval``
stage; ``mode=calibrate`` sets a softmax checkpoint's scalers from data for the hardware attention
(:mod:`gaincell.adapt.calibration`). The nonlinear cell is ``attention.coefficients``; every other hardware setting is the
checkpoint's. Writes ``results/<profile>/checkpoints/<name>/ckpt.pt`` and
``results/<profile>/adapt/<name>/{summary.json, history.csv, stats.csv, histograms.csv}``; the
validation losses of the linear, mapped and adapted model are measured on the study's fixed batches.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pandas as pd
import torch

from gaincell.adapt.algorithm import AdaptResult, AdaptSettings, adapt_scalers, attention_cores, measure_statistics
from gaincell.adapt.calibration import run_stage as run_calibration
from gaincell.adapt.histograms import capture_values, histogram_rows
from gaincell.adapt.inputs import (
    core_kinds,
    distributed_job,
    fixed_batches,
    load_model,
    resolve_checkpoint,
    results_dir,
    save_checkpoint,
)
from gaincell.adapt.losses import batch_losses, paired_difference
from gaincell.adapt.study_eval import study_eval
from gaincell.attention.config import AnalogAttentionConfig, resolve_coefficients
from gaincell.attention.module import SCALER_STAGES
from gaincell.config import AdaptStage, StudyEvalStage, stage_settings
from gaincell.data import Batch
from gaincell.io import atomic_to_csv, atomic_write_json
from gaincell.tracking import Tracker

log = logging.getLogger(__name__)

def adapt_settings(adapt_section: Any) -> AdaptSettings:
    """The update's knobs from the ``adapt`` config section (the fields both declare)."""
    return AdaptSettings(**{f.name: adapt_section[f.name] for f in dataclasses.fields(AdaptSettings)})


def nonlinear_config(cfg: Any, current: AnalogAttentionConfig) -> AnalogAttentionConfig:
    """The checkpoint's hardware settings with the nonlinear cell of ``cfg.attention.coefficients``."""
    coeffs = resolve_coefficients(cfg.attention.coefficients, cfg.attention.fitted_coefficients_path)
    if coeffs is None:
        raise ValueError("attention.coefficients is None: adaptation needs the nonlinear cell "
                         "(attention.coefficients=paper, fitted, fitted_trimmed or ten numbers)")
    return dataclasses.replace(current, coefficients=coeffs)


def run(cfg: Any) -> Dict[str, Any]:
    """The ``adapt`` stage (see the module docstring for modes and outputs). Returns the summary."""
    stage = stage_settings(cfg, AdaptStage)
    if stage.mode == "evaluate":
        return study_eval(cfg, StudyEvalStage(init_from=stage.init_from, name=stage.name))
    if stage.mode == "calibrate":  # a softmax checkpoint's scalers set from data for the hardware attention
        return run_calibration(cfg, stage.init_from, stage.name)
    source = resolve_checkpoint(cfg, stage.init_from)
    if not stage.name:
        raise ValueError("+stage.name is required: the run name of the adapted model (checkpoints/<name>/ckpt.pt)")
    settings = adapt_settings(cfg.adapt)
    if stage.mode == "map_only":
        settings = dataclasses.replace(settings, max_iters=0)
    with distributed_job(cfg) as env:
        torch.manual_seed(cfg.seed)
        model = load_model(source, env.device, cfg.attention.implementation)
        kinds = core_kinds(attention_cores(model))
        if kinds != ["linear_hw"]:
            raise ValueError(f"{source} holds a model with attention {kinds}; adaptation starts from a linear "
                             f"hardware model (a checkpoint trained with attention=linear_hw)")
        val, calibration = fixed_batches(cfg, model, "val"), fixed_batches(cfg, model, "train")
        summary: Dict[str, Any] = {"name": stage.name, "mode": stage.mode, "source": str(source),
                                   "profile": cfg.profile, "attention_kinds_source": kinds,
                                   "world_size": env.world_size, "eval_batches": len(val),
                                   "batch_size": cfg.adapt.batch_size, "block_size": model.config.block_size}
        tracker = Tracker(cfg, run_name=f"adapt_{stage.name}", job_type="adapt") if env.rank == 0 else None
        result, losses, samples, cell = _adapt_model(cfg, model, calibration, val, settings, env, tracker,
                                                     measure_after=stage.mode == "adapt")
        summary.update(_summary(cfg, stage.mode, settings, result, losses, cell, len(calibration),
                                model.config.block_size))
        _log_outcome(stage.name, stage.mode, result, summary)
        if env.rank == 0:
            _write_outputs(cfg, stage.name, model, result, samples, summary)
        if tracker is not None:
            tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
            tracker.log_checkpoint(results_dir(cfg) / "checkpoints" / stage.name / "ckpt.pt", {"mode": stage.mode})
            tracker.finish()
        return summary


def _adapt_model(cfg: Any, model, calibration: List[Batch], val: List[Batch], settings: AdaptSettings, env,
                 tracker, measure_after: bool):
    """Linear targets, switch to the nonlinear cell, eq. 9; the losses and value samples along the way."""
    device, rank, world = env.device, env.rank, env.world_size
    cores = attention_cores(model)
    cal = calibration[rank::world]
    layers, head = sorted({0, len(cores) - 1}), 0
    samples: Dict[str, Dict] = {}
    losses: Dict[str, List[float]] = {}
    # 1. targets: the linear model
    target = measure_statistics(model, cal, cores, device)
    losses["linear"] = batch_losses(model, val, device)
    samples["linear"] = capture_values(model, cores, calibration[0], layers, head, device=device)
    # 2. the nonlinear cell, same weights and scalers
    cell = nonlinear_config(cfg, cores[0].analog)
    model.set_attention("nonlinear_hw", cell)
    losses["mapped"] = batch_losses(model, val, device)
    samples["before"] = capture_values(model, cores, calibration[0], layers, head, device=device)

    def on_iteration(row):
        if tracker is not None:
            tracker.log({f"adapt/{k}": v for k, v in row.items() if k != "iteration"}, step=row["iteration"])

    # 3. eq. 9 (no update in map_only: max_iters = 0)
    result = adapt_scalers(model, cal, target, settings, cores, device, on_iteration=on_iteration)
    if measure_after:
        losses["after"] = batch_losses(model, val, device)
        samples["after"] = capture_values(model, cores, calibration[0], layers, head, device=device)
    else:
        losses["after"] = losses["mapped"]
    return result, losses, samples, cell


def _summary(cfg: Any, mode: str, settings: AdaptSettings, result: AdaptResult, losses: Dict[str, List[float]],
             cell: AnalogAttentionConfig, calibration_batches: int, block_size: int) -> Dict[str, Any]:
    val_linear, val_mapped, val_after = (float(np.mean(losses[k])) for k in ("linear", "mapped", "after"))
    gain, gain_se = paired_difference(losses["mapped"], losses["after"])
    last, first = result.history[-1], result.history[0]
    coefficients = cfg.attention.coefficients
    return {
        "coefficients": list(cell.coefficients),
        "coefficient_set": coefficients if isinstance(coefficients, str) else "custom",
        "folded_coefficients": list(cell.folded_coefficients),
        "tolerance": settings.tolerance, "max_iters": settings.max_iters,
        "damping": [settings.damping_start, settings.damping_end, settings.damping_iters],
        "calibration_batches": calibration_batches,
        "calibration_tokens": calibration_batches * cfg.adapt.batch_size * block_size,
        "converged": result.converged if mode == "adapt" else None, "iterations": result.updates,
        "total_scalers": last["total_scalers"], "converged_scalers": last["converged_scalers"],
        "worst_mean_error": last["worst_mean_error"], "worst_std_error": last["worst_std_error"],
        "worst_mean_error_before": first["worst_mean_error"], "worst_std_error_before": first["worst_std_error"],
        "calibration_loss_linear": result.target.loss, "calibration_loss_before": result.before.loss,
        "calibration_loss_after": result.after.loss,
        "val_loss_linear": val_linear, "val_ppl_linear": math.exp(val_linear),
        "val_loss_mapped": val_mapped, "val_ppl_mapped": math.exp(val_mapped),
        "val_loss": val_after, "val_ppl": math.exp(val_after), "val_batch_losses": losses["after"],
        "val_batch_losses_linear": losses["linear"], "val_batch_losses_mapped": losses["mapped"],
        "adaptation_gain": gain, "adaptation_gain_se": gain_se,  # mapped - adapted, paired over batches
        "not_converged": result.not_converged[:50], "not_converged_count": len(result.not_converged),
    }


def _log_outcome(name: str, mode: str, result: AdaptResult, summary: Dict[str, Any]) -> None:
    last = result.history[-1]
    if mode == "map_only":
        log.info("%s (map_only, no adaptation): worst |dmu| %.2e |dsigma| %.2e; val loss linear %.4f, "
                 "mapped %.4f", name, last["worst_mean_error"], last["worst_std_error"],
                 summary["val_loss_linear"], summary["val_loss_mapped"])
        return
    if not result.converged:
        worst = result.not_converged[0]
        log.warning("adaptation did not converge in %d iterations: %d of %d scalers outside %.1e, worst "
                    "layer %d head %d stage %s (mean error %.2e, std error %.2e)", result.updates,
                    len(result.not_converged), last["total_scalers"], summary["tolerance"], worst["layer"],
                    worst["head"], worst["stage"], worst["mean_error"], worst["std_error"])
    log.info("%s: %d iterations, converged=%s, worst |dmu| %.2e |dsigma| %.2e (before: %.2e, %.2e); "
             "val loss linear %.4f, mapped %.4f, adapted %.4f", name, result.updates, result.converged,
             last["worst_mean_error"], last["worst_std_error"], summary["worst_mean_error_before"],
             summary["worst_std_error_before"], summary["val_loss_linear"], summary["val_loss_mapped"],
             summary["val_loss"])


def _write_outputs(cfg: Any, name: str, model, result: AdaptResult, samples: Dict[str, Dict],
                   summary: Dict[str, Any]) -> None:
    """The adapted checkpoint and ``adapt/<name>/{history,stats,histograms}.csv``, ``summary.json``."""
    results = results_dir(cfg)
    out_dir: Path = results / "adapt" / name
    save_checkpoint(model, results / "checkpoints" / name / "ckpt.pt", extra={"adapt": {k: summary[k] for k in (
        "mode", "source", "converged", "iterations", "val_loss", "coefficient_set")}})
    atomic_to_csv(pd.DataFrame(result.history), out_dir / "history.csv")
    atomic_to_csv(pd.DataFrame(_stats_rows(result)), out_dir / "stats.csv")
    atomic_to_csv(pd.DataFrame(histogram_rows(samples, 0, cfg.adapt.histogram_bins)), out_dir / "histograms.csv")
    atomic_write_json(out_dir / "summary.json", summary)


def _stats_rows(result: AdaptResult) -> List[Dict[str, Any]]:
    """One row per (layer, stage, head): linear, before and after statistics and scalers."""
    rows = []
    t, b, a = result.target, result.before, result.after
    for layer in range(t.mean.shape[0]):
        for si, stage in enumerate(SCALER_STAGES):
            for head in range(t.mean.shape[2]):
                i = (layer, si, head)
                rows.append({
                    "layer": layer, "head": head, "stage": stage,
                    "mean_linear": t.mean[i].item(), "std_linear": t.std[i].item(),
                    "mean_before": b.mean[i].item(), "std_before": b.std[i].item(),
                    "mean_after": a.mean[i].item(), "std_after": a.std[i].item(),
                    "scale_before": result.scale_before[i].item(), "bias_before": result.bias_before[i].item(),
                    "scale_after": result.scale_after[i].item(), "bias_after": result.bias_after[i].item(),
                    "mean_error_after": a.mean[i].item() - t.mean[i].item(),
                    "std_error_after": a.std[i].item() - t.std[i].item(),
                })
    return rows
