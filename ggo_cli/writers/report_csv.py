"""The run's CSV of GGO volumes (``ggo_volumes.csv``): one row per series found.

Format: RFC 4180 (comma separated, ``"``-quoted where needed, CRLF line ends), UTF-8 without a
byte-order mark, a header row of :data:`CSV_COLUMNS` (plus ``patient_id`` last, only when asked).
Missing values are empty cells. Numbers are written the same way on every run and machine:

- ``voxel_volume_ml``: the float used for the volume, as its shortest round-trip decimal
  (Python ``repr``), so ``ggo_voxels x voxel_volume_ml`` recomputes ``ggo_volume_ml``;
- ``ggo_volume_ml``: fixed, 6 decimals (1e-6 mL = 0.001 mm^3), so that check holds to
  5e-7 mL;
- lung columns (``lung_volume_ml``, ``left_lung_volume_ml``, ``right_lung_volume_ml``,
  ``left_ggo_volume_ml``, ``right_ggo_volume_ml``): fixed, 6 decimals like ``ggo_volume_ml``;
  percentages (``ggo_percent_of_lung``, ``left_ggo_percent``, ``right_ggo_percent``:
  ``100 x GGO mL / lung mL`` of that lung): fixed, 4 decimals, empty when that lung's volume
  is 0 (undefined). All lung cells are empty with ``--no-lung-mask``;
- consolidation and lesion columns (:data:`CONSOLIDATION_COLUMNS`), filled only for a model
  with a consolidation channel (:func:`ggo_cli.analysis.measurements.consolidation_channel`),
  empty for a one-channel model and in rows stored before they existed: volumes
  (``consolidation_volume_ml``, ``left_/right_consolidation_volume_ml``, ``lesion_volume_ml``)
  with 6 decimals, percentages (``consolidation_percent_of_lung``, ``lesion_percent_of_lung``,
  ``left_lesion_percent``, ``right_lesion_percent``) with 4, the per-lung cells empty with
  ``--no-lung-mask``. Lesion is GGO or consolidation per voxel and the masks are exclusive, so
  ``ggo + consolidation = lesion`` (volumes to within 1e-6 mL of rounding, lung percentages to
  within 1e-4 points) and ``left + right = both``;
- ``slice_spacing_mm``: 6 significant digits;
- ``pixel_spacing_mm``: ``"<row> x <col>"`` (PixelSpacing order: row spacing first), each to
  6 significant digits; ``x`` rather than DICOM's backslash, which some CSV readers treat as
  an escape character;
- ``study_date``: ISO 8601 ``YYYY-MM-DD`` (from DICOM ``YYYYMMDD``; other values as found);
- follow-up against the patient's prior study (:mod:`ggo_cli.run.followup`: the patient key, the
  representative series and the trend rule), filled when the CSV is rebuilt from the state
  store (:func:`followup_cells`): ``study_representative`` (``yes``: the series represents its
  study and carries the comparison; ``no``: another series of the study does; empty: not
  analysed or no PatientID), then for a representative with a prior ``prior_study_date``
  (ISO), ``days_since_prior``, ``ggo_change_ml`` (now minus then, 6 decimals),
  ``ggo_percent_of_lung_change`` (percentage points, 4 decimals), ``consolidation_change_ml``
  and ``lesion_percent_of_lung_change`` (filled where both studies have them) and ``trend``
  (``increased``, ``decreased``, ``stable``, from the GGO percentage; empty without lung
  percentages);
- ``qc_flags``: the series' quality flags (:class:`ggo_cli.analysis.quality.QcFlag` names, in that
  order) joined by ``;``; empty when nothing is flagged or the series was not analysed.

Every text cell (UIDs and dates included: they come from headers too) has its control
characters written as visible escapes (``\\n``, ``\\x1b``: :func:`ggo_cli.logs.escape_control`),
so each row is one line, and a cell that then begins with ``= + - @`` is prefixed with ``'`` so
spreadsheet programs do not run it as a formula (CSV injection). ``message`` names no path,
folder or file of the series (:meth:`ggo_cli.domain.SeriesInfo.redact`).
``seg_path`` is relative to the CSV's folder (the ``--out`` folder), with ``/`` separators.
``delivery``: where the series' DICOM objects stand in the delivery queue for the run's
destinations (``--send``; every destination on record when the run has none): ``sent`` (every
destination holds every object), ``pending`` (some wait for the next run or ``ggo-cli send``),
``failed`` (a destination refused one: see the manifest); empty when nothing was sent.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path

from ..analysis.quality import format_flags
from ..atomic_output import atomic_write_text
from ..domain import Followup, SeriesOutcome
from ..logs import escape_control

log = logging.getLogger(__name__)

CSV_COLUMNS: tuple[str, ...] = (
    "study_instance_uid",
    "series_instance_uid",
    "study_date",
    "series_description",
    "n_slices",
    "slice_spacing_mm",
    "pixel_spacing_mm",
    "voxel_volume_ml",
    "ggo_voxels",
    "ggo_volume_ml",
    "ggo_slice_count",
    "lung_volume_ml",
    "left_lung_volume_ml",
    "right_lung_volume_ml",
    "ggo_percent_of_lung",
    "left_ggo_volume_ml",
    "right_ggo_volume_ml",
    "left_ggo_percent",
    "right_ggo_percent",
    "consolidation_volume_ml",
    "left_consolidation_volume_ml",
    "right_consolidation_volume_ml",
    "consolidation_percent_of_lung",
    "lesion_volume_ml",
    "lesion_percent_of_lung",
    "left_lesion_percent",
    "right_lesion_percent",
    "study_representative",
    "prior_study_date",
    "days_since_prior",
    "ggo_change_ml",
    "ggo_percent_of_lung_change",
    "consolidation_change_ml",
    "lesion_percent_of_lung_change",
    "trend",
    "qc_flags",
    "status",
    "message",
    "model_name",
    "model_version",
    "seg_path",
    "delivery",
    "processed_at",
)
"""Columns in order; ``patient_id`` is appended only with ``include_patient_id``."""
DELIVERY_COLUMN = "delivery"
"""Filled when the CSV is rebuilt from the state store and its delivery queue (never stored)."""

FOLLOWUP_COLUMNS = (
    "study_representative",
    "prior_study_date",
    "days_since_prior",
    "ggo_change_ml",
    "ggo_percent_of_lung_change",
    "trend",
)
"""Filled when the CSV is rebuilt from the state store (:func:`followup_cells`; never stored)."""
LESION_FOLLOWUP_COLUMNS = ("consolidation_change_ml", "lesion_percent_of_lung_change")
"""Follow-up cells of a model with a consolidation channel: :func:`followup_cells` gives them
only where both studies have the value (a missing cell is written empty; never stored)."""

PATIENT_ID_COLUMN = "patient_id"
CSV_ENCODING = "utf-8"
VOLUME_DECIMALS = 6
PERCENT_DECIMALS = 4
LUNG_VOLUME_COLUMNS = (
    "lung_volume_ml",
    "left_lung_volume_ml",
    "right_lung_volume_ml",
    "left_ggo_volume_ml",
    "right_ggo_volume_ml",
)
LUNG_PERCENT_COLUMNS = ("ggo_percent_of_lung", "left_ggo_percent", "right_ggo_percent")
CONSOLIDATION_VOLUME_COLUMNS = (
    "consolidation_volume_ml",
    "left_consolidation_volume_ml",
    "right_consolidation_volume_ml",
    "lesion_volume_ml",
)
CONSOLIDATION_PERCENT_COLUMNS = (
    "consolidation_percent_of_lung",
    "lesion_percent_of_lung",
    "left_lesion_percent",
    "right_lesion_percent",
)
CONSOLIDATION_COLUMNS = CONSOLIDATION_VOLUME_COLUMNS + CONSOLIDATION_PERCENT_COLUMNS
"""Fields of :class:`~ggo_cli.domain.ConsolidationMeasurement` of the same names; empty cells
for a model without a consolidation channel."""
SPACING_SIGNIFICANT_DIGITS = 6
_FORMULA_PREFIXES = ("=", "+", "-", "@")
_WHITESPACE = re.compile(r"\s+")


def _number(value: float | None, spec: str) -> str:
    """Format a finite number with a format spec; ``None`` or non-finite give ``""``."""
    if value is None or not math.isfinite(value):
        return ""
    return format(value, spec)


def _exact(value: float | None) -> str:
    """Shortest decimal that reads back as the same float; ``""`` when missing."""
    if value is None or not math.isfinite(value):
        return ""
    return repr(float(value))


def _spacing(value: float | None) -> str:
    """A spacing in mm to 6 significant digits."""
    return _number(value, f".{SPACING_SIGNIFICANT_DIGITS}g")


def _fixed(value: Decimal | None, decimals: int) -> str:
    """A Decimal to ``decimals`` places (never ``-0``); ``""`` when missing."""
    if value is None:
        return ""
    return format(value.quantize(Decimal(1).scaleb(-decimals)) + 0, "f")


def followup_cells(followup: Followup | None) -> dict[str, str]:
    """The follow-up cells of a row (:data:`FOLLOWUP_COLUMNS`), empty where not applicable,
    and those of :data:`LESION_FOLLOWUP_COLUMNS` where the comparison has them.

    Args:
        followup: the series' follow-up (``None``: none, every cell empty).

    Returns:
        Cell text per follow-up column; a consolidation or lesion change only when known.
    """
    cells = dict.fromkeys(FOLLOWUP_COLUMNS, "")
    if followup is None or followup.representative is None:
        return cells
    cells["study_representative"] = "yes" if followup.representative else "no"
    comparison = followup.comparison
    if comparison is None:
        return cells
    cells["prior_study_date"] = comparison.prior_study_date.isoformat()
    cells["days_since_prior"] = str(comparison.days_since_prior)
    cells["ggo_change_ml"] = _fixed(comparison.ggo_change_ml, VOLUME_DECIMALS)
    cells["ggo_percent_of_lung_change"] = _fixed(
        comparison.ggo_percent_of_lung_change, PERCENT_DECIMALS
    )
    cells["trend"] = comparison.trend.value if comparison.trend is not None else ""
    if comparison.consolidation_change_ml is not None:
        cells["consolidation_change_ml"] = _fixed(
            comparison.consolidation_change_ml, VOLUME_DECIMALS
        )
    if comparison.lesion_percent_of_lung_change is not None:
        cells["lesion_percent_of_lung_change"] = _fixed(
            comparison.lesion_percent_of_lung_change, PERCENT_DECIMALS
        )
    return cells


def _text(value: str) -> str:
    """One-line text (controls escaped), neutralised against spreadsheet formula injection."""
    text = _WHITESPACE.sub(" ", escape_control(value).strip())
    if text.startswith(_FORMULA_PREFIXES):
        text = "'" + text
    return text


def _iso_date(dicom_date: str) -> str:
    """``YYYYMMDD`` to ``YYYY-MM-DD``; anything else is kept as found (never guessed)."""
    date = dicom_date.strip()
    if len(date) == 8 and date.isdigit():
        return f"{date[:4]}-{date[4:6]}-{date[6:]}"
    return _text(date)


def _relative(path: Path | None, base: Path) -> str:
    """``path`` relative to ``base`` with ``/`` separators (absolute if on another drive)."""
    if path is None:
        return ""
    try:
        return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()
    except ValueError:  # Windows: different drives have no relative path
        return path.resolve().as_posix()


def outcome_row(
    outcome: SeriesOutcome,
    out_dir: Path,
    *,
    model_name: str,
    model_version: str,
    include_patient_id: bool = False,
) -> dict[str, str]:
    """Format one series outcome as a CSV row.

    Args:
        outcome: the series outcome.
        out_dir: the folder ``seg_path`` is made relative to.
        model_name: model name for the row.
        model_version: model version for the row.
        include_patient_id: add the ``patient_id`` cell.

    Returns:
        Cell text per column name (all of :data:`CSV_COLUMNS`, plus ``patient_id`` on request).
    """
    series = outcome.series
    measurement = outcome.measurement
    pixel_spacing = ""
    if outcome.pixel_spacing_mm is not None:
        row_mm, col_mm = outcome.pixel_spacing_mm
        pixel_spacing = f"{_spacing(row_mm)} x {_spacing(col_mm)}"
    row = {
        "study_instance_uid": _text(series.study_instance_uid),
        "series_instance_uid": _text(series.series_instance_uid),
        "study_date": _iso_date(series.study_date),
        "series_description": _text(series.series_description),
        "n_slices": str(outcome.n_slices),
        "slice_spacing_mm": _spacing(outcome.slice_spacing_mm),
        "pixel_spacing_mm": pixel_spacing,
        "voxel_volume_ml": _exact(measurement.voxel_volume_ml if measurement else None),
        "ggo_voxels": str(measurement.ggo_voxels) if measurement else "",
        "ggo_volume_ml": _number(
            measurement.ggo_volume_ml if measurement else None, f".{VOLUME_DECIMALS}f"
        ),
        "ggo_slice_count": str(measurement.ggo_slice_count) if measurement else "",
        "qc_flags": _text(format_flags(outcome.qc_flags)),
        "status": outcome.status.value,
        "message": _text(series.redact(outcome.message)),
        "model_name": _text(model_name),
        "model_version": _text(model_version),
        "seg_path": _text(_relative(outcome.seg_path, out_dir)),
        "processed_at": _text(outcome.processed_at),
    }
    lungs = outcome.lungs
    for column in LUNG_VOLUME_COLUMNS:
        value = getattr(lungs, column) if lungs else None
        row[column] = _number(value, f".{VOLUME_DECIMALS}f")
    for column in LUNG_PERCENT_COLUMNS:
        value = getattr(lungs, column) if lungs else None
        row[column] = _number(value, f".{PERCENT_DECIMALS}f")
    consolidation = outcome.consolidation
    for columns, decimals in (
        (CONSOLIDATION_VOLUME_COLUMNS, VOLUME_DECIMALS),
        (CONSOLIDATION_PERCENT_COLUMNS, PERCENT_DECIMALS),
    ):
        for column in columns:
            value = getattr(consolidation, column) if consolidation else None
            row[column] = _number(value, f".{decimals}f")
    if include_patient_id:
        row[PATIENT_ID_COLUMN] = _text(series.patient_id)
    return row


PSEUDONYM_COLUMN = "patient_pseudonym"
PSEUDONYM_HEX_CHARS = 16
PSEUDONYM_SALT_TAG_KEY = "_pseudonym_salt_tag"
"""Key of a stored row naming (by digest) the salt its pseudonym was made with; never a column."""


def pseudonym(patient_id: str, salt: str) -> str:
    """A salted SHA-256 pseudonym of a PatientID (16 hex characters; ``""`` for no ID)."""
    if not patient_id:
        return ""
    return hashlib.sha256(f"{salt}\0{patient_id}".encode()).hexdigest()[:PSEUDONYM_HEX_CHARS]


def salt_tag(salt: str) -> str:
    """A short digest naming a salt (so a stored pseudonym made with another salt is redone).

    It is a digest of a digest, with its own prefix, so it tells nothing about pseudonyms.
    """
    inner = hashlib.sha256(f"ggo-cli salt tag\0{salt}".encode()).digest()
    return hashlib.sha256(inner).hexdigest()[:12]


def pseudonymize_row(row: Mapping[str, str], salt: str) -> dict[str, str]:
    """A row with its ``patient_id`` replaced by the salted pseudonym (and the salt's tag)."""
    cells = dict(row)
    patient_id = cells.pop(PATIENT_ID_COLUMN, "")
    cells[PSEUDONYM_COLUMN] = pseudonym(patient_id, salt)
    cells[PSEUDONYM_SALT_TAG_KEY] = salt_tag(salt)
    return cells


def write_rows(
    rows: Sequence[Mapping[str, str]],
    path: Path,
    *,
    patient_column: str | None = None,
) -> Path:
    """Write already formatted rows (from :func:`outcome_row`) as the CSV, atomically.

    Args:
        rows: rows with every column of :data:`CSV_COLUMNS`, plus the patient column asked
            for: ``patient_id``, or ``patient_pseudonym`` (from :func:`pseudonymize_row`).
        path: the CSV file.
        patient_column: ``None`` (no patient column), ``"patient_id"`` or
            ``"patient_pseudonym"``. A row without it gets an empty cell.

    Returns:
        ``path``.

    Raises:
        OutputError: the file cannot be written.
    """
    columns = [*CSV_COLUMNS, patient_column] if patient_column else list(CSV_COLUMNS)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(
        buffer, fieldnames=columns, lineterminator="\r\n", extrasaction="ignore", restval=""
    )
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write_text(path, buffer.getvalue(), encoding=CSV_ENCODING)
    log.debug("CSV with %d rows written to %s", len(rows), path)
    return path

