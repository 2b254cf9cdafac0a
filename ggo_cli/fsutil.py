"""Atomic file output: write to a hidden temporary file beside the target, then rename.

PACS folder watchers and users must never see a half-written SEG, CSV or PNG (STYLE.md
section 8). Every output therefore goes to ``.<name>.<random>.tmp`` in the destination folder
(same file system, so the rename is atomic), is flushed with ``fsync``, moved into place with
:func:`os.replace` and made durable by an ``fsync`` of the folder. On any failure the temporary
file is removed and an existing file at the destination is left untouched.

**Links and permissions.** ggo-cli often runs as root from cron, writing into a folder that
other accounts may be able to write to, so nothing below ``--out`` is trusted:

- every folder component between ``--out`` and a file (:class:`OutputTree`) is checked with
  :func:`os.lstat` before each write and must be a real folder (not a symbolic link) owned by
  the user running ggo-cli; missing ones are created (``mkdir``, then ``fchmod`` through an
  ``O_NOFOLLOW | O_DIRECTORY`` descriptor). A planted link gives a *fatal* :class:`OutputError`
  (exit 6) naming the path inside ``--out``: a tampered output folder stops the run rather than
  failing one series after another. ``--out`` itself may be a link (the user named it).
- temporary files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (never through a link) and
  renamed over the final name, which replaces a link planted there instead of following it.
- files holding patient data are made owner-only, ``0600`` (folders ``0700``), by an explicit
  ``fchmod`` that the umask cannot widen; ``--group-readable`` gives ``0640`` / ``0750`` (a PACS
  or reading group).

Limit: the folder checks and the writes are separate system calls, so a local user who can
still write inside ``--out`` could race a link in between; the folders ggo-cli creates are
owner-only, which leaves that window only in ``--out`` itself.

Write errors keep their ``errno`` even when a library re-raised them without it (pydicom
wraps a failed element write in a plain ``OSError``): :func:`output_error` walks the exception
chain. Full disk, quota, read-only and permission errors are fatal (exit 6).

Output paths are built from UIDs and the user's ``--out`` folder, so naming them in messages
leaks no patient data.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputError

log = logging.getLogger(__name__)

TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"
_CREATE_ATTEMPTS = 16
FILE_MODE = 0o600
"""Mode of every output file (SEG, PNGs, CSV, manifests, state, lock): owner only."""
DIR_MODE = 0o700
"""Mode of every folder ggo-cli creates below ``--out``."""
GROUP_FILE_MODE = 0o640
"""File mode with ``--group-readable`` (read access for the folder's group, e.g. a PACS group)."""
GROUP_DIR_MODE = 0o750
"""Folder mode with ``--group-readable``."""
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
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


def _errno_of(exc: BaseException) -> int:
    """The first ``errno`` found along ``exc``'s cause/context chain (0 if none)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            return current.errno
        current = current.__cause__ or current.__context__
    return 0


def output_error(exc: OSError, path: Path, action: str = "write") -> OutputError:
    """Turn an ``OSError`` into a one-line :class:`OutputError` naming the path and a fix.

    Full disk, exceeded quota, read-only file system and missing permission concern the whole
    output folder, so the error is marked ``fatal`` (the run stops rather than failing every
    remaining series the same way). The errno is taken from the exception chain when ``exc``
    itself has none (pydicom re-raises a failed write as a bare ``OSError``).

    Args:
        exc: the operating-system error.
        path: the output the error concerns (UID-based, so free of patient data).
        action: what was being done, e.g. ``"write"`` or ``"create folder"``.

    Returns:
        The error to raise (``raise output_error(exc, path) from exc``).
    """
    code = _errno_of(exc)
    hint = _HINTS.get(code) or (exc.strerror or os.strerror(code) if code else str(exc))
    hint = hint.splitlines()[0] if hint else type(exc).__name__
    return OutputError(f"cannot {action} {path}: {hint}", fatal=code in _FATAL_ERRNOS)


def _create_temp(final: Path, mode: int = FILE_MODE) -> Path:
    """Create a new, empty, uniquely named hidden temp file beside ``final`` with ``mode``.

    ``O_EXCL | O_NOFOLLOW``: never opens an existing file or a link; the mode is set with
    ``fchmod`` so that the umask cannot change it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
    for _ in range(_CREATE_ATTEMPTS):
        temp = final.with_name(f"{TEMP_PREFIX}{final.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:
            fd = os.open(temp, flags, mode)
        except FileExistsError:
            continue
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
        return temp
    raise FileExistsError(errno.EEXIST, "could not find a free temporary file name", str(final))


def _fsync_file(path: Path) -> None:
    """Flush a file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
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


@dataclass(frozen=True, slots=True)
class OutputTree:
    """The ``--out`` folder: where links are refused and which modes files and folders get.

    Attributes:
        root: the output folder (it may itself be a link: the user named it).
        group_readable: ``0640`` files and ``0750`` folders instead of ``0600`` / ``0700``.
    """

    root: Path
    group_readable: bool = False

    @property
    def file_mode(self) -> int:
        """Mode of the files written below ``root``."""
        return GROUP_FILE_MODE if self.group_readable else FILE_MODE

    @property
    def dir_mode(self) -> int:
        """Mode of the folders created below ``root``."""
        return GROUP_DIR_MODE if self.group_readable else DIR_MODE

    def folder(self, folder: Path) -> Path:
        """Check (and create where missing) every folder from ``root`` down to ``folder``.

        Each component below ``root`` must be a real folder, not a symbolic link, owned by
        the effective user; a missing one (``root`` too) is created with :attr:`dir_mode`.

        Args:
            folder: ``root`` or a folder below it.

        Returns:
            ``folder``.

        Raises:
            OutputError: ``fatal`` for a link, a foreign-owned folder, or a folder outside
                ``root``; otherwise as :func:`ensure_folder`.
        """
        try:
            parts = Path(folder).relative_to(self.root).parts
        except ValueError as exc:
            raise OutputError(
                f"refusing to write {folder}: it is outside the output folder {self.root}",
                fatal=True,
            ) from exc
        if not os.path.lexists(self.root):  # --out itself, created on first use
            try:  # folders above --out are not ours: their default mode
                self.root.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise output_error(exc, self.root.parent, "create folder") from exc
            _make_folder(self.root, self.dir_mode)
        current = self.root
        for part in parts:
            current = current / part
            try:
                info = os.lstat(current)
            except FileNotFoundError:
                _make_folder(current, self.dir_mode)
                continue
            except OSError as exc:
                raise output_error(exc, current, "inspect folder") from exc
            _check_folder(current, info)
        return folder

    def file(self, path: Path) -> Path:
        """Check ``path``'s folders (:meth:`folder`) and that ``path`` is not a link.

        Returns:
            ``path``.

        Raises:
            OutputError: ``fatal`` when ``path`` or a folder above it is a link.
        """
        self.folder(path.parent)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return path
        except OSError as exc:
            raise output_error(exc, path, "inspect") from exc
        if stat.S_ISLNK(info.st_mode):
            raise _link_error(path)
        return path


def _link_error(path: Path) -> OutputError:
    """The fatal error for a symbolic link found inside the output folder."""
    return OutputError(
        f"refusing to write through {path}: it is a symbolic link inside the output folder "
        "(planted by someone who can write there?); remove it and make --out writable by its "
        "owner only",
        fatal=True,
    )


def _check_folder(path: Path, info: os.stat_result) -> None:
    """Refuse a link, a non-folder, or a folder owned by another user below ``--out``."""
    if stat.S_ISLNK(info.st_mode):
        raise _link_error(path)
    if not stat.S_ISDIR(info.st_mode):
        raise OutputError(f"cannot create folder {path}: a file is in the way; remove it")
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise OutputError(
            f"refusing to write into {path}: the folder belongs to user id {info.st_uid}, not "
            f"to the user running ggo-cli ({os.geteuid()}); remove it or change its owner",
            fatal=True,
        )


def _make_folder(path: Path, mode: int) -> None:
    """Create one folder and set its mode through an ``O_NOFOLLOW`` descriptor."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        _check_folder(path, os.lstat(path))  # created meanwhile: check it as any other
        return
    except OSError as exc:
        raise output_error(exc, path, "create folder") from exc
    if not hasattr(os, "fchmod"):  # pragma: no cover - Windows
        return
    try:
        fd = os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError as exc:
        raise output_error(exc, path, "open folder") from exc
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def ensure_folder(folder: Path, *, tree: OutputTree | None = None) -> Path:
    """Create an output folder (and its parents) if missing.

    Args:
        folder: the folder.
        tree: when given, ``folder`` lies below ``tree.root``: every component is checked
            for links and created with the tree's folder mode (:meth:`OutputTree.folder`).
            Without it, missing folders are created with ``0700``.

    Returns:
        ``folder``.

    Raises:
        OutputError: the folder cannot be created (permissions, read-only, full disk, or a
            file is in the way); ``fatal`` for a link below ``tree.root``.
    """
    if tree is not None:
        return tree.folder(folder)
    try:
        folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, folder, "create folder") from exc
    return folder


def set_file_mode(path: Path, mode: int) -> None:
    """Set a file's mode without following a link (``O_NOFOLLOW`` + ``fchmod``).

    Raises:
        OutputError: the file cannot be opened (a link gives ``ELOOP``) or changed.
    """
    if not hasattr(os, "fchmod"):  # pragma: no cover - Windows
        return
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    except OSError as exc:
        raise output_error(exc, path, "set the permissions of") from exc


def ensure_writable_dir(folder: Path, *, group_readable: bool = False) -> Path:
    """Create the output folder if needed and prove it writable by creating a probe file.

    A real probe (rather than :func:`os.access`) also catches read-only mounts, full disks
    with no free inode and ACLs, and works for root. Call it once before any work is done.
    A folder created here gets ``0700`` (``0750`` with ``group_readable``); an existing one
    keeps its mode.

    Args:
        folder: the output folder.
        group_readable: the mode of a newly created folder.

    Returns:
        ``folder``.

    Raises:
        OutputError: ``fatal`` when the folder cannot be created or written.
    """
    if not folder.is_dir():
        ensure_folder(folder)
        if hasattr(os, "chmod"):
            try:
                os.chmod(folder, GROUP_DIR_MODE if group_readable else DIR_MODE)
            except OSError as exc:
                raise output_error(exc, folder, "set the permissions of") from exc
    probe = folder / "write-probe"
    try:
        _create_temp(probe).unlink()
    except OSError as exc:
        error = output_error(exc, folder, "write into folder")
        error.fatal = True
        raise error from exc
    return folder


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
        temp = _create_temp(final, FILE_MODE if tree is None else tree.file_mode)
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
        fd = os.open(temp, os.O_WRONLY | os.O_TRUNC | _NOFOLLOW | _CLOEXEC)
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
