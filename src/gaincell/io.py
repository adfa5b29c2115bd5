"""Atomic file output: write to a temporary file in the same folder, then rename over the target.

A job killed mid-write never leaves a truncated result that a later stage (or Snakemake) would trust.
Temporary files are named ``.<target>.<host>-<pid>.<random>.tmp`` and created with mode 0o666 less the
process umask (the permissions of an ordinary ``open``; ``tempfile.mkstemp`` would leave them 0o600).
Each write first removes the temporary files that killed writers of the same target left behind: those
of a process of this host that no longer runs, and any older than ``STALE_TMP_AGE_S`` (another host's).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]

STALE_TMP_AGE_S = 24 * 3600.0  # a temporary file of another host (shared file system) this old is dead


def _host() -> str:
    return socket.gethostname().split(".")[0].replace("-", "_") or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_tmp(path: PathLike) -> list:
    """Remove the temporary files of ``path`` left by killed atomic writes; returns the removed paths.

    A file ``.<name>.<host>-<pid>.<random>.tmp`` is stale when ``host`` is this machine and ``pid`` no
    longer runs, or when it is older than ``STALE_TMP_AGE_S``; a bare ``.<name>.tmp`` (older writers)
    when older than ``STALE_TMP_AGE_S``. Live writers of other processes are left alone.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    host, now = _host(), time.time()
    for tmp in path.parent.glob(f".{path.name}.*tmp*"):
        stem = tmp.name[len(path.name) + 2:]  # "<host>-<pid>.<random>.tmp" | "tmp" | "tmp.<ext>"
        owner = stem.split(".")[0]
        stale = False
        try:
            if "-" in owner and owner.rsplit("-", 1)[1].isdigit():
                tmp_host, pid = owner.rsplit("-", 1)
                stale = (tmp_host == host and not _pid_alive(int(pid))) or \
                    now - tmp.stat().st_mtime > STALE_TMP_AGE_S
            else:
                stale = now - tmp.stat().st_mtime > STALE_TMP_AGE_S
            if stale:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # removed meanwhile by its writer
            continue
    return removed


def tmp_path_beside(path: PathLike) -> Path:
    """A fresh temporary path beside ``path`` (for writers that need a path, e.g. ``np.memmap``), after
    removing stale ones. Rename it over ``path`` with ``os.replace`` when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    return path.with_name(f".{path.name}.{_host()}-{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _open_tmp_beside(path: Path) -> tuple[int, str]:
    tmp = tmp_path_beside(path)
    # O_EXCL: never another writer's file; mode 0o666 & ~umask like any ordinary new file.
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)


def _write_atomically(path: PathLike, write: Callable[[int, str], None]) -> Path:
    """Call ``write(fd, tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = _open_tmp_beside(path)
    try:
        write(fd, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    def write(fd: int, tmp: str) -> None:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return _write_atomically(path, write)


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_save_torch(obj: Any, path: PathLike) -> Path:
    def write(fd: int, tmp: str) -> None:
        os.close(fd)
        torch.save(obj, tmp)

    return _write_atomically(path, write)


def atomic_copy(src: PathLike, dst: PathLike) -> Path:
    """Copy ``src`` to ``dst`` atomically (``dst`` is the old file or the whole new one)."""
    def write(fd: int, tmp: str) -> None:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())

    return _write_atomically(dst, write)


def atomic_to_csv(df, path: PathLike, **kwargs: Any) -> Path:
    """Write a pandas DataFrame to CSV atomically (index off unless asked)."""
    kwargs.setdefault("index", False)
    return atomic_write_text(path, df.to_csv(**kwargs))


def finite_or_none(obj: Any) -> Any:
    """NaN/inf floats (nested in dicts, lists, tuples) become None, so the result is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash_cache_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256.json")


def sha256_file_cached(path: PathLike) -> str:
    """``sha256_file`` remembered in a sidecar ``.<name>.sha256.json`` beside the file, keyed by the
    file's size, modification time (ns) and inode: rehashed only when the file was rewritten.
    (A multi-GB checkpoint is hashed once, not at every rerun.) An unwritable folder just skips the cache."""
    path = Path(path)
    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    cache = _hash_cache_path(path)
    cached: Optional[dict] = None
    try:
        cached = json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    if isinstance(cached, dict) and all(cached.get(k) == v for k, v in key.items()) and cached.get("sha256"):
        return str(cached["sha256"])
    digest = sha256_file(path)
    try:
        atomic_write_json(cache, dict(key, sha256=digest))
    except OSError:
        pass
    return digest
