"""Signal-health diagnostics of the study's models: how much rides on attention, and how the analog
signals use their ranges.

Attention share: the validation loss with every attention core's output replaced (``zero``: by zeros;
``mean``: by that core's per-head, per-feature mean output over the same validation tokens) minus the
loss as is, on fixed validation sequences. Per-sequence mean losses give the paired standard error.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gaincell.attention.config import HW_KINDS
from gaincell.attention.quantize import clamp_quantize
from gaincell.attention.reference import (
    OUTPUT_RANGE,
    dac_inputs,
    hard_sigmoid,
    key_array_product,
    leakage,
    subtile_of_key,
    value_array_product,
    window_mask,
)
from gaincell.config import DiagnoseStage, stage_settings
from gaincell.data import open_tokens
from gaincell.io import atomic_write_json
from gaincell.model import GPT
from gaincell.tracking import Tracker

ABLATIONS = ("zero", "mean")


# --------------------------------------------------------------------------------------------------
# fixed validation sequences and per-sequence losses
# --------------------------------------------------------------------------------------------------
def validation_sequences(tokens: np.ndarray, block_size: int, n_sequences: int) -> torch.Tensor:
    """(N, block_size + 1) int64: ``n_sequences`` non-overlapping windows of ``tokens``, evenly spaced
    from the start (deterministic: the same windows for every model of a study)."""
    span = block_size + 1
    available = len(tokens) // span
    if n_sequences < 1 or n_sequences > available:
        raise ValueError(f"n_sequences={n_sequences}: expected 1..{available} non-overlapping windows of "
                         f"{span} tokens in {len(tokens)} validation tokens")
    stride = (len(tokens) - span) // max(n_sequences - 1, 1) if n_sequences > 1 else 0
    starts = [i * stride for i in range(n_sequences)]
    return torch.stack([torch.from_numpy(np.asarray(tokens[s:s + span], dtype=np.int64)) for s in starts])


def _loss_per_sequence(model: nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    x, y = seqs[:, :-1], seqs[:, 1:]
    logits = model(x)
    logits = logits[0] if isinstance(logits, tuple) else logits
    loss = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
    return loss.double().mean(dim=1)


@torch.no_grad()
def sequence_losses(model: nn.Module, sequences: torch.Tensor, batch_size: int,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """(N,) float64: each sequence's mean next-token loss, nats/token (model in eval mode)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    out = [_loss_per_sequence(model, sequences[i:i + batch_size].to(device)).cpu()
           for i in range(0, len(sequences), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def paired_stats(a: torch.Tensor, b: torch.Tensor) -> Dict[str, float]:
    """Mean of ``a - b`` over sequences and its standard error (sample std / sqrt(N)), in the
    units of a and b; the paired SE excludes training-seed variance."""
    d = (a - b).double()
    n = d.numel()
    se = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "n": int(n)}


# --------------------------------------------------------------------------------------------------
# ablation of every attention core's output
# --------------------------------------------------------------------------------------------------
def _cores(model: nn.Module) -> List[nn.Module]:
    return list(model.attention_cores())  # type: ignore[operator]


@contextlib.contextmanager
def ablated_attention(model: nn.Module, replacement: Sequence[Optional[torch.Tensor]]) -> Iterator[None]:
    """Within the block, core ``i`` returns ``replacement[i]`` broadcast to its output's shape
    (a (H, D) mean, or None for zeros). Forward hooks on ``model.attention_cores()``."""
    with contextlib.ExitStack() as hooks:  # torch's hook handles remove themselves on exit
        for core, value in zip(_cores(model), replacement):
            def hook(module, args, output, value=value):
                if value is None:
                    return torch.zeros_like(output)
                return value.to(output.dtype).view(1, value.shape[0], 1, value.shape[1]).expand_as(output)
            hooks.enter_context(core.register_forward_hook(hook))
        yield


