"""The output folder: file and folder modes, links refused, write errors as ``OutputError``.

Files are written atomically by :mod:`ggo_cli.atomic_output`, through the rules here (STYLE.md
section 8).

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
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
"""``os.O_NOFOLLOW`` where the platform has it (0 elsewhere): open no symbolic link."""
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)
"""``os.O_CLOEXEC`` where the platform has it (0 elsewhere): no descriptor leaks to children."""

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


def create_temp_file(final: Path, mode: int = FILE_MODE) -> Path:
    """Create a new, empty, uniquely named hidden temp file beside ``final`` with ``mode``.

    ``O_EXCL | O_NOFOLLOW``: never opens an existing file or a link; the mode is set with
    ``fchmod`` so that the umask cannot change it.

    Args:
        final: the file the temporary one will become; it is named ``.<name>.<hex>.tmp``.
        mode: the temporary file's mode.

    Returns:
        The temporary file's path.

    Raises:
        OSError: the file cannot be created (``FileExistsError`` when no free name is found).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC
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
        fd = os.open(path, os.O_RDONLY | _DIRECTORY | NOFOLLOW | CLOEXEC)
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
        fd = os.open(path, os.O_RDONLY | NOFOLLOW | CLOEXEC)
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
        create_temp_file(probe).unlink()
    except OSError as exc:
        error = output_error(exc, folder, "write into folder")
        error.fatal = True
        raise error from exc
    return folder
