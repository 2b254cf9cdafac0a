"""The CSV as the product writes it (rows from ``outcome_row``, file by ``write_rows``), and read
back as rows of cell text."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from ggo_cli.domain import SeriesOutcome
from ggo_cli.writers.report_csv import CSV_ENCODING, PATIENT_ID_COLUMN, outcome_row, write_rows


def write_outcomes(
    outcomes: Sequence[SeriesOutcome],
    path: Path,
    *,
    model_name: str,
    model_version: str,
    include_patient_id: bool = False,
    out_dir: Path | None = None,
) -> Path:
    """Write the CSV of some outcomes, in the given order, the way a run does.

    Args:
        outcomes: one outcome per row.
        path: the CSV file.
        model_name: model name written in every row.
        model_version: model version written in every row.
        include_patient_id: add the ``patient_id`` column (last).
        out_dir: the folder ``seg_path`` cells are relative to; defaults to the CSV's folder.

    Returns:
        ``path``.
    """
    rows = [
        outcome_row(
            outcome,
            path.parent if out_dir is None else out_dir,
            model_name=model_name,
            model_version=model_version,
            include_patient_id=include_patient_id,
        )
        for outcome in outcomes
    ]
    return write_rows(rows, path, patient_column=PATIENT_ID_COLUMN if include_patient_id else None)


def read_csv(path: Path) -> list[dict[str, str]]:
    """One dict of cell text per data row of a CSV, keyed by column name, in file order."""
    with path.open(newline="", encoding=CSV_ENCODING) as fh:
        return [dict(row) for row in csv.DictReader(fh)]
