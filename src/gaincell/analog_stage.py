"""Stages of the fully analog transformer (analog projections + gain-cell attention).

``analog_convert``: a trained checkpoint (``+stage.init_from``) with its configured projections made
analog (``projections=analog``) and each tile's input range calibrated on training batches (no weight
changes), saved as ``checkpoints/<+stage.name>/final.pt`` (the study's ``fully_analog``; hardware-aware
training, ``fully_analog_hwa``, continues from it in the ordinary ``train`` stage).

``analog_eval``: validation loss of an analog checkpoint on the study's fixed batches (those of
``adapt +stage.mode=evaluate``), once without inference noise and once per noise seed of
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

from gaincell.adapt import batch_losses, check_vocabulary, resolve_checkpoint, sample_batches
from gaincell.analog_projections import (analog_layers, apply_inference_noise, calibrate_input_ranges,
                                         describe_noise, inference_noise_from_settings, parameters_by_kind,
                                         projection_config_from_dict, set_projections)
from gaincell.io import atomic_save_torch, atomic_write_json
from gaincell.model import GPT

log = logging.getLogger(__name__)


def _stage_get(cfg: Any, key: str, default: Any = None) -> Any:
    stage = cfg.get("stage") or {}
    value = stage.get(key, default) if hasattr(stage, "get") else default
    return default if value is None else value


def _load(path: Path, cfg: Any, device: torch.device) -> GPT:
    """The checkpoint's model in float32 eval mode with the config's attention implementation."""
    model = GPT.from_checkpoint(str(path), map_location="cpu")
    model.config.attention_implementation = str(cfg.attention.implementation)
    for core in model.attention_cores():
        core.implementation = model.config.attention_implementation
    return model.to(device).float().eval()


def _device(cfg: Any) -> torch.device:
    want = str(cfg.train.device)
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


def _threads(cfg: Any) -> None:
    threads = int(cfg.train.get("threads", 0) or 0)
    if threads > 0:
        torch.set_num_threads(threads)


def convert(cfg: Any) -> Path:
    """Stage ``analog_convert`` (see the module docstring); returns the checkpoint written."""
    source = resolve_checkpoint(cfg, _stage_get(cfg, "init_from"))
    name = str(_stage_get(cfg, "name", "") or "")
    if not name:
        raise ValueError("+stage.name is required: the run name of the analog model (checkpoints/<name>/final.pt)")
    projections = projection_config_from_dict(cfg.projections)
    if not projections.analog:
        raise ValueError("analog_convert needs projections=analog (the projections group is 'digital')")
    _threads(cfg)
    torch.manual_seed(int(cfg.seed))
    device = _device(cfg)
    start = time.perf_counter()
    model = _load(source, cfg, device)
    if analog_layers(model):
        raise ValueError(f"{source} already holds analog projections: convert a digital checkpoint")
    set_projections(model, projections)
    model.to(device)
    data_dir = Path(str(cfg.data.data_dir))
    vocab = int(model.config.vocab_size)
    check_vocabulary(data_dir / "meta.json", vocab)
    batches = sample_batches(data_dir / "train.bin", projections.input_range_init_batches, int(cfg.adapt.batch_size),
                             int(model.config.block_size), seed=int(cfg.seed), vocab_size=vocab)
    layers = calibrate_input_ranges(model, [x for x, _ in batches])
    ranges = {n: [round(float(r), 4) for r in layer.input_range.detach()] for n, layer in analog_layers(model)}
    info = {"source": str(source), "layers": layers, "calibration_batches": len(batches),
            "calibration_tokens": len(batches) * int(cfg.adapt.batch_size) * int(model.config.block_size),
            "input_ranges": ranges, **parameters_by_kind(model), "seconds": round(time.perf_counter() - start, 2)}
    out = Path(str(cfg.results_dir)) / "checkpoints" / name / "final.pt"
    state = model.checkpoint_state()
    state.update({"analog_convert": info, "run_name": name})
    atomic_save_torch(state, out)
    log.info("%s: %d analog layers (%d analog weights, %d digital), input ranges calibrated on %d batches -> %s",
             name, layers, info["analog_weights"], info["digital_weights"], len(batches), out)
    print(f"analog_convert[{name}]: {layers} analog layers, input ranges from {len(batches)} batches, "
          f"{info['seconds']} s -> {out}")
    return out


def _seed_losses(source: Path, cfg: Any, device: torch.device, batches: List, noise: Any, seed: int) -> List[float]:
    model = _load(source, cfg, device)
    apply_inference_noise(model, noise, seed)
    return batch_losses(model, batches, device)


def evaluate(cfg: Any) -> Dict[str, Any]:
    """Stage ``analog_eval`` (see the module docstring); returns the summary written."""
    source = resolve_checkpoint(cfg, _stage_get(cfg, "init_from"))
    name = str(_stage_get(cfg, "name", "") or source.parent.name)
    noise = inference_noise_from_settings(cfg.projections)
    _threads(cfg)
    torch.manual_seed(int(cfg.seed))
    device = _device(cfg)
    start = time.perf_counter()
    model = _load(source, cfg, device)
    if not analog_layers(model):
        raise ValueError(f"{source} has no analog projections: evaluate it with adapt +stage.mode=evaluate")
    data_dir = Path(str(cfg.data.data_dir))
    vocab, block, bs = int(model.config.vocab_size), int(model.config.block_size), int(cfg.adapt.batch_size)
    check_vocabulary(data_dir / "meta.json", vocab)
    batches = sample_batches(data_dir / "val.bin", int(cfg.adapt.eval_batches), bs, block,
                             seed=int(cfg.seed) + 1, vocab_size=vocab)  # the study's batches (adapt evaluate)
    noise_free = batch_losses(model, batches, device)
    per_seed = {int(s): _seed_losses(source, cfg, device, batches, noise, int(s)) for s in noise.seeds}
    seed_means = np.array([np.mean(v) for v in per_seed.values()])
    spread = float(seed_means.std(ddof=1)) if len(seed_means) > 1 else float("nan")
    batch_mean = np.mean(np.array(list(per_seed.values())), axis=0)
    summary: Dict[str, Any] = {
        "name": name, "mode": "analog_eval", "source": str(source), "profile": str(cfg.profile),
        "eval_batches": len(batches), "batch_size": bs, "block_size": block,
        "val_loss": float(seed_means.mean()), "val_ppl": math.exp(float(seed_means.mean())),
        "val_loss_spread": spread,  # sample std over the noise seeds (0 would mean no noise was applied)
        "val_loss_seeds": {str(s): float(m) for s, m in zip(per_seed, seed_means)},
        "val_batch_losses": batch_mean.tolist(),  # seed-averaged, on the same batches as every variant
        "val_batch_losses_by_seed": {str(s): v for s, v in per_seed.items()},
        "val_loss_noise_free": float(np.mean(noise_free)), "val_batch_losses_noise_free": noise_free,
        "noise": describe_noise(model.config.projections, noise), **parameters_by_kind(model),
        "seconds": round(time.perf_counter() - start, 2),
    }
    out = Path(str(cfg.results_dir)) / "adapt" / "study" / f"{name}.json"
    atomic_write_json(out, summary)
    print(f"analog_eval[{name}]: val loss {summary['val_loss']:.4f} +- {spread:.4f} (std over {len(seed_means)} "
          f"noise seeds), noise-free {summary['val_loss_noise_free']:.4f}, {summary['seconds']} s -> {out}")
    return summary
