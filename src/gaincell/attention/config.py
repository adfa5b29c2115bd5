"""The hardware knobs of one analog attention head (docs/attention.md), named once.

This dataclass is all the attention math needs: it imports nothing else from gaincell. Defaults are
the paper's values (TSMC 28 nm gain cell, GPT-2 with a 1,024-token window).
"""
from __future__ import annotations

import json
import math
from dataclasses import InitVar, asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

# docs/attention.md#cell-coefficients: the authors' ten coefficients C[i][j], order (0,0)(0,1)(0,2)(0,3)(1,0)(1,1)(1,2)(2,0)(2,1)(3,0).
PAPER_COEFFICIENTS: Tuple[float, ...] = (
    0.17393044, 0.15653739, 0.14088365, 0.12679529, 5.51975209,
    4.96777688, 4.4709992, -1.44776001, -1.30298401, 46.05483778,
)
# (i, j) index of each of the ten coefficients, in the order above.
COEFFICIENT_ORDER: Tuple[Tuple[int, int], ...] = (
    (0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (3, 0),
)


def fold_coefficients(coefficients: Sequence[float], read_voltage: float) -> Tuple[float, float, float, float]:
    """c_i = sum_j C[i][j] * V_read**j (eq. 4): the four constants the model actually uses."""
    folded = [0.0, 0.0, 0.0, 0.0]
    for (i, j), c in zip(COEFFICIENT_ORDER, coefficients):
        folded[i] += float(c) * read_voltage ** j
    return tuple(folded)  # type: ignore[return-value]


@dataclass(frozen=True)
class AnalogAttentionConfig:
    """One analog attention head.

    Attributes:
        window: sliding window M in tokens; a multiple of ``tile_rows``.
        tile_rows: keys per sub-tile (rows of one 64 x 64 array).
        query_levels: levels of the input pulse width on [0, 1] x T_max (None: no quantization).
        stored_levels: levels of the stored K and V voltages on [0, 0.9] V (None: off).
        output_levels: levels of each sub-tile's pulse-counter readout on [-1, 1] (None: off).
        gain: slope g of the linear cell model (charge per unit pulse x volt).
        qk_saturation: S_sat of the HardSigmoid charge-to-pulse after the K array.
        av_saturation: S_sat normalising the V array's output.
        stored_offset: half-supply offset of the stored weight, V.
        read_voltage: read word-line voltage V_read, V.
        decay_per_step: lambda = L * delta_t / tau, leakage per token step (0: no leakage).
        coefficients: None for the linear cell; ten C[i][j] (the order of docs/attention.md#cell-coefficients) for the nonlinear cell.
        exact_nonlinear_grad: nonlinear model backward: exact polynomial gradient (True) or the
            linear model's gradient as a surrogate (False, docs/attention.md#gradients).
        stored_max: top of the stored-voltage range, V.
        cell_variation: relative standard deviation of each physical cell's gain (a factor
            1 + cell_variation * N(0, 1) on every polynomial term of that cell, c_0 included); one cell
            per head, ring-buffer row and column of the K and V arrays, fixed per chip (``noise_seed``),
            shared across the batch (0: identical cells). See ``gaincell.attention.noise``.
        cell_offset_variation: standard deviation of each physical cell's additive offset delta (a
            random c_0 of that cell, in the units of the folded coefficients c_i: a cell computes
            (gamma * sum_i c_i alpha**i W**i + delta) * x, the offset neither leaks nor depends on the
            stored weight); same cells and layout as ``cell_variation``, fixed per chip (``noise_seed``,
            a stream independent of the gains; 0: no offsets). Not supported by the Triton kernels.
        readout_noise: standard deviation of a Gaussian added to each sub-tile readout A_r before the
            output ADC (range [-1, 1]), fresh per readout (0: off).
        noise_seed: seed of the chip (cell gains) and of the readout-noise stream (integer >= 0).
        read_noise: the old name of ``readout_noise``, accepted by the constructor only (configs in
            checkpoints written before the rename load); read ``readout_noise``.
    """

    window: int = 1024
    tile_rows: int = 64
    query_levels: Optional[int] = 16
    stored_levels: Optional[int] = 8
    output_levels: Optional[int] = 32
    gain: float = 19.3
    qk_saturation: float = 80.0
    av_saturation: float = 40.0
    stored_offset: float = 0.45
    read_voltage: float = 0.9
    decay_per_step: float = 1.56e-4
    coefficients: Optional[Tuple[float, ...]] = None
    exact_nonlinear_grad: bool = False
    stored_max: float = 0.9
    cell_variation: float = 0.0
    cell_offset_variation: float = 0.0
    readout_noise: float = 0.0
    noise_seed: int = 0
    read_noise: InitVar[Optional[float]] = None

    def __post_init__(self, read_noise: Optional[float]) -> None:
        if read_noise is not None:
            if self.readout_noise not in (0.0, read_noise):
                raise ValueError(f"read_noise={read_noise!r} and readout_noise={self.readout_noise!r} disagree: "
                                 f"read_noise is the old name of readout_noise, give one of them")
            object.__setattr__(self, "readout_noise", read_noise)
        if not isinstance(self.tile_rows, int) or self.tile_rows < 1:
            raise ValueError(f"tile_rows={self.tile_rows!r}: expected a positive integer")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window={self.window!r}: expected a positive integer")
        if self.window % self.tile_rows != 0:
            raise ValueError(f"window={self.window} is not a multiple of tile_rows={self.tile_rows}: "
                             f"the window is stored in whole sub-tiles")
        for name in ("query_levels", "stored_levels", "output_levels"):
            levels = getattr(self, name)
            if levels is not None and (not isinstance(levels, int) or levels < 2):
                raise ValueError(f"{name}={levels!r}: expected an integer >= 2, or None to disable")
        for name in ("qk_saturation", "av_saturation", "stored_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive number")
        if not (self.decay_per_step >= 0 and math.isfinite(self.decay_per_step)):
            raise ValueError(f"decay_per_step={self.decay_per_step!r}: expected a finite number >= 0")
        for name in ("cell_variation", "cell_offset_variation", "readout_noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name}={value!r}: expected a finite number >= 0")
            object.__setattr__(self, name, float(value))
        if isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, int) or self.noise_seed < 0:
            raise ValueError(f"noise_seed={self.noise_seed!r}: expected an integer >= 0")
        if self.coefficients is not None:
            coeffs = tuple(float(c) for c in self.coefficients)
            if len(coeffs) != 10:
                raise ValueError(f"coefficients has {len(coeffs)} values: expected 10 "
                                 f"(C[i][j] for i + j <= 3, order {COEFFICIENT_ORDER}) or None")
            if not all(math.isfinite(c) for c in coeffs):
                raise ValueError(f"coefficients={coeffs}: expected finite numbers")
            object.__setattr__(self, "coefficients", coeffs)

    @property
    def noisy(self) -> bool:
        """Whether the chip has cell variation (gain or offset) or readout noise."""
        return self.cell_variation > 0 or self.cell_offset_variation > 0 or self.readout_noise > 0

    @property
    def nonlinear(self) -> bool:
        return self.coefficients is not None

    @property
    def tiles(self) -> int:
        """Sub-tiles per head: window / tile_rows."""
        return self.window // self.tile_rows

    @property
    def folded_coefficients(self) -> Tuple[float, float, float, float]:
        """(c_0, c_1, c_2, c_3) at ``read_voltage`` (eq. 4); the linear model is (0, g, 0, 0)."""
        if self.coefficients is None:
            return (0.0, self.gain, 0.0, 0.0)
        return fold_coefficients(self.coefficients, self.read_voltage)


