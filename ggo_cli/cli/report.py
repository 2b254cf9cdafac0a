"""``ggo-cli report OUT``: rebuild a results folder's ``report.html`` (no inference), and the
rebuild that follows every ``segment`` and ``explain`` run.

The page is built from the folder's CSV and manifest alone (:mod:`ggo_cli.writers.report_html`).
After a run it is rebuilt whatever the run came to (series failed, an error, Ctrl-C), as long as
the folder has a CSV and no other run holds it; a page that cannot be built then costs one
WARNING line and never changes the run's exit code.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from ..config import CSV_NAME, RunConfig
from ..errors import GgoError, RunLockedError
from ..fsutil import OutputTree
from ..writers.report_html import write_report

log = logging.getLogger(__name__)


def tree_like_csv(out_dir: Path) -> OutputTree:
    """The output folder's rules, group-readable when its CSV is (``--group-readable`` runs)."""
    try:
        mode = os.stat(out_dir / CSV_NAME).st_mode
    except OSError:
        return OutputTree(out_dir)
    return OutputTree(out_dir, group_readable=bool(mode & stat.S_IRGRP))


def refresh_report(out_dir: Path, tree: OutputTree) -> Path | None:
    """Rebuild ``report.html`` after a run; a failure is one WARNING line, never raised.

    Args:
        out_dir: the run's output folder.
        tree: the run's output folder rules (file modes).

    Returns:
        The page's path, or ``None`` when the folder has no CSV or the page was not written.
    """
    if not (out_dir / CSV_NAME).is_file():
        log.debug("no %s in the output folder: no report page", CSV_NAME)
        return None
    try:
        return write_report(out_dir, tree=tree)
    except GgoError as exc:
        log.warning("report.html not rebuilt: %s (run `ggo-cli report` to retry)", exc)
    except Exception as exc:  # a bug in the page must not change what the run reports
        log.warning(
            "report.html not rebuilt: unexpected %s: %s (a bug; `ggo-cli --debug report` shows "
            "the traceback)",
            type(exc).__name__,
            exc,
        )
    return None


@contextmanager
def report_after_run(cfg: RunConfig) -> Iterator[None]:
    """Rebuild the report page when the run inside ends: normally, by an error or by Ctrl-C
    (the CSV is rewritten after every series), but not when another run holds the folder."""
    try:
        yield
    except RunLockedError:
        raise
    except BaseException:
        refresh_report(cfg.out_dir, cfg.tree)
        raise
    refresh_report(cfg.out_dir, cfg.tree)


def report_command(
    out: Annotated[
        Path, typer.Argument(help="A results folder: the --out folder of segment runs.")
    ],
) -> int:
    """Rebuild OUT/report.html from OUT's CSV and run manifest, without running anything.

    Prints the page's path. Exit 2 when OUT or its ggo_volumes.csv is missing or unreadable,
    6 when the page cannot be written.
    """
    path = write_report(out, tree=tree_like_csv(out))
    typer.echo(str(path))
    return 0
