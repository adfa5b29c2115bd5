"""Pipeline stage ``fit``: the third-order polynomial cell model from the SPICE characterisation.

The model (eq. 4) says the charge a cell adds for an input pulse ``u`` (in units
of T_max) and a stored weight ``y = K - 0.45`` read at word-line voltage ``x`` is

    u * f(y, x),   f(y, x) = sum_{i + j <= 3} C[i][j] * y**i * x**j

with ``f`` in the paper's current units (uA). Two fits are made, both reported (docs/attention.md#cell-coefficients):

* ``read_voltage`` (the authors' procedure, default primary): a cubic in ``y`` at the full read
  voltage gives the folded ``c_i`` (what the model computes with); the ten ``C[i][j]`` are then
  ``c_i`` spread over ``j`` by powers of V_read like the paper's (``C[i][j+1] = V_read * C[i][j]``),
  so folding them at 0.9 V gives the ``c_i`` back exactly.
* ``full_grid``: a least-squares fit of all ten ``C[i][j]`` to the whole (stored, read-voltage)
  grid; its fold at 0.9 V generally differs from the read-voltage fit.

Normalisation (docs/attention.md#cell-coefficients): our stored levels are already the model's ``K`` in [0, 0.9] (the device
stage maps them onto the cell's physical window), our read window ``[read_v_min, read_v_max]`` maps
linearly onto [0.45, 0.9] V, and one current scale factor (applied to both fits) makes the
read-voltage fit's ``c_1`` equal the paper's 13.612, so the model's constants ``g``, 80 and 40 keep
their meaning. The cell's shape (``c_0/c_1``, ``c_2/c_1``, ``c_3/c_1``) is ours.

Writes ``results/<profile>/fit/coefficients.json`` (key ``coefficients``: ten floats, the order of docs/attention.md#cell-coefficients,
read by ``attention.coefficients: fitted``) and ``fit_points.csv`` (data, predictions, residuals).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from gaincell.attention.config import PAPER_COEFFICIENTS, fold_coefficients
from gaincell.device.netlists import ODD_BY_CONSTRUCTION
from gaincell.device.stage import config_hash
from gaincell.io import atomic_to_csv, atomic_write_json
from gaincell.io import finite_or_none as _finite

PAPER_LINEAR_SLOPE = 19.3


class FitError(ValueError):
    """The data cannot be fitted (NaNs, too few points, no linear response)."""


def monomials(order: int) -> List[Tuple[int, int]]:
    """(i, j) with i + j <= order, in the spec's order: by i, then j (order 3 gives docs/attention.md#cell-coefficients's)."""
    if not isinstance(order, (int, np.integer)) or order < 1:
        raise FitError(f"fit.order={order!r}: expected an integer >= 1")
    return [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]


def _check(arrays: Dict[str, np.ndarray], n_coeffs: int, min_points: int) -> int:
    n = None
    for name, a in arrays.items():
        a = np.asarray(a, dtype=float)
        if n is None:
            n = a.size
        elif a.size != n:
            raise FitError(f"{name} has {a.size} values, expected {n} (one per data point)")
        bad = ~np.isfinite(a)
        if bad.any():
            raise FitError(f"{name} has {int(bad.sum())} NaN/inf values of {a.size}: "
                           f"drop or re-simulate those points before fitting")
    need = max(int(min_points), n_coeffs)
    if n is None or n < need:
        raise FitError(f"{n or 0} data points: the fit of {n_coeffs} coefficients needs at least {need}")
    return int(n)


def _residuals(pred: np.ndarray, target: np.ndarray) -> Dict[str, float]:
    r = pred - target
    scale = float(np.max(np.abs(target))) or 1.0
    return {"rms": float(np.sqrt(np.mean(r ** 2))), "max": float(np.max(np.abs(r))),
            "rms_relative_to_full_scale": float(np.sqrt(np.mean(r ** 2)) / scale),
            "max_relative_to_full_scale": float(np.max(np.abs(r)) / scale), "points": int(r.size)}


def fit_surface(y, x, u, target, order: int = 3, min_points: int = 10) -> Tuple[np.ndarray, Dict[str, float]]:
    """Least squares of ``target = u * sum C[i][j] y^i x^j``; coefficients in ``monomials(order)`` order."""
    mons = monomials(order)
    _check({"stored weight y": y, "read voltage x": x, "pulse u": u, "target": target}, len(mons), min_points)
    y, x, u, t = (np.asarray(a, float).ravel() for a in (y, x, u, target))
    distinct_x = np.unique(np.round(x, 12)).size
    if distinct_x <= order:
        raise FitError(f"{distinct_x} distinct read voltages: a full-grid fit of order {order} needs at "
                       f"least {order + 1}")
    a = np.stack([u * y ** i * x ** j for i, j in mons], axis=1)
    coeffs, *_ = np.linalg.lstsq(a, t, rcond=None)
    return coeffs, _residuals(a @ coeffs, t)


def fit_folded(y, u, target, order: int = 3, min_points: int = 10) -> Tuple[np.ndarray, Dict[str, float]]:
    """Least squares of ``target = u * sum_i c_i y^i`` at one read voltage: (c_0..c_order), residuals."""
    _check({"stored weight y": y, "pulse u": u, "target": target}, order + 1, min_points)
    y, u, t = (np.asarray(a, float).ravel() for a in (y, u, target))
    if np.unique(np.round(y, 12)).size <= order:
        raise FitError(f"{np.unique(y).size} distinct stored levels: a cubic needs at least {order + 1}")
    a = np.stack([u * y ** i for i in range(order + 1)], axis=1)
    coeffs, *_ = np.linalg.lstsq(a, t, rcond=None)
    return coeffs, _residuals(a @ coeffs, t)


def least_squares_standard_errors(design: np.ndarray, target: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """Standard errors of least-squares coefficients: sqrt(diag(s^2 (A^T A)^-1)), s^2 = RSS / (n - p).

    The residuals here are model error (a cubic through a smooth SPICE curve), not noise, so the SE
    measures how well the data pin each coefficient given that misfit: a coefficient within one SE of
    zero is not resolved by the fit.
    """
    a = np.asarray(design, float)
    n, p = a.shape
    if n <= p:
        return np.full(p, np.nan)
    rss = float(np.sum((a @ coeffs - np.asarray(target, float)) ** 2))
    cov = rss / (n - p) * np.linalg.pinv(a.T @ a)
    return np.sqrt(np.clip(np.diag(cov), 0.0, None))


def folded_standard_errors(y, u, target, coeffs: Sequence[float]) -> List[float]:
    """Standard errors of ``fit_folded``'s (c_0..c_order) on the same data."""
    y, u, t = (np.asarray(a, float).ravel() for a in (y, u, target))
    a = np.stack([u * y ** i for i in range(len(coeffs))], axis=1)
    return [float(v) for v in least_squares_standard_errors(a, t, np.asarray(coeffs, float))]


