"""Logging setup: the only place handlers are added (STYLE.md section 6).

Everything goes to stderr (rich on a terminal, plain lines otherwise) and optionally to a
rotating log file; stdout is left for the machine-readable summary. No locals are ever shown
in tracebacks, so DICOM headers cannot leak into logs.
"""

from __future__ import annotations

import logging
import logging.handlers
import pickle
import queue
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 5
_HANDLER_MARK = "_ggo_cli_handler"


def level_from_flags(verbose: int, quiet: int) -> int:
    """Map ``-v``/``-q`` counts to a logging level (INFO by default)."""
    return max(logging.DEBUG, min(logging.ERROR, logging.INFO + 10 * (quiet - verbose)))


def configure_logging(
    level: int = logging.INFO,
    *,
    log_file: Path | None = None,
    use_rich: bool | None = None,
) -> None:
    """Configure the ``ggo_cli`` logger tree; safe to call more than once.

    Args:
        level: level for stderr (and the file).
        log_file: optional file, rotated at 10 MiB, five backups kept.
        use_rich: force the rich handler on or off; default: on when stderr is a terminal.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(handler)
        handler.close()
    if use_rich is None:
        use_rich = sys.stderr.isatty()
    handlers: list[logging.Handler] = []
    if use_rich:
        from rich.console import Console
        from rich.logging import RichHandler

        handlers.append(
            RichHandler(
                console=Console(stderr=True),
                show_path=False,
                rich_tracebacks=False,
                markup=False,
            )
        )
    else:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(PLAIN_FORMAT))
        handlers.append(stream)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=LOG_FILE_MAX_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
        )
        file_handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
        handlers.append(file_handler)
    for handler in handlers:
        setattr(handler, _HANDLER_MARK, True)
        handler.setLevel(level)
        root.addHandler(handler)
    # Our own records at the requested level; third-party libraries only from WARNING up.
    root.setLevel(logging.WARNING)
    logging.getLogger("ggo_cli").setLevel(level)
    logging.captureWarnings(True)


def quiet_pydicom() -> None:
    """Never validate values on read: pydicom's reports quote the values (dates, names).

    Called by the CLI and in every worker process (they do not inherit the setting).
    """
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def configure_worker_logging(records: Any, level: int) -> None:
    """In a worker process: send log records through ``records`` to the main process.

    ``ggo_cli`` records from ``level`` up and third-party warnings go to a
    :class:`logging.handlers.QueueHandler`; the main process hands them to its own handlers
    (:func:`relay_worker_logs`), so the worker writes nothing to stderr or files itself.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(logging.handlers.QueueHandler(records))
    root.setLevel(logging.WARNING)
    logging.getLogger("ggo_cli").setLevel(level)
    logging.captureWarnings(True)


@contextmanager
def relay_worker_logs(records: Any) -> Iterator[None]:
    """While open, hand the records worker processes put on ``records`` (a multiprocessing
    queue) to this process's logger of the same name (levels were applied in the worker; this
    process's handlers and filters apply as to its own records).

    The relay thread polls, so a worker killed in the middle of a write cannot hang the exit.
    """
    stop = threading.Event()

    def relay() -> None:
        while True:
            try:
                record = records.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    return  # drained
                continue
            except (EOFError, OSError, ValueError, pickle.UnpicklingError):
                return  # a worker died mid-write or the queue closed: stop relaying
            logging.getLogger(record.name).handle(record)

    thread = threading.Thread(target=relay, name="ggo-worker-logs", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
