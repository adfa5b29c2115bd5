"""Equation 9: re-set the per-head scalers of a nonlinear gain-cell model to match the linear model's
statistics. No files, no config: any module holding ``AttentionCore``s and batches of (x, y).

For every scaling stage (q, k, v, out) of every head of every layer, with mu and sigma the mean and
standard deviation of the stage's output over the calibration batches:

    a <- a * sigma_L / sigma_NL        b <- b + (mu_L - mu_NL)        (damped by beta, 1.0 -> 0.1)

all stages of all layers from one pass over the batches per iteration, until every ``|mu_NL - mu_L|``
and ``|sigma_NL - sigma_L|`` is below the tolerance or the iteration limit. Under torchrun the
statistics are all-reduced, so every rank computes the same update and ends with identical scalers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from gaincell.adapt.distributed import all_reduce_sum, world
from gaincell.adapt.losses import loss_from_output
from gaincell.attention.config import HW_KINDS
from gaincell.attention.module import SCALER_STAGES, AttentionCore
from gaincell.data import Batch


@dataclass(frozen=True)
class AdaptSettings:
    """Knobs of the damped update (the ``adapt`` config section, minus data sizes).

    Attributes:
        tolerance: stop when every |mu_NL - mu_L| and |sigma_NL - sigma_L| is below this (absolute).
        max_iters: most updates applied (one calibration pass is measured per update, plus a final one).
        damping_start: beta of the first update (1.0 = the undamped equation 9).
        damping_end: beta reached after ``damping_iters`` updates, then kept.
        damping_iters: updates over which beta falls linearly from start to end.
    """

    tolerance: float = 1e-4
    max_iters: int = 100
    damping_start: float = 1.0
    damping_end: float = 0.1
    damping_iters: int = 50

    def __post_init__(self) -> None:
        if not self.tolerance > 0:
            raise ValueError(f"adapt.tolerance={self.tolerance!r}: expected a positive number")
        if self.max_iters < 0:
            raise ValueError(f"adapt.max_iters={self.max_iters!r}: expected an integer >= 0")
        for name in ("damping_start", "damping_end"):
            beta = getattr(self, name)
            if not 0 < beta <= 1:
                raise ValueError(f"adapt.{name}={beta!r}: expected a damping factor in (0, 1]")
        if self.damping_iters < 1:
            raise ValueError(f"adapt.damping_iters={self.damping_iters!r}: expected an integer >= 1")

    def beta(self, update: int) -> float:
        """Damping factor of update number ``update`` (0-based): linear from start to end, then end."""
        frac = min(update, self.damping_iters) / self.damping_iters
        return self.damping_start + (self.damping_end - self.damping_start) * frac


@dataclass
class Statistics:
    """Per layer, scaling stage (q, k, v, out) and head: mean and standard deviation, shape (L, 4, H)."""

    mean: torch.Tensor
    std: torch.Tensor
    loss: float = float("nan")          # mean cross-entropy over the same batches, nats/token


@dataclass
class AdaptResult:
    converged: bool
    updates: int                        # updates applied
    history: List[Dict[str, float]]     # one row per measurement (update index, errors, loss, beta)
    target: Statistics                  # linear model
    before: Statistics                  # nonlinear model with the linear model's scalers
    after: Statistics                   # nonlinear model after the last update
    scale_before: torch.Tensor          # (L, 4, H)
    bias_before: torch.Tensor
    scale_after: torch.Tensor
    bias_after: torch.Tensor
    not_converged: List[Dict[str, Any]]  # scalers still outside the tolerance, worst first


def attention_cores(model: nn.Module) -> List[AttentionCore]:
    """The model's attention cores, first layer first."""
    if hasattr(model, "attention_cores"):
        cores = list(model.attention_cores())
    else:
        cores = [m for m in model.modules() if isinstance(m, AttentionCore)]
    if not cores:
        raise ValueError(f"{type(model).__name__} holds no AttentionCore: nothing to adapt")
    return cores