def coefficient_report(folded: Sequence[float], se: Sequence[float], cell_kind: Optional[str],
                       target_c1: float) -> List[Dict[str, Any]]:
    """Each folded c_i with its standard error and what sets it: ``measured`` (by the fit),
    ``imposed by the normalisation`` (c_1 = target_c1, through the current scale) or, for a pair cell
    that is odd by construction, ``zero by construction`` (c_0, c_2)."""
    rows = []
    for i, (c, e) in enumerate(zip(folded, se)):
        if i == 1:
            status = "imposed"
            note = f"the current scale factor is chosen so that c_1 = {target_c1} (docs/attention.md#cell-coefficients)"
        elif i % 2 == 0 and cell_kind in ODD_BY_CONSTRUCTION:
            status = "zero by construction"
            note = f"the {cell_kind} cell is odd in W, so even terms vanish whatever the device"
        else:
            status = "measured"
            note = "fitted to the SPICE read sweep"
        z = abs(c) / e if e and e > 0 and math.isfinite(e) else float("inf") if c else 0.0
        rows.append({"name": f"c{i}", "value": float(c), "standard_error": float(e), "status": status,
                     "significance": float(z), "resolved": bool(status == "measured" and z > 1.0), "note": note})
    return rows


def zero_crossing(folded: Sequence[float], offset_v: float = 0.45) -> Optional[float]:
    """Stored voltage K (V) where the folded cubic crosses zero, the real root nearest the offset within
    K in [0, 2 * offset_v]; None when it does not cross there."""
    roots = np.roots(np.asarray(folded, float)[::-1])
    real = [float(r.real) for r in roots if abs(r.imag) < 1e-9 and abs(r.real) <= offset_v]
    return offset_v + min(real, key=abs) if real else None


