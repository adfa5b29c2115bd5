"""One chip's cell-to-cell gain variation and its readout noise (issue 16 §3), shared by every path.

Two non-idealities of ``AnalogAttentionConfig``, both off (exactly today's arithmetic) at 0:

* ``cell_variation`` sigma: every physical gain cell has its own gain factor ``gamma = 1 + sigma * N(0, 1)``
  that multiplies all of its polynomial terms, c_0 included (the linear cell: its only term, g). The K
  and V arrays of a layer hold one cell per head, ring-buffer row (memory slot) and column, so each
  array's factors are an (H, M, D) tensor; the key t' lives in row ``t' mod M``. The factors are drawn
  once per chip from ``noise_seed`` (in float64 on the CPU, then cast), so every path and device sees
  the same chip, and they are shared across the batch. ``gains_per_key`` lays them out per key.
* ``cell_offset_variation`` sigma: every physical cell also has its own additive offset
  ``delta = sigma * N(0, 1)`` (a per-cell random c_0, units of the folded coefficients): the cell
  computes ``(gamma * sum_i c_i alpha**i W**i + delta) * x``. Same (H, M, D) layout per array, drawn
  once per chip from an independent branch of ``noise_seed``; ``offsets_per_key`` lays them out per key.
* ``readout_noise`` sigma: a Gaussian N(0, sigma^2) added to each sub-tile readout A_r (one per query
  step, sub-tile holding at least one key, and column) before the output ADC clamps it to [-1, 1] and
  quantizes it. Fresh per readout: each call of the attention (or each decoder) takes the next seed of
  a stream that ``noise_seed`` starts; ``reset_readout_noise`` restarts every stream, so the same
  seed gives the same output sequence. The paths draw with different generators, so they agree in
  distribution, not draw by draw.

Models give each layer its own chip and stream: ``layer_config`` derives a layer's seed from the
configured seed and the layer index.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .config import AnalogAttentionConfig

__all__ = ["cell_gains", "gains_per_key", "cell_offsets", "offsets_per_key", "next_readout_seed", "readout_generator", "reset_readout_noise",
           "derive_seed", "layer_config"]

_CHIP_STREAM, _READOUT_STREAM, _LAYER, _OFFSET_STREAM = 0, 1, 2, 3  # independent SeedSequence branches of one noise_seed
_readout_streams: Dict[int, torch.Generator] = {}


def derive_seed(seed: int, *path: int) -> int:
    """A 63-bit seed for the branch ``path`` of ``seed`` (numpy SeedSequence: decorrelated children)."""
    state = np.random.SeedSequence([int(seed), *map(int, path)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def layer_config(cfg: AnalogAttentionConfig, layer_index: int) -> AnalogAttentionConfig:
    """The config of layer ``layer_index``: its own chip and noise stream (seed derived from the
    configured seed and the index). Without variation and noise the seed is unused: ``cfg`` itself."""
    if not cfg.noisy:
        return cfg
    return dataclasses.replace(cfg, noise_seed=derive_seed(cfg.noise_seed, _LAYER, layer_index))


@functools.lru_cache(maxsize=64)
def _chip(seed: int, sigma: float, heads: int, rows: int, columns: int) -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(derive_seed(seed, _CHIP_STREAM))
    shape = (heads, rows, columns)
    gain_k = 1.0 + sigma * torch.randn(shape, generator=generator, dtype=torch.float64)
    gain_v = 1.0 + sigma * torch.randn(shape, generator=generator, dtype=torch.float64)
    return gain_k, gain_v


@functools.lru_cache(maxsize=64)
def _offsets(seed: int, sigma: float, heads: int, rows: int, columns: int) -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(derive_seed(seed, _OFFSET_STREAM))
    shape = (heads, rows, columns)
    offset_k = sigma * torch.randn(shape, generator=generator, dtype=torch.float64)
    offset_v = sigma * torch.randn(shape, generator=generator, dtype=torch.float64)
    return offset_k, offset_v


@functools.lru_cache(maxsize=64)
def _chip_on(seed: int, sigma: float, heads: int, rows: int, columns: int, dtype: torch.dtype,
             device: torch.device, draw=_chip) -> Tuple[torch.Tensor, torch.Tensor]:
    return tuple(g.to(device=device, dtype=dtype) for g in draw(seed, sigma, heads, rows, columns))


def cell_gains(cfg: AnalogAttentionConfig, heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
               device=None) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The chip's gain factors (gamma_K, gamma_V), each (heads, window, head_dim): row s is memory slot
    s of the ring buffer. None when ``cfg.cell_variation == 0``. Cached; do not modify them in place."""
    if cfg.cell_variation == 0:
        return None
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _chip_on(int(cfg.noise_seed), float(cfg.cell_variation), int(heads), cfg.window, int(head_dim),
                    dtype, device)


def cell_offsets(cfg: AnalogAttentionConfig, heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 device=None) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The chip's additive cell offsets (delta_K, delta_V), each (heads, window, head_dim), in units of the
    folded coefficients: row s is memory slot s. None when ``cfg.cell_offset_variation == 0``. Drawn from
    a branch of ``noise_seed`` independent of the gains. Cached; do not modify them in place."""
    if cfg.cell_offset_variation == 0:
        return None
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _chip_on(int(cfg.noise_seed), float(cfg.cell_offset_variation), int(heads), cfg.window, int(head_dim),
                    dtype, device, _offsets)


def offsets_per_key(cfg: AnalogAttentionConfig, heads: int, t_len: int, head_dim: int, dtype: torch.dtype,
                    device=None) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(delta_K, delta_V) of the cells that hold keys 0..t_len-1 (row t' mod M), each (1, heads, T, D);
    None without offsets."""
    offsets = cell_offsets(cfg, heads, head_dim, dtype, device)
    if offsets is None:
        return None
    rows = torch.arange(t_len, device=offsets[0].device) % cfg.window
    return tuple(o[:, rows].unsqueeze(0) for o in offsets)


def gains_per_key(cfg: AnalogAttentionConfig, heads: int, t_len: int, head_dim: int, dtype: torch.dtype,
                  device=None) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(gamma_K, gamma_V) of the cells that hold keys 0..t_len-1 (row t' mod M), each (1, heads, T, D),
    broadcast over the batch; None without variation."""
    gains = cell_gains(cfg, heads, head_dim, dtype, device)
    if gains is None:
        return None
    rows = torch.arange(t_len, device=gains[0].device) % cfg.window
    return tuple(g[:, rows].unsqueeze(0) for g in gains)


def next_readout_seed(cfg: AnalogAttentionConfig) -> int:
    """The next seed of ``cfg.noise_seed``'s readout-noise stream (one per attention call or decoder).

    The stream is a CPU generator: drawing from it never waits for an accelerator."""
    seed = int(cfg.noise_seed)
    stream = _readout_streams.get(seed)
    if stream is None:
        stream = torch.Generator().manual_seed(derive_seed(seed, _READOUT_STREAM))
        _readout_streams[seed] = stream
    return int(torch.randint(0, 2 ** 62, (), generator=stream))


def readout_generator(seed: int, device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (one call's readout-noise draws)."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def reset_readout_noise() -> None:
    """Restart every readout-noise stream: the next calls repeat the draws of a fresh process."""
    _readout_streams.clear()
