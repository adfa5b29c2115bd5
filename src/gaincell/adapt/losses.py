"""Validation losses of a model on fixed batches, shared by every process of a torchrun job."""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from gaincell.adapt.distributed import all_reduce_sum, world
from gaincell.data import Batch


def loss_from_output(out: Any) -> torch.Tensor:
    """The scalar loss of ``model(idx, targets)``: a (logits, loss) tuple, an object with .loss, or the loss."""
    if isinstance(out, (tuple, list)):
        out = out[1]
    elif hasattr(out, "loss"):
        out = out.loss
    if not (isinstance(out, torch.Tensor) and out.dim() == 0):
        raise TypeError("model(idx, targets) must return the scalar loss (alone, as .loss, or second of a tuple)")
    return out


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
            total[0] += float(loss_from_output(model(x, y)))
            total[1] += 1
    finally:
        model.train(was_training)
    total = all_reduce_sum(total)
    if total[1] == 0:
        raise ValueError("no evaluation batches")
    return (total[0] / total[1]).item()


@torch.no_grad()
def batch_losses(model: nn.Module, batches: Sequence[Batch], device: Optional[torch.device] = None) -> List[float]:
    """Loss of every one of ``batches`` (the full list, identical on every rank; each rank computes its
    share ``rank::world``). Keeping them per batch allows paired comparisons between variants measured
    on the same batches (``paired_difference``)."""
    rank, size = world()
    was_training = model.training
    model.eval()
    out = torch.zeros(len(batches), dtype=torch.float64)
    try:
        for i in range(rank, len(batches), size):
            x, y = batches[i]
            if device is not None:
                x, y = x.to(device), y.to(device)
            out[i] = float(loss_from_output(model(x, y)))
    finally:
        model.train(was_training)
    return all_reduce_sum(out).tolist()


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
    """mean(a - b) and its standard error over batches (a and b measured on the same batches)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se
