"""The ``evaluate`` stage: one model variant on ``cfg.eval.tasks`` through lm-evaluation-harness.

``python -m gaincell evaluate +stage.name=<variant> +stage.checkpoint=<ckpt.pt>
[+stage.attention=<kind>]`` writes, under ``results/<profile>/eval/``:

* ``tasks/``                   the local tasks (YAML + JSONL), built once from ``data/eval_text.txt``;
* ``<variant>/tasks/<task>.json`` the harness's output for one task; a finished task whose
  fingerprint (checkpoint sha256, task definition, evaluation settings) matches is not rerun;
* ``<variant>/results.csv``      tidy table: variant, task, metric, value, stderr, num_samples
  (+ ``results.json``, the same rows);
* ``summary.csv``              every variant's rows (:func:`merge_results`), read by the figure.

``+stage.attention=<kind>`` switches the loaded model's attention (with the analog knobs of
``cfg.attention``) before evaluation, e.g. to score a linear-trained model with the nonlinear cell.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import random
import re
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from gaincell.attention.config import analog_config_from_settings
from gaincell.config import EvaluateStage, stage_settings
from gaincell.data import check_tokenizer, load_tokenizer
from gaincell.io import atomic_to_csv, atomic_write_json
from gaincell.model import GPT
from gaincell.tracking import Tracker

from .tasks import LOCAL_TASKS, LocalTaskParams, build_local_tasks, is_local_task, local_task_fingerprint

log = logging.getLogger(__name__)

RESULT_COLUMNS = ["variant", "task", "metric", "value", "stderr", "num_samples"]
RESULT_FORMAT = 1  # bump when the per-task result file changes meaning


class MissingDatasetError(RuntimeError):
    """A harness task's dataset is not available (offline, or the hub is unreachable)."""


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def set_offline(offline: bool) -> None:
    """Keep the harness off the network: the env vars for modules imported later, and the flags of
    ``datasets``/``huggingface_hub`` if they are already imported (they read the env at import)."""
    if not offline:
        return
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"

    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def lm_eval_version() -> str:
    return version("lm_eval")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _float_or_nan(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def tidy_rows(variant: str, harness_output: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Rows (variant, task, metric, value, stderr, num_samples) from one ``simple_evaluate`` output.

    Harness keys look like ``acc,none`` and ``acc_stderr,none``; a filter other than ``none`` is kept
    in the metric name (``exact_match/strict-match``). A stderr of ``N/A`` becomes NaN.
    """
    rows = []
    n_samples = harness_output.get("n-samples", {})
    for task, metrics in harness_output.get("results", {}).items():
        n = n_samples.get(task, {}).get("effective", metrics.get("sample_len"))
        for key, value in metrics.items():
            if "," not in key:
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            rows.append({
                "variant": variant,
                "task": task,
                "metric": metric if filt == "none" else f"{metric}/{filt}",
                "value": _float_or_nan(value),
                "stderr": _float_or_nan(metrics.get(f"{metric}_stderr,{filt}")),
                "num_samples": int(n) if n is not None else -1,
            })
    return rows


def merge_results(eval_dir: Path) -> Path:
    """Concatenate every ``<eval_dir>/<variant>/results.csv`` into ``<eval_dir>/summary.csv``.

    Variant jobs running side by side each merge after writing their own table; a lock serialises the
    merges, so the last one reads every table written before it and the summary ends up complete.
    """
    eval_dir = Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    with open(eval_dir / ".summary.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        frames = [pd.read_csv(p) for p in sorted(eval_dir.glob("*/results.csv"))]
        frames = [f for f in frames if not f.empty]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RESULT_COLUMNS)
        # Variants in name order; tasks and metrics keep each variant's own (configured) order.
        table = table.sort_values(["variant"], kind="stable").reset_index(drop=True)
        return atomic_to_csv(table[RESULT_COLUMNS], eval_dir / "summary.csv")


# --------------------------------------------------------------------------------------------------
# the evaluation of one variant
# --------------------------------------------------------------------------------------------------
def _harness_task_config(task_manager, name: str) -> Dict[str, Any]:
    entry = task_manager.task_index.get(name)
    return dict(getattr(entry, "cfg", None) or {})


def locate_harness_tasks(names: Sequence[str]):
    """Find the harness's own task definitions without indexing all ~14k task YAMLs (seconds).

    Returns (folders holding a YAML with ``task: <name>``, names only mentioned in some YAML such as
    groups and tags, which need the full index, names in no YAML at all, i.e. unknown).
    """
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    patterns = {n: re.compile(rf"^task:\s*['\"]?{re.escape(n)}['\"]?\s*$", re.M) for n in names}
    mentioned, folders = set(), {}
    for path in sorted(root.rglob("*.yaml")):
        text = path.read_text(errors="replace")
        for name, pattern in patterns.items():
            if name in text:
                mentioned.add(name)
                if pattern.search(text):
                    folders.setdefault(name, set()).add(path.parent)
    found = sorted({str(f) for fs in folders.values() for f in fs})
    needs_index = [n for n in names if n in mentioned and n not in folders]
    unknown = [n for n in names if n not in mentioned]
    return found, needs_index, unknown


def check_harness_tasks(task_manager, names: Sequence[str], offline: bool) -> None:
    """Load each harness task once (this reads its dataset) and turn a dataset failure into one clear
    error naming every missing dataset, instead of a traceback from deep inside ``datasets``."""
    missing = []
    for name in names:
        try:
            task_manager.load([name])
        except Exception as exc:  # noqa: BLE001 - any failure to get the data is reported the same way
            cfg = _harness_task_config(task_manager, name)
            dataset = cfg.get("dataset_path", "?")
            if cfg.get("dataset_name"):
                dataset += f" (config {cfg['dataset_name']})"
            missing.append(f"{name}: Hugging Face dataset {dataset} [{type(exc).__name__}: {str(exc)[:160]}]")
    if missing:
        how = ("eval.offline=true (HF_DATASETS_OFFLINE=1) and it is not in the local Hugging Face cache"
               if offline else "it could not be downloaded")
        raise MissingDatasetError(
            "evaluate: dataset(s) unavailable for harness task(s); " + how + ":\n  " + "\n  ".join(missing)
            + "\nRun once with eval.offline=false on a machine with internet access (the datasets are then "
            "cached), or evaluate the local tasks (eval.tasks=[" + ",".join(LOCAL_TASKS) + "]).")


def run_harness_task(lm, task_manager, task: str, limit: Optional[int], bootstrap_iters: int,
                     seed: int) -> Dict[str, Any]:
    """The harness's evaluation of one task: what ``simple_evaluate`` does for a ready model (seeds,
    zero-shot unless the task says otherwise, few-shot sampler seed, then ``evaluator.evaluate``)
    without its environment report, which runs ``pip list`` on every call (seconds per task)."""
    from lm_eval.evaluator import evaluate

    seed_everything(seed)
    loaded = task_manager.load([task])
    for task_obj in loaded["tasks"].values():
        if task_obj.get_config("num_fewshot") is None:
            task_obj.set_config(key="num_fewshot", value=0)
        task_obj.set_fewshot_seed(seed=seed)
    out = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=bootstrap_iters, log_samples=False)
    if out is None:  # only non-zero ranks get None; we run one process
        raise RuntimeError(f"lm-eval returned no results for task {task!r}")
    return out


def _prepare_tasks(tasks: Sequence[str], task_dir: Path, eval_text_path: Path, params: LocalTaskParams):
    """The harness's TaskManager for ``tasks`` (local ones built into ``task_dir``), the local tasks'
    YAML paths and the harness task names; unknown names are an error listing what is expected."""
    from lm_eval.tasks import TaskManager

    local = [t for t in tasks if is_local_task(t)]
    harness = [t for t in tasks if not is_local_task(t)]
    unknown_message = (f"expected local tasks {sorted(LOCAL_TASKS)} or lm-eval task names (e.g. arc_easy, "
                       f"arc_challenge, winogrande, hellaswag, lambada_openai, piqa, wikitext)")
    harness_dirs, needs_index, unknown = locate_harness_tasks(harness) if harness else ([], [], [])
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown}: {unknown_message}")
    local_yaml = build_local_tasks(eval_text_path, task_dir, local, params) if local else {}
    include = ([str(task_dir)] if local else []) + harness_dirs
    task_manager = TaskManager(include_path=include or None, include_defaults=bool(needs_index))
    unknown = [t for t in harness if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown}: {unknown_message}")
    return task_manager, local_yaml, harness


def evaluate_variant(lm_factory: Callable[[], Any], variant: str, tasks: Sequence[str], eval_dir: Path,
                     eval_text_path: Path, params: LocalTaskParams, model_fingerprint: str,
                     limit: Optional[int] = None, bootstrap_iters: int = 1000, seed: int = 1234,
                     offline: bool = True, settings_fingerprint: str = "") -> pd.DataFrame:
    """Evaluate one variant on ``tasks``; returns its tidy table (also written to disk).

    ``lm_factory`` builds the harness model only when some task has to run (resumed runs that find
    every task finished never load the checkpoint).
    """
    set_offline(offline)
    if not tasks:
        raise ValueError("eval.tasks is empty: expected at least one task name")
    if not variant or "/" in variant or variant in ("tasks", "summary.csv"):
        raise ValueError(f"stage.name={variant!r}: expected a plain variant name (no '/', not 'tasks')")
    eval_dir = Path(eval_dir)
    variant_dir = eval_dir / variant
    task_manager, local_yaml, harness = _prepare_tasks(tasks, eval_dir / "tasks", eval_text_path, params)

    def fingerprint(task: str) -> str:
        if task in local_yaml:
            definition = local_task_fingerprint(local_yaml[task])
        else:
            cfg = _harness_task_config(task_manager, task)
            definition = json.dumps({"version": (cfg.get("metadata") or {}).get("version"),
                                     "dataset": cfg.get("dataset_path"), "name": cfg.get("dataset_name")})
        blob = json.dumps({"format": RESULT_FORMAT, "model": model_fingerprint, "task": task,
                           "definition": definition, "limit": limit, "bootstrap_iters": bootstrap_iters,
                           "seed": seed, "settings": settings_fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    outputs: Dict[str, Dict[str, Any]] = {}
    todo = []
    for task in tasks:
        path = variant_dir / "tasks" / f"{task}.json"
        fp = fingerprint(task)
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
            except json.JSONDecodeError:
                stored = {}
            if stored.get("fingerprint") == fp:
                log.info("evaluate %s: %s already done (%s), skipped", variant, task, path)
                outputs[task] = stored
                continue
        todo.append((task, path, fp))
    if todo:
        todo_harness = [t for t, _, _ in todo if t in harness]
        if todo_harness:
            check_harness_tasks(task_manager, todo_harness, offline)
        outputs.update(_run_tasks(lm_factory(), task_manager, variant, todo, limit, bootstrap_iters, seed))

    rows = [row for task in tasks for row in tidy_rows(variant, outputs[task])]
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    atomic_to_csv(table, variant_dir / "results.csv")
    atomic_write_json(variant_dir / "results.json",
                      {"variant": variant, "model_fingerprint": model_fingerprint, "tasks": list(tasks),
                       "rows": json.loads(table.to_json(orient="records"))})
    merge_results(eval_dir)
    return table


def _run_tasks(lm: Any, task_manager: Any, variant: str, todo: Sequence[Tuple[str, Path, str]],
               limit: Optional[int], bootstrap_iters: int, seed: int) -> Dict[str, Dict[str, Any]]:
    """Run each ``(task, output path, fingerprint)`` through the harness; each result is written (atomically)
    as soon as it is done, so a killed stage resumes at the next task."""
    outputs = {}
    for task, path, fp in todo:
        start = time.perf_counter()
        out = run_harness_task(lm, task_manager, task, limit, bootstrap_iters, seed)
        stored = {"task": task, "variant": variant, "fingerprint": fp,
                  "elapsed_s": round(time.perf_counter() - start, 3),
                  "results": out["results"], "n-samples": out.get("n-samples", {}),
                  "versions": out.get("versions", {}), "n-shot": out.get("n-shot", {}),
                  "lm_eval_version": lm_eval_version()}
        atomic_write_json(path, json.loads(json.dumps(stored, default=str)))
        outputs[task] = stored
        log.info("evaluate %s: %s done in %.1f s", variant, task, stored["elapsed_s"])
    return outputs


# --------------------------------------------------------------------------------------------------
# stage entry point
# --------------------------------------------------------------------------------------------------
def _stage(cfg) -> EvaluateStage:
    stage = stage_settings(cfg, EvaluateStage)
    for key in ("name", "checkpoint"):
        if getattr(stage, key) in (None, ""):
            raise ValueError(f"evaluate: missing +stage.{key}=...; expected e.g. "
                             f"`python -m gaincell evaluate +stage.name=softmax "
                             f"+stage.checkpoint=results/<profile>/checkpoints/softmax/ckpt.pt`")
    return stage


def local_task_params(eval_cfg) -> LocalTaskParams:
    return LocalTaskParams(num_examples=int(eval_cfg.num_examples), num_choices=int(eval_cfg.num_choices),
                           context_words=int(eval_cfg.context_words), ppl_doc_words=int(eval_cfg.ppl_doc_words),
                           seed=int(eval_cfg.seed))


def _log_to_tracker(cfg, variant: str, table: pd.DataFrame) -> None:
    tracker = Tracker(cfg, run_name=f"eval-{variant}", job_type="evaluate")
    try:
        flat = {f"eval/{r.task}/{r.metric}": float(r.value) for r in table.itertuples()}
        flat.update({f"eval/{r.task}/{r.metric}_stderr": float(r.stderr)
                     for r in table.itertuples() if not math.isnan(r.stderr)})
        tracker.log(flat, step=0)
        tracker.summary(flat)
        if getattr(tracker, "wandb_run", None) is not None:
            import wandb

            tracker.wandb_run.log({"eval/results": wandb.Table(dataframe=table)}, step=0)
    finally:
        tracker.finish()


def run(cfg) -> pd.DataFrame:
    """Stage function (``python -m gaincell evaluate``); see the module docstring."""
    stage = _stage(cfg)
    variant, checkpoint, attention = stage.name, Path(stage.checkpoint), stage.attention
    if not checkpoint.is_file():
        raise FileNotFoundError(f"evaluate: checkpoint {checkpoint} not found (stage.checkpoint); "
                                f"expected a ckpt.pt written by train/adapt")
    ev = cfg.eval
    results_dir = Path(cfg.results_dir)
    stride = int(ev.rolling_stride) or None

    def make_lm():
        from .lm import GaincellLM, resolve_device  # noqa: PLC0415 (imports lm-evaluation-harness)

        device = resolve_device(str(ev.device))
        analog_cfg = None
        if attention:
            analog_cfg = analog_config_from_settings(cfg.attention)
        model = GPT.from_checkpoint(str(checkpoint), map_location=str(device),
                                    attention=str(attention) if attention else None, analog_cfg=analog_cfg)

        tokenizer = load_tokenizer(str(cfg.data.data_dir))
        check_tokenizer(model.tokenizer_info, tokenizer.data_dir, checkpoint, tokenizer.fingerprint)  # names the file
        return GaincellLM(model, tokenizer, batch_size=int(ev.batch_size), device=str(device),
                          dtype=str(ev.dtype), stride=stride, max_gen_toks=int(ev.max_gen_toks))

    model_fp = sha256_file(checkpoint)
    if attention:
        model_fp += f"+attention={attention}:" + hashlib.sha256(
            json.dumps(_plain(cfg.attention), sort_keys=True, default=str).encode()).hexdigest()[:16]
    settings_fp = json.dumps({"stride": stride, "dtype": str(ev.dtype)}, sort_keys=True)
    table = evaluate_variant(make_lm, variant, list(ev.tasks), results_dir / "eval",
                             Path(str(cfg.data.data_dir)) / "eval_text.txt", local_task_params(ev),
                             model_fp, limit=ev.limit, bootstrap_iters=int(ev.bootstrap_iters),
                             seed=int(ev.seed), offline=bool(ev.offline), settings_fingerprint=settings_fp)
    _log_to_tracker(cfg, variant, table)
    print(table.to_string(index=False))
    return table


def _plain(section) -> Any:
    return OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else section
