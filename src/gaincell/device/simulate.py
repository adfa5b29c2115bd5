"""Run SPICE simulations: ngspice as a shared library (through PySpice), a process pool, a cache.

A ``Task`` is one simulated point: a netlist, one or more analyses (each preceded by ``alter``
commands that set the point's source values), the vectors to read back and a post-processing
function (``"module:function"``) that turns the waveforms into a few numbers in the worker, so only
small results cross process boundaries.

Design choices, each measured here (see ``/work/shared/notes/ecosystem-pitfalls.md``):

* Shared-library mode of PySpice 1.5 with Debian's ngspice 39 (the subprocess mode is broken with
  ngspice 39 and NumPy 2). ``NgSpiceShared.LIBRARY_PATH`` points at ``libngspice.so.0`` (or
  ``$NGSPICE_LIBRARY_PATH``).
* A netlist is loaded once per worker and reused: parsing the sky130 library takes about 1 s, one
  transient of a cell about 10 ms. Points of a sweep differ only by source values, which ``alter``
  changes without re-parsing.
* Workers are started with ``spawn``: each holds its own ngspice instance and no state is shared.
* Every finished point is stored in a SQLite cache keyed by a hash of everything that determines it
  (netlist text, commands, post-processing, parameters, ngspice version); a killed sweep resumes.
* A point that fails (ngspice error, non-convergence, a transient that stops early, even a worker
  that dies) is returned with ``ok=False`` and its error; the sweep goes on.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import importlib
import json
import logging
import multiprocessing as mp
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

CACHE_VERSION = 1
DEFAULT_LIBRARY_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libngspice.so.0",
    "/usr/lib/aarch64-linux-gnu/libngspice.so.0",
    "/usr/lib/libngspice.so.0",
    "/usr/local/lib/libngspice.so.0",
    "/usr/lib/x86_64-linux-gnu/libngspice.so",
    "/usr/local/lib/libngspice.so",
)


class SimulationError(RuntimeError):
    """ngspice could not be started, or a point failed where failure is not allowed."""


@dataclass
class Run:
    """One analysis of a task: ngspice commands (``alter ...``) then the analysis itself."""

    commands: List[str]
    analysis: str                       # e.g. "tran 0.05n 20n" or "op"
    stop_time_s: Optional[float] = None  # for a transient: the end time that must be reached


@dataclass
class Task:
    """One simulated point."""

    netlist: str
    runs: List[Run]
    vectors: List[str]                  # vector names read after each run (lower case)
    postprocess: str                    # "module:function"(waveforms: list[dict], params) -> dict | list[dict]
    params: Dict[str, Any] = field(default_factory=dict)

    def key(self, ngspice_version: str = "") -> str:
        blob = json.dumps({
            "v": CACHE_VERSION, "ngspice": ngspice_version,
            "netlist": hashlib.sha256(self.netlist.encode()).hexdigest(),
            "runs": [asdict(r) for r in self.runs], "vectors": self.vectors,
            "post": self.postprocess, "params": self.params}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Result:
    """What a task gave: ``rows`` (one dict per output row) or ``error``."""

    ok: bool
    rows: List[Dict[str, Any]]
    error: Optional[str]
    params: Dict[str, Any]
    seconds: float
    cached: bool = False


# --------------------------------------------------------------------------------------------------
# ngspice in this process
# --------------------------------------------------------------------------------------------------
_NGSPICE = None
_LOADED_HASH: Optional[str] = None


def library_path() -> str:
    """Path of libngspice: ``$NGSPICE_LIBRARY_PATH`` or the first Debian/usual location that exists."""
    env = os.environ.get("NGSPICE_LIBRARY_PATH")
    if env:
        return env
    for candidate in DEFAULT_LIBRARY_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    raise SimulationError("libngspice not found: install ngspice and libngspice0 (Debian: apt-get install "
                          "ngspice libngspice0-dev) or set NGSPICE_LIBRARY_PATH to libngspice.so.0")


def ngspice():
    """The process's ngspice shared-library instance (created on first use)."""
    global _NGSPICE
    if _NGSPICE is None:
        for name in ("PySpice", "PySpice.Spice.NgSpice.Shared"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            from PySpice.Spice.NgSpice.Shared import NgSpiceShared
        except ImportError as err:  # pragma: no cover
            raise SimulationError(f"PySpice is not installed ({err}): pip install 'gaincell[device]'") from err
        NgSpiceShared.LIBRARY_PATH = library_path()
        try:
            _NGSPICE = NgSpiceShared.new_instance()
        except OSError as err:
            raise SimulationError(f"cannot load libngspice from {NgSpiceShared.LIBRARY_PATH}: {err}") from err
        # One thread per process: parallelism comes from the pool.
        _command("set num_threads=1")
    return _NGSPICE


def ngspice_version() -> str:
    """The version line of the loaded ngspice, e.g. ``ngspice-39``."""
    ng = ngspice()
    out = _command("version -s")
    for line in out.splitlines():
        line = line.strip(" *")
        if line.lower().startswith("ngspice-") or "ngspice" in line.lower():
            return line.split(":")[0].strip()
    return f"ngspice-{ng.ngspice_version}"


_FATAL = ("error", "aborted", "too small", "singular matrix", "no such", "unknown", "not found", "undefined")
_EXEC_CALLS = 0


def _messages() -> List[str]:
    ng = _NGSPICE
    return [m.strip() for m in list(ng._stdout) + list(ng._stderr) if m.strip()]


def _problems() -> List[str]:
    """ngspice output lines that mean the command failed (warnings and model checks are fine)."""
    out = []
    for line in _messages():
        low = line.lower()
        if low.startswith("warning") or low.startswith("checking parameters") or "unsupported ngspice" in low:
            continue
        if any(p in low for p in _FATAL):
            out.append(line)
    return out


def _command(command: str) -> str:
    """Run one ngspice command; raise ``SimulationError`` with ngspice's own message when it fails.

    PySpice's ``exec_command`` treats every stderr line as an error (ngspice prints BSIM4 parameter
    checks there), so the shared-library call is made directly and the output judged here.
    """
    global _EXEC_CALLS
    ng = ngspice() if _NGSPICE is None else _NGSPICE
    _EXEC_CALLS += 1
    if _EXEC_CALLS > 5000:  # ngspice keeps every command in its history: free it now and then
        ng._ngspice_shared.ngSpice_Command(ffi_null())
        _EXEC_CALLS = 0
    ng.clear_output()
    rc = ng._ngspice_shared.ngSpice_Command(command.encode("ascii"))
    problems = _problems()
    if rc or problems:
        raise SimulationError(f"ngspice command {command[:80]!r} failed: {' | '.join(problems)[-400:] or f'rc={rc}'}")
    return "\n".join(ng._stdout)


def ffi_null():
    from PySpice.Spice.NgSpice.Shared import FFI

    return FFI.NULL


def _load(netlist: str) -> None:
    global _LOADED_HASH
    from PySpice.Spice.NgSpice.Shared import FFI, ffi

    digest = hashlib.sha256(netlist.encode()).hexdigest()
    if digest == _LOADED_HASH:
        return
    ng = ngspice()
    if _LOADED_HASH is not None:
        try:
            _command("remcirc")
        except SimulationError:
            pass
        _LOADED_HASH = None
    lines = [line for line in netlist.splitlines() if line.strip()]
    if not lines or lines[-1].strip().lower() != ".end":
        lines.append(".end")  # ngspice ignores a deck without it (PySpice's str() omits it)
    lines.append("")
    keep = [ffi.new("char[]", line.encode("utf8")) for line in lines] + [FFI.NULL]
    array = ffi.new("char *[]", keep)
    ng.clear_output()
    rc = ng._ngspice_shared.ngSpice_Circ(array)
    problems = _problems()
    if rc or problems:
        raise SimulationError(f"ngspice rejected the netlist: {' | '.join(problems)[-400:] or f'rc={rc}'}")
    _LOADED_HASH = digest


def _vector(plot: str, name: str) -> np.ndarray:
    from PySpice.Spice.NgSpice.Shared import ffi

    ng = ngspice()
    info = ng._ngspice_shared.ngGet_Vec_Info(f"{plot}.{name}".encode())
    if info == ffi.NULL or info.v_realdata == ffi.NULL:
        raise SimulationError(f"vector {name!r} not found in plot {plot}")
    return np.frombuffer(ffi.buffer(info.v_realdata, info.v_length * 8), dtype=np.float64).copy()


def _resolve(spec: str) -> Callable:
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def run_task(task: Task) -> Result:
    """Simulate one task in this process; never raises for a failed point."""
    global _LOADED_HASH
    start = time.perf_counter()
    try:
        _load(task.netlist)
        ng = ngspice()
        waves: List[Dict[str, np.ndarray]] = []
        for run in task.runs:
            for command in run.commands:
                _command(command)
            _command(run.analysis)
            plot = ng.last_plot
            try:
                data = {name: _vector(plot, name) for name in task.vectors}
            finally:
                _command("destroy all")
            if run.stop_time_s is not None:
                t_end = float(data["time"][-1]) if "time" in data and len(data["time"]) else float("nan")
                if not t_end >= run.stop_time_s * (1 - 1e-6):
                    raise SimulationError(f"transient stopped at {t_end:.3e} s before {run.stop_time_s:.3e} s "
                                          f"(non-convergence)")
            waves.append(data)
        out = _resolve(task.postprocess)(waves, task.params)
        rows = out if isinstance(out, list) else [out]
        for row in rows:
            for k, v in row.items():
                if isinstance(v, np.generic):
                    row[k] = v.item()
        return Result(True, rows, None, task.params, time.perf_counter() - start)
    except Exception as err:  # a failed point is reported, not fatal
        try:
            _command("destroy all")
        except Exception:
            pass
        _LOADED_HASH = None  # ngspice may be in a bad state: reload next time
        msg = f"{type(err).__name__}: {err}"
        return Result(False, [], msg, task.params, time.perf_counter() - start)


def _worker_init() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ngspice()


def _run_chunk(tasks: Sequence[Task]) -> List[Result]:
    return [run_task(t) for t in tasks]


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------
class PointCache:
    """SQLite key -> JSON result of finished points (written by the parent process only)."""

    def __init__(self, path: Optional[os.PathLike]):
        self.path = Path(path) if path else None
        self._db = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS points (key TEXT PRIMARY KEY, result TEXT)")
            self._db.commit()

    def get(self, key: str) -> Optional[Result]:
        if self._db is None:
            return None
        row = self._db.execute("SELECT result FROM points WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        return Result(True, data["rows"], None, data["params"], data["seconds"], cached=True)

    def put(self, key: str, result: Result) -> None:
        if self._db is None or not result.ok:  # failed points are retried next time
            return
        blob = json.dumps({"rows": result.rows, "params": result.params, "seconds": result.seconds},
                          default=_json_default)
        self._db.execute("INSERT OR REPLACE INTO points VALUES (?, ?)", (key, blob))

    def commit(self) -> None:
        if self._db is not None:
            self._db.commit()

    def close(self) -> None:
        if self._db is not None:
            self._db.commit()
            self._db.close()
            self._db = None


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(type(obj).__name__)


# --------------------------------------------------------------------------------------------------
# sweeps
# --------------------------------------------------------------------------------------------------
def resolve_workers(workers: int) -> int:
    """0 means every core this process may use."""
    if workers and workers > 0:
        return int(workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


def run_tasks(tasks: Sequence[Task], workers: int = 1, cache_path: Optional[os.PathLike] = None,
              desc: str = "spice", progress: bool = True, chunk_size: int = 8,
              version: Optional[str] = None) -> List[Result]:
    """Simulate every task (cached ones are not re-run); results in task order.

    ``workers=1`` runs in this process (no pool); more start a ``spawn`` process pool. Tasks with the
    same netlist are sent together in chunks so a worker parses each netlist rarely. A worker that
    dies takes only its chunk down: those points are retried once one by one, then reported failed.
    """
    version = version if version is not None else ngspice_version_cached()
    cache = PointCache(cache_path)
    results: List[Optional[Result]] = [None] * len(tasks)
    keys = [t.key(version) for t in tasks]
    todo: List[int] = []
    for i, key in enumerate(keys):
        hit = cache.get(key)
        if hit is not None:
            results[i] = hit
        else:
            todo.append(i)
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=desc, disable=not progress,
               unit="pt", dynamic_ncols=True)
    last_commit = time.monotonic()

    def finish(i: int, res: Result) -> None:
        nonlocal last_commit
        results[i] = res
        cache.put(keys[i], res)
        bar.update(1)
        if time.monotonic() - last_commit > 5:
            cache.commit()
            last_commit = time.monotonic()

    try:
        n_workers = min(resolve_workers(workers), max(1, len(todo)))
        if n_workers <= 1:
            for i in todo:
                finish(i, run_task(tasks[i]))
        else:
            # Group by netlist (a worker then parses each netlist rarely), biggest netlists first (they
            # are the slow points: an idle worker at the end is worse than one at the start), and cut
            # each group into chunks small enough to keep every worker busy.
            groups: Dict[str, List[int]] = {}
            for i in todo:
                groups.setdefault(hashlib.sha1(tasks[i].netlist.encode()).hexdigest(), []).append(i)
            chunks = []
            for idx in sorted(groups.values(), key=lambda g: -len(tasks[g[0]].netlist)):
                size = max(1, min(chunk_size, -(-len(idx) // n_workers)))
                chunks += [idx[k:k + size] for k in range(0, len(idx), size)]
            retry: List[int] = []
            ctx = mp.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_worker_init) as pool:
                futures = {pool.submit(_run_chunk, [tasks[i] for i in c]): c for c in chunks}
                for fut in cf.as_completed(futures):
                    idx = futures[fut]
                    try:
                        for i, res in zip(idx, fut.result()):
                            finish(i, res)
                    except Exception:  # worker died (BrokenProcessPool): retry these points alone
                        retry.extend(idx)
            for i in retry:
                if results[i] is not None:
                    continue
                with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_worker_init) as pool:
                    try:
                        finish(i, pool.submit(run_task, tasks[i]).result())
                    except Exception as err:
                        finish(i, Result(False, [], f"worker crashed: {type(err).__name__}: {err}",
                                         tasks[i].params, 0.0))
    finally:
        bar.close()
        cache.close()
    return [r for r in results]  # type: ignore[misc]


_VERSION_CACHE: Optional[str] = None


def ngspice_version_cached() -> str:
    """ngspice's version, asked once per process (loads the library in this process)."""
    global _VERSION_CACHE
    if _VERSION_CACHE is None:
        _VERSION_CACHE = ngspice_version()
    return _VERSION_CACHE


def failed(results: Iterable[Result]) -> List[Result]:
    return [r for r in results if not r.ok]