def spread_folded(folded: Sequence[float], read_voltage: float, order: int = 3) -> List[float]:
    """Ten ``C[i][j]`` from four ``c_i`` the authors' way: ``C[i][j] ∝ V^j``, folding back to ``c_i``.

    ``C[i][j] = c_i V^j / sum_{k=0}^{order-i} V^(2k)``, so ``sum_j C[i][j] V^j = c_i``.
    """
    out = []
    for i, j in monomials(order):
        norm = sum(read_voltage ** (2 * k) for k in range(order - i + 1))
        out.append(float(folded[i]) * read_voltage ** j / norm)
    return out


def fold(coefficients: Sequence[float], read_voltage: float, order: int = 3) -> List[float]:
    folded = [0.0] * (order + 1)
    for (i, j), c in zip(monomials(order), coefficients):
        folded[i] += float(c) * read_voltage ** j
    return folded


def linear_slope(y, u, target) -> float:
    """Slope ``g`` of the linear cell ``target = g * u * y`` (least squares through the origin)."""
    y, u, t = (np.asarray(a, float).ravel() for a in (y, u, target))
    z = u * y
    denom = float(z @ z)
    if denom <= 0:
        raise FitError("no nonzero input x weight products: cannot fit a linear slope")
    return float(z @ t / denom)


def linear_slope_standard_error(y, u, target, slope: float) -> float:
    """Standard error of ``linear_slope`` (one-parameter least squares through the origin)."""
    y, u, t = (np.asarray(a, float).ravel() for a in (y, u, target))
    return float(least_squares_standard_errors((u * y)[:, None], t, np.array([slope]))[0])


def normalise(df: pd.DataFrame, read_window_v: Tuple[float, float], pulse_width_max_ns: float,
              model_read_voltage: float = 0.9, model_read_min_v: float = 0.45,
              model_offset_v: float = 0.45) -> pd.DataFrame:
    """Model coordinates of each read-sweep row: y, x, u, and the raw target (mean current, uA)."""
    for col in ("level_v", "read_v", "pulse_width_ns", "charge_c"):
        if col not in df.columns:
            raise FitError(f"cell sweep has no column {col!r}: is it the device stage's cell_sweep.csv?")
    lo, hi = float(read_window_v[0]), float(read_window_v[1])
    out = pd.DataFrame({
        "y": df["level_v"].to_numpy(float) - model_offset_v,
        "u": df["pulse_width_ns"].to_numpy(float) / float(pulse_width_max_ns),
        # charge per T_max, in uA: the "current" of the model
        "target_raw_ua": df["charge_c"].to_numpy(float) / (float(pulse_width_max_ns) * 1e-9) * 1e6,
        "read_v": df["read_v"].to_numpy(float), "level_v": df["level_v"].to_numpy(float),
        "pulse_width_ns": df["pulse_width_ns"].to_numpy(float)})
    if hi > lo:
        out["x"] = model_read_min_v + (out["read_v"] - lo) / (hi - lo) * (model_read_voltage - model_read_min_v)
    else:
        out["x"] = model_read_voltage
    return out


def _full_grid_fit(pts: pd.DataFrame, at_read: np.ndarray, v_read: float, order: int,
                   min_points: int) -> Dict[str, Any]:
    """The ten C[i][j] fitted on the whole (stored, read voltage) grid; adds ``pred_full_grid`` to ``pts``.
    A failure is reported in the result (``error``), not raised: this fit is the secondary one by default."""
    try:
        coeffs_fg, res_fg = fit_surface(pts["y"], pts["x"], pts["u"], pts["target"], order, min_points)
    except FitError as err:
        pts["pred_full_grid"] = np.nan
        return {"coefficients": None, "error": str(err)}
    a = np.stack([pts["u"] * pts["y"] ** i * pts["x"] ** j for i, j in monomials(order)], axis=1)
    pts["pred_full_grid"] = a @ coeffs_fg
    return {"coefficients": [float(c) for c in coeffs_fg], "folded": fold(coeffs_fg, v_read, order),
            "residuals": res_fg, "residuals_at_read_voltage": _residuals(
                pts.loc[at_read, "pred_full_grid"].to_numpy(), pts.loc[at_read, "target"].to_numpy())}


def _paper_reference(v_read: float) -> Dict[str, Any]:
    """The authors' coefficients, folded at ``v_read``, and their shape: what our fit is compared with."""
    paper_folded = fold_coefficients(PAPER_COEFFICIENTS, v_read)
    return {"coefficients": list(PAPER_COEFFICIENTS), "folded": list(paper_folded),
            "linear_slope": PAPER_LINEAR_SLOPE,
            "shape": {"c0_over_c1": paper_folded[0] / paper_folded[1],
                      "c2_over_c1": paper_folded[2] / paper_folded[1],
                      "c3_over_c1": paper_folded[3] / paper_folded[1]},
            "source": "Leroux et al., Nat. Comput. Sci. 2025 (docs/attention.md#cell-coefficients)"}