def get_scalers(cores: Sequence[AttentionCore]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias), each (L, 4, H) float64, stages in SCALER_STAGES order."""
    scale = torch.stack([torch.stack([getattr(c, f"{s}_scale").detach().double().cpu() for s in SCALER_STAGES])
                         for c in cores])
    bias = torch.stack([torch.stack([getattr(c, f"{s}_bias").detach().double().cpu() for s in SCALER_STAGES])
                        for c in cores])
    return scale, bias


@torch.no_grad()
def set_scalers(cores: Sequence[AttentionCore], scale: torch.Tensor, bias: torch.Tensor) -> None:
    for layer, core in enumerate(cores):
        for si, stage in enumerate(SCALER_STAGES):
            p_scale, p_bias = getattr(core, f"{stage}_scale"), getattr(core, f"{stage}_bias")
            p_scale.copy_(scale[layer, si].to(p_scale.device, p_scale.dtype))
            p_bias.copy_(bias[layer, si].to(p_bias.device, p_bias.dtype))


def _accumulate_captured(cores: Sequence[AttentionCore], sum_mean: torch.Tensor, sum_sq: torch.Tensor) -> None:
    """Add one forward's per-head (mean, mean of squares) of every stage to the running sums."""
    for layer, core in enumerate(cores):
        for si, stage in enumerate(SCALER_STAGES):
            if stage not in core.captured:
                raise RuntimeError(f"layer {layer} recorded no '{stage}' statistics: its attention kind "
                                   f"is {core.kind!r}; adaptation needs a hardware kind {HW_KINDS}")
            mu, sd = core.captured[stage]
            mu, sd = mu.double().cpu(), sd.double().cpu()
            sum_mean[layer, si] += mu
            sum_sq[layer, si] += sd * sd + mu * mu


@torch.no_grad()
def measure_statistics(model: nn.Module, batches: Sequence[Batch], cores: Optional[Sequence[AttentionCore]] = None,
                       device: Optional[torch.device] = None) -> Statistics:
    """Mean and std of every scaling stage's output over all ``batches`` (this rank's share), and the loss.

    Each forward gives per-head (mean, std) per stage (``AttentionCore.capture_stats``); batches are
    pooled through the first two moments, E[x] and E[x^2] = std^2 + mean^2, which is exact for
    equal-size batches (the pooled std is the population std to within a relative 1/(2N), N the values
    per head and batch, the same for linear and nonlinear model). Under DDP the moment sums and batch
    counts are all-reduced, so every rank returns the statistics of the union of all ranks' batches.
    """
    cores = list(cores) if cores is not None else attention_cores(model)
    sum_mean = torch.zeros(len(cores), len(SCALER_STAGES), cores[0].n_head, dtype=torch.float64)
    sum_sq = torch.zeros_like(sum_mean)
    counts = torch.zeros(2, dtype=torch.float64)  # batches, summed loss
    was_training = model.training
    model.eval()
    for core in cores:
        core.capture_stats = True
        core.captured = {}
    try:
        for x, y in batches:
            if device is not None:
                x, y = x.to(device), y.to(device)
            loss = loss_from_output(model(x, y))
            _accumulate_captured(cores, sum_mean, sum_sq)
            counts[0] += 1
            counts[1] += float(loss)
    finally:
        for core in cores:
            core.capture_stats = False
            core.captured = {}
        model.train(was_training)
    packed = all_reduce_sum(torch.cat([sum_mean.flatten(), sum_sq.flatten(), counts]))
    n = packed[-2].item()
    if n == 0:
        raise ValueError("no calibration batches: every rank had an empty share")
    k = sum_mean.numel()
    mean = packed[:k].view_as(sum_mean) / n
    second = packed[k:2 * k].view_as(sum_mean) / n
    std = (second - mean * mean).clamp_min(0.0).sqrt()
    return Statistics(mean=mean, std=std, loss=packed[-1].item() / n)


def constant_stage(mean: torch.Tensor, std: torch.Tensor, target_std: torch.Tensor) -> torch.Tensor:
    """True where a stage's output is constant up to float32 rounding: std <= 1e-6 x max(|mean|, target std)
    (float32 carries ~7 significant digits, so a constant's measured std is ~1e-8 of its value)."""
    return std <= 1e-6 * torch.maximum(mean.abs(), target_std)


