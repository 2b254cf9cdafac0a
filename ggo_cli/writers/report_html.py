"""The run's report page (``report.html``): what an output folder holds, for a person to read.

Built from the folder alone, so that ``ggo-cli report OUT`` can rebuild it at any time:

- ``ggo_volumes.csv`` (:mod:`ggo_cli.writers.report_csv`), read by column name: one table row
  per CSV row, in the CSV's order. Columns the page does not know are ignored; a known column
  the CSV lacks shows as empty cells; the follow-up columns (``study_representative``,
  ``prior_study_date``, ``days_since_prior``, ``ggo_change_ml``, ``ggo_percent_of_lung_change``,
  ``trend``) and the patient column (``patient_id`` or ``patient_pseudonym``) are shown only
  when the CSV has them. No patient name or birth date is ever in the CSV, so none is on the page.
- ``run_manifest.json`` (:mod:`ggo_cli.run.manifest`): the last run's summary. A missing or
  unreadable manifest is said on the page; the table is still built.
- each series' folder ``<StudyInstanceUID>/<SeriesInstanceUID>/``: a link to ``overlay.png``
  (with a thumbnail), to each GradCAM++ panel (``gradcam/slice_NNNN.png``) and to
  ``trend.png``, each only when that file exists as a regular file (a link is not followed),
  by a relative address: the page and its folder can move together (a file share).

Every cell keeps the CSV's exact text in its ``data-v`` attribute (what the page sorts by);
numbers are shown rounded for reading. Every value is escaped (:func:`html.escape`), and the
page is written atomically through the output folder's rules (:mod:`ggo_cli.atomic_output`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..atomic_output import atomic_write_text
from ..config import CSV_NAME, MANIFEST_NAME, OVERLAY_NAME, TREND_NAME, gradcam_names
from ..errors import InputError
from ..fsutil import OutputTree
from .report_csv import CSV_ENCODING
from .report_page import render_controls, render_page, render_summary
from .report_table import SeriesLinks, render_table, shown_columns

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
GRADCAM_PANEL_PATTERN = re.compile(r"^slice_\d{4,}\.png$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UID_MAX_CHARS = 64


@dataclass(frozen=True, slots=True)
class ReportInput:
    """What the page is built from.

    Attributes:
        columns: the CSV's header, in its order.
        rows: the CSV's rows (every cell text; a missing cell ``""``).
        manifest: the parsed manifest, or ``None``.
        notes: remarks for the summary (a missing manifest, a table newer than the summary).
    """

    columns: tuple[str, ...]
    rows: tuple[Mapping[str, str], ...]
    manifest: Mapping[str, Any] | None
    notes: tuple[str, ...]


def read_results(out_dir: Path) -> tuple[tuple[str, ...], tuple[dict[str, str], ...]]:
    """The CSV's header and rows.

    Raises:
        InputError: the folder or its CSV is missing or cannot be read.
    """
    path = out_dir / CSV_NAME
    if not out_dir.is_dir():
        raise InputError(f"output folder {out_dir} not found; name the --out folder of a run")
    try:
        with path.open(newline="", encoding=CSV_ENCODING) as fh:
            reader = csv.DictReader(fh)
            rows = tuple(
                {key: value or "" for key, value in row.items() if isinstance(key, str)}
                for row in reader
            )
            return tuple(reader.fieldnames or ()), rows
    except FileNotFoundError:
        raise InputError(
            f"{out_dir} has no {CSV_NAME}; run `ggo-cli segment ... --out {out_dir}` first"
        ) from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(
            f"cannot read {path}: {exc}; a `ggo-cli segment` run on that folder rewrites it"
        ) from exc


def read_manifest(out_dir: Path) -> tuple[Mapping[str, Any] | None, tuple[str, ...]]:
    """The parsed manifest and the notes about it (why it is missing, whether it is older)."""
    path = out_dir / MANIFEST_NAME
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, (f"No {MANIFEST_NAME}: no run has finished in this folder yet.",)
    except (OSError, ValueError) as exc:
        log.debug("cannot read %s: %s", path, exc)
        return None, (f"{MANIFEST_NAME} cannot be read; the next run rewrites it.",)
    if not isinstance(document, dict):
        return None, (f"{MANIFEST_NAME} is not a run manifest; the next run rewrites it.",)
    try:
        newer = (out_dir / CSV_NAME).stat().st_mtime_ns > path.stat().st_mtime_ns
    except OSError:
        newer = False
    notes = (
        (
            "The table was updated after this summary was written (a run stopped or under "
            "way, or ggo-cli send): the counts below are of the last finished run.",
        )
        if newer
        else ()
    )
    return document, notes


def _regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (a link is not followed)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _real_folder(path: Path) -> bool:
    """Whether ``path`` is a folder and not a link."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _address(*parts: str) -> str:
    """A relative URL of a file below the page's folder (each part percent-encoded)."""
    return "/".join(quote(part) for part in parts)


