"""Every paper figure and table, regenerated from files under ``results/<profile>/``.

Each module here holds figure functions ``fig_<name>(results_dir: Path, out_dir: Path) -> list[Path]``
that read only result files (never models) and write PNG (+ PDF). ``run`` calls all of them, writes
``captions.md`` (each function's docstring) and ``index.json`` (what was made, what failed and why).
"""
from __future__ import annotations

import ast
import importlib
import inspect
import json
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from gaincell.config import FiguresStage, stage_settings
from gaincell.io import atomic_write_json, atomic_write_text
from gaincell.tracking import log_stage_outputs

# Modules in pipeline order.
FIGURE_MODULES = ("device", "train", "adapt", "diagnose", "variation", "evaluate", "hardware", "analog", "benchmarks")


def figure_functions() -> Dict[str, Tuple[str, Callable]]:
    """name -> (module, function) of every ``fig_*`` function, in pipeline order."""
    found: Dict[str, Tuple[str, Callable]] = {}
    for module_name in FIGURE_MODULES:
        module = importlib.import_module(f"{__name__}.{module_name}")
        for name, func in inspect.getmembers(module, inspect.isfunction):
            if name.startswith("fig_") and func.__module__ == module.__name__:
                found[name[4:]] = (module_name, func)
    return found


def docstring_captions() -> Dict[str, str]:
    """name -> whole docstring of every ``fig_*`` function, read from the modules' source with ``ast``
    (no import of matplotlib or pandas: the Snakefile calls this when it parses, for the HTML report)."""
    captions: Dict[str, str] = {}
    for module_name in FIGURE_MODULES:
        tree = ast.parse((Path(__file__).parent / f"{module_name}.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("fig_"):
                captions[node.name[4:]] = ast.get_docstring(node) or ""
    return captions


def caption_of(func: Callable) -> str:
    doc = inspect.getdoc(func) or ""
    return doc.split("\n\n")[0].replace("\n", " ").strip()


def _make_one(name: str, module_name: str, func: Callable | None, results_dir: Path, out_dir: Path) -> tuple:
    """Make one figure: ("made", entry) | ("skipped", None) | ("failed", message). ``func`` None: look
    the function up by name (in a worker process)."""
    func = func or figure_functions()[name][1]
    start = time.perf_counter()
    try:
        paths = func(Path(results_dir), Path(out_dir)) or []
    except Exception as err:  # one figure's missing input must not hide the others
        print(f"figure {name}: FAILED {type(err).__name__}: {err}", file=sys.stderr)
        traceback.print_exc()
        return "failed", f"{type(err).__name__}: {err}"
    if not paths:  # optional figure whose inputs this run does not make (e.g. benchmarks)
        print(f"figure {name}: skipped (no input)")
        return "skipped", None
    print(f"figure {name}: {', '.join(Path(p).name for p in paths)}", flush=True)
    return "made", {"module": module_name, "files": [str(p) for p in paths], "caption": caption_of(func),
                    "seconds": round(time.perf_counter() - start, 2)}


def make_all(results_dir: Path, out_dir: Path, strict: bool = True, only: List[str] | None = None,
             workers: int = 1) -> dict:
    """Make every figure. ``strict``: raise at the end when any figure failed. ``workers`` > 1: that many
    processes make the figures side by side (the index keeps pipeline order)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [(name, module_name, func) for name, (module_name, func) in figure_functions().items()
            if not only or name in only]
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            outcomes = list(pool.map(_make_one, *zip(*[(n, m, None, results_dir, out_dir) for n, m, _ in todo])))
    else:
        outcomes = [_make_one(n, m, f, results_dir, out_dir) for n, m, f in todo]
    made = {n: payload for (n, _, _), (status, payload) in zip(todo, outcomes) if status == "made"}
    failed = {n: payload for (n, _, _), (status, payload) in zip(todo, outcomes) if status == "failed"}
    skipped = [n for (n, _, _), (status, _) in zip(todo, outcomes) if status == "skipped"]
    index = {"results_dir": str(results_dir), "made": made, "failed": failed, "skipped": skipped}
    if only and (out_dir / "index.json").is_file():  # a partial remake keeps the other figures' entries
        previous = json.loads((out_dir / "index.json").read_text())
        for key in ("made", "failed"):
            kept = {k: v for k, v in previous.get(key, {}).items() if k not in only}
            index[key] = {**kept, **index[key]}
        index["skipped"] = [k for k in previous.get("skipped", []) if k not in only] + skipped
    captions = ["# Figures\n"] + [f"## {k}\n\n{v['caption']}\n\nFiles: " + ", ".join(Path(f).name for f in v["files"]) + "\n"
                                 for k, v in index["made"].items()]
    atomic_write_text(out_dir / "captions.md", "\n".join(captions))
    atomic_write_json(out_dir / "index.json", index)
    if strict and failed:
        raise RuntimeError(f"{len(failed)} figure(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return index


def run(cfg) -> None:
    """CLI stage ``figures``: ``+stage.strict=false`` keeps going past missing inputs; ``+stage.only=[a,b]``."""
    stage = stage_settings(cfg, FiguresStage)
    results_dir = Path(cfg.results_dir)
    try:
        make_all(results_dir, results_dir / "figures", strict=stage.strict, only=stage.only or None,
                 workers=stage.workers)
    finally:  # what was made is logged even when a figure failed (make_all writes the index first)
        index_path = results_dir / "figures" / "index.json"
        index = json.loads(index_path.read_text()) if index_path.is_file() else {"made": {}}
        log_figures(cfg, index, results_dir / "figures")


def log_figures(cfg, index: dict, out_dir: Path) -> None:
    """W&B: every figure made (PNG) as an image with its caption, every table in ``out_dir`` (the study
    table, the evaluation summary...) as a table. Best effort (gaincell.tracking.log_stage_outputs)."""
    images, captions = {}, {}
    for name, entry in index.get("made", {}).items():
        for f in entry["files"]:
            if str(f).endswith(".png"):
                key = f"figures/{Path(f).stem}"
                images[key], captions[key] = Path(f), entry.get("caption", "")
    tables = {f"tables/{p.stem}": p for p in sorted(Path(out_dir).glob("*.csv"))}
    log_stage_outputs(cfg, "figures", "figures", tables=tables, images=images, captions=captions)
