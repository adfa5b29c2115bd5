"""The polynomial cell model (paper coefficients) against the authors' SPICE simulations of one 64 x 64
K array and one 64 x 64 V array (../shared/reference/spice_64x64_arrays*.npz; README there).

Axis convention of the npz: (trial, token, feature); axis 1 of K and V is the key row, so the arrays'
products are Q @ f(K)^T and phi_S @ f(V), as in the library's (T, D) layout.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gaincell.attention import PAPER_COEFFICIENTS, AnalogAttentionConfig
from gaincell.attention.reference import analog_attention_dense, hard_sigmoid, key_array_product, value_array_product

REFERENCE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "reference"
TOLERANCE = 0.01  # relative error (Frobenius norm) the issue asks for


def spice_config() -> AnalogAttentionConfig:
    """Paper coefficients folded at 0.9 V, leakage off, no quantization, one 64-key sub-tile."""
    return AnalogAttentionConfig(window=64, tile_rows=64, coefficients=PAPER_COEFFICIENTS, decay_per_step=0.0,
                                 query_levels=None, stored_levels=None, output_levels=None)


def load(name: str):
    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.skip(f"authors' SPICE data not found at {path} (../shared/reference is not in this checkout)")
    data = np.load(path)
    return {key: torch.from_numpy(data[key].astype(np.float64)) for key in ("Q", "K", "V", "S", "phi_S", "output")}


def relative_error(model: torch.Tensor, spice: torch.Tensor) -> float:
    return float((model - spice).norm() / spice.norm())


CAUSAL = torch.tril(torch.ones(64, 64, dtype=torch.bool))


@pytest.fixture(scope="module")
def arrays():
    return load("spice_64x64_arrays.npz")


@pytest.fixture(scope="module")
def negated():
    return load("spice_64x64_arrays_negated.npz")


def test_first_array_charge(arrays):
    cfg = spice_config()
    assert arrays["S"][:, ~CAUSAL].abs().max() == 0  # the SPICE S is causal: keys after the query read 0
    S = key_array_product(arrays["Q"], arrays["K"] - cfg.stored_offset, cfg)
    error = relative_error(S[:, CAUSAL], arrays["S"][:, CAUSAL])
    assert error < TOLERANCE, f"first array S relative error {error:.4f}"
    for trial in range(S.shape[0]):  # every trial, not just on average
        assert relative_error(S[trial][CAUSAL], arrays["S"][trial][CAUSAL]) < TOLERANCE
    # the fitted cubic matters: the linear cell (slope g) is far off the SPICE charge
    S_linear = key_array_product(arrays["Q"], arrays["K"] - 0.45, AnalogAttentionConfig())
    assert relative_error(S_linear[:, CAUSAL], arrays["S"][:, CAUSAL]) > 5 * TOLERANCE


def test_charge_to_pulse(arrays):
    torch.testing.assert_close(hard_sigmoid(arrays["S"], spice_config()), arrays["phi_S"], rtol=0, atol=1e-6)


def test_second_array_output(arrays):
    cfg = spice_config()
    A = value_array_product(arrays["phi_S"], arrays["V"] - cfg.stored_offset, cfg).clamp(-1, 1)
    error = relative_error(A, arrays["output"])
    assert error < TOLERANCE, f"second array output relative error {error:.4f}"
    assert (arrays["output"].abs() == 1).any() and (A.abs() == 1).any()  # the readout clamp is exercised


def test_end_to_end_attention_from_q_k_v(arrays):
    """The whole dense model (one 64-key sub-tile, causal) from the SPICE inputs alone: the first array's
    0.26 % error passes through the HardSigmoid into the output."""
    cfg = spice_config()
    y = analog_attention_dense(arrays["Q"][:, None], arrays["K"][:, None], arrays["V"][:, None], cfg)[:, 0]
    error = relative_error(y, arrays["output"])
    assert error < TOLERANCE, f"end-to-end relative error {error:.4f}"


def test_negated_variant(arrays, negated):
    """Same inputs with the sign-inverted first array: S and the output both flip sign (the negative
    half of a signed implementation); the cell model reproduces both up to that sign."""
    cfg = spice_config()
    for key in ("Q", "K", "V"):
        assert torch.equal(arrays[key], negated[key])
    S = key_array_product(negated["Q"], negated["K"] - cfg.stored_offset, cfg)
    error = relative_error(-S[:, CAUSAL], negated["S"][:, CAUSAL])
    assert error < TOLERANCE, f"negated first array relative error {error:.4f}"
    torch.testing.assert_close(hard_sigmoid(negated["S"], cfg), negated["phi_S"], rtol=0, atol=1e-6)
    A = value_array_product(negated["phi_S"], negated["V"] - cfg.stored_offset, cfg).clamp(-1, 1)
    error = relative_error(-A, negated["output"])
    assert error < TOLERANCE, f"negated second array relative error {error:.4f}"