FITTED_SETS = ("fitted", "fitted_trimmed")  # coefficient sets read from the pipeline's own fit


def trim_offset(coefficients: Sequence[float]) -> Tuple[float, ...]:
    """The cell read against a reference trimmed to its own zero-weight current: every ``C[0][j]`` set to 0,
    so the folded ``c_0`` is 0 at any read voltage and ``c_1..c_3`` are unchanged (docs/attention.md#cell-coefficients).

    A single-ended cell reads ``I(K) - I_ref``; moving the reference from ``I(Vref)`` to the current of the
    stored zero weight (``W = K - 0.45 = 0``, the middle of the stored window) subtracts the polynomial's value
    at ``W = 0``, which is exactly the ``i = 0`` terms. (Measured: characterizing with the reference at the
    middle of the stored window gives the same c_2, c_3 and a c_0 of zero within its fit error.)"""
    return tuple(0.0 if i == 0 else float(c) for (i, _), c in zip(COEFFICIENT_ORDER, coefficients))


def resolve_coefficients(coefficients, fitted_path: Optional[str] = None) -> Optional[Tuple[float, ...]]:
    """A coefficient set from the config: None, ``"paper"`` (docs/attention.md#cell-coefficients), ``"fitted"`` (the pipeline's
    fit: the JSON written by the fit stage, key ``coefficients``), ``"fitted_trimmed"`` (the same with the
    reference trimmed to the zero-weight current, :func:`trim_offset`) or ten numbers."""
    if coefficients is None:
        return None
    if isinstance(coefficients, str):
        if coefficients == "paper":
            return PAPER_COEFFICIENTS
        if coefficients in FITTED_SETS:
            if not fitted_path or not Path(fitted_path).is_file():
                raise FileNotFoundError(f"coefficients={coefficients!r} but the fit result {fitted_path!r} does not "
                                        f"exist: run the fit stage first, or use coefficients=paper")
            with open(fitted_path) as fh:
                fitted = tuple(float(c) for c in json.load(fh)["coefficients"])
            return trim_offset(fitted) if coefficients == "fitted_trimmed" else fitted
        raise ValueError(f"coefficients={coefficients!r}: expected None, 'paper', 'fitted', 'fitted_trimmed' "
                         f"or ten numbers")
    return tuple(float(c) for c in coefficients)


