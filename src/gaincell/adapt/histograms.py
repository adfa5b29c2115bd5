"""Raw values of each scaling stage's output and their densities, for the before/after figure (Fig. 4b)."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from gaincell.attention.module import AttentionCore
from gaincell.data import Batch


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
