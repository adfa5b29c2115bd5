"""Streaming analog attention: the gain-cell K and V arrays as a ring buffer, one token per step.

The hardware runs autoregressively (docs/attention.md#second-array-product-and-sub-tiles): each step writes the new token's
key and value column into memory slot ``t mod M`` of the K and V arrays (overwriting the oldest key
once the window is full), applies the new query to the K array, turns the charges into pulses, applies
those to the V array and reads each 64-row sub-tile with its own pulse counter before the digital sum.

    from gaincell.attention import AnalogAttentionConfig, AnalogKVDecoder, analog_attention
    decoder = AnalogKVDecoder(cfg, batch=B, heads=H, head_dim=D)
    y_t = decoder.step(q_t, k_t, v_t)   # (B, H, D) each -> (B, H, D)
    # equals analog_attention(q, k, v, cfg)[:, :, t] for the t-th call

Inputs are already scaled (eq. 8), as for ``analog_attention``; the output is before the output
scaler (eq. 8). State per layer (one decoder holds every head of one layer): stored K and V
(quantized on write, offset removed, with their powers for the nonlinear cell), the write pointer,
and the age of every slot in token steps for leakage (eq. 6). A step costs O(B H M D) once the
window is full, independent of how many tokens came before.

Cell variation (``cfg.cell_variation``): the cells of ring-buffer row s are those of the chip
``cfg.noise_seed`` (``gaincell.attention.noise.cell_gains``), so token t, written to row t mod M, meets
the same cells as key t in ``analog_attention``: with the same config the two agree as without
variation. Readout noise (``cfg.readout_noise``): each step adds fresh Gaussian noise to every read
sub-tile before its ADC, from ``generator`` or a generator seeded from the config's noise stream; the
statistics are the parallel computation's, the draws are not.

NaN inputs are refused without a host synchronisation per step: on CPU at once, on an accelerator a
flag is kept on the device and read by ``check_finite()`` (``gaincell.generate`` calls it once per
prompt and at the end).
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import AnalogAttentionConfig
from .noise import cell_gains, next_readout_seed, readout_generator
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
        generator: draws the readout noise when ``cfg.readout_noise > 0`` (a generator on the state's
            device); None: one seeded from the config's noise stream when the state is allocated.
            The noise has the statistics of the parallel computation's but not its draws.
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
        # Powers i >= 1 of the stored weight that the cell model uses, with their folded c_i (eq. 4).
        self._powers = (1,) if not cfg.nonlinear else (1, 2, 3)
        self._c = {0: c0, 1: c1, 2: c2, 3: c3}
        self.steps = 0
        self._allocated = False
        self._first_nan_step: Optional[torch.Tensor] = None  # on the device: first step with a NaN input, -1

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
        """The slot the next step writes: steps mod M (docs/attention.md#second-array-product-and-sub-tiles)."""
        return self.steps % self.cfg.window

    def reset(self) -> None:
        """Forget every stored key and value (a new sequence); the chip and the noise stream stay."""
        self.steps = 0
        if self._allocated:
            self._stored_k.zero_()
            self._stored_v.zero_()
            self._age.zero_()
            self._first_nan_step.fill_(-1)

    def check_finite(self) -> None:
        """Raise ValueError if any input since the last reset held NaN (one host synchronisation)."""
        if self._first_nan_step is None:
            return
        first = int(self._first_nan_step)
        if first >= 0:
            raise ValueError(f"AnalogKVDecoder: the inputs of step {first} (counting from 0 since the last "
                             f"reset) contain NaN: expected finite q, k, v; every output since then is invalid")

    def _record_nan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Refuse NaN inputs: at once on CPU, else in a device flag that ``check_finite`` reads."""
        bad = torch.isnan(q).any() | torch.isnan(k).any() | torch.isnan(v).any()
        if not self._defer_nan_check:
            if bool(bad):
                raise ValueError(f"AnalogKVDecoder.step {self.steps}: q, k or v contains NaN "
                                 f"(q {int(torch.isnan(q).sum())}, k {int(torch.isnan(k).sum())}, "
                                 f"v {int(torch.isnan(v).sum())} values): expected finite inputs")
            return
        first = self._first_nan_step
        first.copy_(torch.where(bad & (first < 0), self.steps, first))

    def _allocate(self, like: torch.Tensor) -> None:
        device = self._device if self._device is not None else like.device
        # Half-precision inputs are computed in float32, as in the reference.
        dtype = self._dtype if self._dtype is not None else compute_dtype(like.dtype)
        if not dtype.is_floating_point:
            raise TypeError(f"decoder dtype {dtype}: expected a floating-point dtype")
        self._device, self._dtype = device, dtype
        m, n_pow = self.cfg.window, len(self._powers)
        shape = (n_pow, self.batch, self.heads, m, self.head_dim)
        # Stored weights relative to the half-supply offset, W**i and U**i (eq. 4), slot-major.
        self._stored_k = torch.zeros(shape, device=device, dtype=dtype)
        self._stored_v = torch.zeros(shape, device=device, dtype=dtype)
        # Token steps since each slot was written (int64: exact for any sequence length).
        self._age = torch.zeros(m, device=device, dtype=torch.long)
        # The chip's cells (H, M, D) per array, None without variation; the readout-noise generator.
        self._gains = cell_gains(self.cfg, self.heads, self.head_dim, dtype, device)
        if self.cfg.readout_noise > 0 and self.generator is None:
            self.generator = readout_generator(next_readout_seed(self.cfg), device)
        self._first_nan_step = torch.full((), -1, device=device, dtype=torch.long)
        # On CPU reading a flag costs nothing: refuse NaN at once. Elsewhere keep it on the device.
        self._defer_nan_check = device.type != "cpu"
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
        cfg, dt = self.cfg, self._dtype
        out_dtype = q.dtype
        q, k, v = (x.to(device=self._device, dtype=dt) for x in (q, k, v))
        self._record_nan(q, k, v)
        query = self._write(q, k, v)
        # Only the sub-tiles that hold keys take part; the slots are filled in order from 0.
        tiles = -(-self.filled_slots // cfg.tile_rows)
        active = tiles * cfg.tile_rows
        # alpha = exp(-lambda * age) (eq. 6), in double then rounded once, as the reference does; alpha^i
        # (eq. 7) stacked over the powers so that each array's products for all powers are one batched matmul.
        alpha = torch.exp(-cfg.decay_per_step * self._age[:active].to(torch.float64)).to(dt)
        alpha_pow = torch.stack([alpha ** power if power > 1 else alpha for power in self._powers])
        alpha_pow = alpha_pow.view(len(self._powers), 1, 1, active)
        pulse = self._pulses(query, alpha_pow, active)
        readout = self._value_array(pulse, alpha_pow, tiles, active)
        if cfg.readout_noise > 0:  # every read sub-tile (those holding a key), before its ADC
            readout = readout + cfg.readout_noise * torch.randn(readout.shape, generator=self.generator,
                                                                device=self._device, dtype=dt)
        # Each sub-tile's pulse counter (clamp + quantize), then the digital adders.
        y = clamp_quantize(readout, cfg.output_levels, *OUTPUT_RANGE).sum(dim=2)
        return y.to(out_dtype)

    def _write(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """DAC / storage (docs/attention.md#quantization), then the write of the key and value into slot
        t mod M; returns the quantized query. The arithmetic follows gaincell.attention.reference operation
        by operation, so that the two agree to the last bit wherever the summation order of the matrix
        products does not matter."""
        cfg = self.cfg
        query = clamp_quantize(q, cfg.query_levels, 0.0, 1.0)
        w = clamp_quantize(k, cfg.stored_levels, 0.0, cfg.stored_max) - cfg.stored_offset
        u = clamp_quantize(v, cfg.stored_levels, 0.0, cfg.stored_max) - cfg.stored_offset
        slot = self.write_pointer
        self._age += 1  # every stored charge is one step older when the new query reads it
        self._age[slot] = 0
        gain_k, gain_v = self._gains if self._gains is not None else (None, None)
        for n, power in enumerate(self._powers):
            # Row ``slot``'s cells multiply every term they compute (their gain factors, per head and column).
            self._stored_k[n, :, :, slot] = w ** power if gain_k is None else gain_k[:, slot] * w ** power
            self._stored_v[n, :, :, slot] = u ** power if gain_v is None else gain_v[:, slot] * u ** power
        self.steps += 1
        return query

    def _pulses(self, query: torch.Tensor, alpha_pow: torch.Tensor, active: int) -> torch.Tensor:
        """First dot product on the K array (eq. 4, 7): S[s] = sum_i c_i alpha^i sum_d Q[d] W[s, d]^i, then
        charge to pulse (eq. 3), masked to the stored keys; (B, H, active)."""
        cfg, gain_k = self.cfg, (self._gains[0] if self._gains is not None else None)
        qcol = query.unsqueeze(-1)  # (B, H, D, 1)
        dots = torch.matmul(self._stored_k[:, :, :, :active], qcol).squeeze(-1)  # (powers, B, H, active)
        if not cfg.nonlinear:
            charge = (cfg.gain * dots[0]) * alpha_pow[0]
        else:
            # The i = 0 term: key-independent (c_0 sum_d Q), or through each row's cells (c_0 gamma . Q).
            charge = self._c[0] * (query.sum(-1, keepdim=True) if gain_k is None
                                   else torch.matmul(gain_k[:, :active], qcol).squeeze(-1))
            for n, power in enumerate(self._powers):
                charge = charge + (self._c[power] * dots[n]) * alpha_pow[n]
        pulse = (charge / cfg.qk_saturation).clamp(0.0, 1.0)
        filled = self.filled_slots
        if filled < active:
            valid = torch.arange(active, device=self._device) < filled
            pulse = torch.where(valid, pulse, torch.zeros((), device=self._device, dtype=self._dtype))
        return pulse

    def _value_array(self, pulse: torch.Tensor, alpha_pow: torch.Tensor, tiles: int, active: int) -> torch.Tensor:
        """Second dot product per sub-tile (eq. 4, 7): A_r[d] = (1/S_sat) sum_i c_i sum_s P alpha^i U^i;
        (B, H, tiles, D), before the pulse counters."""
        cfg, rows = self.cfg, self.cfg.tile_rows
        gain_v = self._gains[1] if self._gains is not None else None
        n_pow = len(self._powers)
        weights = (pulse * alpha_pow).reshape(n_pow, self.batch, self.heads, tiles, 1, rows)
        values = self._stored_v[:, :, :, :active].reshape(n_pow, self.batch, self.heads, tiles, rows,
                                                          self.head_dim)
        products = torch.matmul(weights, values).squeeze(-2)  # (powers, B, H, tiles, D)
        if not cfg.nonlinear:
            return (cfg.gain / cfg.av_saturation) * products[0]
        pulse_tiles = pulse.reshape(self.batch, self.heads, tiles, 1, rows)
        if gain_v is None:
            readout = self._c[0] * pulse_tiles.sum(-1)  # i = 0
        else:
            gains_tiles = gain_v[:, :active].reshape(self.heads, tiles, rows, self.head_dim)
            readout = self._c[0] * torch.matmul(pulse_tiles, gains_tiles).squeeze(-2)
        for n, power in enumerate(self._powers):
            readout = readout + self._c[power] * products[n]
        return readout / cfg.av_saturation

    def extra_repr(self) -> str:  # pragma: no cover - debugging aid
        return (f"AnalogKVDecoder(batch={self.batch}, heads={self.heads}, head_dim={self.head_dim}, "
                f"window={self.cfg.window}, steps={self.steps})")

    __repr__ = extra_repr

