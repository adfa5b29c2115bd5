"""An exclusive lock on a results folder, held while a pipeline run writes it.

Snakemake's own lock lives in the working directory's ``.snakemake/``, so two runs started from different
working directories (or clones) with the same ``results_dir`` would not see each other. The workflow takes
this lock in its ``onstart`` handler: ``flock`` on ``<results_dir>/.gaincell.lock``, released by the
kernel when the process ends (a killed run leaves no stale lock). The file names the holder.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO

LOCK_NAME = ".gaincell.lock"


class ResultsFolderBusy(RuntimeError):
    """Another process holds the results folder's lock."""


def acquire(results_dir: str | os.PathLike) -> IO[str]:
    """Lock ``results_dir`` for this process; keep the returned file open as long as the lock is needed.

    Raises ResultsFolderBusy naming the holder (pid, host, working directory, start time, command).
    """
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not written its name yet"
        handle.close()
        raise ResultsFolderBusy(f"results folder {folder} is being written by another run ({holder}): "
                                f"wait for it to finish, or give this run another results_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "cwd": os.getcwd(),
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "command": " ".join(sys.argv)[:300]}) + "\n")
    handle.flush()
    return handle
