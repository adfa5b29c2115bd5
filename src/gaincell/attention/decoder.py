"""Streaming analog attention: the gain-cell K and V arrays as a ring buffer, one token per step.

The hardware runs autoregressively (spec analog-attention.md §6): each step writes the new token's
key and value column into memory slot ``t mod M`` of the K and V arrays (overwriting the oldest key
once the window is full), applies the new query to the K array, turns the charges into pulses, applies
those to the V array and reads each 64-row sub-tile with its own pulse counter before the digital sum.

    from gaincell.attention import AnalogAttentionConfig, AnalogKVDecoder, analog_attention
    decoder = AnalogKVDecoder(cfg, batch=B, heads=H, head_dim=D)
    y_t = decoder.step(q_t, k_t, v_t)   # (B, H, D) each -> (B, H, D)
    # equals analog_attention(q, k, v, cfg)[:, :, t] for the t-th call

Inputs are already scaled (spec §1), as for ``analog_attention``; the output is before the output
scaler (spec §7). State per layer (one decoder holds every head of one layer): stored K and V
(quantized on write, offset removed, with their powers for the nonlinear cell), the write pointer,
and the age of every slot in token steps for leakage (spec §3). A step costs O(B H M D) once the
window is full, independent of how many tokens came before.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import AnalogAttentionConfig
from .quantize import clamp_quantize
from .reference import OUTPUT_RANGE, compute_dtype

__all__ = ["AnalogKVDecoder"]


class AnalogKVDecoder:
    """The K and V gain-cell arrays of one attention layer (every head), stepped one token at a time.

    Args:
        cfg: the hardware config (window M, tile rows, levels, cell model, leakage).
        batch: sequences B decoded together.
        heads: attention heads H.
        head_dim: head dimension D (columns of each array).
        max_steps: optional limit on the number of tokens this decoder may consume (None: unlimited);
            stepping past it is an error (the arrays never need it: they overwrite their oldest slot).
        device, dtype: where and in what precision the array state lives; by default those of the
            first step's inputs (half precision is computed in float32, as in the reference).
        generator: seeds the read noise when ``cfg.read_noise > 0``. The noise has the statistics of the
            parallel computation's but not its draws, so equality with it holds only without noise.
    """

    def __init__(self, cfg: AnalogAttentionConfig, batch: int, heads: int, head_dim: int,
                 max_steps: Optional[int] = None, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, generator: Optional[torch.Generator] = None) -> None:
        if not isinstance(cfg, AnalogAttentionConfig):
            raise TypeError(f"cfg is a {type(cfg).__name__}: expected an AnalogAttentionConfig")
        for name, value in (("batch", batch), ("heads", heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                      or max_steps < 1):
            raise ValueError(f"max_steps={max_steps!r}: expected a positive integer or None")
        self.cfg = cfg
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.max_steps = max_steps
        self.generator = generator
        self._device = torch.device(device) if device is not None else None
        self._dtype = dtype
        c0, c1, c2, c3 = cfg.folded_coefficients
        # Powers i >= 1 of the stored weight that the cell model uses, with their folded c_i (spec §4).
        self._powers = (1,) if not cfg.nonlinear else (1, 2, 3)
        self._c = {0: c0, 1: c1, 2: c2, 3: c3}
        self.steps = 0
        self._allocated = False

    # ------------------------------------------------------------------ state
    @property
    def window(self) -> int:
        return self.cfg.window

    @property
    def filled_slots(self) -> int:
        """Slots holding a key: min(steps, M)."""
        return min(self.steps, self.cfg.window)

    @property
    def write_pointer(self) -> int:
        """The slot the next step writes: steps mod M (spec §6)."""
        return self.steps % self.cfg.window

    def reset(self) -> None:
        """Forget every stored key and value (a new sequence)."""
        self.steps = 0
        if self._allocated:
            self._stored_k.zero_()
            self._stored_v.zero_()
            self._age.zero_()

    def _allocate(self, like: torch.Tensor) -> None:
        device = self._device if self._device is not None else like.device
        # Half-precision inputs are computed in float32, as in the reference.
        dtype = self._dtype if self._dtype is not None else compute_dtype(like.dtype)
        if not dtype.is_floating_point:
            raise TypeError(f"decoder dtype {dtype}: expected a floating-point dtype")
        self._device, self._dtype = device, dtype
        m, n_pow = self.cfg.window, len(self._powers)
        shape = (n_pow, self.batch, self.heads, m, self.head_dim)
        # Stored weights relative to the half-supply offset, W**i and U**i (spec §4, §6), slot-major.
        self._stored_k = torch.zeros(shape, device=device, dtype=dtype)
        self._stored_v = torch.zeros(shape, device=device, dtype=dtype)
        # Token steps since each slot was written (int64: exact for any sequence length).
        self._age = torch.zeros(m, device=device, dtype=torch.long)
        self._allocated = True

    def _check(self, name: str, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} is a {type(x).__name__}: expected a torch.Tensor of shape "
                            f"(batch, heads, head_dim) = {(self.batch, self.heads, self.head_dim)}")
        expected = (self.batch, self.heads, self.head_dim)
        if x.dim() != 3:
            raise ValueError(f"{name} has shape {tuple(x.shape)}: expected one token's (batch, heads, "
                             f"head_dim) = {expected}")
        if x.shape[1] != self.heads:
            raise ValueError(f"{name} has {x.shape[1]} heads (shape {tuple(x.shape)}): this decoder was "
                             f"built for heads={self.heads}")
        if x.shape[2] != self.head_dim:
            raise ValueError(f"{name} has head dimension {x.shape[2]} (shape {tuple(x.shape)}): this "
                             f"decoder was built for head_dim={self.head_dim}")
        if x.shape[0] != self.batch:
            raise ValueError(f"{name} has batch {x.shape[0]} (shape {tuple(x.shape)}): this decoder was "
                             f"built for batch={self.batch}")

    # ------------------------------------------------------------------ one token
    @torch.no_grad()
    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write token t's key and value, apply its query; (B, H, D) each -> y_t (B, H, D)."""
        for name, x in (("q", q), ("k", k), ("v", v)):
            self._check(name, x)
        if self.max_steps is not None and self.steps >= self.max_steps:
            raise RuntimeError(f"step {self.steps + 1} exceeds this decoder's max_steps={self.max_steps}: "
                               f"build it with a larger max_steps (or None), or reset() it")
        if not self._allocated:
            self._allocate(q)
        cfg = self.cfg
        dev, dt = self._device, self._dtype
        out_dtype = q.dtype
        q, k, v = (x.to(device=dev, dtype=dt) for x in (q, k, v))

        # DAC / storage (spec §2), then the write into slot t mod M (spec §6). The arithmetic follows
        # gaincell.attention.reference operation by operation, so that the two agree to the last bit
        # wherever the summation order of the matrix products does not matter.
        query = clamp_quantize(q, cfg.query_levels, 0.0, 1.0)
        w = clamp_quantize(k, cfg.stored_levels, 0.0, cfg.stored_max) - cfg.stored_offset
        u = clamp_quantize(v, cfg.stored_levels, 0.0, cfg.stored_max) - cfg.stored_offset
        slot = self.write_pointer
        self._age += 1  # every stored charge is one step older when the new query reads it
        self._age[slot] = 0
        for n, power in enumerate(self._powers):
            self._stored_k[n, :, :, slot] = w ** power
            self._stored_v[n, :, :, slot] = u ** power
        self.steps += 1

        # Only the sub-tiles that hold keys take part; the slots are filled in order from 0.
        rows = cfg.tile_rows
        filled = self.filled_slots
        tiles = -(-filled // rows)
        active = tiles * rows
        # alpha = exp(-lambda * age), in double then rounded once, as the reference does; alpha^i stacked
        # over the powers so that each array's products for all powers are one batched matmul.
        alpha = torch.exp(-cfg.decay_per_step * self._age[:active].to(torch.float64)).to(dt)
        alpha_pow = torch.stack([alpha ** power if power > 1 else alpha for power in self._powers])
        alpha_pow = alpha_pow.view(len(self._powers), 1, 1, active)

        # First dot product on the K array (spec §4): S[s] = sum_i c_i alpha^i sum_d Q[d] W[s, d]^i.
        qcol = query.unsqueeze(-1)  # (B, H, D, 1)
        dots = torch.matmul(self._stored_k[:, :, :, :active], qcol).squeeze(-1)  # (powers, B, H, active)
        if not cfg.nonlinear:
            charge = (cfg.gain * dots[0]) * alpha_pow[0]
        else:
            charge = self._c[0] * query.sum(-1, keepdim=True)  # the key-independent i = 0 term
            for n, power in enumerate(self._powers):
                charge = charge + (self._c[power] * dots[n]) * alpha_pow[n]
        charge = self._noisy(charge)
        # Charge to pulse (spec §5), masked to the stored keys (slots are filled in order from 0).
        pulse = (charge / cfg.qk_saturation).clamp(0.0, 1.0)
        if filled < active:
            valid = torch.arange(active, device=dev) < filled
            pulse = torch.where(valid, pulse, torch.zeros((), device=dev, dtype=dt))

        # Second dot product per sub-tile (spec §6): A_r[d] = (1/S_sat) sum_i c_i sum_s P alpha^i U^i.
        n_pow = len(self._powers)
        weights = (pulse * alpha_pow).reshape(n_pow, self.batch, self.heads, tiles, 1, rows)
        values = self._stored_v[:, :, :, :active].reshape(n_pow, self.batch, self.heads, tiles, rows,
                                                          self.head_dim)
        products = torch.matmul(weights, values).squeeze(-2)  # (powers, B, H, tiles, D)
        if not cfg.nonlinear:
            readout = (cfg.gain / cfg.av_saturation) * products[0]
        else:
            readout = self._c[0] * pulse.reshape(self.batch, self.heads, tiles, 1, rows).sum(-1)  # i = 0
            for n, power in enumerate(self._powers):
                readout = readout + self._c[power] * products[n]
            readout = readout / cfg.av_saturation
        readout = self._noisy(readout)
        # Each sub-tile's pulse counter (clamp + quantize), then the digital adders.
        y = clamp_quantize(readout, cfg.output_levels, *OUTPUT_RANGE).sum(dim=2)
        return y.to(out_dtype)

    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        """Relative Gaussian read noise on an array output (spec config ``read_noise``; 0: off)."""
        if self.cfg.read_noise == 0:
            return x
        noise = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return x * (1.0 + self.cfg.read_noise * noise)

    def extra_repr(self) -> str:  # pragma: no cover - debugging aid
        return (f"AnalogKVDecoder(batch={self.batch}, heads={self.heads}, head_dim={self.head_dim}, "
                f"window={self.cfg.window}, steps={self.steps})")

    __repr__ = extra_repr

