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

Cell variation (``cfg.cell_variation``, and the additive offsets of ``cfg.cell_offset_variation``): the cells of ring-buffer row s are those of the chip
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

import math
from typing import Optional

import torch

from .config import AnalogAttentionConfig
from .noise import cell_gains, cell_offsets, next_readout_seed, readout_generator
from .reference import OUTPUT_RANGE, compute_dtype

__all__ = ["AnalogKVDecoder"]

# ``prefill`` gathers the arrays each token of a chunk sees: at most this many elements per chunk.
PREFILL_CHUNK_ELEMENTS = 1 << 24


def _converter(levels: Optional[int], lo: float, hi: float, dtype, device) -> tuple:
    """The constants of one DAC/ADC: (lo, hi) as numbers (a clamp is fastest with number bounds), and
    (1 / step, step) as 0-d tensors of the compute dtype, None without quantization. A product with a
    0-d tensor rounds the constant to the dtype exactly as one with a Python number does, and skips
    wrapping the number on every call."""
    if levels is None:
        return lo, hi, None, None
    return (lo, hi, torch.tensor((levels - 1) / (hi - lo), dtype=dtype, device=device),
            torch.tensor((hi - lo) / (levels - 1), dtype=dtype, device=device))


def _dac(x: torch.Tensor, converter: tuple) -> torch.Tensor:
    """``quantize.clamp_quantize`` without its autograd wrapping (the decoder runs under no_grad): the
    operations of ``quantize._quantize_forward``, so the same values bit for bit."""
    lo, hi, inv_step, step = converter
    x = torch.clamp(x, lo, hi)
    if inv_step is None:
        return x
    return x.mul_(inv_step).round_().mul_(step).clamp_(lo, hi)


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
        self._step_shape = torch.Size((batch, heads, head_dim))
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
            self._first_nan_step.fill_(-1)

    def check_finite(self) -> None:
        """Raise ValueError if any input since the last reset held NaN (one host synchronisation)."""
        if self._first_nan_step is None:
            return
        first = int(self._first_nan_step)
        if first >= 0:
            raise ValueError(f"AnalogKVDecoder: the inputs of step {first} (counting from 0 since the last "
                             f"reset) contain NaN: expected finite q, k, v; every output since then is invalid")

    def _record_nan(self, qkv: torch.Tensor) -> None:
        """Refuse NaN in q, k, v (stacked): at once on CPU, else in a device flag that ``check_finite``
        reads. One reduction: a sum is NaN if an element is (or +inf meets -inf: then look closer)."""
        if not self._defer_nan_check:
            if math.isnan(float(qkv.sum())) and bool(torch.isnan(qkv).any()):
                q, k, v = (int(torch.isnan(x).sum()) for x in qkv)
                raise ValueError(f"AnalogKVDecoder.step {self.steps}: q, k or v contains NaN "
                                 f"(q {q}, k {k}, v {v} values): expected finite inputs")
            return
        first = self._first_nan_step
        first.copy_(torch.where(torch.isnan(qkv).any() & (first < 0), self.steps, first))

    def _allocate(self, like: torch.Tensor) -> None:
        device = self._device if self._device is not None else like.device
        # Half-precision inputs are computed in float32, as in the reference.
        dtype = self._dtype if self._dtype is not None else compute_dtype(like.dtype)
        if not dtype.is_floating_point:
            raise TypeError(f"decoder dtype {dtype}: expected a floating-point dtype")
        self._device, self._dtype = device, dtype
        m, n_pow = self.cfg.window, len(self._powers)
        shape = (n_pow, self.batch, self.heads, m, self.head_dim)
        # Stored weights relative to the half-supply offset, W**i and U**i (eq. 4): V slot-major,
        # K column-major (slots last), so that both products are (row vector) x (matrix).
        self._stored_k = torch.zeros(shape[:3] + (self.head_dim, m), device=device, dtype=dtype)
        self._stored_v = torch.zeros(shape, device=device, dtype=dtype)
        # Leakage (eq. 6): alpha^i = exp(-lambda a)^i for every age a < M, in double then rounded once as
        # the reference does, laid out so that the slots' factors after writing slot p are the contiguous
        # view [M - 1 - p, 2M - 1 - p) (slot s is (p - s) mod M steps old): no per-step exp.
        decay = torch.exp(-self.cfg.decay_per_step * torch.arange(m, device=device, dtype=torch.float64)).to(dtype)
        ages = (m - 1 - torch.arange(2 * m - 1, device=device)) % m
        self._alpha_ext = torch.stack([decay ** power if power > 1 else decay for power in self._powers])[:, ages]
        self._slot_index = torch.arange(m, device=device)
        cfg = self.cfg
        self._query_dac = _converter(cfg.query_levels, 0.0, 1.0, dtype, device)
        self._stored_dac = _converter(cfg.stored_levels, 0.0, cfg.stored_max, dtype, device)
        self._joint_dac = None
        if cfg.query_levels is not None and cfg.stored_levels is not None and cfg.stored_max <= 1.0:
            rows = (self._query_dac, self._stored_dac, self._stored_dac)
            self._joint_dac = tuple(torch.stack([r[i] for r in rows]) for i in (2, 3))
        self._output_adc = _converter(cfg.output_levels, *OUTPUT_RANGE, dtype, device)
        const = {"gain": cfg.gain, "qk_saturation": cfg.qk_saturation, "av_saturation": cfg.av_saturation,
                 "value_gain": cfg.gain / cfg.av_saturation,
                 "stored_offset": cfg.stored_offset, **{f"c{i}": c for i, c in enumerate(cfg.folded_coefficients)}}
        self._const = {name: torch.tensor(x, dtype=dtype, device=device) for name, x in const.items()}
        self._tile_index = torch.arange(self.cfg.tiles, device=device)
        # The chip's cells (H, M, D) per array, None without variation; the readout-noise generator.
        self._gains = cell_gains(self.cfg, self.heads, self.head_dim, dtype, device)
        if self._gains is not None:  # gamma_K column-major and gamma_V by sub-tile, for the c_0 terms
            self._gain_k_t = self._gains[0].transpose(-1, -2).contiguous()
            self._gain_v_tiles = self._gains[1].reshape(self.heads, self.cfg.tiles, self.cfg.tile_rows, self.head_dim)
        # The cells' additive offsets (cell_offset_variation), laid out as the gains for the c_0 terms.
        self._offsets = cell_offsets(self.cfg, self.heads, self.head_dim, dtype, device)
        if self._offsets is not None:
            self._offset_k_t = self._offsets[0].transpose(-1, -2).contiguous()
            self._offset_v_tiles = self._offsets[1].reshape(self.heads, self.cfg.tiles, self.cfg.tile_rows,
                                                            self.head_dim)
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

    # ------------------------------------------------------------------ tokens
    def _check_all(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: int) -> None:
        """Shapes (fast path: one tuple comparison) and the step limit, before anything is written."""
        if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
                and q.shape == k.shape == v.shape == self._step_shape):
            for name, x in (("q", q), ("k", k), ("v", v)):
                self._check(name, x)
        if self.max_steps is not None and self.steps + tokens > self.max_steps:
            raise RuntimeError(f"step {self.steps + tokens} exceeds this decoder's max_steps={self.max_steps}: "
                               f"build it with a larger max_steps (or None), or reset() it")

    def _prepare(self, q, k, v):
        """Inputs on the state's device and dtype, NaN refused, through the DAC (docs/attention.md#quantization): Q, W, U."""
        if not self._allocated:
            self._allocate(q)
        dev, dt = self._device, self._dtype
        qkv = torch.stack((q, k, v)).to(device=dev, dtype=dt)
        self._record_nan(qkv)
        if self._joint_dac is not None:
            # One pass for the three converters: clamp to [0, 1], each row's own step, then the stored
            # rows' top (stored_max <= 1). A stored input in (stored_max, 1] lands on stored_max, as
            # with its own clamp first: the values are those of the separate converters bit for bit.
            inv_step, step = (c.view((3,) + (1,) * (qkv.dim() - 1)) for c in self._joint_dac)
            x = qkv.clamp_(0.0, 1.0).mul_(inv_step).round_().mul_(step).clamp_(0.0, 1.0)
            x[1:].clamp_(max=self.cfg.stored_max).sub_(self._const["stored_offset"])
            return x[0], x[1], x[2]
        query = _dac(qkv[0], self._query_dac)
        # K and V share their converter settings: one pass for both.
        stored = _dac(qkv[1:], self._stored_dac) - self._const["stored_offset"]
        return query, stored[0], stored[1]

    @torch.no_grad()
    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write token t's key and value, apply its query; (B, H, D) each -> y_t (B, H, D)."""
        self._check_all(q, k, v, 1)
        out_dtype = q.dtype
        query, w, u = self._prepare(q, k, v)
        # The write into slot t mod M (docs/attention.md#second-array-product-and-sub-tiles); row ``slot``'s cells multiply every term they compute.
        slot = self.steps % self.cfg.window
        gain_k, gain_v = self._gains if self._gains is not None else (None, None)
        for n, power in enumerate(self._powers):
            w_p, u_p = (w, u) if power == 1 else (w ** power, u ** power)
            self._stored_k[n, :, :, :, slot] = w_p if gain_k is None else gain_k[:, slot] * w_p
            self._stored_v[n, :, :, slot] = u_p if gain_v is None else gain_v[:, slot] * u_p
        self.steps += 1
        # alpha^i of every slot: slot s holds a key (t - s) mod M steps old; a view of the decay table.
        m = self.cfg.window
        alpha = self._alpha_ext[:, m - 1 - slot:2 * m - 1 - slot].unsqueeze(0)   # (1, powers, M)
        filled = min(self.steps, m)
        valid = None if filled == m else (self._slot_index < filled)
        y = self._read(query.unsqueeze(0), self._stored_k.unsqueeze(0), self._stored_v.unsqueeze(0), alpha,
                       valid, filled)
        return y[0] if y.dtype == out_dtype else y[0].to(out_dtype)

    @torch.no_grad()
    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A prompt of T tokens at once: (B, H, T, D) each -> y (B, H, T, D), exactly the outputs (and the
        final state) of T calls of ``step``: every token's products are computed as a step computes
        them, against the arrays as that token sees them, batched over the tokens (in chunks that bound
        memory). With readout noise the tokens are stepped one by one (the noise draws follow the steps).
        """
        if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k, v)) or q.shape[2] != k.shape[2] \
                or q.shape[2] != v.shape[2]:
            raise ValueError(f"prefill takes q, k, v of shape (batch, heads, tokens, head_dim) = "
                             f"{(self.batch, self.heads, 'T', self.head_dim)}; got "
                             f"{[tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in (q, k, v)]}")
        tokens = q.shape[2]
        self._check_all(q[:, :, 0], k[:, :, 0], v[:, :, 0], tokens)
        if self.cfg.readout_noise > 0 or tokens == 1:
            return torch.stack([self.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(tokens)], dim=2)
        out_dtype = q.dtype
        per_token = len(self._powers) * self.batch * self.heads * self.cfg.window * self.head_dim
        chunk = max(1, PREFILL_CHUNK_ELEMENTS // per_token)
        outputs = []
        for start in range(0, tokens, chunk):
            sl = slice(start, min(tokens, start + chunk))
            query, w, u = self._prepare(*(x[:, :, sl].transpose(1, 2).transpose(0, 1) for x in (q, k, v)))
            outputs.append(self._prefill_chunk(query, w, u))
        return torch.cat(outputs, dim=0).permute(1, 2, 0, 3).to(out_dtype)

    def _prefill_chunk(self, query, w, u) -> torch.Tensor:
        """Tokens t0 .. t0 + N - 1 (inputs (N, B, H, D) after the DAC): the arrays each token sees, gathered
        from the current arrays and the chunk's own keys; y (N, B, H, D); the arrays advanced."""
        m, n_tok, t0 = self.cfg.window, query.shape[0], self.steps
        dev = self._device
        times = torch.arange(t0, t0 + n_tok, device=dev)
        slots = times % m
        gain_k, gain_v = self._gains if self._gains is not None else (None, None)
        # The chunk's keys and values as they are written (powers, cells of their rows): (P, B, H, N, D).
        w_p = [w if p == 1 else w ** p for p in self._powers]
        u_p = [u if p == 1 else u ** p for p in self._powers]
        new_k = torch.stack([(x if gain_k is None else gain_k[:, slots].transpose(0, 1).unsqueeze(1) * x)
                             for x in w_p]).permute(0, 2, 3, 4, 1)                 # (P, B, H, D, N)
        new_v = torch.stack([(x if gain_v is None else gain_v[:, slots].transpose(0, 1).unsqueeze(1) * x)
                             for x in u_p]).permute(0, 2, 3, 1, 4)                 # (P, B, H, N, D)
        # Row of [current arrays; chunk] in slot s at token t: the chunk's latest write there, else old.
        s = self._slot_index
        last = times[:, None] - (times[:, None] - s[None, :]) % m                    # (N, M) token index
        rows = torch.where(last >= t0, m + last - t0, s[None, :].expand(n_tok, m)).reshape(-1)
        source = torch.cat([self._stored_k, new_k], dim=4)                             # (P, B, H, D, M + N)
        seen_k = source.index_select(4, rows).view(*new_k.shape[:4], n_tok, m)
        seen_k = seen_k.permute(4, 0, 1, 2, 3, 5).contiguous()                       # (N, P, B, H, D, M)
        source = torch.cat([self._stored_v, new_v], dim=3)                             # (P, B, H, M + N, D)
        seen_v = source.index_select(3, rows).view(*new_v.shape[:3], n_tok, m, self.head_dim)
        seen_v = seen_v.permute(3, 0, 1, 2, 4, 5).contiguous()                       # (N, P, B, H, M, D)
        offsets = (m - 1 - slots)[:, None] + s[None, :]                             # (N, M)
        alpha = self._alpha_ext[:, offsets].transpose(0, 1).contiguous()            # (N, P, M)
        filled = torch.clamp(times + 1, max=m)
        valid = s[None, :] < filled[:, None]                                         # (N, M)
        y = self._read(query, seen_k, seen_v, alpha, valid.view(n_tok, 1, 1, m),
                       int(filled.max()))
        # Advance: the chunk's last M tokens are in their slots now (distinct slots).
        keep = slice(max(0, n_tok - m), n_tok)
        self._stored_k[..., slots[keep]] = new_k[..., keep]
        self._stored_v[:, :, :, slots[keep]] = new_v[:, :, :, keep]
        self.steps += n_tok
        return y

    def _read(self, query, stored_k, stored_v, alpha, valid, filled: int) -> torch.Tensor:
        """Eqs. 3-4 and the sub-tile readouts for N tokens at once: query (N, B, H, D), the arrays each sees (K: (N, P, B, H, D, M),
        V: (N, P, B, H, M, D)),
        alpha^i per slot (N, P, M), ``valid`` slots holding a key (None: all), ``filled`` the most slots
        any token sees. Every product is one (D).(D x M) or (rows).(rows x D) per token and head, as in
        a single step, so a token's result does not depend on N. Returns y (N, B, H, D)."""
        cfg = self.cfg
        n_tok, n_pow = query.shape[0], len(self._powers)
        rows, tiles = cfg.tile_rows, cfg.tiles
        alpha = alpha.view(n_tok, n_pow, 1, 1, cfg.window)
        # First dot product on the K array (eq. 4): S[s] = sum_i c_i alpha^i sum_d Q[d] W[s, d]^i.
        qrow = query.unsqueeze(-2).unsqueeze(1)                                      # (N, 1, B, H, 1, D)
        if n_pow == 1:  # the products straight to bmm (matmul's broadcasting logic costs a step ~10 %)
            bh = n_tok * self.batch * self.heads
            dots = torch.bmm(qrow.reshape(bh, 1, -1), stored_k.view(bh, -1, cfg.window)).view(n_tok, 1, self.batch,
                                                                                              self.heads, -1)
        else:
            dots = torch.matmul(qrow, stored_k).squeeze(-2)                          # (N, P, B, H, M)
        gain_k, gain_v = self._gains if self._gains is not None else (None, None)
        c = self._const
        if not cfg.nonlinear:
            charge = (c["gain"] * dots[:, 0]) * alpha[:, 0]
        else:
            # The i = 0 term: key-independent (c_0 sum_d Q), or through each row's cells (c_0 gamma . Q).
            charge = c["c0"] * (query.sum(-1, keepdim=True) if gain_k is None
                                else torch.matmul(qrow[:, 0], self._gain_k_t).squeeze(-2))
            for n, power in enumerate(self._powers):
                charge = charge + (c[f"c{power}"] * dots[:, n]) * alpha[:, n]
        if self._offsets is not None:  # each row's cells' additive offsets: Q . delta_K, not attenuated
            charge = charge + torch.matmul(qrow[:, 0], self._offset_k_t).squeeze(-2)
        # Charge to pulse (eq. 3), zero for slots that hold no key yet.
        pulse = (charge / c["qk_saturation"]).clamp_(0.0, 1.0)
        if valid is not None:
            pulse = torch.where(valid, pulse, 0.0)
        # Second dot product per sub-tile (docs/attention.md#second-array-product-and-sub-tiles): A_r[d] = (1/S_sat) sum_i c_i sum_s P alpha^i U^i.
        items = n_tok * n_pow * self.batch * self.heads * tiles
        weights = (pulse.unsqueeze(1) * alpha).reshape(items, 1, rows)
        products = torch.bmm(weights, stored_v.view(items, rows, self.head_dim)).view(
            n_tok, n_pow, self.batch, self.heads, tiles, self.head_dim)               # (N, P, B, H, tiles, D)
        if not cfg.nonlinear:
            readout = c["value_gain"] * products[:, 0]
        else:
            pulse_tiles = pulse.view(n_tok, self.batch, self.heads, tiles, 1, rows)
            if gain_v is None:
                readout = c["c0"] * pulse_tiles.sum(-1)  # i = 0
            else:
                readout = c["c0"] * torch.matmul(pulse_tiles, self._gain_v_tiles).squeeze(-2)
            for n, power in enumerate(self._powers):
                readout = readout + c[f"c{power}"] * products[:, n]
            readout = readout / c["av_saturation"]
        if self._offsets is not None:  # each row's cells' additive offsets: P . delta_V / S_av per sub-tile
            pulse_tiles = pulse.view(n_tok, self.batch, self.heads, tiles, 1, rows)
            readout = readout + torch.matmul(pulse_tiles, self._offset_v_tiles).squeeze(-2) / c["av_saturation"]
        if cfg.readout_noise > 0:  # every read sub-tile (those holding a key), before its ADC
            read = self._tile_index < -(-filled // rows)
            noise = torch.randn(readout.shape, generator=self.generator, device=readout.device, dtype=readout.dtype)
            readout = readout + cfg.readout_noise * torch.where(read.view(tiles, 1), noise, 0.0)
        # Each sub-tile's pulse counter (clamp + quantize), then the digital adders; an empty sub-tile
        # reads exactly 0.
        return _dac(readout, self._output_adc).sum(dim=-2)

    def extra_repr(self) -> str:  # pragma: no cover - debugging aid
        return (f"AnalogKVDecoder(batch={self.batch}, heads={self.heads}, head_dim={self.head_dim}, "
                f"window={self.cfg.window}, steps={self.steps})")

    __repr__ = extra_repr

