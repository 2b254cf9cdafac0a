"""The series table of ``report.html``: its columns, its cells and each row's picture links.

Each cell keeps the CSV's exact text in ``data-v`` (what the page's script sorts by, numbers
as numbers) and in ``data-col`` the CSV column it shows; numbers are shown rounded for
reading. Every value is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from html import escape

from .report_csv import PATIENT_ID_COLUMN, PSEUDONYM_COLUMN

_UID_SHOWN_CHARS = 12
"""The tail of a series UID shown in the table (the whole UID is its tooltip)."""


class Kind(Enum):
    """How a column's cells are shown and sorted."""

    TEXT = "text"
    NUMBER = "number"


@dataclass(frozen=True, slots=True)
class Column:
    """One column of the series table.

    Attributes:
        key: the CSV column it shows.
        label: its header.
        kind: text or number (numbers sort as numbers and are shown rounded).
        decimals: digits after the point a number is shown with.
        signed: numbers shown with their sign (changes).
        optional: shown only when the CSV has the column.
    """

    key: str
    label: str
    kind: Kind = Kind.TEXT
    decimals: int = 0
    signed: bool = False
    optional: bool = False


def _number(key: str, label: str, decimals: int, **extra: bool) -> Column:
    return Column(key, label, Kind.NUMBER, decimals, **extra)


PATIENT_COLUMNS = (
    Column(PATIENT_ID_COLUMN, "Patient ID", optional=True),
    Column(PSEUDONYM_COLUMN, "Patient pseudonym", optional=True),
)
TABLE_COLUMNS: tuple[Column, ...] = (
    *PATIENT_COLUMNS,
    Column("study_date", "Study date"),
    Column("series_description", "Description"),
    Column("series_instance_uid", "Series"),
    _number("n_slices", "Slices", 0),
    _number("ggo_volume_ml", "GGO mL", 2),
    _number("lung_volume_ml", "Lung mL", 1),
    _number("ggo_percent_of_lung", "GGO % of lung", 2),
    _number("left_ggo_percent", "Left GGO %", 2),
    _number("right_ggo_percent", "Right GGO %", 2),
    Column("study_representative", "Represents study", optional=True),
    Column("prior_study_date", "Prior study", optional=True),
    _number("days_since_prior", "Days since prior", 0, optional=True),
    _number("ggo_change_ml", "GGO change mL", 2, signed=True, optional=True),
    _number("ggo_percent_of_lung_change", "GGO % change", 2, signed=True, optional=True),
    Column("trend", "Trend", optional=True),
    Column("qc_flags", "QC flags"),
    Column("status", "Status"),
    Column("message", "Message"),
    Column("delivery", "Delivery", optional=True),
)
"""The table's columns in order (a files column follows them)."""


@dataclass(frozen=True, slots=True)
class SeriesLinks:
    """Relative addresses of a series' pictures that exist (``None`` / empty where none).

    Attributes:
        overlay: ``overlay.png``.
        gradcam: the GradCAM++ panels, as ``(slice number, address)`` in slice order.
        trend: the patient's ``trend.png``.
    """

    overlay: str | None = None
    gradcam: tuple[tuple[str, str], ...] = ()
    trend: str | None = None


def shown_columns(header: Sequence[str], rows: Sequence[Mapping[str, str]]) -> tuple[Column, ...]:
    """The table's columns for a CSV header: optional ones only when the CSV has them (and
    the delivery column only when a series was sent)."""
    present = set(header)
    shown = []
    for column in TABLE_COLUMNS:
        if column.optional and column.key not in present:
            continue
        if column.key == "delivery" and not any(r.get("delivery") for r in rows):
            continue
        shown.append(column)
    return tuple(shown)


def parse_number(text: str) -> float | None:
    """A CSV number cell as a float (``None`` for empty or non-numeric text).

    A leading ``'`` (the CSV's guard against spreadsheet formulas, before a ``-``) is dropped.
    """
    value = text.strip()
    if value.startswith("'"):
        value = value[1:]
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def display_text(column: Column, text: str) -> str:
    """How a cell reads on the page (not yet escaped): numbers rounded (changes signed)."""
    if column.kind is Kind.NUMBER:
        number = parse_number(text)
        if number is None:
            return text
        return format(number, f"{'+' if column.signed else ''}.{column.decimals}f")
    return text


def _cell(column: Column, row: Mapping[str, str]) -> str:
    """One ``<td>``: the CSV's exact text in ``data-v``, the shown text inside."""
    text = row.get(column.key, "")
    value = escape(text, quote=True)
    attrs = f'data-col="{escape(column.key, quote=True)}" data-v="{value}"'
    shown_text = display_text(column, text)
    if column.key == "message":  # the row names its series already
        shown_text = shown_text.removeprefix(f"series {row.get('series_instance_uid', '')}: ")
    shown = escape(shown_text, quote=True)
    if column.kind is Kind.NUMBER:
        return f'<td class="num" {attrs}>{shown}</td>'
    if column.key == "series_instance_uid" and len(text) > _UID_SHOWN_CHARS:
        tail = escape(text[-_UID_SHOWN_CHARS:], quote=True)
        return f'<td {attrs}><span title="{value}">&hellip;{tail}</span></td>'
    if column.key == "qc_flags":
        flags = "".join(
            f'<span class="flag">{escape(flag.strip(), quote=True)}</span>'
            for flag in text.split(";")
            if flag.strip()
        )
        return f"<td {attrs}>{flags}</td>"
    if column.key in ("status", "trend") and text:
        kind = re.sub(r"[^a-z]", "", text.lower())
        return f'<td {attrs}><span class="{column.key} {column.key}-{kind}">{shown}</span></td>'
    css = ' class="msg"' if column.key == "message" else ""
    return f"<td{css} {attrs}>{shown}</td>"


def _files_cell(links: SeriesLinks) -> str:
    """The links to a series' pictures (nothing for a picture that does not exist)."""
    parts = []
    if links.overlay:
        href = escape(links.overlay, quote=True)
        parts.append(
            f'<a class="overlay" href="{href}"><img src="{href}" alt="overlay" '
            'loading="lazy"></a>'
        )
    if links.trend:
        parts.append(f'<a class="trend-link" href="{escape(links.trend, quote=True)}">trend</a>')
    if links.gradcam:
        panels = " ".join(
            f'<a href="{escape(href, quote=True)}">{escape(label, quote=True)}</a>'
            for label, href in links.gradcam
        )
        parts.append(
            f'<details class="gradcam"><summary>GradCAM++ ({len(links.gradcam)})</summary>'
            f"{panels}</details>"
        )
    return f'<td class="files">{"".join(parts)}</td>'


def render_table(
    columns: Sequence[Column], rows: Sequence[Mapping[str, str]], links: Sequence[SeriesLinks]
) -> str:
    """The series table: one row per CSV row, in the CSV's order."""
    headers = "".join(
        f'<th scope="col" data-col="{escape(c.key, quote=True)}" data-type="{c.kind.value}">'
        f'<button type="button">{escape(c.label, quote=True)}</button></th>'
        for c in columns
    )
    body = []
    for index, (row, row_links) in enumerate(zip(rows, links, strict=True)):
        status = escape(row.get("status", ""), quote=True)
        cells = "".join(_cell(c, row) for c in columns)
        body.append(
            f'<tr data-i="{index}" data-status="{status}">{cells}{_files_cell(row_links)}</tr>'
        )
    return (
        f'<table id="series-table"><thead><tr>{headers}<th scope="col">Files</th></tr></thead>'
        f'<tbody>{"".join(body)}</tbody></table>'
    )
