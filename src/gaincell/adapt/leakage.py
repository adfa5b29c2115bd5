"""The ``leakage_eval`` stage: one value of the leakage sweep (Supplementary Fig. 6).

    python -m gaincell leakage_eval --multirun attention.decay_per_step=0,1e-3,1e-2 \\
        +stage.init_from=<hardware ckpt> [+stage.finetune_iters=N] [+stage.finetune_lr=LR]

Validation loss of a trained hardware model at the leakage ``attention.decay_per_step`` (lambda of
eq. 5, per token step), on the study's fixed batches, and after ``finetune_iters`` iterations of
fine-tuning at it (the trainer, run ``leakage_<value>``, peak learning rate ``finetune_lr``, default
``train.min_lr``). One JSON per value: ``results/<profile>/adapt/leakage/<format(value, 'g')>.json``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from gaincell import train
from gaincell.adapt.algorithm import attention_cores
from gaincell.adapt.distributed import barrier
from gaincell.adapt.inputs import (
    core_kinds,
    distributed_job,
    fixed_batches,
    load_model,
    resolve_checkpoint,
    results_dir,
)
from gaincell.adapt.losses import batch_losses
from gaincell.attention.config import HW_KINDS, AnalogAttentionConfig
from gaincell.config import LeakageStage, stage_settings
from gaincell.data import Batch
from gaincell.io import atomic_write_json
from gaincell.model import CheckpointError

log = logging.getLogger(__name__)


def leakage_tag(value: float) -> str:
    """File name of one leakage value (``format(value, 'g')``: 0, 1.56e-07, 0.000156, 0.1)."""
    return format(float(value), "g")


def leakage_eval(cfg: Any) -> Dict[str, Any]:
    """One job of the leakage sweep (``--multirun attention.decay_per_step=...``), see the module docstring."""
    stage = stage_settings(cfg, LeakageStage)
    value = cfg.attention.decay_per_step
    tag = leakage_tag(value)
    source = resolve_checkpoint(cfg, stage.init_from)
    if stage.finetune_iters < 0:
        raise ValueError(f"+stage.finetune_iters={stage.finetune_iters}: expected an integer >= 0")
    finetune_lr = float(stage.finetune_lr or cfg.train.min_lr)
    if not finetune_lr > 0:
        raise ValueError(f"+stage.finetune_lr={finetune_lr}: expected a positive learning rate")
    with distributed_job(cfg) as env:
        model = load_model(source, env.device, cfg.attention.implementation)
        kinds = core_kinds(attention_cores(model))
        if len(kinds) != 1 or kinds[0] not in HW_KINDS:
            raise ValueError(f"{source} holds attention {kinds}: the leakage study needs a hardware model "
                             f"({' or '.join(HW_KINDS)}); softmax models have no stored charge to leak")
        kind = kinds[0]
        hw = dataclasses.replace(model.attention_cores()[0].analog, decay_per_step=value)
        model.set_attention(kind, hw)
        val = fixed_batches(cfg, model, "val")
        losses = batch_losses(model, val, env.device)
        loss = float(np.mean(losses))
        row: Dict[str, Any] = {
            "decay_per_step": value, "kind": kind, "source": str(source),
            "window": hw.window, "attenuation_at_window": math.exp(-value * (hw.window - 1)),
            "val_loss": loss, "val_ppl": math.exp(loss), "val_batch_losses": losses,
            "finetune_iters": stage.finetune_iters,
            "val_loss_finetuned": None, "val_ppl_finetuned": None, "finetune_run": None,
            "finetune_lr": finetune_lr if stage.finetune_iters else None,
        }
        log.info("leakage %s: %s model from %s, validation loss %.4f", tag, kind, source, loss)
        if stage.finetune_iters > 0:
            del model
            row.update(_finetune_and_evaluate(cfg, source, kind, hw, stage.finetune_iters, finetune_lr, val, env))
        if env.rank == 0:
            atomic_write_json(results_dir(cfg) / "adapt" / "leakage" / f"{tag}.json", row)
        return row


def finetune_config(cfg: Any, source: Path, kind: str, hw: AnalogAttentionConfig, iters: int, lr: float,
                    run_name: str) -> DictConfig:
    """The trainer's config of the brief fine-tune at this leakage (run ``run_name``)."""
    ft = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(ft):
        ft.attention.kind = kind
        if kind == "nonlinear_hw":  # keep the checkpoint's cell whatever the config says
            ft.attention.coefficients = list(hw.coefficients)
        ft.stage = {"name": run_name, "init_from": str(source)}
        ft.train.max_iters = iters
        ft.train.lr_decay_iters = iters
        # a brief fine-tune of a converged model: start from the learning rate its schedule ended
        # at (train.min_lr), not the peak, which would first knock it out of its minimum
        ft.train.learning_rate = lr
        ft.train.min_lr = lr / 10
        ft.train.warmup_iters = max(iters // 10, 1)
        ft.train.eval_interval = iters
        ft.train.checkpoint_interval = iters
    return ft


def _finetune_and_evaluate(cfg: Any, source: Path, kind: str, hw: AnalogAttentionConfig, iters: int, lr: float,
                           val: List[Batch], env) -> Dict[str, Any]:
    """Fine-tune at the leakage (run ``leakage_<value>``) and measure the validation loss again."""
    run_name = f"leakage_{leakage_tag(hw.decay_per_step)}"
    ft = finetune_config(cfg, source, kind, hw, iters, lr, run_name)
    try:  # resumes this sub-run's own checkpoint if a previous sweep was killed
        train.run(ft)
    except CheckpointError as err:
        # a finished or partial fine-tune of another configuration (other source, settings):
        # this stage owns the leakage_<value> runs, so it starts that one afresh
        log.warning("leakage %s: %s; restarting the fine-tuning run from %s", run_name, err, source)
        train.setup_distributed(cfg.train.device)
        if env.rank == 0:
            shutil.rmtree(results_dir(cfg) / "checkpoints" / run_name, ignore_errors=True)
        barrier()
        train.run(ft)
    # train.run leaves the process group destroyed under torchrun: join it again
    train.setup_distributed(cfg.train.device)
    tuned = resolve_checkpoint(cfg, str(results_dir(cfg) / "checkpoints" / run_name))
    model = load_model(tuned, env.device, cfg.attention.implementation)
    model.set_attention(kind, hw)
    losses = batch_losses(model, val, env.device)
    loss = float(np.mean(losses))
    log.info("leakage %s: after %d fine-tuning iterations, validation loss %.4f", run_name, iters, loss)
    return {"val_loss_finetuned": loss, "val_ppl_finetuned": math.exp(loss), "finetune_run": run_name,
            "val_batch_losses_finetuned": losses}
