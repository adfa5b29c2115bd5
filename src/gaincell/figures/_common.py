"""What every figure module shares: reading result files, saving a figure as PNG (150 dpi) and PDF atomically."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import matplotlib.pyplot as plt
import pandas as pd

from gaincell.io import tmp_path_beside


def read_csv(path: Path) -> pd.DataFrame:
    """A result table; a missing file is an error naming it (the figure's inputs are not there)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first")
    return pd.read_csv(path)


def read_json(path: Path) -> Dict[str, Any]:
    """A result file; a missing file is an error naming it (the figure's inputs are not there)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first")
    return json.loads(Path(path).read_text())


def read_json_if_present(path: Path) -> Optional[dict]:
    """A result file that may be absent or unreadable (an optional input): None then."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def save_figure(fig, out_dir: Path, name: str) -> List[Path]:
    """Write ``<name>.png`` and ``<name>.pdf`` beside each other (temp file, then rename) and close the figure."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, kwargs in (("png", {"dpi": 150}), ("pdf", {})):
        path = out_dir / f"{name}.{ext}"
        tmp = tmp_path_beside(path)  # stale ones of killed runs removed; umask permissions
        fig.savefig(tmp, format=ext, bbox_inches="tight", **kwargs)
        tmp.replace(path)
        paths.append(path)
    plt.close(fig)
    return paths
