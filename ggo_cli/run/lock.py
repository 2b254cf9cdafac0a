"""One run per output folder: an exclusive lock held for the whole run.

The lock is ``<out>/.ggo-cli/lock``, held with ``flock`` (``msvcrt.locking`` on Windows). The
operating system releases it when the process ends, however it ends, so a lock left by a
killed run is simply taken over; the file's content (PID, host, start time of the holder) is
only there to name the holder in the message a second run prints.

The file is opened with ``O_NOFOLLOW`` after its folder has been checked for links
(:class:`~ggo_cli.fsutil.OutputTree`): a ``lock`` planted as a link to another file is
refused (fatal, exit 6) instead of truncating that file. It is owner-only (``0600``), or
``0640`` with ``--group-readable``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from ..errors import RunLockedError
from ..fsutil import OutputTree, output_error
from .state import STATE_FOLDER

log = logging.getLogger(__name__)

LOCK_NAME = "lock"


def _try_lock(handle: IO[str]) -> bool:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class RunLock:
    """Context manager holding the output folder's run lock.

    Args:
        out_dir: the output folder.
        group_readable: the lock file's mode is ``0640`` rather than ``0600``.

    Raises:
        RunLockedError: another live run holds the lock (message names PID, host, start).
        OutputError: the lock file cannot be created, or is a link (fatal).
    """

    def __init__(self, out_dir: Path, *, group_readable: bool = False) -> None:
        self.path = out_dir / STATE_FOLDER / LOCK_NAME
        self._tree = OutputTree(out_dir, group_readable)
        self._handle: IO[str] | None = None

    def _open(self) -> IO[str]:
        """Open (create) the lock file without following a link; mode set with fchmod."""
        self._tree.file(self.path)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, self._tree.file_mode)
        except OSError as exc:
            error = output_error(exc, self.path, "create the lock file")
            error.fatal = True
            raise error from exc
        if hasattr(os, "fchmod"):
            os.fchmod(fd, self._tree.file_mode)
        return os.fdopen(fd, "r+", encoding="utf-8")

    def __enter__(self) -> RunLock:
        handle = self._open()
        if not _try_lock(handle):
            holder = _read_holder(handle)
            handle.close()
            raise RunLockedError(
                f"output folder {self.path.parent.parent} is in use by another ggo-cli run "
                f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
                f"{holder.get('started_at', '?')}); wait for it to finish or choose another --out"
            )
        previous = _read_holder(handle)
        if previous:
            log.info(
                "took over the lock of an earlier run that ended (pid %s, started %s)",
                previous.get("pid", "?"),
                previous.get("started_at", "?"),
            )
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                }
            )
        )
        handle.flush()
        os.fsync(handle.fileno())
        self._handle = handle
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            # Empty the file first: a later run then knows the previous one ended cleanly.
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.close()
            self._handle = None


def _read_holder(handle: IO[str]) -> dict[str, Any]:
    try:
        handle.seek(0)
        text = handle.read()
        holder = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