@torch.no_grad()
def core_output_means(model: nn.Module, sequences: torch.Tensor, batch_size: int) -> List[torch.Tensor]:
    """Per core, the (H, D) mean of its output over every position of ``sequences`` (float64)."""
    cores = _cores(model)
    sums: List[Optional[torch.Tensor]] = [None] * len(cores)
    counts = [0] * len(cores)
    with contextlib.ExitStack() as hooks:
        for i, core in enumerate(cores):
            def hook(module, args, output, i=i):
                s = output.detach().double().sum(dim=(0, 2))  # (H, D)
                sums[i] = s if sums[i] is None else sums[i] + s
                counts[i] += output.shape[0] * output.shape[2]
            hooks.enter_context(core.register_forward_hook(hook))
        sequence_losses(model, sequences, batch_size)
    return [s / c for s, c in zip(sums, counts)]  # type: ignore[operator]


def attention_share(model: nn.Module, sequences: torch.Tensor, batch_size: int,
                    base_losses: Optional[torch.Tensor] = None) -> Dict[str, Dict[str, float]]:
    """{ablation: paired stats of (ablated loss - loss as is)} for ``zero`` and ``mean`` ablation,
    nats/token over per-sequence means. ``base_losses`` (from ``sequence_losses``) avoids a pass."""
    base = base_losses if base_losses is not None else sequence_losses(model, sequences, batch_size)
    n_cores = len(_cores(model))
    replacements = {"zero": [None] * n_cores, "mean": core_output_means(model, sequences, batch_size)}
    result = {}
    for name in ABLATIONS:
        with ablated_attention(model, replacements[name]):
            ablated = sequence_losses(model, sequences, batch_size)
        result[name] = paired_stats(ablated, base)
    return result


# --------------------------------------------------------------------------------------------------
# signal health inside the analog attention (recomputed with gaincell.attention's own functions)
# --------------------------------------------------------------------------------------------------
# Fractions per layer and head. *_low / *_high: the scaled input below / above its DAC range (clipped);
# hs_zero / hs_sat: HardSigmoid outputs (in-window query-key pairs) at 0 / at 1; readout_zero /
# readout_sat: sub-tile readouts (query, sub-tile holding at least one of its keys) that the ADC rounds
# to 0 / that reach its +-1 range; output_zero: attention outputs (before the output scaler) exactly 0.
FRACTIONS = ("q_low", "q_high", "k_low", "k_high", "v_low", "v_high", "hs_zero", "hs_sat",
             "readout_zero", "readout_sat", "output_zero")


