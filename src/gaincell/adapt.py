"""Adaptation of a trained linear hardware model onto the nonlinear gain-cell model (spec §11, eq. 9).

The linear intermediate model is trained with the linear cell; the real cell is nonlinear. Rather than
retrain, the per-head scalers around every attention (``q~ = a q + b`` ... ``out = a y + b``, spec §1/§7)
are re-set so that each scaling stage's output has the same mean and standard deviation in the
nonlinear model as in the linear one:

    a <- a * sigma_L / sigma_NL        b <- b + (mu_L - mu_NL)        (damped by beta, 1.0 -> 0.1)

all stages of all layers from one pass over the calibration batches per iteration, until every
``|mu_NL - mu_L|`` and ``|sigma_NL - sigma_L|`` is below the tolerance (1e-4) or the iteration limit.

Stages (``python -m gaincell <stage> ...``):

* ``adapt`` (:func:`run`), ``+stage.init_from=<linear ckpt>``, ``+stage.name=<output run>`` and
  ``+stage.mode=``: ``adapt`` (default: equation 9), ``map_only`` (switch to the nonlinear cell and
  keep the linear model's scalers: the study's variant 4), or ``evaluate`` (validation loss of any
  checkpoint on the same fixed batches, for the study table). Writes
  ``results/<profile>/checkpoints/<name>/ckpt.pt`` and ``results/<profile>/adapt/<name>/``
  ``{summary.json, history.csv, stats.csv, histograms.csv}`` (mode ``evaluate``: only
  ``results/<profile>/adapt/study/<name>.json``).
* ``leakage_eval`` (:func:`leakage_eval`), one job of a Hydra multirun over
  ``attention.decay_per_step``: validation loss of a trained hardware model (``+stage.init_from``) at
  that leakage, and after ``+stage.finetune_iters`` iterations of fine-tuning at it (the trainer, run
  ``leakage_<value>``, peak learning rate ``+stage.finetune_lr``, default ``train.min_lr``); one JSON per
  value, ``results/<profile>/adapt/leakage/<format(value, 'g')>.json``.

Under ``torchrun`` the calibration batches are split across ranks and the statistics (and losses)
are all-reduced, so every rank computes the same update and ends with identical scalers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from gaincell.attention.module import HW_KINDS, SCALER_STAGES, AttentionCore

log = logging.getLogger(__name__)

MODES = ("adapt", "map_only", "evaluate")
Batch = Tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# the algorithm (independent of files and of the model class: any module holding AttentionCores)
# --------------------------------------------------------------------------------------------------
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


def _loss_from_output(out: Any) -> torch.Tensor:
    """The scalar loss of ``model(idx, targets)``: a (logits, loss) tuple, an object with .loss, or the loss."""
    if isinstance(out, (tuple, list)):
        out = out[1]
    elif hasattr(out, "loss"):
        out = out.loss
    if not (isinstance(out, torch.Tensor) and out.dim() == 0):
        raise TypeError("model(idx, targets) must return the scalar loss (alone, as .loss, or second of a tuple)")
    return out


def _world() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if _world()[1] > 1:
        dist.barrier()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if _world()[1] > 1:
        # NCCL needs the tensor on the rank's GPU; gloo takes CPU tensors.
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        buf = t.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        t = buf.cpu()
    return t


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
    n_layer, n_head = len(cores), cores[0].n_head
    sum_mean = torch.zeros(n_layer, len(SCALER_STAGES), n_head, dtype=torch.float64)
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
            loss = _loss_from_output(model(x, y))
            for layer, core in enumerate(cores):
                for si, stage in enumerate(SCALER_STAGES):
                    if stage not in core.captured:
                        raise RuntimeError(f"layer {layer} recorded no '{stage}' statistics: its attention kind "
                                           f"is {core.kind!r}; adaptation needs a hardware kind {HW_KINDS}")
                    mu, sd = core.captured[stage]
                    mu, sd = mu.double().cpu(), sd.double().cpu()
                    sum_mean[layer, si] += mu
                    sum_sq[layer, si] += sd * sd + mu * mu
            counts[0] += 1
            counts[1] += float(loss)
    finally:
        for core in cores:
            core.capture_stats = False
            core.captured = {}
        model.train(was_training)
    packed = _all_reduce_sum(torch.cat([sum_mean.flatten(), sum_sq.flatten(), counts]))
    n = packed[-2].item()
    if n == 0:
        raise ValueError("no calibration batches: every rank had an empty share")
    k = sum_mean.numel()
    mean = packed[:k].view_as(sum_mean) / n
    second = packed[k:2 * k].view_as(sum_mean) / n
    std = (second - mean * mean).clamp_min(0.0).sqrt()
    return Statistics(mean=mean, std=std, loss=packed[-1].item() / n)


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence[Batch], device: Optional[torch.device] = None) -> float:
    """Mean cross-entropy (nats/token) over ``batches`` (this rank's share), all-reduced across ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    try:
        for x, y in batches:
            if device is not None:
                x, y = x.to(device), y.to(device)
            total[0] += float(_loss_from_output(model(x, y)))
            total[1] += 1
    finally:
        model.train(was_training)
    total = _all_reduce_sum(total)
    if total[1] == 0:
        raise ValueError("no evaluation batches")
    return (total[0] / total[1]).item()


@torch.no_grad()
def batch_losses(model: nn.Module, batches: Sequence[Batch], device: Optional[torch.device] = None) -> List[float]:
    """Loss of every one of ``batches`` (the full list, identical on every rank; each rank computes its
    share ``rank::world``). Keeping them per batch allows paired comparisons between variants measured
    on the same batches (``paired_difference``)."""
    rank, world = _world()
    was_training = model.training
    model.eval()
    out = torch.zeros(len(batches), dtype=torch.float64)
    try:
        for i in range(rank, len(batches), world):
            x, y = batches[i]
            if device is not None:
                x, y = x.to(device), y.to(device)
            out[i] = float(_loss_from_output(model(x, y)))
    finally:
        model.train(was_training)
    return _all_reduce_sum(out).tolist()


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
    """mean(a - b) and its standard error over batches (a and b measured on the same batches)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


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


def adapt_scalers(model: nn.Module, batches: Sequence[Batch], target: Statistics, settings: AdaptSettings,
                  cores: Optional[Sequence[AttentionCore]] = None, device: Optional[torch.device] = None,
                  progress: bool = True, on_iteration=None) -> AdaptResult:
    """Equation 9 on the model as it is (already switched to the nonlinear cell), in place.

    ``target`` holds the linear model's statistics on the same batches. Returns the history and the
    final state; non-convergence is reported in ``not_converged``, not raised.
    ``on_iteration(row)`` is called with every history row (for logging).
    """
    from tqdm.auto import tqdm

    cores = list(cores) if cores is not None else attention_cores(model)
    scale0, bias0 = get_scalers(cores)
    if scale0.shape != target.mean.shape:
        raise ValueError(f"target statistics have shape {tuple(target.mean.shape)}, the model's scalers "
                         f"{tuple(scale0.shape)} (layers, stages, heads)")
    scale, bias = scale0.clone(), bias0.clone()
    tol = settings.tolerance
    history: List[Dict[str, float]] = []
    before = stats = None
    converged = False
    rank = _world()[0]
    bar = tqdm(total=settings.max_iters, desc="adapt", unit="it", disable=not progress or rank != 0)
    update = 0
    while True:
        stats = measure_statistics(model, batches, cores, device)
        if before is None:
            before = stats
        err_mean, err_std = _errors(stats, target)
        ok = (err_mean.abs() < tol) & (err_std.abs() < tol)
        beta = settings.beta(update)
        row = {"iteration": update, "worst_mean_error": err_mean.abs().max().item(),
               "worst_std_error": err_std.abs().max().item(), "converged_scalers": int(ok.sum().item()),
               "total_scalers": ok.numel(), "calibration_loss": stats.loss,
               "beta": beta if update < settings.max_iters and not bool(ok.all()) else float("nan")}
        history.append(row)
        if on_iteration is not None:
            on_iteration(row)
        bar.set_postfix(mean_err=f"{row['worst_mean_error']:.1e}", std_err=f"{row['worst_std_error']:.1e}",
                        ok=f"{row['converged_scalers']}/{row['total_scalers']}")
        if bool(ok.all()):
            converged = True
            break
        if update >= settings.max_iters:
            break
        # Equation 9. A stage whose nonlinear output is constant (std 0) cannot be rescaled: keep its a.
        ratio = torch.where(stats.std > 0, target.std / stats.std.clamp_min(1e-300), torch.ones_like(scale))
        scale = beta * (scale * ratio) + (1.0 - beta) * scale
        bias = beta * (bias + (target.mean - stats.mean)) + (1.0 - beta) * bias
        set_scalers(cores, scale, bias)
        update += 1
        bar.update(1)
    bar.close()
    err_mean, err_std = _errors(stats, target)
    return AdaptResult(converged=converged, updates=update, history=history, target=target, before=before,
                       after=stats, scale_before=scale0, bias_before=bias0, scale_after=scale, bias_after=bias,
                       not_converged=_not_converged(err_mean, err_std, tol))


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def sample_batches(path: Path, n_batches: int, batch_size: int, block_size: int, seed: int,
                   vocab_size: Optional[int] = None) -> List[Batch]:
    """``n_batches`` fixed (x, y) batches of ``block_size`` tokens from a uint16 token file.

    The offsets depend only on ``seed``: every pass (linear, each iteration, every variant) sees the
    same tokens. Tokens >= ``vocab_size`` (data tokenized for another model) are an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} does not exist: run the prepare_data stage first")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if len(data) < block_size + 2:
        raise ValueError(f"{path} holds {len(data)} tokens, fewer than one sequence of block_size={block_size}")
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        starts = rng.integers(0, len(data) - block_size - 1, size=batch_size)
        chunk = np.stack([np.asarray(data[s:s + block_size + 1], dtype=np.int64) for s in starts])
        if vocab_size is not None and int(chunk.max()) >= vocab_size:
            raise ValueError(f"{path} contains token id {int(chunk.max())} but the model's vocabulary has "
                             f"{vocab_size} entries: the calibration data was tokenized for another model")
        t = torch.from_numpy(chunk)
        batches.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
    return batches


