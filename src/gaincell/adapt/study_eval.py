"""The ``study_eval`` stage: validation loss of one study variant on the study's fixed batches.

    python -m gaincell study_eval +stage.init_from=<checkpoint> [+stage.name=<variant>]

Every variant (paper Table 1 / Fig. 4) is measured on the same ``adapt.eval_batches`` batches of
``val.bin`` that the ``adapt`` stage uses for its linear / mapped / adapted losses, so the losses pair
batch by batch. Writes ``results/<profile>/adapt/study/<name>.json`` (loss, perplexity, per-batch
losses). ``python -m gaincell adapt +stage.mode=evaluate`` is the same stage under its former name.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict

import numpy as np
import torch

from gaincell.adapt.inputs import (
    core_kinds,
    distributed_job,
    fixed_batches,
    load_model,
    resolve_checkpoint,
    results_dir,
)
from gaincell.adapt.losses import batch_losses
from gaincell.config import StudyEvalStage, stage_settings
from gaincell.io import atomic_write_json

log = logging.getLogger(__name__)


def study_eval(cfg: Any, stage: StudyEvalStage | None = None) -> Dict[str, Any]:
    """Measure and write one variant's validation loss; returns the written summary."""
    stage = stage or stage_settings(cfg, StudyEvalStage)
    source = resolve_checkpoint(cfg, stage.init_from)
    name = stage.name or source.parent.name
    with distributed_job(cfg) as env:
        torch.manual_seed(cfg.seed)
        model = load_model(source, env.device, cfg.attention.implementation)
        val = fixed_batches(cfg, model, "val")
        losses = batch_losses(model, val, env.device)
        loss = float(np.mean(losses))
        summary = {"name": name, "mode": "evaluate", "source": str(source), "profile": cfg.profile,
                   "attention_kinds_source": core_kinds(model.attention_cores()), "world_size": env.world_size,
                   "eval_batches": len(val), "batch_size": cfg.adapt.batch_size,
                   "block_size": model.config.block_size,
                   "val_loss": loss, "val_ppl": math.exp(loss), "val_batch_losses": losses}
        log.info("%s: validation loss %.4f (ppl %.2f)", name, loss, math.exp(loss))
        if env.rank == 0:
            atomic_write_json(results_dir(cfg) / "adapt" / "study" / f"{name}.json", summary)
        return summary