def fit_characterization(df: pd.DataFrame, read_window_v: Tuple[float, float], pulse_width_max_ns: float,
                         fit_cfg, cell_kind: Optional[str] = None) -> Tuple[Dict[str, Any], pd.DataFrame]:
    """Both fits, the scale factor and residuals (normalised units) for one read sweep.

    ``cell_kind`` (``device.cell`` of the sweep) only labels the coefficients (see ``coefficient_report``).
    """
    get = (lambda k: fit_cfg[k]) if hasattr(fit_cfg, "__getitem__") else (lambda k: getattr(fit_cfg, k))
    order, min_points = int(get("order")), int(get("min_points"))
    v_read = float(get("model_read_voltage"))
    method = str(get("method"))
    if method not in ("read_voltage", "full_grid"):
        raise FitError(f"fit.method={method!r}: expected read_voltage or full_grid")
    which = str(get("pulse_widths"))
    if which not in ("all", "max"):
        raise FitError(f"fit.pulse_widths={which!r}: expected all or max")
    if order != 3:
        # the attention model and coefficients.json carry exactly the ten C[i][j] of order 3
        raise FitError(f"fit.order={order}: the nonlinear attention model uses order 3")
    pts = normalise(df, read_window_v, pulse_width_max_ns, v_read, float(get("model_read_min_v")),
                    float(get("model_offset_v")))
    if which == "max":
        pts = pts[np.isclose(pts["pulse_width_ns"], pts["pulse_width_ns"].max())]
    at_read = np.isclose(pts["x"], v_read)
    sub = pts[at_read]
    folded_raw, _ = fit_folded(sub["y"], sub["u"], sub["target_raw_ua"], order, min_points)
    if not folded_raw[1] > 0:
        raise FitError(f"the fitted linear coefficient c_1 = {folded_raw[1]:.4g} uA is not positive: the "
                       f"cell's signed output does not grow with the stored weight (check the stored window "
                       f"and device.cell)")
    scale = float(get("target_c1")) / float(folded_raw[1])
    pts["target"] = pts["target_raw_ua"] * scale
    sub = pts[at_read]
    folded, res_rv = fit_folded(sub["y"], sub["u"], sub["target"], order, min_points)
    folded_se = folded_standard_errors(sub["y"], sub["u"], sub["target"], folded)
    coeffs_rv = spread_folded(folded, v_read, order)
    slope = linear_slope(sub["y"], sub["u"], sub["target"])
    slope_se = linear_slope_standard_error(sub["y"], sub["u"], sub["target"], slope)
    pts["pred_read_voltage"] = np.nan
    pts.loc[at_read, "pred_read_voltage"] = sub["u"] * np.polyval(folded[::-1], sub["y"])

    full = _full_grid_fit(pts, at_read, v_read, order, min_points)

    if method == "full_grid" and full.get("coefficients") is None:
        raise FitError(f"fit.method=full_grid but the full-grid fit failed: {full['error']}")
    primary = coeffs_rv if method == "read_voltage" else full["coefficients"]
    primary_res = res_rv if method == "read_voltage" else full["residuals"]
    pts["residual"] = pts["target"] - (pts["pred_read_voltage"] if method == "read_voltage" else pts["pred_full_grid"])
    result = {
        "coefficients": [float(c) for c in primary],
        "order": [list(m) for m in monomials(order)],
        "method": method,
        "folded": [float(c) for c in fold(primary, v_read, order)],
        "read_voltage_v": v_read,
        "linear_slope": slope,
        "linear_slope_standard_error": slope_se,
        "linear_slope_note": ("least-squares slope g of target = g * u * y at V_read (measured): the linear "
                              "hardware model's gain when attention.gain is null and coefficients=fitted"),
        "folded_standard_errors": folded_se,
        "coefficient_report": coefficient_report(folded, folded_se, cell_kind, float(get("target_c1"))),
        "residuals": primary_res,
        "units": "paper current units (uA of the authors' cell) per unit input pulse (T_max); y = K - 0.45 V",
        "read_voltage_fit": {"coefficients": coeffs_rv, "folded": [float(c) for c in folded], "residuals": res_rv},
        "full_grid": full,
        "zero_crossing_k_v": zero_crossing(folded, float(get("model_offset_v"))),
        "shape": {"c0_over_c1": float(folded[0] / folded[1]), "c2_over_c1": float(folded[2] / folded[1]),
                  "c3_over_c1": float(folded[3] / folded[1])},
        "normalisation": {"read_window_v": [float(read_window_v[0]), float(read_window_v[1])],
                          "model_read_window_v": [float(get("model_read_min_v")), v_read],
                          "model_stored_range_v": [0.0, float(get("model_stored_max_v"))],
                          "scale_factor": scale,
                          "scale_factor_units": "paper uA per uA of our cell's mean current over T_max",
                          "target_c1": float(get("target_c1")), "pulse_width_max_ns": float(pulse_width_max_ns),
                          "pulse_widths": which},
        "paper": _paper_reference(v_read),
        "n_points": int(len(pts)),
    }
    return result, pts