PAPER_GAIN = 19.3   # the paper's linear-model slope g, fitted to its own cell (docs/attention.md#cell-coefficients)
HW_KINDS = ("linear_hw", "nonlinear_hw")  # the analog gain-cell attention kinds


def resolve_gain(gain, coefficients, fitted_path: Optional[str] = None) -> float:
    """The linear hardware model's slope g (``attention.gain``; README, "The linear model's gain").

    A number is used as given. ``None`` means "the cell's own slope": with ``coefficients=fitted`` the
    least-squares slope of the fitted cell (``linear_slope`` in the fit stage's coefficients.json), so
    the linear model and the nonlinear cell it is adapted to share one scale; with ``coefficients=paper``
    the paper's 19.3. The gain is fixed when the linear model is trained and travels in its checkpoint:
    one linear model (the default cell's g) then serves every cell of the nonlinearity study, and
    adaptation (eq. 9) absorbs the gain ratio of any other cell.
    """
    if gain is not None:
        return float(gain)
    if isinstance(coefficients, str) and coefficients == "paper":
        return PAPER_GAIN
    if isinstance(coefficients, str) and coefficients in FITTED_SETS:  # the offset trim leaves the slope
        if not fitted_path or not Path(fitted_path).is_file():
            raise FileNotFoundError(f"attention.gain=null with coefficients={coefficients!r} takes g from the fit "
                                    f"result {fitted_path!r}, which does not exist: run the fit stage first")
        with open(fitted_path) as fh:
            data = json.load(fh)
        if "linear_slope" not in data:
            raise ValueError(f"{fitted_path} has no 'linear_slope': rerun the fit stage")
        return float(data["linear_slope"])
    raise ValueError(f"attention.gain=null with coefficients={coefficients!r}: the slope g is taken from "
                     f"'paper', 'fitted' or 'fitted_trimmed' only; set attention.gain to a number")


def resolve_decay_per_step(value, derived_path: Optional[str] = None) -> float:
    """``attention.decay_per_step``: a number, or ``"derived"``: the value the ``derive_decay`` stage
    computed from our cost model's latency and our measured retention (``derived_path``, key
    ``decay_per_step``; see ``gaincell.hardware.decay``)."""
    if isinstance(value, str):
        if value != "derived":
            raise ValueError(f"attention.decay_per_step={value!r}: expected a number >= 0 or 'derived'")

        if not derived_path or not Path(derived_path).is_file():
            raise FileNotFoundError(f"attention.decay_per_step=derived reads {derived_path!r}, which does not "
                                    f"exist: run the derive_decay stage first")
        with open(derived_path) as fh:
            return float(json.load(fh)["decay_per_step"])
    return float(value)


def analog_config_from_settings(settings: Any) -> AnalogAttentionConfig:
    """Build the attention's dataclass from the Hydra ``attention`` section (``AttentionSettings``, a
    mapping of the same keys, or a dataclass instance): every ``AnalogAttentionConfig`` field present in
    ``settings`` is taken from it (absent ones keep their default: settings written before the field
    existed), ``coefficients``, ``gain`` and ``decay_per_step`` resolved.

    The coefficient set is resolved for ``nonlinear_hw`` only; every other kind gets the linear cell.
    The gain g is resolved (``resolve_gain``) for the hardware kinds; softmax kinds never read it.
    """
    if is_dataclass(settings):
        settings = asdict(settings)
    kind, fitted_path = settings["kind"], settings.get("fitted_coefficients_path")
    coeffs = None
    if kind == "nonlinear_hw":
        coeffs = resolve_coefficients(settings["coefficients"], fitted_path)
        if coeffs is None:
            raise ValueError("attention.kind=nonlinear_hw needs attention.coefficients (paper, fitted, fitted_trimmed or 10 numbers)")
    gain = settings.get("gain")
    if kind in HW_KINDS:
        gain = resolve_gain(gain, settings.get("coefficients"), fitted_path)
    knobs = {f.name: settings[f.name] for f in fields(AnalogAttentionConfig)
             if f.name in settings and f.name not in ("coefficients", "gain")}
    if "decay_per_step" in settings:
        knobs["decay_per_step"] = resolve_decay_per_step(settings["decay_per_step"], settings.get("derived_decay_path"))
    if "read_noise" in settings:  # the old name of readout_noise (an InitVar, not a field)
        knobs["read_noise"] = settings["read_noise"]
    return AnalogAttentionConfig(**knobs, coefficients=coeffs, gain=PAPER_GAIN if gain is None else float(gain))
