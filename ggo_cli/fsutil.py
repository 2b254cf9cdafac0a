"""Atomic file output: write to a hidden temporary file beside the target, then rename.

PACS folder watchers and users must never see a half-written SEG, CSV or PNG (STYLE.md
section 8). Every output therefore goes to ``.<name>.<random>.tmp`` in the destination folder
(same file system, so the rename is atomic), is flushed with ``fsync``, moved into place with
:func:`os.replace` and made durable by an ``fsync`` of the folder. On any failure the temporary
file is removed and an existing file at the destination is left untouched.

Output paths are built from UIDs and the user's ``--out`` folder, so naming them in messages
leaks no patient data.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

log = logging.getLogger(__name__)

TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"
_CREATE_ATTEMPTS = 16
_FILE_MODE = 0o666  # reduced by the process umask, as for any file the user creates
# Folder fsync is impossible on some file systems, or on a write-only (-wx) folder: skip it.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EISDIR, errno.EACCES}

_FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
_HINTS = {
    errno.ENOSPC: "no space left on device; free some space or choose another --out folder",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another --out folder",
    errno.EROFS: "the file system is read-only; choose a writable --out folder",
    errno.EACCES: "permission denied; choose a writable --out folder",
    errno.EPERM: "operation not permitted; choose a writable --out folder",
    errno.ENAMETOOLONG: "the file name is too long; choose a shorter --out folder",
}


def output_error(exc: OSError, path: Path, action: str = "write") -> OutputError:
    """Turn an ``OSError`` into a one-line :class:`OutputError` naming the path and a fix.

    Full disk, exceeded quota, read-only file system and missing permission concern the whole
    output folder, so the error is marked ``fatal`` (the run stops rather than failing every
    remaining series the same way).

    Args:
        exc: the operating-system error.
        path: the output the error concerns (UID-based, so free of patient data).
        action: what was being done, e.g. ``"write"`` or ``"create folder"``.

    Returns:
        The error to raise (``raise output_error(exc, path) from exc``).
    """
    code = exc.errno or 0
    hint = _HINTS.get(code) or (exc.strerror or type(exc).__name__)
    return OutputError(f"cannot {action} {path}: {hint}", fatal=code in _FATAL_ERRNOS)


def _create_temp(final: Path) -> Path:
    """Create a new, empty, uniquely named hidden temp file beside ``final``."""
    for _ in range(_CREATE_ATTEMPTS):
        temp = final.with_name(f"{TEMP_PREFIX}{final.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        except FileExistsError:
            continue
        os.close(fd)
        return temp
    raise FileExistsError(errno.EEXIST, "could not find a free temporary file name", str(final))


def _fsync_file(path: Path) -> None:
    """Flush a file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
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


def ensure_folder(folder: Path) -> Path:
    """Create an output folder (and its parents) if missing.

    Args:
        folder: the folder.

    Returns:
        ``folder``.

    Raises:
        OutputError: the folder cannot be created (permissions, read-only, full disk, or a
            file is in the way).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, folder, "create folder") from exc
    return folder


def ensure_writable_dir(folder: Path) -> Path:
    """Create the output folder if needed and prove it writable by creating a probe file.

    A real probe (rather than :func:`os.access`) also catches read-only mounts, full disks
    with no free inode and ACLs, and works for root. Call it once before any work is done.

    Args:
        folder: the output folder.

    Returns:
        ``folder``.

    Raises:
        OutputError: ``fatal`` when the folder cannot be created or written.
    """
    ensure_folder(folder)
    probe = folder / "write-probe"
    try:
        _create_temp(probe).unlink()
    except OSError as exc:
        error = output_error(exc, folder, "write into folder")
        error.fatal = True
        raise error from exc
    return folder


@contextmanager
def atomic_write_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it atomically becomes ``final``.

    The temporary file is created empty (mode ``0o666`` less the umask) in ``final``'s folder,
    named ``.<final name>.<random hex>.tmp``. Write it by path (``open(tmp, "wb")``,
    ``dataset.save_as(tmp)``, ``image.save(tmp)``). When the block ends normally, the file is
    fsynced, renamed over ``final`` with :func:`os.replace`, and the folder is fsynced. When the
    block raises, the temporary file is removed and ``final`` (if it existed) is unchanged.

    Args:
        final: the destination file; missing parent folders are created.

    Yields:
        The temporary path to write.

    Raises:
        OutputError: creating, writing, syncing or renaming failed with an ``OSError`` (full
            disk, read-only file system, permission denied...); the message names ``final``.
            Other exceptions from the block propagate unchanged (after clean-up).
    """
    final = Path(final)
    ensure_folder(final.parent)
    try:
        temp = _create_temp(final)
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


def atomic_write_bytes(final: Path, data: bytes) -> Path:
    """Write ``data`` to ``final`` atomically (see :func:`atomic_write_path`).

    Args:
        final: the destination file.
        data: the complete content.

    Returns:
        ``final``.

    Raises:
        OutputError: the file cannot be written.
    """
    with atomic_write_path(final) as temp, temp.open("wb") as fh:
        fh.write(data)
    return final


def atomic_write_text(final: Path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``final`` atomically, with no newline translation.

    Args:
        final: the destination file.
        text: the complete content; line endings are written exactly as given.
        encoding: text encoding.

    Returns:
        ``final``.

    Raises:
        OutputError: the file cannot be written.
    """
    return atomic_write_bytes(final, text.encode(encoding))
