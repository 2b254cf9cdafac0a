"""Logging setup: third-party records (pydicom's decoder tracebacks) stay at DEBUG."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from ggo_cli.logs import ThirdPartyDemotion, configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root and ggo_cli loggers back as they were (configure_logging changes them)."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("ggo_cli").level)
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(saved[1])
    logging.getLogger("ggo_cli").setLevel(saved[2])
    logging.captureWarnings(False)


@pytest.mark.usefixtures("restore_logging")
def test_third_party_warnings_and_errors_become_debug_records(
    caplog: pytest.LogCaptureFixture,
) -> None:
    configure_logging(logging.INFO, use_rich=False)
    configure_logging(logging.INFO, use_rich=False)  # idempotent: one handler, one filter
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_ggo_cli_handler", False)]
    assert len(ours) == 1
    assert sum(isinstance(f, ThirdPartyDemotion) for f in ours[0].filters) == 1
    demotion = ThirdPartyDemotion(logging.INFO)
    for name in (
        "pydicom",
        "pydicom.pixels.decoders.base",
        "highdicom.seg.sop",
        "PIL.Image",
        "pynetdicom.transport",
        "dicomweb_client.web",
        "urllib3.connectionpool",
    ):
        record = logging.LogRecord(name, logging.ERROR, __file__, 1, "boom", None, None)
        assert not demotion.filter(record)
        assert (record.levelno, record.levelname) == (logging.DEBUG, "DEBUG")
    for name in ("ggo_cli.run.pipeline", "pydicomx", "py.warnings"):
        record = logging.LogRecord(name, logging.WARNING, __file__, 1, "kept", None, None)
        assert demotion.filter(record)
        assert record.levelno == logging.WARNING
    info = logging.LogRecord("pydicom", logging.INFO, __file__, 1, "info", None, None)
    assert demotion.filter(info) and info.levelno == logging.INFO  # below WARNING: as it was
    assert ThirdPartyDemotion(logging.DEBUG).filter(
        logging.LogRecord("pydicom", logging.ERROR, __file__, 1, "shown with -vv", None, None)
    )


def test_pydicom_has_no_stderr_handler_of_its_own() -> None:
    # pydicom adds a StreamHandler only when pydicom.config.debug() is called (never by us).
    handlers = logging.getLogger("pydicom").handlers
    assert all(type(h) is logging.NullHandler for h in handlers)


FORGED = "1.2.3\n2026-01-01 00:00:00,000 INFO ggo_cli.run.pipeline: forged\x1b[31m\r\x85\u2028\x7f"


def test_escape_control_writes_every_control_character_visibly() -> None:
    from ggo_cli.logs import escape_control

    assert escape_control("a\nb\r\tc\x1b[31md\x00\x7f\x85\x9f\u2028\u2029") == (
        "a\\nb\\r\\tc\\x1b[31md\\x00\\x7f\\x85\\x9f\\u2028\\u2029"
    )
    assert escape_control("C:\\data\\DOE^JANE é ü") == "C:\\data\\DOE^JANE é ü"  # kept


def test_a_record_with_control_characters_is_one_line_on_stderr_and_in_the_log_file(
    tmp_path: Path, restore_logging: None, capfd: pytest.CaptureFixture[str]
) -> None:
    """A UID or folder name with a newline or an escape sequence cannot forge log lines."""
    log_file = tmp_path / "run.log"
    configure_logging(logging.INFO, log_file=log_file, use_rich=False)
    log = logging.getLogger("ggo_cli.test")
    log.info("series %s: %d slices", FORGED, 3)
    log.warning(FORGED)  # a message without arguments
    try:
        raise ValueError(FORGED)
    except ValueError:
        log.error("failed", exc_info=True)
    for handler in logging.getLogger().handlers:
        handler.flush()
    for text in (capfd.readouterr().err, log_file.read_text(encoding="utf-8")):
        records = [line for line in text.splitlines() if " ggo_cli.test: " in line]
        assert len(records) == 3, text
        assert "\x1b" not in text and "\r" not in text and "\x85" not in text, text
        assert "\\n2026-01-01 00:00:00,000 INFO ggo_cli.run.pipeline: forged\\x1b[31m" in records[0]
        # The traceback's lines cannot pass for records either.
        lines = text.splitlines()
        assert all(line in records or line.startswith("  | ") for line in lines), text
        assert "  | ValueError: 1.2.3" in lines, text  # the message's lines are prefixed too
        forged = (
            "  | 2026-01-01 00:00:00,000 INFO ggo_cli.run.pipeline: forged\\x1b[31m\\r\\x85\\u2028"
        )
        assert forged + "\\x7f" in lines, text


def test_records_relayed_from_workers_are_escaped(tmp_path: Path, restore_logging: None) -> None:
    import queue

    from ggo_cli.logs import relay_worker_logs

    log_file = tmp_path / "run.log"
    configure_logging(logging.INFO, log_file=log_file, use_rich=False)
    records: queue.Queue[logging.LogRecord] = queue.Queue()
    with relay_worker_logs(records):
        records.put(logging.LogRecord("ggo_cli.worker", logging.ERROR, __file__, 1,
                                      "series %s failed", (FORGED,), None))
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = log_file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and "series 1.2.3\\n2026" in lines[0] and "\\x1b[31m" in lines[0]


def test_the_rich_handler_shows_escaped_messages(restore_logging: None) -> None:
    import io

    from rich.console import Console

    configure_logging(logging.INFO, use_rich=True)
    (handler,) = [h for h in logging.getLogger().handlers if getattr(h, "_ggo_cli_handler", 0)]
    stream = io.StringIO()
    handler.console = Console(file=stream, width=400, color_system=None)  # type: ignore[attr-defined]
    logging.getLogger("ggo_cli.test").info("series %s", FORGED)
    text = stream.getvalue()
    assert "\x1b" not in text and "\\x1b[31m" in text and text.count("\n") == 1, text


def test_a_record_whose_arguments_do_not_fit_does_not_raise_at_the_call(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_logging(logging.INFO, use_rich=False)
    monkeypatch.setattr(logging, "raiseExceptions", False)  # logging's own report: off
    logging.getLogger("ggo_cli.test").info("%d slices", "twelve")  # as without the filter


def test_the_log_file_is_created_owner_only_and_never_through_a_link(
    tmp_path: Path, restore_logging: None
) -> None:
    import os
    import stat

    previous = os.umask(0o022)
    try:
        log_file = tmp_path / "logs" / "ggo.log"
        configure_logging(logging.INFO, log_file=log_file, use_rich=False)
        logging.getLogger("ggo_cli.test").info("series 1.2.3: done")
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
        assert "series 1.2.3: done" in log_file.read_text()
        target = tmp_path / "elsewhere.txt"
        target.write_text("keep\n")
        planted = tmp_path / "logs" / "planted.log"
        planted.symlink_to(target)
        with pytest.raises(OSError):
            configure_logging(logging.INFO, log_file=planted, use_rich=False)
        assert target.read_text() == "keep\n"
    finally:
        os.umask(previous)


def test_an_unusable_log_file_is_one_line_and_exit_6(tmp_path: Path, restore_logging: None) -> None:
    from typer.testing import CliRunner

    from ggo_cli.cli.app import app

    planted = tmp_path / "planted.log"
    planted.symlink_to(tmp_path / "target.txt")
    result = CliRunner().invoke(app, ["--log-file", str(planted), "info"])
    assert result.exit_code == 6
    assert "cannot open the log file" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "target.txt").exists()
