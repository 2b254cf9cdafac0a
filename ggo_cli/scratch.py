"""Scratch folders for work files (the int8 rebuild) under ggo-cli's own cache folder.

A run killed with ``kill -9`` cannot delete its scratch folder, and the int8 rebuild writes
about 160 MB there. So scratch folders never go to the system temp folder: they are made under
``<cache>/tmp/`` (the cache folder of :func:`ggo_cli.onnx.verdict_cache.cache_dir`), each holds a
lock file locked while it is in use, and every new scratch folder first removes the folders
whose lock is free (their process is gone: the operating system drops the locks of a killed
process). While one is open, Python's :mod:`tempfile` default folder points into it, so the
temporary files of ONNX Runtime's quantizer (``ort.quant.*``, ``pre.quant.*``) go there too.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

SCRATCH_FOLDER = "tmp"
IN_USE_NAME = ".in-use"
LOCKLESS_GRACE_S = 60.0
"""A folder without its lock file is left alone this long (it may be being created)."""
_TEMPDIR_LOCK = threading.Lock()


def scratch_root() -> Path:
    """``<cache>/tmp``: where scratch folders are made."""
    from .onnx.verdict_cache import cache_dir  # deferred: verdict_cache imports this module

    return cache_dir() / SCRATCH_FOLDER


def lock_exclusive(handle: IO[bytes], *, wait: bool = False) -> bool:
    """Take an exclusive lock on an open file (released when it is closed or its process
    dies); ``False`` when it is held elsewhere (without ``wait``) or cannot be taken.

    Args:
        handle: the file, opened for writing.
        wait: wait for the lock (on Windows at most about 10 s) instead of giving up at once.
    """
    try:
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


def _abandoned(folder: Path) -> bool:
    """Whether no live process uses ``folder`` (its lock file is free, or long missing)."""
    marker = folder / IN_USE_NAME
    try:
        with marker.open("rb") as handle:
            return lock_exclusive(handle)  # closing the file drops the lock again
    except FileNotFoundError:
        try:
            return time.time() - folder.stat().st_mtime > LOCKLESS_GRACE_S
        except OSError:
            return False
    except OSError:  # Windows: a file locked by another process cannot be opened
        return False


def sweep_scratch(root: Path | None = None) -> int:
    """Remove the scratch folders of processes that are gone (e.g. killed with ``kill -9``).

    Args:
        root: the folder of scratch folders; default :func:`scratch_root`.

    Returns:
        The number of folders removed.
    """
    root = scratch_root() if root is None else root
    try:
        entries = list(root.iterdir())
    except OSError:
        return 0
    removed = 0
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink() and _abandoned(entry):
            shutil.rmtree(entry, ignore_errors=True)
            removed += not entry.exists()
    if removed:
        log.debug("removed %d scratch folders left by killed runs from %s", removed, root)
    return removed


@contextmanager
def scratch_folder(prefix: str, *, redirect_tempfile: bool = True) -> Iterator[Path]:
    """A fresh scratch folder under :func:`scratch_root`, removed on exit.

    Stale folders are swept first (:func:`sweep_scratch`). While the block runs, the
    :mod:`tempfile` default folder is the scratch folder (for the libraries called inside), so
    the block should not run beside other code that needs the system temp folder.

    Args:
        prefix: start of the folder's name.
        redirect_tempfile: make it the :mod:`tempfile` default folder while the block runs
            (off: the folder only; such blocks may nest redirecting ones).

    Yields:
        The folder.

    Raises:
        OSError: the folder cannot be made.
    """
    root = scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    sweep_scratch(root)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    handle = (folder / IN_USE_NAME).open("wb")
    try:
        lock_exclusive(handle)
        if not redirect_tempfile:
            yield folder
            return
        with _TEMPDIR_LOCK:
            saved = tempfile.tempdir
            tempfile.tempdir = os.fspath(folder)
            try:
                yield folder
            finally:
                tempfile.tempdir = saved
    finally:
        handle.close()
        shutil.rmtree(folder, ignore_errors=True)