def _slice_label(name: str) -> str:
    """The slice number of a GradCAM++ panel's file name (``slice_0012.png`` -> ``12``)."""
    return str(int(name.removeprefix("slice_").removesuffix(".png")))


def _is_uid(text: str) -> bool:
    return len(text) <= _UID_MAX_CHARS and bool(_UID.match(text))


def series_links(out_dir: Path, row: Mapping[str, str]) -> SeriesLinks:
    """The pictures of a CSV row's series folder that exist, as relative addresses.

    The folder is ``<StudyInstanceUID>/<SeriesInstanceUID>`` below ``out_dir``; a UID that is
    not a valid DICOM UID (so could name another folder) gets no links, nor does a folder
    reached through a link.
    """
    study, series = row.get("study_instance_uid", ""), row.get("series_instance_uid", "")
    if not (_is_uid(study) and _is_uid(series)):
        return SeriesLinks()
    if not (_real_folder(out_dir / study) and _real_folder(out_dir / study / series)):
        return SeriesLinks()
    folder = out_dir / study / series
    overlay = _address(study, series, OVERLAY_NAME)
    trend = _address(study, series, TREND_NAME)
    panels: list[tuple[str, str]] = []
    # GGO's panels, then consolidation's (``ggo-cli explain --target consolidation``).
    for target, suffix in (("ggo", ""), ("consolidation", " cons.")):
        figures = gradcam_names(target)[1]
        if not _real_folder(folder / figures):
            continue
        panels += [
            (_slice_label(name) + suffix, _address(study, series, figures, name))
            for name in sorted(os.listdir(folder / figures))
            if GRADCAM_PANEL_PATTERN.match(name) and _regular_file(folder / figures / name)
        ]
    return SeriesLinks(
        overlay=overlay if _regular_file(folder / OVERLAY_NAME) else None,
        gradcam=tuple(panels),
        trend=trend if _regular_file(folder / TREND_NAME) else None,
    )


def read_report_input(out_dir: Path) -> ReportInput:
    """Read what the page shows from ``out_dir`` (see the module's description).

    Raises:
        InputError: the folder or its CSV is missing or unreadable.
    """
    header, rows = read_results(out_dir)
    manifest, notes = read_manifest(out_dir)
    return ReportInput(header, rows, manifest, notes)


def render_report(data: ReportInput, out_dir: Path, *, generated_at: str | None = None) -> str:
    """The page's HTML for ``data``, with the links of the series folders below ``out_dir``."""
    columns = shown_columns(data.columns, data.rows)
    links = [series_links(out_dir, row) for row in data.rows]
    statuses = [row.get("status", "") for row in data.rows if row.get("status")]
    return render_page(
        generated_at=generated_at or datetime.now(UTC).isoformat(timespec="seconds"),
        summary=render_summary(data.manifest, data.notes),
        controls=render_controls(statuses, len(data.rows)),
        table=render_table(columns, data.rows, links),
    )


def write_report(out_dir: Path, *, tree: OutputTree | None = None) -> Path:
    """Build ``<out_dir>/report.html`` from what the folder holds, atomically.

    Args:
        out_dir: the output folder of a run (it must hold ``ggo_volumes.csv``).
        tree: the output folder's rules (links refused, its file mode); default: owner-only.

    Returns:
        The page's path.

    Raises:
        InputError: the folder or its CSV is missing or unreadable.
        OutputError: the page cannot be written.
    """
    data = read_report_input(out_dir)
    page = render_report(data, out_dir)
    path = out_dir / REPORT_NAME
    atomic_write_text(path, page, tree=tree or OutputTree(out_dir))
    log.debug("report of %d series written to %s", len(data.rows), path)
    return path