def fit_mismatch(mm: pd.DataFrame, nominal: pd.DataFrame, scale: float, pulse_width_max_ns: float,
                 order: int = 3, offset_v: float = 0.45) -> Tuple[Dict[str, Any], pd.DataFrame]:
    """One cubic per Monte-Carlo cell (``mismatch.csv``: every stored level at V_read and T_max), in the
    nominal fit's units (its current ``scale``, NOT renormalised per cell, so gain differences survive).

    Returns the spread of each folded c_i across cells (standard deviation, ddof=1, with its own standard
    error sigma / sqrt(2 (N - 1)) of a Gaussian sample), the gain spread sigma(c_1)/mean(c_1) (what
    ``attention.cell_variation`` models: one gain factor per physical cell) and the offset spread
    sigma(c_0), plus the per-cell table. ``nominal`` holds the same points of the nominal cell.
    """
    def folded_of(df: pd.DataFrame) -> np.ndarray:
        y = df["level_v"].to_numpy(float) - offset_v
        t = df["charge_c"].to_numpy(float) / (pulse_width_max_ns * 1e-9) * 1e6 * scale
        c, _ = fit_folded(y, np.ones_like(y), t, order, min_points=order + 1)
        return c

    rows = []
    for index, grp in mm.groupby("mc_cell"):
        c = folded_of(grp)
        rows.append({"mc_cell": int(index), "delvto_pos_v": float(grp["delvto_pos_v"].iloc[0]),
                     "delvto_neg_v": float(grp["delvto_neg_v"].iloc[0]), **{f"c{i}": float(v) for i, v in enumerate(c)}})
    cells = pd.DataFrame(rows)
    n = len(cells)
    nominal_c = folded_of(nominal)
    spread = {}
    for i in range(order + 1):
        v = cells[f"c{i}"].to_numpy()
        sd = float(np.std(v, ddof=1)) if n > 1 else float("nan")
        spread[f"c{i}"] = {"nominal": float(nominal_c[i]), "mean": float(v.mean()), "std": sd,
                           "std_standard_error": sd / math.sqrt(2 * (n - 1)) if n > 1 else float("nan")}
    c1 = spread["c1"]["mean"]
    gain = spread["c1"]["std"] / abs(c1) if c1 else float("nan")
    # what the offset spread does to a readout, beside what the gain spread does at a typical weight
    # (|y| = 0.225 V, half the range): the offset is negligible only when this ratio is small
    offset_vs_gain = spread["c0"]["std"] / (spread["c1"]["std"] * 0.225) if spread["c1"]["std"] else float("nan")
    result = {"cells": n, "coefficients": spread, "gain_spread_relative": gain,
              "gain_spread_relative_standard_error": gain / math.sqrt(2 * (n - 1)) if n > 1 else float("nan"),
              "offset_spread": spread["c0"]["std"], "offset_spread_over_c1": spread["c0"]["std"] / abs(c1) if c1 else None,
              "offset_over_gain_effect_at_half_range": offset_vs_gain,
              "units": "folded c_i in the nominal fit's normalised units (paper uA); spreads across Monte-Carlo cells",
              "note": ("cell_variation (attention) models the gain spread: one factor per cell multiplying every "
                       "term; cell_offset_variation models the offset spread sigma(c_0): one additive c_0 per cell, in "
                       "the units of the cells' folded c_i (rescale by the model's c_1 / this fit's c_1)")}
    return result, cells