def equation_9(scale: torch.Tensor, bias: torch.Tensor, stats: Statistics, target: Statistics,
               beta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """One damped update of eq. 9: a <- a sigma_L / sigma_NL, b <- b + mu_L - mu_NL, mixed with the old
    values by ``beta``. A stage whose nonlinear output is constant cannot be rescaled: its a is kept
    (constant: std 0, or below 1e-6 of the output's scale, i.e. float32 rounding of a constant: rescaling
    that noise to the target std would blow the scaler up, e.g. when every pulse of a head is 0)."""
    ratio = torch.where(~constant_stage(stats.mean, stats.std, target.std),
                        target.std / stats.std.clamp_min(1e-300), torch.ones_like(scale))
    new_scale = beta * (scale * ratio) + (1.0 - beta) * scale
    new_bias = beta * (bias + (target.mean - stats.mean)) + (1.0 - beta) * bias
    return new_scale, new_bias


def _errors(stats: Statistics, target: Statistics) -> Tuple[torch.Tensor, torch.Tensor]:
    return stats.mean - target.mean, stats.std - target.std


def _not_converged(err_mean: torch.Tensor, err_std: torch.Tensor, tolerance: float) -> List[Dict[str, Any]]:
    bad = []
    n_layer, n_stage, n_head = err_mean.shape
    for layer in range(n_layer):
        for si in range(n_stage):
            for head in range(n_head):
                em, es = err_mean[layer, si, head].item(), err_std[layer, si, head].item()
                if not (abs(em) < tolerance and abs(es) < tolerance):
                    bad.append({"layer": layer, "head": head, "stage": SCALER_STAGES[si],
                                "mean_error": em, "std_error": es, "worst_abs_error": max(abs(em), abs(es))})
    return sorted(bad, key=lambda r: -r["worst_abs_error"])


def _history_row(update: int, stats: Statistics, target: Statistics, settings: AdaptSettings
                 ) -> Tuple[Dict[str, float], bool]:
    """One history row (errors after ``update`` updates, the beta of the next one) and whether all converged."""
    err_mean, err_std = _errors(stats, target)
    ok = (err_mean.abs() < settings.tolerance) & (err_std.abs() < settings.tolerance)
    converged = bool(ok.all())
    row = {"iteration": update, "worst_mean_error": err_mean.abs().max().item(),
           "worst_std_error": err_std.abs().max().item(), "converged_scalers": int(ok.sum().item()),
           "total_scalers": ok.numel(), "calibration_loss": stats.loss,
           "beta": settings.beta(update) if update < settings.max_iters and not converged else float("nan")}
    return row, converged


def adapt_scalers(model: nn.Module, batches: Sequence[Batch], target: Statistics, settings: AdaptSettings,
                  cores: Optional[Sequence[AttentionCore]] = None, device: Optional[torch.device] = None,
                  progress: bool = True, on_iteration: Optional[Callable[[Dict[str, float]], None]] = None
                  ) -> AdaptResult:
    """Equation 9 on the model as it is (already switched to the nonlinear cell), in place.

    ``target`` holds the linear model's statistics on the same batches. Returns the history and the
    final state; non-convergence is reported in ``not_converged``, not raised.
    ``on_iteration(row)`` is called with every history row (for logging).
    """
    cores = list(cores) if cores is not None else attention_cores(model)
    scale0, bias0 = get_scalers(cores)
    if scale0.shape != target.mean.shape:
        raise ValueError(f"target statistics have shape {tuple(target.mean.shape)}, the model's scalers "
                         f"{tuple(scale0.shape)} (layers, stages, heads)")
    scale, bias = scale0.clone(), bias0.clone()
    history: List[Dict[str, float]] = []
    bar = tqdm(total=settings.max_iters, desc="adapt", unit="it", disable=not progress or world()[0] != 0)
    update, before = 0, None
    while True:
        stats = measure_statistics(model, batches, cores, device)
        if before is None:
            before = stats
        row, converged = _history_row(update, stats, target, settings)
        history.append(row)
        if on_iteration is not None:
            on_iteration(row)
        bar.set_postfix(mean_err=f"{row['worst_mean_error']:.1e}", std_err=f"{row['worst_std_error']:.1e}",
                        ok=f"{row['converged_scalers']}/{row['total_scalers']}")
        if converged or update >= settings.max_iters:
            break
        scale, bias = equation_9(scale, bias, stats, target, settings.beta(update))
        set_scalers(cores, scale, bias)
        update += 1
        bar.update(1)
    bar.close()
    err_mean, err_std = _errors(stats, target)
    return AdaptResult(converged=converged, updates=update, history=history, target=target, before=before,
                       after=stats, scale_before=scale0, bias_before=bias0, scale_after=scale, bias_after=bias,
                       not_converged=_not_converged(err_mean, err_std, settings.tolerance))