def check_vocabulary(meta_path: Path, model_vocab: int) -> int:
    """The data's vocabulary size from meta.json; it must be the model's (else: another tokenizer)."""
    meta_path = Path(meta_path)
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist: run the prepare_data stage first")
    data_vocab = int(json.loads(meta_path.read_text())["vocab_size"])
    if data_vocab != model_vocab:
        raise ValueError(f"calibration data vocabulary is {data_vocab} tokens ({meta_path}) but the model's is "
                         f"{model_vocab}: the checkpoint was trained on another tokenizer")
    return data_vocab


# --------------------------------------------------------------------------------------------------
# value histograms for the before/after figure (paper Fig. 4b)
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def capture_values(model: nn.Module, cores: Sequence[AttentionCore], batch: Batch, layers: Sequence[int],
                   head: int, max_values: int = 100_000, device: Optional[torch.device] = None
                   ) -> Dict[Tuple[int, str], np.ndarray]:
    """The raw values of each scaling stage's output (one head) for the chosen layers, on one batch."""
    values: Dict[Tuple[int, str], np.ndarray] = {}
    handles = []

    def subsample(t: torch.Tensor) -> np.ndarray:
        flat = t[:, head].detach().float().flatten().cpu().numpy()
        if flat.size > max_values:  # a fixed stride keeps it deterministic
            flat = flat[:: int(math.ceil(flat.size / max_values))]
        return flat

    for layer in layers:
        core = cores[layer]

        def pre_hook(mod, args, kwargs, layer=layer):
            qkv = list(args) + [kwargs[k] for k in ("q", "k", "v") if k in kwargs]
            for stage, x in zip(("q", "k", "v"), qkv[:3]):
                a = getattr(mod, f"{stage}_scale").view(1, -1, 1, 1)
                b = getattr(mod, f"{stage}_bias").view(1, -1, 1, 1)
                values[(layer, stage)] = subsample(a * x + b)

        def post_hook(mod, args, output, layer=layer):
            values[(layer, "out")] = subsample(output)

        handles.append(core.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(core.register_forward_hook(post_hook))
    was_training = model.training
    model.eval()
    try:
        x, y = batch
        if device is not None:
            x, y = x.to(device), y.to(device)
        model(x, y)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return values


def histogram_rows(samples: Dict[str, Dict[Tuple[int, str], np.ndarray]], head: int, bins: int) -> List[Dict]:
    """Long-format density rows; the bin edges of each (layer, stage) span the linear model's values."""
    rows = []
    for (layer, stage), ref in samples["linear"].items():
        lo, hi = np.percentile(ref, [0.1, 99.9])
        pad = 0.25 * (hi - lo) if hi > lo else 1.0
        edges = np.linspace(lo - pad, hi + pad, bins + 1)
        for model_name, by_key in samples.items():
            vals = by_key.get((layer, stage))
            if vals is None:
                continue
            dens, _ = np.histogram(np.clip(vals, edges[0], edges[-1]), bins=edges, density=True)
            for i in range(bins):
                rows.append({"layer": layer, "head": head, "stage": stage, "model": model_name,
                             "bin_left": edges[i], "bin_right": edges[i + 1], "density": dens[i]})
    return rows


# --------------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------------
def _results_dir(cfg) -> Path:
    return Path(str(cfg.results_dir))


def _stage_get(cfg, key: str, default: Any = None) -> Any:
    stage = cfg.get("stage") or {}
    return stage.get(key, default) if hasattr(stage, "get") else default


def resolve_checkpoint(cfg, spec: Optional[str]) -> Path:
    """``+stage.init_from``: a checkpoint file, a run folder, or a run name under checkpoints/."""
    if not spec:
        raise ValueError("+stage.init_from is required: the checkpoint (file, folder or run name) to start from")
    p = Path(str(spec))
    candidates = [p, p / "final.pt", p / "ckpt.pt"]
    run_dir = _results_dir(cfg) / "checkpoints" / str(spec)
    candidates += [run_dir / "final.pt", run_dir / "ckpt.pt"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"+stage.init_from={spec!r}: no checkpoint found (tried {', '.join(map(str, candidates))})")


def _setup_distributed(cfg):
    """The trainer's device choice and torchrun process group (``gaincell.train.setup_distributed``)."""
    from gaincell.train import setup_distributed

    return setup_distributed(str(cfg.train.device))


def _teardown_distributed(env) -> None:
    import torch.distributed as dist

    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _set_threads(cfg) -> None:
    threads = int(cfg.train.get("threads", 0) or 0)
    if threads > 0:
        torch.set_num_threads(threads)


def _core_kinds(cores: Sequence[AttentionCore]) -> List[str]:
    return sorted({c.kind for c in cores})


def _load_model(path: Path, device: torch.device, implementation: str = "auto"):
    """The checkpoint's model in float32 eval mode; the attention implementation is the config's (as in
    the trainer): every implementation computes the same function, at different speeds."""
    from gaincell.model import GPT

    model = GPT.from_checkpoint(str(path), map_location="cpu")
    model.config.attention_implementation = implementation
    for core in model.attention_cores():
        core.implementation = implementation
    return model.to(device).float().eval()


def _nonlinear_config(cfg, current):
    """The checkpoint's hardware settings with the nonlinear cell of ``cfg.attention.coefficients``."""
    from gaincell.attention.config import resolve_coefficients

    coeffs = resolve_coefficients(cfg.attention.coefficients, str(cfg.attention.fitted_coefficients_path))
    if coeffs is None:
        raise ValueError("attention.coefficients is None: adaptation needs the nonlinear cell "
                         "(attention.coefficients=paper, fitted or ten numbers)")
    return dataclasses.replace(current, coefficients=coeffs)


def _save_adapted(model, path: Path, extra: Dict[str, Any]) -> None:
    """The model in the trainer's checkpoint format (``GPT.from_checkpoint`` reads it) plus ``extra``."""
    from gaincell.io import atomic_save_torch

    state = model.checkpoint_state()
    state.update(extra)
    atomic_save_torch(state, path)


def _stats_rows(cores, result: AdaptResult) -> List[Dict[str, Any]]:
    rows = []
    t, b, a = result.target, result.before, result.after
    for layer in range(t.mean.shape[0]):
        for si, stage in enumerate(SCALER_STAGES):
            for head in range(t.mean.shape[2]):
                i = (layer, si, head)
                em, es = a.mean[i].item() - t.mean[i].item(), a.std[i].item() - t.std[i].item()
                rows.append({
                    "layer": layer, "head": head, "stage": stage,
                    "mean_linear": t.mean[i].item(), "std_linear": t.std[i].item(),
                    "mean_before": b.mean[i].item(), "std_before": b.std[i].item(),
                    "mean_after": a.mean[i].item(), "std_after": a.std[i].item(),
                    "scale_before": result.scale_before[i].item(), "bias_before": result.bias_before[i].item(),
                    "scale_after": result.scale_after[i].item(), "bias_after": result.bias_after[i].item(),
                    "mean_error_after": em, "std_error_after": es,
                })
    return rows


def run(cfg) -> Dict[str, Any]:
    """The ``adapt`` stage (see the module docstring for modes and outputs). Returns the summary."""
    import pandas as pd

    from gaincell.io import atomic_to_csv, atomic_write_json

    mode = str(_stage_get(cfg, "mode", "adapt"))
    if mode not in MODES:
        raise ValueError(f"+stage.mode={mode!r}: expected one of {MODES}")
    source = resolve_checkpoint(cfg, _stage_get(cfg, "init_from"))
    name = _stage_get(cfg, "name") or (source.parent.name if mode == "evaluate" else None)
    if not name:
        raise ValueError("+stage.name is required: the run name of the adapted model (checkpoints/<name>/ckpt.pt)")
    name = str(name)
    settings = AdaptSettings(tolerance=float(cfg.adapt.tolerance), max_iters=int(cfg.adapt.max_iters),
                             damping_start=float(cfg.adapt.damping_start), damping_end=float(cfg.adapt.damping_end),
                             damping_iters=int(cfg.adapt.damping_iters))
    _set_threads(cfg)
    env = _setup_distributed(cfg)
    device, rank, world = env.device, env.rank, env.world_size
    torch.manual_seed(int(cfg.seed))
    results = _results_dir(cfg)
    out_dir = results / "adapt" / name
    try:
        model = _load_model(source, device, str(cfg.attention.implementation))
        cores = attention_cores(model)
        kinds = _core_kinds(cores)
        if mode != "evaluate" and kinds != ["linear_hw"]:
            raise ValueError(f"{source} holds a model with attention {kinds}; adaptation starts from a linear "
                             f"hardware model (a checkpoint trained with attention=linear_hw)")
        data_dir = Path(str(cfg.data.data_dir))
        vocab = int(model.config.vocab_size)
        check_vocabulary(data_dir / "meta.json", vocab)
        block = int(model.config.block_size)
        bs = int(cfg.adapt.batch_size)
        val_all = sample_batches(data_dir / "val.bin", int(cfg.adapt.eval_batches), bs, block,
                                 seed=int(cfg.seed) + 1, vocab_size=vocab)
        summary: Dict[str, Any] = {"name": name, "mode": mode, "source": str(source), "profile": str(cfg.profile),
                                   "attention_kinds_source": kinds, "world_size": world,
                                   "eval_batches": len(val_all), "batch_size": bs, "block_size": block}
        if mode == "evaluate":
            losses = batch_losses(model, val_all, device)
            loss = float(np.mean(losses))
            summary.update(val_loss=loss, val_ppl=math.exp(loss), val_batch_losses=losses)
            log.info("%s: validation loss %.4f (ppl %.2f)", name, loss, math.exp(loss))
            if rank == 0:
                atomic_write_json(results / "adapt" / "study" / f"{name}.json", summary)
            return summary

        cal_all = sample_batches(data_dir / "train.bin", int(cfg.adapt.calibration_batches), bs, block,
                                 seed=int(cfg.seed), vocab_size=vocab)
        cal = cal_all[rank::world]
        hist_layers = sorted({0, len(cores) - 1})
        hist_head, bins = 0, int(cfg.adapt.histogram_bins)
        samples: Dict[str, Dict] = {}
        # 1. targets: the linear model
        target = measure_statistics(model, cal, cores, device)
        losses_linear = batch_losses(model, val_all, device)
        samples["linear"] = capture_values(model, cores, cal_all[0], hist_layers, hist_head, device=device)
        # 2. the nonlinear cell, same weights and scalers
        linear_cfg = cores[0].analog
        nl_cfg = _nonlinear_config(cfg, linear_cfg)
        model.set_attention("nonlinear_hw", nl_cfg)
        losses_mapped = batch_losses(model, val_all, device)
        samples["before"] = capture_values(model, cores, cal_all[0], hist_layers, hist_head, device=device)
        tracker = _tracker(cfg, name, rank)
        adapt_settings = settings if mode == "adapt" else dataclasses.replace(settings, max_iters=0)

        def on_iteration(row):
            if tracker is not None:
                tracker.log({f"adapt/{k}": v for k, v in row.items() if k != "iteration"}, step=row["iteration"])

        result = adapt_scalers(model, cal, target, adapt_settings, cores, device, on_iteration=on_iteration)
        losses_after = batch_losses(model, val_all, device) if mode == "adapt" else losses_mapped
        val_linear, val_mapped, val_after = (float(np.mean(v)) for v in (losses_linear, losses_mapped, losses_after))
        gain, gain_se = paired_difference(losses_mapped, losses_after)
        if mode == "adapt":
            samples["after"] = capture_values(model, cores, cal_all[0], hist_layers, hist_head, device=device)
        last = result.history[-1]
        summary.update({
            "coefficients": list(nl_cfg.coefficients), "coefficient_set": _coefficient_set_name(cfg),
            "folded_coefficients": list(nl_cfg.folded_coefficients),
            "tolerance": settings.tolerance, "max_iters": adapt_settings.max_iters,
            "damping": [settings.damping_start, settings.damping_end, settings.damping_iters],
            "calibration_batches": len(cal_all), "calibration_tokens": len(cal_all) * bs * block,
            "converged": result.converged if mode == "adapt" else None, "iterations": result.updates,
            "total_scalers": last["total_scalers"], "converged_scalers": last["converged_scalers"],
            "worst_mean_error": last["worst_mean_error"], "worst_std_error": last["worst_std_error"],
            "worst_mean_error_before": result.history[0]["worst_mean_error"],
            "worst_std_error_before": result.history[0]["worst_std_error"],
            "calibration_loss_linear": target.loss, "calibration_loss_before": result.before.loss,
            "calibration_loss_after": result.after.loss,
            "val_loss_linear": val_linear, "val_ppl_linear": math.exp(val_linear),
            "val_loss_mapped": val_mapped, "val_ppl_mapped": math.exp(val_mapped),
            "val_loss": val_after, "val_ppl": math.exp(val_after), "val_batch_losses": losses_after,
            "val_batch_losses_linear": losses_linear, "val_batch_losses_mapped": losses_mapped,
            "adaptation_gain": gain, "adaptation_gain_se": gain_se,  # mapped - adapted, paired over batches
            "not_converged": result.not_converged[:50], "not_converged_count": len(result.not_converged),
        })
        if mode == "adapt" and not result.converged:
            worst = result.not_converged[0]
            log.warning("adaptation did not converge in %d iterations: %d of %d scalers outside %.1e, worst "
                        "layer %d head %d stage %s (mean error %.2e, std error %.2e)", result.updates,
                        len(result.not_converged), last["total_scalers"], settings.tolerance, worst["layer"],
                        worst["head"], worst["stage"], worst["mean_error"], worst["std_error"])
        if mode == "adapt":
            log.info("%s: %d iterations, converged=%s, worst |dmu| %.2e |dsigma| %.2e (before: %.2e, %.2e); "
                     "val loss linear %.4f, mapped %.4f, adapted %.4f", name, result.updates, result.converged,
                     last["worst_mean_error"], last["worst_std_error"], summary["worst_mean_error_before"],
                     summary["worst_std_error_before"], val_linear, val_mapped, val_after)
        else:
            log.info("%s (map_only, no adaptation): worst |dmu| %.2e |dsigma| %.2e; val loss linear %.4f, "
                     "mapped %.4f", name, last["worst_mean_error"], last["worst_std_error"], val_linear, val_mapped)
        if rank == 0:
            ckpt_path = results / "checkpoints" / name / "ckpt.pt"
            _save_adapted(model, ckpt_path, extra={"adapt": {k: summary[k] for k in (
                "mode", "source", "converged", "iterations", "val_loss", "coefficient_set")}})
            atomic_to_csv(pd.DataFrame(result.history), out_dir / "history.csv")
            atomic_to_csv(pd.DataFrame(_stats_rows(cores, result)), out_dir / "stats.csv")
            atomic_to_csv(pd.DataFrame(histogram_rows(samples, hist_head, bins)), out_dir / "histograms.csv")
            atomic_write_json(out_dir / "summary.json", summary)
        if tracker is not None:
            tracker.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
            tracker.finish()
        return summary
    finally:
        _teardown_distributed(env)


def _coefficient_set_name(cfg) -> str:
    c = cfg.attention.coefficients
    return c if isinstance(c, str) else "custom"


def _tracker(cfg, name: str, rank: int):
    """W&B + CSV log of the iterations (``logs/tracking/adapt/adapt_<name>.csv``), rank 0 only."""
    if rank != 0:
        return None
    from gaincell.tracking import Tracker

    return Tracker(cfg, run_name=f"adapt_{name}", job_type="adapt")


def leakage_tag(value: float) -> str:
    """File name of one leakage value (``format(value, 'g')``: 0, 1.56e-07, 0.000156, 0.1)."""
    return format(float(value), "g")


def leakage_eval(cfg) -> Dict[str, Any]:
    """One job of the leakage sweep (``--multirun attention.decay_per_step=...``), see the module docstring."""
    from omegaconf import OmegaConf, open_dict

    from gaincell.io import atomic_write_json

    value = float(cfg.attention.decay_per_step)
    tag = leakage_tag(value)
    source = resolve_checkpoint(cfg, _stage_get(cfg, "init_from"))
    finetune_iters = int(_stage_get(cfg, "finetune_iters", 0) or 0)
    if finetune_iters < 0:
        raise ValueError(f"+stage.finetune_iters={finetune_iters}: expected an integer >= 0")
    finetune_lr = float(_stage_get(cfg, "finetune_lr", None) or cfg.train.min_lr)
    if not finetune_lr > 0:
        raise ValueError(f"+stage.finetune_lr={finetune_lr}: expected a positive learning rate")
    _set_threads(cfg)
    env = _setup_distributed(cfg)
    device, rank = env.device, env.rank
    results = _results_dir(cfg)
    try:
        model = _load_model(source, device, str(cfg.attention.implementation))
        cores = attention_cores(model)
        kinds = _core_kinds(cores)
        if len(kinds) != 1 or kinds[0] not in HW_KINDS:
            raise ValueError(f"{source} holds attention {kinds}: the leakage study needs a hardware model "
                             f"({' or '.join(HW_KINDS)}); softmax models have no stored charge to leak")
        kind = kinds[0]
        hw = dataclasses.replace(cores[0].analog, decay_per_step=value)
        model.set_attention(kind, hw)
        data_dir = Path(str(cfg.data.data_dir))
        vocab = int(model.config.vocab_size)
        check_vocabulary(data_dir / "meta.json", vocab)
        val_all = sample_batches(data_dir / "val.bin", int(cfg.adapt.eval_batches), int(cfg.adapt.batch_size),
                                 int(model.config.block_size), seed=int(cfg.seed) + 1, vocab_size=vocab)
        losses = batch_losses(model, val_all, device)
        loss = float(np.mean(losses))
        row: Dict[str, Any] = {
            "decay_per_step": value, "kind": kind, "source": str(source),
            "window": hw.window, "attenuation_at_window": math.exp(-value * (hw.window - 1)),
            "val_loss": loss, "val_ppl": math.exp(loss), "val_batch_losses": losses, "finetune_iters": finetune_iters,
            "val_loss_finetuned": None, "val_ppl_finetuned": None, "finetune_run": None,
            "finetune_lr": finetune_lr if finetune_iters else None,
        }
        log.info("leakage %s: %s model from %s, validation loss %.4f", tag, kind, source, loss)
        if finetune_iters > 0:
            from gaincell import train
            from gaincell.model import CheckpointError

            run_name = f"leakage_{tag}"
            ft = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
            with open_dict(ft):
                ft.attention.kind = kind
                if kind == "nonlinear_hw":  # keep the checkpoint's cell whatever the config says
                    ft.attention.coefficients = list(hw.coefficients)
                ft.stage.name = run_name
                ft.stage.init_from = str(source)
                ft.train.max_iters = finetune_iters
                ft.train.lr_decay_iters = finetune_iters
                # a brief fine-tune of a converged model: start from the learning rate its schedule ended
                # at (train.min_lr), not the peak, which would first knock it out of its minimum
                ft.train.learning_rate = finetune_lr
                ft.train.min_lr = finetune_lr / 10
                ft.train.warmup_iters = max(finetune_iters // 10, 1)
                ft.train.eval_interval = finetune_iters
                ft.train.checkpoint_interval = finetune_iters
            del model
            try:  # resumes this sub-run's own checkpoint if a previous sweep was killed
                train.run(ft)
            except CheckpointError as err:
                # a finished or partial fine-tune of another configuration (other source, settings):
                # this stage owns the leakage_<value> runs, so it starts that one afresh
                log.warning("leakage %s: %s; restarting the fine-tuning run from %s", tag, err, source)
                env = _setup_distributed(cfg)
                if rank == 0:
                    shutil.rmtree(results / "checkpoints" / run_name, ignore_errors=True)
                _barrier()
                train.run(ft)
            # train.run leaves the process group destroyed under torchrun: join it again
            env = _setup_distributed(cfg)
            tuned = resolve_checkpoint(cfg, str(results / "checkpoints" / run_name))
            model = _load_model(tuned, device, str(cfg.attention.implementation))
            model.set_attention(kind, hw)
            losses_ft = batch_losses(model, val_all, device)
            loss_ft = float(np.mean(losses_ft))
            row.update(val_loss_finetuned=loss_ft, val_ppl_finetuned=math.exp(loss_ft), finetune_run=run_name,
                       val_batch_losses_finetuned=losses_ft)
            log.info("leakage %s: after %d fine-tuning iterations, validation loss %.4f", tag, finetune_iters, loss_ft)
        if rank == 0:
            atomic_write_json(results / "adapt" / "leakage" / f"{tag}.json", row)
        return row
    finally:
        _teardown_distributed(env)
