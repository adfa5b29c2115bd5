"""What every figure module shares: saving a figure as PNG (150 dpi) and PDF, atomically."""
from __future__ import annotations

from pathlib import Path
from typing import List

import matplotlib.pyplot as plt

from gaincell.io import tmp_path_beside


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
