"""Scaler calibration before hardware training: set every head's q, k, v input scalers from a statistics
pass so the DAC ranges are used (in the spirit of equation 9 and of LSUV initialisation).

A softmax model switched to the hardware attention keeps its input scalers at a = 1, b = 0 / 0.45: most
of q~ falls below the query DAC's 0 and k~, v~ spill over both ends of the stored range (measured on the
tiny profile: 50-55 % of q~ < 0, 40-70 % of k~ clipped), and Adam moves a scalar by about its learning
rate per step, far too slowly to fix that during fine-tuning. Calibration sets, per layer and head,

    q~ = a q + b   to mean ``query_mean``,  std ``query_std``   (DAC range [0, 1], 16 levels)
    k~, v~         to mean ``stored_mean``, std ``stored_std``  (DAC range [0, stored_max], 8 levels)
    out = a y + b  to the mean and std of the softmax model's attention output for that head,

so the layers after attention see outputs of the scale they were trained with. Layer by layer (the
statistics of layer l depend only on layers before it) with exact affine updates from the measured
statistics (``adapt.measure_statistics``, the equation 9 pass): q, k, v of layer l, then its output
stage, so one sweep of 2 L passes matches every target to float precision.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd
import torch
from torch import nn

from gaincell.adapt.algorithm import (
    Statistics,
    attention_cores,
    constant_stage,
    get_scalers,
    measure_statistics,
    set_scalers,
)
from gaincell.adapt.inputs import distributed_job, fixed_batches, load_model, resolve_checkpoint, save_checkpoint
from gaincell.attention.config import HW_KINDS, analog_config_from_settings
from gaincell.attention.module import SCALER_STAGES
from gaincell.data import Batch
from gaincell.io import atomic_to_csv, atomic_write_json

STAGE_INDEX = {s: i for i, s in enumerate(SCALER_STAGES)}


@dataclass(frozen=True)
class CalibrationTargets:
    """Per-head targets of the scaled inputs (the ``adapt.calibrate_*`` config keys), volts / pulse units.

    Defaults: the centre of each DAC range and a standard deviation that puts +-2.5 sigma (query, 16
    levels) and +-2.25 sigma (stored, 8 levels) at the range ends: a Gaussian signal is then clipped
    1.2 % / 2.4 % of the time, near the clipping a uniform quantizer of that many levels balances
    against its step (Max, 1960).
    """

    query_mean: float = 0.5
    query_std: float = 0.2
    stored_mean: float = 0.45
    stored_std: float = 0.2

    def __post_init__(self) -> None:
        for name in ("query_std", "stored_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"calibration target {name}={getattr(self, name)!r}: expected a positive std")

    def stage(self, stage: str):
        """(mean, std) target of ``q``, ``k`` or ``v``."""
        return (self.query_mean, self.query_std) if stage == "q" else (self.stored_mean, self.stored_std)


@torch.no_grad()
def output_statistics(model: nn.Module, batches: Sequence[Batch], device: Optional[torch.device] = None
                      ) -> List[torch.Tensor]:
    """Per attention core, a (2, H) float64 tensor: mean and std per head of its output (B, H, T, D) over
    all ``batches`` (whatever the attention kind: used on the softmax model before the switch)."""
    cores = attention_cores(model)
    moments: List[Optional[torch.Tensor]] = [None] * len(cores)
    handles = []
    for i, core in enumerate(cores):
        def hook(module, args, output, i=i):
            flat = output.detach().double().transpose(0, 1).reshape(output.shape[1], -1)
            m = torch.stack([flat.sum(dim=1), (flat * flat).sum(dim=1), torch.full_like(flat[:, 0], flat.shape[1])])
            moments[i] = m.cpu() if moments[i] is None else moments[i] + m.cpu()
        handles.append(core.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            model(x.to(device) if device is not None else x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = []
    for m in moments:
        mean = m[0] / m[2]
        out.append(torch.stack([mean, (m[1] / m[2] - mean * mean).clamp_min(0).sqrt()]))
    return out


def exact_affine(scale: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 target_mean: torch.Tensor, target_std: torch.Tensor):
    """(scale', bias') giving y' = scale' x + bias' the target mean and std, for y = scale x + bias
    measured with ``mean`` and ``std``: scale' = scale sigma_t / sigma, bias' = mu_t - (sigma_t / sigma)
    (mu - bias). A constant stage (``algorithm.constant_stage``) keeps its scale and only shifts."""
    ratio = torch.where(~constant_stage(mean, std, target_std), target_std / std.clamp_min(1e-300),
                        torch.ones_like(std))
    return scale * ratio, target_mean - ratio * (mean - bias)


def target_errors(stats: Statistics, targets: CalibrationTargets, output_targets: Sequence[torch.Tensor]):
    """Largest |mean - target| and |std - target| over every layer, stage and head of ``stats``."""
    t_mean, t_std = torch.empty_like(stats.mean), torch.empty_like(stats.std)
    for stage in ("q", "k", "v"):
        t_mean[:, STAGE_INDEX[stage]], t_std[:, STAGE_INDEX[stage]] = targets.stage(stage)
    t_mean[:, STAGE_INDEX["out"]] = torch.stack([t[0] for t in output_targets])
    t_std[:, STAGE_INDEX["out"]] = torch.stack([t[1] for t in output_targets])
    return float((stats.mean - t_mean).abs().max()), float((stats.std - t_std).abs().max())


def calibrate_scalers(model: nn.Module, batches: Sequence[Batch], targets: CalibrationTargets,
                      output_targets: Sequence[torch.Tensor], device: Optional[torch.device] = None
                      ) -> Dict[str, Statistics]:
    """Set every hardware core's scalers in place (see the module docstring); ``output_targets`` from
    ``output_statistics`` of the model before its switch to the hardware attention. Returns the
    statistics ``before`` and ``after`` (each ``adapt.Statistics``, shape (L, 4, H))."""
    cores = attention_cores(model)
    if len(output_targets) != len(cores):
        raise ValueError(f"{len(output_targets)} output targets for {len(cores)} attention layers")
    before = stats = measure_statistics(model, batches, cores, device)
    scale, bias = get_scalers(cores)
    for layer in range(len(cores)):
        for stages in (("q", "k", "v"), ("out",)):
            if stages == ("out",):
                stats = measure_statistics(model, batches, cores, device)
            for stage in stages:
                i = (layer, STAGE_INDEX[stage])
                if stage == "out":
                    t_mean, t_std = output_targets[layer][0], output_targets[layer][1]
                else:
                    m, s = targets.stage(stage)
                    t_mean, t_std = torch.full_like(stats.mean[i], m), torch.full_like(stats.std[i], s)
                scale[i], bias[i] = exact_affine(scale[i], bias[i], stats.mean[i], stats.std[i], t_mean, t_std)
            set_scalers(cores, scale, bias)
        stats = measure_statistics(model, batches, cores, device) if layer + 1 < len(cores) else stats
    after = measure_statistics(model, batches, cores, device)
    return {"before": before, "after": after}


# --------------------------------------------------------------------------------------------------
# the stage: adapt +stage.mode=calibrate (a softmax checkpoint -> a calibrated hardware checkpoint)
# --------------------------------------------------------------------------------------------------
def targets_from_config(adapt_section) -> CalibrationTargets:
    return CalibrationTargets(query_mean=float(adapt_section.calibrate_query_mean),
                              query_std=float(adapt_section.calibrate_query_std),
                              stored_mean=float(adapt_section.calibrate_stored_mean),
                              stored_std=float(adapt_section.calibrate_stored_std))


def _stats_rows(result: Dict[str, Statistics]) -> List[Dict[str, float]]:
    before, after = result["before"], result["after"]
    rows = []
    for layer in range(before.mean.shape[0]):
        for si, stage in enumerate(SCALER_STAGES):
            for head in range(before.mean.shape[2]):
                i = (layer, si, head)
                rows.append({"layer": layer, "head": head, "stage": stage,
                             "mean_before": before.mean[i].item(), "std_before": before.std[i].item(),
                             "mean_after": after.mean[i].item(), "std_after": after.std[i].item()})
    return rows


def run_stage(cfg, init_from: Optional[str], name: Optional[str]) -> Dict[str, object]:
    """``python -m gaincell adapt +stage.mode=calibrate attention=linear_hw +stage.init_from=<softmax>
    +stage.name=<run>``: writes ``checkpoints/<run>/ckpt.pt`` (the hardware model, calibrated, untrained)
    and ``adapt/<run>/{summary.json, stats.csv}`` (per layer, stage and head: mean and std before and
    after calibration, on the ``adapt.calibration_batches`` fixed batches of train.bin)."""
    kind = str(cfg.attention.kind)
    if kind not in HW_KINDS:
        raise ValueError(f"calibrate: attention={kind!r}; expected a hardware kind {HW_KINDS} to calibrate for")
    if not name:
        raise ValueError("+stage.name is required: the run name of the calibrated model")
    source = resolve_checkpoint(cfg, init_from)
    with distributed_job(cfg) as env:
        if env.distributed:
            raise ValueError("calibrate runs in one process (a few forward passes): launch it without torchrun")
        torch.manual_seed(cfg.seed)
        model = load_model(source, env.device, str(cfg.attention.implementation))
        kinds = sorted({c.kind for c in attention_cores(model)})
        if any(k in HW_KINDS for k in kinds):
            raise ValueError(f"{source} already holds hardware attention {kinds}: calibration starts from a "
                             f"software (softmax) checkpoint")
        batches = fixed_batches(cfg, model, "train")
        output_targets = output_statistics(model, batches, env.device)
        model.set_attention(kind, analog_config_from_settings(cfg.attention))
        targets = targets_from_config(cfg.adapt)
        result = calibrate_scalers(model, batches, targets, output_targets, env.device)
    error = target_errors(result["after"], targets, output_targets)
    summary = {"name": name, "mode": "calibrate", "source": str(source), "attention": kind,
               "targets": dataclasses.asdict(targets), "calibration_batches": len(batches),
               "calibration_tokens": sum(int(x.numel()) for x, _ in batches),
               "calibration_loss_before": result["before"].loss, "calibration_loss_after": result["after"].loss,
               "worst_mean_error_after": error[0], "worst_std_error_after": error[1]}
    results = Path(str(cfg.results_dir))
    save_checkpoint(model, results / "checkpoints" / name / "ckpt.pt",
                    extra={"adapt": {"mode": "calibrate", "source": str(source), "targets": summary["targets"]}})
    atomic_to_csv(pd.DataFrame(_stats_rows(result)), results / "adapt" / name / "stats.csv")
    atomic_write_json(results / "adapt" / name / "summary.json", summary)
    print(f"calibrate {name}: {source} -> {kind}, loss on the calibration batches "
          f"{result['before'].loss:.4f} -> {result['after'].loss:.4f}")
    return summary