def _mismatch_result(device_dir: Path, df: pd.DataFrame, summary: Dict[str, Any], result: Dict[str, Any],
                     out_dir: Path, fit_cfg) -> Dict[str, Any]:
    """Per-cell fits of ``device/mismatch.csv`` (written to ``fit/mismatch_fits.csv``), or why there are none."""
    info = dict(summary.get("mismatch") or {})
    path = device_dir / "mismatch.csv"
    mm = pd.read_csv(path) if path.is_file() and path.stat().st_size > 1 else pd.DataFrame()
    if mm.empty or "mc_cell" not in mm.columns:
        return {**info, "available": False, "reason": info.get("reason", f"{path} has no Monte-Carlo cells")}
    read_v, width = float(mm["read_v"].iloc[0]), float(mm["pulse_width_ns"].iloc[0])
    nominal = df[np.isclose(df["read_v"], read_v) & np.isclose(df["pulse_width_ns"], width)]
    spread, cells = fit_mismatch(mm, nominal, result["normalisation"]["scale_factor"],
                                 float(summary["pulse_width_max_ns"]), int(fit_cfg.order),
                                 float(fit_cfg.model_offset_v))
    atomic_to_csv(cells, out_dir / "mismatch_fits.csv")
    return {**info, **spread}


def run(cfg) -> Dict[str, Any]:
    """Fit ``results/<profile>/device/cell_sweep.csv``; write ``results/<profile>/fit/``."""
    started = time.time()
    results_dir = Path(str(cfg.results_dir))
    device_dir, out_dir = results_dir / "device", results_dir / "fit"
    sweep_path, summary_path = device_dir / "cell_sweep.csv", device_dir / "summary.json"
    for path in (sweep_path, summary_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the characterize stage first")
    summary = json.loads(summary_path.read_text())
    df = pd.read_csv(sweep_path)
    result, pts = fit_characterization(df, tuple(summary["read_window_v"]), float(summary["pulse_width_max_ns"]),
                                       cfg.fit, summary.get("cell_kind"))

    result["provenance"] = {
        "config_hash": config_hash(cfg), "device_config_hash": summary.get("config_hash"),
        "ngspice_version": summary.get("ngspice_version"), "technology": summary.get("technology"),
        "corner": summary.get("corner"), "cell_kind": summary.get("cell_kind"),
        "reference_v": summary.get("reference_v"),
        "stored_window_v": summary.get("stored_window_v"), "source": str(sweep_path),
        "fit_config": OmegaConf.to_container(cfg.fit, resolve=True),
        "created_unix_s": time.time(), "seconds": time.time() - started,
    }
    result["normalisation"]["stored_window_v"] = summary.get("stored_window_v")
    result["normalisation"]["cell_kind"] = summary.get("cell_kind")
    result["normalisation"]["reference_v"] = summary.get("reference_v")
    out_dir.mkdir(parents=True, exist_ok=True)
    result["mismatch"] = _mismatch_result(device_dir, df, summary, result, out_dir, cfg.fit)
    atomic_to_csv(pts, out_dir / "fit_points.csv")
    atomic_write_json(out_dir / "coefficients.json", _finite(result))
    f, p = result["folded"], result["paper"]["folded"]
    fg = result["full_grid"].get("folded") if result["full_grid"] else None
    print(f"fit: folded c_i at {result['read_voltage_v']} V = {', '.join(f'{c:.4g}' for c in f)} "
          f"+- {', '.join(f'{e:.2g}' for e in result['folded_standard_errors'])} (c1 imposed) "
          f"(paper {', '.join(f'{c:.4g}' for c in p)}); cell {result['provenance']['cell_kind']}, reference "
          f"{result['provenance']['reference_v']} V; linear slope {result['linear_slope']:.3g} (paper 19.3); "
          f"rms residual {result['residuals']['rms']:.3g} ({100 * result['residuals']['rms_relative_to_full_scale']:.2f} % "
          f"of full scale); scale {result['normalisation']['scale_factor']:.4g}"
          + (f"; full grid folds to {', '.join(f'{c:.4g}' for c in fg)}" if fg else "")
          + f" -> {out_dir / 'coefficients.json'}")
    mm = result["mismatch"]
    if mm.get("available"):
        print(f"fit: Monte-Carlo mismatch, {mm['cells']} cells, sigma(vth) {mm['vth_sigma_v'] * 1e3:.3g} mV: gain spread "
              f"sigma(c1)/c1 = {mm['gain_spread_relative']:.4f} +- {mm['gain_spread_relative_standard_error']:.4f}, "
              f"offset spread sigma(c0) = {mm['offset_spread']:.4g}, sigma(c2) = {mm['coefficients']['c2']['std']:.4g}, "
              f"sigma(c3) = {mm['coefficients']['c3']['std']:.4g}")
    return result


