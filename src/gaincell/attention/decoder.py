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
(quantized on write, offset removed, with their powers for the nonlinear cell, times each row's cells)
and the write pointer. Leakage (eq. 6) needs no per-step work: the factor of a slot a steps old,
c_i alpha(a)**i over the saturation charge, comes from a table made once, read at an offset given by
the write pointer. A step costs O(B H M D) once the window is full, independent of how many tokens came
before: two batched matrix products and a few passes over (B, H, M) and (B, H, D) values.

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
from typing import NamedTuple, Optional

import torch

from .config import AnalogAttentionConfig
from .noise import cell_gains, cell_offsets, next_readout_seed, readout_generator
from .reference import OUTPUT_RANGE, compute_dtype

__all__ = ["AnalogKVDecoder"]

# ``prefill`` gathers the arrays each token of a chunk sees: at most this many elements per chunk.
PREFILL_CHUNK_ELEMENTS = 1 << 24
# On CPU the gathered arrays cost more than the steps they replace (``benchmarks/decode.py``: a
# 256-token prompt, window 256, 4 heads, D = 64, one thread, gathered 10-13x slower than stepped):
# there ``prefill`` steps the tokens (the same outputs by definition). Elsewhere it gathers, as
# before: one batched product per chunk instead of ~30 small kernels per token (not measured here).
PREFILL_GATHERS_ON_CPU = False


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


def _quantize_(x: torch.Tensor, converter: tuple, clamp_first: bool = True) -> torch.Tensor:
    """``_dac`` in place (on a tensor the caller owns); ``clamp_first=False`` where the first clamp
    changes nothing (``_first_clamp_redundant``): the same values bit for bit, one pass less."""
    lo, hi, inv_step, step = converter
    if inv_step is None:
        return x.clamp_(lo, hi)
    if clamp_first:
        x = x.clamp_(lo, hi)
    return x.mul_(inv_step).round_().mul_(step).clamp_(lo, hi)


def _first_clamp_redundant(converter: tuple) -> bool:
    """Whether quantizing x without clamping it first gives the clamped result for every x: inside
    [lo, hi] the operations are the same; above, round(x / step) >= round(hi / step) (rounding is
    monotone), so the last clamp gives hi if round(hi / step) * step >= hi already in the dtype (and
    likewise below lo). Not with a bound at 0: x in (-step / 2, 0) would read -0.0, the clamped
    converter +0.0. True for the 32-level [-1, 1] ADC: +-1 round to +-16 levels, +-1.03."""
    lo, hi, inv_step, step = converter
    if lo == 0.0 or hi == 0.0:
        return False
    top = torch.round(torch.tensor(hi, dtype=step.dtype) * inv_step) * step
    bottom = torch.round(torch.tensor(lo, dtype=step.dtype) * inv_step) * step
    return bool(top >= hi) and bool(bottom <= lo)


class _Workspace(NamedTuple):
    """Buffers of N tokens' products, with the views the products use (made once for a step)."""
    query_row: torch.Tensor       # (N B H, 1, D): the DAC'd queries
    query: torch.Tensor           # (N, B H, 1, D) view
    dots: torch.Tensor            # (N B H, 1, terms M): Q . each stored term
    dots_by_term: torch.Tensor    # (N, B H, terms, M) view
    charge: torch.Tensor          # (N, B H, M): the charge, then the pulse
    pulse_by_tile: torch.Tensor   # (N, B H, tiles, 1, rows) view of ``charge``
    weights: torch.Tensor         # (N B H tiles, 1, terms rows): pulse x factor, sub-tile by sub-tile
    weights_by_tile: torch.Tensor  # (N, B H, tiles, terms, rows) view
    readout: torch.Tensor         # (N B H tiles, 1, D): each sub-tile's readout
    readout_by_tile: torch.Tensor  # (N, B H, tiles, D) view


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
        # Powers i >= 1 of the stored weight that the cell model uses, with their folded c_i (eq. 4).
        self._powers = (1,) if not cfg.nonlinear else (1, 2, 3)
        # Terms per slot in the arrays: the powers, and a constant one (c_0 gamma + delta) if any. Without
        # cell variation the nonlinear cell's c_0 is the same in every cell: its terms are then computed
        # from the query and the pulses (c_0 sum_d Q, c_0 sum_s P), not stored (a quarter less to read).
        self._implicit_c0 = cfg.nonlinear and cfg.cell_variation == 0 and cfg.cell_offset_variation == 0
        self._n_terms = len(self._powers) + int((cfg.nonlinear or cfg.cell_offset_variation > 0)
                                                and not self._implicit_c0)
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
        if device.type == like.device.type and device.index is None:
            device = like.device  # "cuda" means the inputs' "cuda:N": the step's fast path compares devices
        self._device, self._dtype = device, dtype
        cfg, batch, heads, dim = self.cfg, self.batch, self.heads, self.head_dim
        m, n_terms = cfg.window, self._n_terms
        # The arrays, one column (K) or row (V) per slot and term: term n < P holds gamma * W**p (p the
        # n-th power, gamma the row's cells, 1 without variation), the last (nonlinear cell or offsets)
        # the slot's constant c_0 gamma + delta, written with the slot's first key (an empty slot is 0 in
        # every term, so its charge and pulse are 0: no mask, except for the implicit c_0 of the
        # nonlinear cell without variation, which is added to every slot). K: (B, H, D, terms, M); V by sub-tile,
        # (B, H, tiles, terms, rows, D): each product is one matrix per head (and sub-tile).
        self._stored_k = torch.zeros(batch, heads, dim, n_terms, m, device=device, dtype=dtype)
        self._stored_v = torch.zeros(batch, heads, cfg.tiles, n_terms, cfg.tile_rows, dim, device=device,
                                     dtype=dtype)
        self._allocate_tables(device, dtype)
        self._allocate_cells(device, dtype)
        self._query_dac = _converter(cfg.query_levels, 0.0, 1.0, dtype, device)
        self._stored_dac = _converter(cfg.stored_levels, 0.0, cfg.stored_max, dtype, device)
        self._output_adc = _converter(cfg.output_levels, *OUTPUT_RANGE, dtype, device)
        self._adc_clamp_first = self._output_adc[2] is None or not _first_clamp_redundant(self._output_adc)
        self._stored_offset = torch.tensor(cfg.stored_offset, dtype=dtype, device=device)
        self._joint_dac = None
        if cfg.query_levels is not None and cfg.stored_levels is not None:
            # The three converters in one pass over (q, k, v) stacked: each row's own bounds and steps
            # (tensor bounds: a clamp is exact, so the values are the separate converters' bit for bit),
            # then the stored rows' offset (q - 0 is q).
            rows = (self._query_dac, self._stored_dac, self._stored_dac)
            self._joint_dac = tuple(torch.tensor(values, dtype=dtype, device=device).view(3, 1, 1, 1) for values in (
                (0.0, 0.0, 0.0), (1.0, cfg.stored_max, cfg.stored_max), tuple(float(r[2]) for r in rows),
                tuple(float(r[3]) for r in rows), (0.0, cfg.stored_offset, cfg.stored_offset)))
        self._tile_index = torch.arange(cfg.tiles, device=device)
        self._slot_index = torch.arange(m, device=device)
        if cfg.readout_noise > 0 and self.generator is None:
            self.generator = readout_generator(next_readout_seed(cfg), device)
        self._first_nan_step = torch.full((), -1, device=device, dtype=torch.long)
        # On CPU reading a flag costs nothing: refuse NaN at once. Elsewhere keep it on the device.
        self._defer_nan_check = device.type != "cpu"
        self._allocate_step_views(device, dtype)
        self._allocated = True

    def _allocate_tables(self, device, dtype) -> None:
        """Leakage (eq. 6) with the cell coefficients and saturations folded in, per slot and term: the
        factor of term n of a slot a steps old is c_p alpha(a)**p / S_sat_qk on the K array and
        c_p alpha(a)**p / S_sat_av on the V array (the constant term: 1 / S_sat), alpha = exp(-lambda a)
        in double rounded once as the reference does. (terms, 2M - 1), laid out by age so that the slots'
        factors after writing slot p are the columns [M - 1 - p, 2M - 1 - p) (slot s is (p - s) mod M steps old)."""
        cfg, m = self.cfg, self.cfg.window
        self._c0_k = cfg.folded_coefficients[0] / cfg.qk_saturation
        self._c0_v = cfg.folded_coefficients[0] / cfg.av_saturation
        decay = torch.exp(-cfg.decay_per_step * torch.arange(m, device=device, dtype=torch.float64)).to(dtype)
        coefficient = cfg.folded_coefficients  # linear: (0, g, 0, 0)
        alpha_pow = [decay ** power if power > 1 else decay for power in self._powers]
        ones = [torch.ones_like(decay)] * (self._n_terms - len(self._powers))
        value_coefficient = [cfg.gain / cfg.av_saturation] if not cfg.nonlinear else \
            [coefficient[p] / cfg.av_saturation for p in self._powers]
        by_age_k = torch.stack([a * coefficient[p] / cfg.qk_saturation for a, p in zip(alpha_pow, self._powers)]
                               + [x / cfg.qk_saturation for x in ones])                   # (terms, M)
        by_age_v = torch.stack([a * c for a, c in zip(alpha_pow, value_coefficient)]
                               + [x / cfg.av_saturation for x in ones])
        ages = (m - 1 - torch.arange(2 * m - 1, device=device)) % m
        self._table_k, self._table_v = by_age_k[:, ages].contiguous(), by_age_v[:, ages].contiguous()

    def _allocate_cells(self, device, dtype) -> None:
        """The chip's cells (H, M, D) per array (``cell_gains``, ``cell_offsets``; None without variation)
        and each slot's constant term c_0 gamma + delta per array, (2, H, M, D) (None without one)."""
        cfg = self.cfg
        self._gains = cell_gains(cfg, self.heads, self.head_dim, dtype, device)
        self._offsets = cell_offsets(cfg, self.heads, self.head_dim, dtype, device)
        self._constant = None
        if self._n_terms > len(self._powers):
            shape = (2, self.heads, cfg.window, self.head_dim)
            constant = torch.zeros(shape, device=device, dtype=dtype)
            if cfg.nonlinear:
                c0 = cfg.folded_coefficients[0]
                constant = c0 * torch.stack(self._gains) if self._gains is not None else constant.fill_(c0)
            if self._offsets is not None:
                constant = constant + torch.stack(self._offsets)
            self._constant = constant

    def _allocate_step_views(self, device, dtype) -> None:
        """What one step reads and writes, as views made once: the input buffer (q, k, v; then the powers
        of k and v), per slot the columns it writes and the table rows it reads, the arrays as batched
        matrices for the two products."""
        cfg, m, n_pow = self.cfg, self.cfg.window, len(self._powers)
        bh, tiles = self.batch * self.heads, cfg.tiles
        work = torch.zeros(1 + 2 * n_pow, self.batch, self.heads, self.head_dim, device=device, dtype=dtype)
        self._qkv = work[:3]
        self._qkv_rows = tuple(work[:3])  # q, k, v's rows of the buffer, as views made once
        self._written = work[1:].view(n_pow, 2, self.batch, self.heads, self.head_dim)   # (P, K/V, B, H, D)
        self._power_views = tuple(self._written)
        self._written_k = self._written[:, 0].permute(1, 2, 3, 0)                        # (B, H, D, P)
        self._written_v = self._written[:, 1].permute(1, 2, 0, 3)                        # (B, H, P, D)
        rows = cfg.tile_rows
        self._write_k = [self._stored_k[:, :, :, :n_pow, s] for s in range(m)]
        self._write_v = [self._stored_v[:, :, s // rows, :n_pow, s % rows] for s in range(m)]
        if self._constant is not None:
            self._write_constant = [(self._stored_k[:, :, :, n_pow, s], self._stored_v[:, :, s // rows, n_pow, s % rows],
                                     self._constant[0, :, s], self._constant[1, :, s]) for s in range(m)]
        if self._gains is not None:  # (K/V, 1, H, D) per slot, against (P, K/V, B, H, D)
            gains = torch.stack(self._gains)
            self._gain_at = [gains[:, None, :, s] for s in range(m)]
        self._table_k_at = [self._table_k[:, m - 1 - s:2 * m - 1 - s] for s in range(m)]        # (terms, M)
        self._table_v_at = [self._table_v[:, m - 1 - s:2 * m - 1 - s].view(self._n_terms, tiles, rows).transpose(0, 1)
                            for s in range(m)]                                                   # (tiles, terms, rows)
        self._query_row = work[0].view(bh, 1, self.head_dim)
        self._k_matrix = self._stored_k.view(bh, self.head_dim, self._n_terms * m)
        self._v_matrix = self._stored_v.view(bh * tiles, self._n_terms * rows, self.head_dim)
        self._step_work = self._workspace(self._query_row)
        self._step_output = self._step_work.readout.view(self.batch, self.heads, tiles, self.head_dim)

    def _workspace(self, query_row: torch.Tensor) -> _Workspace:
        """Buffers for the products of the N tokens whose queries are ``query_row`` (N B H, 1, D)."""
        cfg, bh, n_terms = self.cfg, self.batch * self.heads, self._n_terms
        n_tok, tiles, rows = query_row.shape[0] // bh, cfg.tiles, cfg.tile_rows
        dots = query_row.new_empty(n_tok * bh, 1, n_terms * cfg.window)
        charge = dots.view(n_tok, bh, cfg.window) if n_terms == 1 else query_row.new_empty(n_tok, bh, cfg.window)
        weights = query_row.new_empty(n_tok * bh * tiles, 1, n_terms * rows)
        readout = query_row.new_empty(n_tok * bh * tiles, 1, self.head_dim)
        return _Workspace(query_row, query_row.view(n_tok, bh, 1, self.head_dim), dots,
                          dots.view(n_tok, bh, n_terms, cfg.window), charge,
                          charge.view(n_tok, bh, tiles, 1, rows), weights,
                          weights.view(n_tok, bh, tiles, n_terms, rows), readout,
                          readout.view(n_tok, bh, tiles, self.head_dim))

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

    def _dac_inputs_(self, qkv: torch.Tensor) -> torch.Tensor:
        """(q, k, v) stacked, in place through the DAC (docs/attention.md#quantization): (Q, W, U), the
        stored rows relative to the half-supply offset."""
        if self._joint_dac is not None:
            lo, hi, inv_step, step, offset = self._joint_dac if qkv.dim() == 4 else (  # (3, 1, 1, 1): a step's
                c.view((3,) + (1,) * (qkv.dim() - 1)) for c in self._joint_dac)     # shape, else (3, 1, ...)
            # (The first clamp stays even where the last one would give the same values: without it a
            # query in (-step / 2, 0) would read -0.0 where the converter gives +0.0.)
            return qkv.clamp_(lo, hi).mul_(inv_step).round_().mul_(step).clamp_(lo, hi).sub_(offset)
        qkv[0] = _dac(qkv[0], self._query_dac)
        # K and V share their converter settings: one pass for both.
        qkv[1:] = _dac(qkv[1:], self._stored_dac) - self._stored_offset
        return qkv

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write token t's key and value, apply its query; (B, H, D) each -> y_t (B, H, D)."""
        self._check_all(q, k, v, 1)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            with torch.no_grad():
                return self._step(q, k, v)
        return self._step(q, k, v)

    def _step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self._allocated:
            self._allocate(q)
        if q.device != self._device or k.device != self._device or v.device != self._device:
            q, k, v = (x.to(self._device) for x in (q, k, v))
        for row, x in zip(self._qkv_rows, (q, k, v)):  # in the state's dtype (torch.stack with out=
            row.copy_(x)                                # costs about twice these three copies)
        qkv = self._qkv
        self._record_nan(qkv)
        self._dac_inputs_(qkv)
        # The write into slot t mod M (docs/attention.md#second-array-product-and-sub-tiles): the powers
        # of W and U, times the cells of row ``slot``.
        slot = self.steps % self.cfg.window
        written = self._written
        if len(self._powers) > 1:
            first, square, cube = self._power_views
            torch.mul(first, first, out=square)
            torch.mul(square, first, out=cube)   # (W * W) * W, as W ** 3 computes it
        if self._gains is not None:
            written.mul_(self._gain_at[slot])
        self._write_k[slot].copy_(self._written_k)
        self._write_v[slot].copy_(self._written_v)
        if self._constant is not None and self.steps < self.cfg.window:  # the slot's first key
            for target, constant in zip(self._write_constant[slot][:2], self._write_constant[slot][2:]):
                target.copy_(constant)
        self.steps += 1
        filled = min(self.steps, self.cfg.window)
        empty = self._slot_index >= filled if self._implicit_c0 and filled < self.cfg.window else None
        self._array_products(self._step_work, self._k_matrix, self._table_k_at[slot], self._table_v_at[slot],
                             self._v_matrix, empty)
        y = self._sub_tile_readout(self._step_output, filled)
        return y if y.dtype == q.dtype else y.to(q.dtype)

    @torch.no_grad()
    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A prompt of T tokens at once: (B, H, T, D) each -> y (B, H, T, D), exactly the outputs (and the
        final state) of T calls of ``step``: every token's products are computed as a step computes
        them, against the arrays as that token sees them, batched over the tokens (in chunks that bound
        memory). With readout noise the tokens are stepped one by one (the noise draws follow the steps),
        and on CPU too (``PREFILL_GATHERS_ON_CPU``: stepping is faster there).
        """
        if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k, v)) or q.shape[2] != k.shape[2] \
                or q.shape[2] != v.shape[2]:
            raise ValueError(f"prefill takes q, k, v of shape (batch, heads, tokens, head_dim) = "
                             f"{(self.batch, self.heads, 'T', self.head_dim)}; got "
                             f"{[tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in (q, k, v)]}")
        tokens = q.shape[2]
        self._check_all(q[:, :, 0], k[:, :, 0], v[:, :, 0], tokens)
        if not self._allocated:
            self._allocate(q)
        if self.cfg.readout_noise > 0 or tokens == 1 or (self._device.type == "cpu" and not PREFILL_GATHERS_ON_CPU):
            return torch.stack([self.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(tokens)], dim=2)
        out_dtype = q.dtype
        per_token = self._n_terms * self.batch * self.heads * self.cfg.window * self.head_dim
        chunk = max(1, PREFILL_CHUNK_ELEMENTS // per_token)
        outputs = []
        for start in range(0, tokens, chunk):
            sl = slice(start, min(tokens, start + chunk))
            qkv = torch.stack([x[:, :, sl].transpose(1, 2).transpose(0, 1) for x in (q, k, v)]).to(
                device=self._device, dtype=self._dtype)                                  # (3, N, B, H, D)
            self._record_nan(qkv)
            outputs.append(self._prefill_chunk(self._dac_inputs_(qkv)))
        return torch.cat(outputs, dim=0).permute(1, 2, 0, 3).to(out_dtype)

    def _chunk_columns(self, qkv: torch.Tensor, slots: torch.Tensor):
        """The chunk's keys and values as a step writes them (powers, cells of their rows, the constant
        term): K (B, H, D, terms, N), V (B, H, N, terms, D)."""
        written = [qkv[1:]]                                                           # (K/V, N, B, H, D)
        if len(self._powers) > 1:
            written.append(written[0] * written[0])
            written.append(written[1] * written[0])
        written = torch.stack(written)                                                # (P, K/V, N, B, H, D)
        if self._gains is not None:
            written = written * torch.stack(self._gains)[:, :, slots].permute(0, 2, 1, 3).unsqueeze(2)
        n_tok, n_pow = qkv.shape[1], len(self._powers)
        new_k = written.new_empty(self.batch, self.heads, self.head_dim, self._n_terms, n_tok)
        new_v = written.new_empty(self.batch, self.heads, n_tok, self._n_terms, self.head_dim)
        new_k[:, :, :, :n_pow] = written[:, 0].permute(2, 3, 4, 0, 1)
        new_v[:, :, :, :n_pow] = written[:, 1].permute(2, 3, 1, 0, 4)
        if self._constant is not None:
            constant = self._constant[:, :, slots]                                    # (K/V, H, N, D)
            new_k[:, :, :, n_pow] = constant[0].transpose(-1, -2)
            new_v[:, :, :, n_pow] = constant[1]
        return new_k, new_v

    def _prefill_chunk(self, qkv: torch.Tensor) -> torch.Tensor:
        """Tokens t0 .. t0 + N - 1 (inputs (3, N, B, H, D) after the DAC): the arrays each token sees, gathered
        from the current arrays and the chunk's own keys; y (N, B, H, D); the arrays advanced."""
        m, n_tok, t0 = self.cfg.window, qkv.shape[1], self.steps
        bh, n_terms, dim = self.batch * self.heads, self._n_terms, self.head_dim
        times = torch.arange(t0, t0 + n_tok, device=self._device)
        slots = times % m
        new_k, new_v = self._chunk_columns(qkv, slots)
        # Row of [current arrays; chunk] in slot s at token t: the chunk's latest write there, else old.
        s = self._slot_index
        last = times[:, None] - (times[:, None] - s[None, :]) % m                    # (N, M) token index
        rows = torch.where(last >= t0, m + last - t0, s[None, :].expand(n_tok, m)).reshape(-1)
        tiles, tile_rows = self.cfg.tiles, self.cfg.tile_rows
        seen_k = torch.cat([self._stored_k, new_k], dim=4).index_select(4, rows)      # (B, H, D, terms, N M)
        seen_k = seen_k.view(self.batch, self.heads, dim, n_terms, n_tok, m).permute(4, 0, 1, 2, 3, 5)
        by_slot_v = self._stored_v.transpose(3, 4).reshape(self.batch, self.heads, m, n_terms, dim)
        seen_v = torch.cat([by_slot_v, new_v], dim=2).index_select(2, rows)           # (B, H, N M, terms, D)
        seen_v = seen_v.view(self.batch, self.heads, n_tok, tiles, tile_rows, n_terms, dim
                             ).permute(2, 0, 1, 3, 5, 4, 6)                           # (N, B, H, tiles, terms, rows, D)
        offsets = (m - 1 - slots)[:, None] + s[None, :]                              # (N, M)
        table_v = self._table_v[:, offsets].view(n_terms, n_tok, tiles, tile_rows).permute(1, 2, 0, 3)
        empty = None
        if self._implicit_c0 and t0 < m:   # slots holding no key yet for each token
            empty = (s[None, :] >= torch.clamp(times + 1, max=m)[:, None]).unsqueeze(1)  # (N, 1, M)
        work = self._workspace(qkv[0].reshape(n_tok * bh, 1, dim))
        self._array_products(work, seen_k.reshape(n_tok * bh, dim, n_terms * m),
                             self._table_k[:, offsets].transpose(0, 1).unsqueeze(1), table_v.unsqueeze(1),
                             seen_v.reshape(n_tok * bh * tiles, n_terms * tile_rows, dim), empty)
        y = self._sub_tile_readout(work.readout.view(n_tok, self.batch, self.heads, tiles, dim), m)
        # Advance: the chunk's last M tokens are in their slots now (distinct slots).
        keep = slice(max(0, n_tok - m), n_tok)
        self._stored_k[..., slots[keep]] = new_k[..., keep]
        self._stored_v[:, :, slots[keep] // tile_rows, :, slots[keep] % tile_rows] = new_v[:, :, keep].transpose(0, 2).transpose(1, 2)
        self.steps += n_tok
        return y

    def _array_products(self, work: _Workspace, k_matrix, table_k, table_v, v_matrix,
                        empty: Optional[torch.Tensor] = None) -> None:
        """Eqs. 3-4 for N tokens at once, each against the arrays it sees, into ``work`` (its queries
        given): ``k_matrix`` (N B H, D, terms M), ``v_matrix`` (N B H tiles, terms rows, D), the tables'
        factors (N, 1, terms, M) and (N, 1, tiles, terms, rows), or without the leading (N, 1) for one
        token. Every product is one (D).(D x terms M) or (terms rows).(terms rows x D) per token and head,
        as in a single step, so a token's result does not depend on N. ``empty`` (N or 1, 1, M): the
        slots holding no key yet (needed only with the implicit c_0 terms; None: none). Leaves the sub-tile
        readouts before their ADC in ``work.readout``."""
        # First dot product on the K array (eq. 4): S[s] = sum_n factor_n(age of s) (Q . term_n[s]) / S_sat.
        torch.bmm(work.query_row, k_matrix, out=work.dots)
        charge = work.dots_by_term.mul_(table_k)
        if self._n_terms > 1:
            torch.sum(charge, dim=-2, out=work.charge)
        charge = work.charge
        if self._implicit_c0:  # + c_0 sum_d Q / S_sat, the same for every slot
            charge.add_(work.query.sum(-1), alpha=self._c0_k)
        # Charge to pulse (eq. 3): 0 for an empty slot (every stored term 0; the implicit c_0: masked).
        charge.clamp_(0.0, 1.0)
        if empty is not None:
            charge.masked_fill_(empty, 0.0)
        # Second dot product per sub-tile (docs/attention.md#second-array-product-and-sub-tiles):
        # A_r[d] = sum_n sum_{s in r} P[s] factor_n(age of s) term_n[s, d].
        torch.mul(work.pulse_by_tile, table_v, out=work.weights_by_tile)
        torch.bmm(work.weights, v_matrix, out=work.readout)
        if self._implicit_c0:  # + c_0 sum_{s in r} P[s] / S_sat_av, the same for every column
            work.readout_by_tile.add_(work.pulse_by_tile.sum(-1), alpha=self._c0_v)

    def _sub_tile_readout(self, readout: torch.Tensor, filled: int) -> torch.Tensor:
        """Readout noise on every read sub-tile (those holding a key: ``filled`` slots), each sub-tile's
        pulse counter (clamp + quantize), then the digital adders: readouts (..., tiles, D) -> (..., D);
        an empty sub-tile reads 0."""
        cfg = self.cfg
        if cfg.readout_noise > 0:
            read = self._tile_index < -(-filled // cfg.tile_rows)
            noise = torch.randn((1,) + readout.shape, generator=self.generator, device=readout.device,
                                dtype=readout.dtype)[0]
            readout = readout + cfg.readout_noise * torch.where(read.view(cfg.tiles, 1), noise, 0.0)
        return _quantize_(readout, self._output_adc, self._adc_clamp_first).sum(dim=-2)

    def extra_repr(self) -> str:  # pragma: no cover - debugging aid
        return (f"AnalogKVDecoder(batch={self.batch}, heads={self.heads}, head_dim={self.head_dim}, "
                f"window={self.cfg.window}, steps={self.steps})")

    __repr__ = extra_repr

