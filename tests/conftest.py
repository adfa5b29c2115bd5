"""Shared test set-up: no W&B network, a fixed seed, and the authors' reference data when present."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# pytest -n 2 runs two workers on 2 cores: one torch thread each, or they stall on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("GAINCELL_TEST_THREADS", "1")))

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture
def reference_dir() -> Path:
    """../shared/reference (the authors' published data); tests using it skip when it is absent."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"authors' reference data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