def scaled_inputs(core: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q~, k~, v~ = a x + b with the core's per-head input scalers (eq. 8), float32."""
    out = []
    for stage, x in (("q", q), ("k", k), ("v", v)):
        a = getattr(core, f"{stage}_scale").detach().float().view(1, -1, 1, 1)
        b = getattr(core, f"{stage}_bias").detach().float().view(1, -1, 1, 1)
        out.append(a * x.float() + b)
    return out


def _level_counts(x: torch.Tensor, levels: Optional[int], hi: float) -> Optional[torch.Tensor]:
    """(H, levels) counts of the DAC level index of every element of x (B, H, T, D), x on the level grid."""
    if levels is None:
        return None
    index = torch.round(x * ((levels - 1) / hi)).long().clamp(0, levels - 1)
    flat = index.transpose(0, 1).reshape(x.shape[1], -1)
    return torch.stack([torch.bincount(row, minlength=levels) for row in flat]).double()


def signal_counts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg) -> Dict[str, torch.Tensor]:
    """Counts behind ``FRACTIONS`` (each name: (H,) hits, and ``<name>_of``: (H,) totals) and the DAC
    level occupancy (``q_levels`` (H, 16), ``k_levels`` / ``v_levels`` (H, 8)) for scaled inputs
    q~, k~, v~ (B, H, T, D) of one analog head configuration ``cfg`` (an AnalogAttentionConfig)."""
    def per_head(mask: torch.Tensor) -> torch.Tensor:
        return mask.transpose(0, 1).reshape(mask.shape[1], -1).double().sum(dim=1)

    counts: Dict[str, torch.Tensor] = {}

    def add(name: str, hits: torch.Tensor, of: torch.Tensor) -> None:
        counts[name], counts[f"{name}_of"] = per_head(hits), per_head(of)

    everything = torch.ones_like(q, dtype=torch.bool)
    for name, x, hi in (("q", q, 1.0), ("k", k, cfg.stored_max), ("v", v, cfg.stored_max)):
        add(f"{name}_low", x < 0, everything)
        add(f"{name}_high", x > hi, everything)
    Q, K, V = dac_inputs(q, k, v, cfg)
    counts["q_levels"] = _level_counts(Q, cfg.query_levels, 1.0)
    counts["k_levels"] = _level_counts(K, cfg.stored_levels, cfg.stored_max)
    counts["v_levels"] = _level_counts(V, cfg.stored_levels, cfg.stored_max)
    t_len = q.shape[-2]
    mask = window_mask(t_len, cfg.window, q.device).expand(*q.shape[:2], t_len, t_len)
    alpha = leakage(t_len, cfg, Q.dtype, q.device)
    P = hard_sigmoid(key_array_product(Q, K - cfg.stored_offset, cfg, alpha), cfg)
    add("hs_zero", (P <= 0) & mask, mask)
    add("hs_sat", (P >= 1) & mask, mask)
    P = torch.where(mask, P, torch.zeros_like(P))
    U = V - cfg.stored_offset
    slot_tile = subtile_of_key(t_len, cfg, q.device)
    y = torch.zeros_like(Q)
    zero_hits = sat_hits = of = torch.zeros(q.shape[1], dtype=torch.float64, device=q.device)
    for r in range(min(cfg.tiles, -(-t_len // cfg.tile_rows))):
        keys = torch.nonzero(slot_tile == r).squeeze(-1)
        A = value_array_product(P[..., keys], U[..., keys, :], cfg, alpha[:, keys])
        read = clamp_quantize(A, cfg.output_levels, *OUTPUT_RANGE)
        y = y + read
        holds = mask[..., keys].any(dim=-1, keepdim=True).expand_as(A)  # (B, H, T, D)
        zero_hits = zero_hits + per_head((read == 0) & holds)
        sat_hits = sat_hits + per_head((A.abs() >= 1) & holds)
        of = of + per_head(holds)
    counts.update(readout_zero=zero_hits, readout_zero_of=of, readout_sat=sat_hits, readout_sat_of=of)
    add("output_zero", y == 0, everything)
    return counts


@torch.no_grad()
def signal_health(model: nn.Module, sequences: torch.Tensor, batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """Per attention core (layer): ``{fraction name: (H,) fraction, q_levels/k_levels/v_levels: (H, n)
    occupancy fractions}`` over ``sequences``; empty dicts for softmax layers."""
    cores = _cores(model)
    totals: List[Dict[str, torch.Tensor]] = [{} for _ in cores]
    with contextlib.ExitStack() as hooks:
        for i, core in enumerate(cores):
            if getattr(core, "kind", "softmax") not in HW_KINDS:
                continue

            def pre_hook(module, args, i=i):
                q, k, v = scaled_inputs(module, *args[:3])
                for name, c in signal_counts(q, k, v, module.analog).items():
                    if c is not None:
                        totals[i][name] = totals[i][name] + c.cpu() if name in totals[i] else c.cpu()
            hooks.enter_context(core.register_forward_pre_hook(pre_hook))
        sequence_losses(model, sequences, batch_size)
    result = []
    for layer_totals in totals:
        out = {name: layer_totals[name] / layer_totals[f"{name}_of"].clamp_min(1) for name in FRACTIONS
               if name in layer_totals}
        for name in ("q_levels", "k_levels", "v_levels"):
            if name in layer_totals:
                c = layer_totals[name]
                out[name] = c / c.sum(dim=1, keepdim=True).clamp_min(1)
        result.append(out)
    return result


def level_bits(occupancy: torch.Tensor) -> torch.Tensor:
    """Entropy (bits) of each row of a level-occupancy table: log2(levels) when every level is used
    equally, 0 when one level takes everything."""
    p = occupancy.double()
    return -(torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p))).sum(dim=-1)


def health_rows(health: List[Dict[str, torch.Tensor]]) -> List[Dict[str, object]]:
    """Long rows (one per layer and head) of ``signal_health``'s result: every fraction, the level
    occupancies (lists) and their entropy in bits."""
    rows = []
    for layer, values in enumerate(health):
        if not values:
            continue
        for head in range(len(values["q_low"])):
            row: Dict[str, object] = {"layer": layer, "head": head}
            row.update({name: float(values[name][head]) for name in FRACTIONS})
            for name in ("q_levels", "k_levels", "v_levels"):
                if name in values:
                    row[name] = [float(x) for x in values[name][head]]
                    row[name.replace("levels", "bits")] = float(level_bits(values[name][head]))
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------
def run(cfg) -> Dict[str, object]:
    """``python -m gaincell diagnose +stage.name=<run> +stage.checkpoint=<path>``: per-sequence validation
    losses, attention share (zero and mean ablation) and, for hardware models, the signal health per
    layer and head. Writes ``results/<profile>/diagnose/<run>.json`` and logs a summary to W&B."""
    stage = stage_settings(cfg, DiagnoseStage)
    if not stage.name or not stage.checkpoint:
        raise ValueError("diagnose: +stage.name and +stage.checkpoint are required")
    name, checkpoint = stage.name, Path(stage.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"diagnose: checkpoint {checkpoint} not found (+stage.checkpoint)")
    d = cfg.diagnose
    threads = int(cfg.train.get("threads", 0) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    model = GPT.from_checkpoint(str(checkpoint)).float().eval()
    for core in model.attention_cores():
        core.implementation = str(cfg.attention.implementation)
    kinds = sorted({c.kind for c in model.attention_cores()})
    seqs = validation_sequences(open_tokens(str(cfg.data.data_dir), "val"), model.config.block_size,
                                int(d.sequences))
    bs = int(d.batch_size)
    base = sequence_losses(model, seqs, bs)
    n_share = min(int(d.share_sequences), len(seqs))
    share = attention_share(model, seqs[:n_share], bs, base_losses=base[:n_share])
    hardware = any(k in HW_KINDS for k in kinds)
    health = health_rows(signal_health(model, seqs[:int(d.health_sequences)], bs)) if hardware else []
    record = {"name": name, "checkpoint": str(checkpoint), "attention": kinds, "block_size": model.config.block_size,
              "sequences": len(seqs), "val_loss": float(base.mean()), "sequence_losses": base.tolist(),
              "share_sequences": n_share, "attention_share": share,
              "health_sequences": int(d.health_sequences) if hardware else 0, "health": health}
    atomic_write_json(Path(str(cfg.results_dir)) / "diagnose" / f"{name}.json", record)
    tracker = Tracker(cfg, run_name=f"diagnose_{name}", job_type="diagnose")
    summary = {"val_loss": record["val_loss"], "share_zero": share["zero"]["mean"],
               "share_zero_se": share["zero"]["se"], "share_mean": share["mean"]["mean"]}
    for field in FRACTIONS:
        if health:
            summary[f"mean_{field}"] = float(np.mean([row[field] for row in health]))
    tracker.summary(summary)
    tracker.finish()
    print(f"diagnose {name}: val loss {record['val_loss']:.4f} over {len(seqs)} sequences; attention share "
          f"{share['zero']['mean']:.3f} +- {share['zero']['se']:.3f} (zero), {share['mean']['mean']:.3f} (mean)")
    return record
