"""Logging setup: the only place handlers are added (STYLE.md section 6).

Everything goes to stderr (rich on a terminal, plain lines otherwise) and optionally to a
rotating log file; stdout is left for the machine-readable summary. No locals are ever shown
in tracebacks, so DICOM headers cannot leak into logs.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import pickle
import queue
import re
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
THIRD_PARTY_LOGGERS = (
    "pydicom",
    "highdicom",
    "PIL",
    "pylibjpeg",
    "openjpeg",
    "libjpeg",
    "rle",
    "pynetdicom",
    "dicomweb_client",
    "urllib3",
)
"""Loggers (and their children) of the DICOM, image and network libraries whose records are
demoted.

pynetdicom logs a refused connection at ERROR and dicomweb-client an HTTP error with the request;
the delivery queue turns each into one line per destination (:mod:`ggo_cli.delivery.deliver`).

pydicom's pixel decoders log every failed plugin attempt at ERROR with its traceback
(``pydicom.pixels.decoders.base``), then raise; ggo-cli turns that exception into the series'
one-line reason, so the library's own records are detail for ``--debug``. python-gdcm does not
use :mod:`logging`.
"""


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""C0 controls (newline, carriage return, escape...), DEL, C1 controls and the Unicode line and
paragraph separators: whatever can end a line or drive a terminal."""
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
TRACEBACK_PREFIX = "  | "
"""Starts every traceback line (``--debug``), so that none can pass for a log record."""


def escape_control(text: str) -> str:
    """``text`` with every control character written as a visible escape.

    Newline, carriage return and tab become ``\\n``, ``\\r``, ``\\t``; other C0 and C1
    controls and DEL become ``\\xNN``; U+2028/U+2029 become ``\\u2028``/``\\u2029``. A UID,
    folder name or header value can then neither forge a log line, split a CSV row, nor send
    terminal escape sequences. Backslashes are kept as they are (Windows paths stay readable),
    so the escaping is for display and cannot be reversed exactly.
    """

    def visible(match: re.Match[str]) -> str:
        char = match.group(0)
        if char in _NAMED_ESCAPES:
            return _NAMED_ESCAPES[char]
        code = ord(char)
        return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"

    return _CONTROL.sub(visible, text)


class ControlEscape(logging.Filter):
    """A handler filter: the record's message (its arguments filled in) with control characters
    escaped (:func:`escape_control`), so that every record is one line on every handler,
    relayed records of ``--jobs`` workers included. Always lets the record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit: emit() reports it
            return True
        escaped = escape_control(message)
        if escaped != message or record.args:
            record.msg, record.args = escaped, None
        return True


class EscapingFormatter(logging.Formatter):
    """A formatter whose tracebacks (``--debug``) are escaped and indented line by line.

    A traceback ends with the exception's message, which may quote anything; each of its
    lines starts with :data:`TRACEBACK_PREFIX`, so no line of it can look like a record.
    """

    def format(self, record: logging.LogRecord) -> str:
        # Another handler may have cached its own traceback text on the record: not used here.
        saved = record.exc_text
        record.exc_text = None if record.exc_info else saved and _indented(saved)
        try:
            return super().format(record)
        finally:
            record.exc_text = saved

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    """Each line of ``text`` escaped and prefixed with :data:`TRACEBACK_PREFIX`."""
    return "\n".join(TRACEBACK_PREFIX + escape_control(line) for line in text.split("\n"))


def level_from_flags(verbose: int, quiet: int) -> int:
    """Map ``-v``/``-q`` counts to a logging level (INFO by default)."""
    return max(logging.DEBUG, min(logging.ERROR, logging.INFO + 10 * (quiet - verbose)))


class ThirdPartyDemotion(logging.Filter):
    """A handler filter: third-party records at WARNING and above become DEBUG records.

    The level and level name are changed in place, so every handler shows them as DEBUG. A
    handler compares a record's level with its own before it runs its filters, so this filter
    also drops what its demotion took below ``level`` (the handler's level).

    Args:
        level: the level of the handler this filter is attached to.
    """

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and _is_third_party(record.name):
            record.levelno = logging.DEBUG
            record.levelname = logging.getLevelName(logging.DEBUG)
        return record.levelno >= self.level


def _is_third_party(name: str) -> bool:
    """Whether logger ``name`` is one of :data:`THIRD_PARTY_LOGGERS` or below one."""
    return any(name == top or name.startswith(f"{top}.") for top in THIRD_PARTY_LOGGERS)


class OwnerOnlyRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log file created owner-only (``0600``) and never through a link.

    The log names series by UID, which is linked to a patient in the PACS: like every other
    output it is created readable by its owner only (an existing file keeps the mode its
    administrator gave it, e.g. ``0640`` for a group). A planted link in place of the file is
    refused (``O_NOFOLLOW``) instead of appending to whatever it points at.
    """

    def _open(self) -> Any:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(self.baseFilename, flags, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


def configure_logging(
    level: int = logging.INFO,
    *,
    log_file: Path | None = None,
    use_rich: bool | None = None,
) -> None:
    """Configure the ``ggo_cli`` logger tree; safe to call more than once.

    Third-party records at WARNING and above are shown as DEBUG records, so only with ``-vv``
    or ``--debug`` (:class:`ThirdPartyDemotion`): a cron log gets one line per failed series,
    not a decoder's tracebacks.

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
        handlers[-1].setFormatter(EscapingFormatter("%(message)s"))
    else:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(EscapingFormatter(PLAIN_FORMAT))
        handlers.append(stream)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = OwnerOnlyRotatingFileHandler(
            log_file, maxBytes=LOG_FILE_MAX_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
        )
        file_handler.setFormatter(EscapingFormatter(PLAIN_FORMAT))
        handlers.append(file_handler)
    for handler in handlers:
        setattr(handler, _HANDLER_MARK, True)
        handler.setLevel(level)
        # On the handler, not on the library loggers: a logger's filters never see the records
        # of its children, nor the records relayed from --jobs workers.
        handler.addFilter(ThirdPartyDemotion(level))
        handler.addFilter(ControlEscape())
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
