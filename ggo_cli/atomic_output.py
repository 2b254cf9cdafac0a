"""Atomic file output: write to a hidden temporary file beside the target, then rename.

PACS folder watchers and users must never see a half-written SEG, CSV or PNG (STYLE.md
section 8). Every output therefore goes to ``.<name>.<random>.tmp`` in the destination folder
(same file system, so the rename is atomic), is flushed with ``fsync``, moved into place with
:func:`os.replace` and made durable by an ``fsync`` of the folder. On any failure the temporary
file is removed and an existing file at the destination is left untouched.

The output folder's rules (modes, links refused, write errors as
:class:`~ggo_cli.errors.OutputError`) are :mod:`ggo_cli.fsutil`'s; every function here applies
them.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .fsutil import (
    CLOEXEC,
    FILE_MODE,
    NOFOLLOW,
    OutputTree,
    create_temp_file,
    ensure_folder,
    output_error,
)

log = logging.getLogger(__name__)

# Folder fsync is impossible on some file systems, or on a write-only (-wx) folder: skip it.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EISDIR, errno.EACCES}


def _fsync_file(path: Path) -> None:
    """Flush a file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY | NOFOLLOW | CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be synced (Windows)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        if exc.errno in _DIR_FSYNC_UNSUPPORTED:
            log.debug("cannot open folder %s to fsync it: %s", folder, exc)
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems (network mounts, FUSE) refuse fsync on a folder; the file itself
        # is already synced and in place, so this only weakens crash durability.
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
        log.debug("fsync of folder %s not supported: %s", folder, exc)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    """Remove a temp file after a failure; a failure to remove is logged, not raised."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove temporary file %s: %s", path, exc)

@contextmanager
def atomic_write_path(final: Path, *, tree: OutputTree | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; on success it atomically becomes ``final``.

    The temporary file is created empty (mode ``0600``, or the tree's file mode; the umask
    plays no part) with ``O_EXCL | O_NOFOLLOW`` in ``final``'s folder, named
    ``.<final name>.<random hex>.tmp``. Write it by path (``open(tmp, "wb")``,
    ``dataset.save_as(tmp)``, ``image.save(tmp)``). When the block ends normally, the file is
    fsynced, renamed over ``final`` with :func:`os.replace`, and the folder is fsynced. When the
    block raises, the temporary file is removed and ``final`` (if it existed) is unchanged.

    Args:
        final: the destination file; missing parent folders are created.
        tree: the output folder ``final`` lies in: its folders are checked for links
            (:class:`OutputTree`) and the file gets the tree's mode.

    Yields:
        The temporary path to write.

    Raises:
        OutputError: creating, writing, syncing or renaming failed with an ``OSError`` (full
            disk, read-only file system, permission denied...); the message names ``final``.
            ``fatal`` for a link inside the output folder. Other exceptions from the block
            propagate unchanged (after clean-up).
    """
    final = Path(final)
    if tree is not None:
        tree.file(final)
    else:
        ensure_folder(final.parent)
    try:
        temp = create_temp_file(final, FILE_MODE if tree is None else tree.file_mode)
    except OSError as exc:
        raise output_error(exc, final) from exc
    try:
        yield temp
        _fsync_file(temp)
        os.replace(temp, final)
    except OSError as exc:
        _remove_quietly(temp)
        raise output_error(exc, final) from exc
    except BaseException:
        _remove_quietly(temp)
        raise
    try:
        _fsync_dir(final.parent)
    except OSError as exc:
        raise output_error(exc, final, "sync the folder of") from exc
    log.debug("wrote %s", final)


def atomic_write_bytes(final: Path, data: bytes, *, tree: OutputTree | None = None) -> Path:
    """Write ``data`` to ``final`` atomically (see :func:`atomic_write_path`).

    Args:
        final: the destination file.
        data: the complete content.
        tree: the output folder (links refused, its file mode).

    Returns:
        ``final``.

    Raises:
        OutputError: the file cannot be written.
    """
    with atomic_write_path(final, tree=tree) as temp:
        fd = os.open(temp, os.O_WRONLY | os.O_TRUNC | NOFOLLOW | CLOEXEC)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return final


def atomic_write_text(
    final: Path, text: str, *, encoding: str = "utf-8", tree: OutputTree | None = None
) -> Path:
    """Write ``text`` to ``final`` atomically, with no newline translation.

    Args:
        final: the destination file.
        text: the complete content; line endings are written exactly as given.
        encoding: text encoding.
        tree: the output folder (links refused, its file mode).

    Returns:
        ``final``.

    Raises:
        OutputError: the file cannot be written.
    """
    return atomic_write_bytes(final, text.encode(encoding), tree=tree)
