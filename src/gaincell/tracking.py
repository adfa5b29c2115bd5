"""Experiment logging: Weights & Biases (offline by default) plus a local CSV of the same metrics.

    tracker = Tracker(cfg, run_name="linear_hw", job_type="train", csv_path=".../metrics.csv")
    tracker.log({"train_loss": 3.2, "lr": 6e-4}, step=10)
    tracker.summary({"final_val_loss": 3.1})
    tracker.log_table("study", df)                       # a DataFrame or CSV path as a W&B table
    tracker.log_images({"figure/fig4": "fig4.png"})      # figures as images
    tracker.log_checkpoint("checkpoints/linear_hw/final.pt")  # a reference artifact (file:// URI)
    tracker.finish()

The W&B group is ``$WANDB_RUN_GROUP`` (the workflow sets it from a hash of the composed configuration,
so reruns of one configuration share a group), else ``tracking.group``. W&B's mode comes from
``cfg.tracking.mode`` (``offline`` | ``online`` | ``disabled``), overridden by ``$WANDB_MODE``; the run
gets the full resolved config. In ``disabled`` mode wandb is not imported. Figures read the CSV, never
W&B. The CSV is rewritten atomically (whole file, at most every ``tracking.csv_flush_s`` seconds and at
``flush``/``finish``); ``resume_step`` keeps only the rows up to that step of an existing CSV, so a run
resumed from a checkpoint continues one clean curve.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from gaincell.io import atomic_write_json, atomic_write_text, sha256_file_cached

MODES = ("offline", "online", "disabled")


def _get(section: Any, key: str, default: Any = None) -> Any:
    if section is None:
        return default
    try:
        return section[key] if hasattr(section, "__getitem__") else getattr(section, key)
    except (KeyError, AttributeError):
        return default


def resolved_config_dict(cfg: Any) -> Dict[str, Any]:
    """The full config as plain Python (resolved interpolations) for W&B and run records."""
    try:
        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    if hasattr(cfg, "__dataclass_fields__"):
        return dataclasses.asdict(cfg)
    return dict(cfg) if cfg is not None else {}


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


class Tracker:
    """W&B run + local CSV of logged metrics.

    Args:
        cfg: the composed config (its ``tracking`` section and ``results_dir`` are used; the whole of it
            is logged as the run config).
        run_name: the run's name (W&B name and default CSV name).
        job_type: stage name (train, adapt, evaluate, ...): W&B job type, default CSV folder.
        csv_path: where the CSV goes; default ``<results_dir>/logs/tracking/<job_type>/<run_name>.csv``.
        step_name: the CSV's step column name.
        columns: metric columns that always appear first, in this order (others follow as first seen).
        resume_step: keep the existing CSV's rows with step <= this (None: start a new CSV).
        wandb_id: W&B run id to resume (e.g. stored in a checkpoint); a new one is made otherwise.
        enabled: False makes every call a no-op (non-zero DDP ranks).
    """

    def __init__(self, cfg: Any, run_name: str, job_type: str, csv_path: Optional[os.PathLike] = None,
                 step_name: str = "step", columns: Optional[List[str]] = None, resume_step: Optional[int] = None,
                 wandb_id: Optional[str] = None, enabled: bool = True) -> None:
        self.run_name = run_name
        self.job_type = job_type
        self.enabled = enabled
        self.step_name = step_name
        self.columns: List[str] = list(columns or [])
        tracking = _get(cfg, "tracking")
        self.mode = os.environ.get("WANDB_MODE") or str(_get(tracking, "mode", "offline"))
        if self.mode not in MODES:
            raise ValueError(f"tracking.mode={self.mode!r}: expected one of {MODES}")
        self.flush_interval_s = float(_get(tracking, "csv_flush_s", 5.0))
        results_dir = Path(str(_get(cfg, "results_dir", "results")))
        self.csv_path = Path(csv_path) if csv_path is not None else \
            results_dir / "logs" / "tracking" / job_type / f"{run_name}.csv"
        self.rows: List[Dict[str, Any]] = []
        self._summary: Dict[str, Any] = {}
        self._last_flush = time.monotonic()
        self._dirty = False
        self.wandb_run = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        if resume_step is not None and self.csv_path.is_file():
            self.rows = self._read_rows(resume_step)
            self._dirty = True
        if self.mode != "disabled":
            self._init_wandb(cfg, tracking, results_dir)

    # ------------------------------------------------------------------------------------------------
    def _init_wandb(self, cfg: Any, tracking: Any, results_dir: Path) -> None:
        import wandb

        wandb_dir = Path(str(_get(tracking, "dir", results_dir / "wandb")))
        wandb_dir.mkdir(parents=True, exist_ok=True)
        if self.wandb_id is None:
            self.wandb_id = uuid.uuid4().hex[:8]
        self.wandb_run = wandb.init(
            project=str(_get(tracking, "project", "gaincell")), entity=_get(tracking, "entity"),
            group=os.environ.get("WANDB_RUN_GROUP") or _get(tracking, "group"), name=self.run_name,
            job_type=self.job_type,
            config=resolved_config_dict(cfg), dir=str(wandb_dir), mode=self.mode, id=self.wandb_id,
            resume="allow", reinit="finish_previous")

    def _read_rows(self, resume_step: int) -> List[Dict[str, Any]]:
        rows = []
        with open(self.csv_path, newline="") as fh:
            for row in csv.DictReader(fh):
                try:
                    step = int(float(row[self.step_name]))
                except (KeyError, ValueError):
                    continue
                if step <= resume_step:
                    rows.append({k: _parse(v) for k, v in row.items()})
                    for k in row:
                        if k != self.step_name and k not in self.columns:
                            self.columns.append(k)
        return rows

    # ------------------------------------------------------------------------------------------------
    def log(self, metrics: Dict[str, Any], step: int) -> None:
        """One row: ``metrics`` at ``step`` (W&B and CSV)."""
        if not self.enabled:
            return
        row = {self.step_name: int(step)}
        for k, v in metrics.items():
            if hasattr(v, "item"):
                v = v.item()
            row[k] = v
            if k not in self.columns:
                self.columns.append(k)
        self.rows.append(row)
        self._dirty = True
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != self.step_name and v is not None
                                and not (isinstance(v, float) and math.isnan(v))}, step=int(step))
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def log_table(self, key: str, table: Any) -> None:
        """A pandas DataFrame (or a CSV file's path) as a W&B table under ``key``; the local copy is the
        CSV the stage wrote. No-op without W&B."""
        if not self.enabled or self.wandb_run is None:
            return
        import wandb

        df = pd.read_csv(table) if isinstance(table, (str, os.PathLike)) else table
        self.wandb_run.log({key: wandb.Table(dataframe=df)})

    def log_images(self, images: Dict[str, os.PathLike], captions: Optional[Dict[str, str]] = None) -> None:
        """Image files (PNG) under their keys, with captions. No-op without W&B."""
        if not self.enabled or self.wandb_run is None or not images:
            return
        import wandb

        captions = captions or {}
        self.wandb_run.log({k: wandb.Image(str(p), caption=captions.get(k)) for k, p in images.items()})

    def log_checkpoint(self, path: os.PathLike, metadata: Optional[Dict[str, Any]] = None) -> None:
        """A checkpoint as a W&B *reference* artifact (``file://`` URI: the file stays where it is, W&B
        records its path, size and our SHA-256), named ``checkpoint-<run>``. No-op without W&B."""
        if not self.enabled or self.wandb_run is None:
            return
        import wandb

        path = Path(path).resolve()
        meta = {"sha256": sha256_file_cached(path), "bytes": path.stat().st_size, **(metadata or {})}
        artifact = wandb.Artifact(name=artifact_name(f"checkpoint-{self.run_name}"), type="model", metadata=meta)
        # checksum=False: W&B would read the whole file again; the SHA-256 above identifies the content.
        artifact.add_reference(path.as_uri(), name=path.name, checksum=False)
        self.wandb_run.log_artifact(artifact, aliases=["latest", f"sha256-{meta['sha256'][:12]}"])

    def summary(self, values: Dict[str, Any]) -> None:
        """Final numbers of the run (W&B summary and ``<csv stem>.summary.json``)."""
        if not self.enabled:
            return
        self._summary.update({k: (v.item() if hasattr(v, "item") else v) for k, v in values.items()})
        if self.wandb_run is not None:
            for k, v in self._summary.items():
                self.wandb_run.summary[k] = v
        atomic_write_json(self.summary_path, self._summary)

    @property
    def summary_path(self) -> Path:
        return self.csv_path.with_name(self.csv_path.stem + ".summary.json")

    def flush(self) -> None:
        """Rewrite the CSV now (atomically)."""
        if not self.enabled or not self._dirty:
            return

        header = [self.step_name] + self.columns
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for row in self.rows:
            writer.writerow([_format(row.get(c)) for c in header])
        atomic_write_text(self.csv_path, buf.getvalue())
        self._last_flush = time.monotonic()
        self._dirty = False

    def finish(self) -> None:
        if not self.enabled:
            return
        self.flush()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()


def artifact_name(text: str) -> str:
    """A W&B artifact name (letters, digits, ``-``, ``_``, ``.``) from a run name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def log_stage_outputs(cfg: Any, run_name: str, job_type: str, tables: Optional[Dict[str, Any]] = None,
                      images: Optional[Dict[str, os.PathLike]] = None, captions: Optional[Dict[str, str]] = None,
                      summary: Optional[Dict[str, Any]] = None) -> None:
    """One W&B run of a stage's outputs: tables (DataFrames or CSV paths), images, summary numbers.
    Best effort: a tracking failure is printed and never fails the stage whose results are written."""
    try:
        tracker = Tracker(cfg, run_name=run_name, job_type=job_type)
        try:
            for key, table in (tables or {}).items():
                tracker.log_table(key, table)
            tracker.log_images(images or {}, captions)
            if summary:
                tracker.summary(summary)
        finally:
            tracker.finish()
    except Exception as err:  # logging must never lose the written results
        print(f"{job_type}: tracking skipped ({type(err).__name__}: {err})")


def _parse(text: Optional[str]) -> Any:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


__all__ = ["Tracker", "resolved_config_dict", "MODES", "log_stage_outputs", "artifact_name"]
