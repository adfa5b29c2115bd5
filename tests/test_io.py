"""Atomic writes: the target is either the old or the new content, never a partial file."""
import json

import pytest

from gaincell.io import atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_failed_write_keeps_old_content(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_outputs_get_the_permissions_of_an_ordinary_file(tmp_path):
    """0o666 less the umask (mkstemp would give 0o600: other users of a shared results folder locked out)."""
    import os

    from gaincell.io import atomic_copy, atomic_save_torch

    old = os.umask(0o022)
    try:
        for path, write in ((tmp_path / "a.txt", lambda p: atomic_write_text(p, "x")),
                            (tmp_path / "b.pt", lambda p: atomic_save_torch({"x": 1}, p)),
                            (tmp_path / "c.txt", lambda p: atomic_copy(tmp_path / "a.txt", p))):
            write(path)
            assert path.stat().st_mode & 0o777 == 0o644, path
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_stale_temporary_files_of_killed_writers_are_removed(tmp_path):
    """A killed writer's temporary file (its process gone) goes at the next write of the same target;
    a live writer's stays; a bare old-style one goes once older than STALE_TMP_AGE_S."""
    import os
    import subprocess
    import time

    from gaincell.io import STALE_TMP_AGE_S, _host, remove_stale_tmp

    target = tmp_path / "m.csv"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".m.csv.{_host()}-{dead.pid}.abcd.tmp"
    live = tmp_path / f".m.csv.{_host()}-{os.getpid()}.ef01.tmp"
    old_style, fresh_old_style = tmp_path / ".m.csv.tmp", tmp_path / ".other.tmp"
    for p in (stale, live, old_style, fresh_old_style):
        p.write_text("partial")
    old = time.time() - STALE_TMP_AGE_S - 60
    os.utime(old_style, (old, old))
    atomic_write_text(target, "done")
    assert target.read_text() == "done"
    assert not stale.exists() and not old_style.exists()
    assert live.exists() and fresh_old_style.exists()  # a writer still running; another target's file
    assert remove_stale_tmp(target) == []


def test_sha256_cache_follows_the_file(tmp_path):
    import hashlib
    import os

    from gaincell.io import sha256_file_cached

    path = tmp_path / "w.pt"
    path.write_bytes(b"one")
    assert sha256_file_cached(path) == hashlib.sha256(b"one").hexdigest()
    assert (tmp_path / ".w.pt.sha256.json").is_file()
    atomic_write_text(path, "two")  # rewritten: new inode and mtime, same size
    assert sha256_file_cached(path) == hashlib.sha256(b"two").hexdigest()
    st = path.stat()
    with open(path, "r+b") as fh:  # in-place edit, mtime put back: only the size or inode would tell
        fh.write(b"TWO")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert sha256_file_cached(path) == hashlib.sha256(b"TWO").hexdigest()
