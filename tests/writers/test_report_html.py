"""``report.html``: the CSV's rows and numbers, escaping, links to files that exist only, no
network reference, the patient column only when the CSV has it, atomic writing."""

from __future__ import annotations

import csv
import json
import os
import re
import stat
from html.parser import HTMLParser
from pathlib import Path

import pytest

from ggo_cli.config import CSV_NAME, MANIFEST_NAME, TREND_NAME
from ggo_cli.errors import InputError
from ggo_cli.fsutil import OutputTree
from ggo_cli.writers.report_html import REPORT_NAME, write_report

STUDY = "1.2.3"
OK_UID, OK2_UID, FAILED_UID, SKIPPED_UID = "1.2.3.4", "1.2.3.5", "1.2.3.6", "1.2.3.7"
BASE_COLUMNS = (
    "study_instance_uid",
    "series_instance_uid",
    "study_date",
    "series_description",
    "n_slices",
    "ggo_volume_ml",
    "lung_volume_ml",
    "ggo_percent_of_lung",
    "left_ggo_percent",
    "right_ggo_percent",
    "qc_flags",
    "status",
    "message",
    "seg_path",
)
FOLLOW_UP = ("prior_study_date", "days_since_prior", "ggo_change_ml", "ggo_percent_of_lung_change")
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


def _row(uid: str, status: str, **cells: str) -> dict[str, str]:
    return {"study_instance_uid": STUDY, "series_instance_uid": uid, "status": status, **cells}


ROWS = (
    _row(
        OK_UID,
        "ok",
        study_date="2024-01-02",
        series_description="Chest <script>alert('x')</script> & co",
        n_slices="12",
        ggo_volume_ml="26.032475",
        lung_volume_ml="3130.500000",
        ggo_percent_of_lung="0.8316",
        qc_flags="thick_slices;low_confidence",
    ),
    _row(OK2_UID, "ok", n_slices="120", ggo_volume_ml="3.100000", study_date="2024-02-01"),
    _row(FAILED_UID, "failed", n_slices="9", message='slice spacing varies "2.5-3.75" <b>mm</b>'),
    _row(SKIPPED_UID, "skipped", n_slices="2", message="localizer image"),
)


def _write_csv(out: Path, rows: tuple[dict[str, str], ...], columns: tuple[str, ...]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / CSV_NAME).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _write_manifest(out: Path) -> None:
    manifest = {
        "started_at": "2026-12-03T01:00:00+00:00",
        "finished_at": "2026-12-03T01:05:00+00:00",
        "versions": {"ggo-cli": "0.1.0"},
        "model": {"name": "ggo-resnet50-unet", "version": "1.0", "path": "/secret/model.onnx"},
        "device": {"requested": "auto", "used": "cpu", "precision": "int8", "jobs": 1},
        "counts": {"series": 4, "ok": 2, "skipped": 1, "failed": 1, "pending": 0},
        "qc_flag_counts": {"thick_slices": 1, "low_confidence": 0},
        "timings_s": {"total": 300.25},
        "series": [
            {
                "series_instance_uid": FAILED_UID,
                "status": "failed",
                "message": f"series {FAILED_UID}: <img src=x onerror=alert(1)> spacing",
            }
        ],
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")


def _series_folder(out: Path, uid: str) -> Path:
    folder = out / STUDY / uid
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An output folder: four series, pictures for the first, a manifest."""
    out = tmp_path / "out"
    _write_csv(out, ROWS, BASE_COLUMNS)
    _write_manifest(out)
    folder = _series_folder(out, OK_UID)
    (folder / "overlay.png").write_bytes(PNG_BYTES)
    (folder / TREND_NAME).write_bytes(PNG_BYTES)
    (folder / "gradcam").mkdir()
    for name in ("slice_0003.png", "slice_0011.png", "notes.txt"):
        (folder / "gradcam" / name).write_bytes(PNG_BYTES)
    _series_folder(out, OK2_UID)  # a folder without pictures (--png none)
    return out


class _Page(HTMLParser):
    """The table's rows (``data-col`` -> ``data-v`` and shown text), headers and addresses."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, tuple[str, str]]] = []
        self.headers: list[str] = []
        self.addresses: list[str] = []
        self._cell: tuple[str, str] | None = None
        self._text: list[str] = []
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.addresses += [values[k] for k in ("src", "href") if k in values]
        if tag == "tbody":
            self._in_body = True
        elif tag == "th" and "data-col" in values:
            self.headers.append(values["data-col"])
        elif tag == "tr" and self._in_body:
            self.rows.append({})
        elif tag == "td" and "data-col" in values:
            self._cell, self._text = (values["data-col"], values["data-v"]), []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            column, value = self._cell
            self.rows[-1][column] = (value, "".join(self._text))
            self._cell = None


def _parse(out: Path) -> tuple[str, _Page]:
    page = (out / REPORT_NAME).read_text(encoding="utf-8")
    parser = _Page()
    parser.feed(page)
    return page, parser


def test_one_row_per_csv_row_with_its_numbers(out: Path) -> None:
    write_report(out)
    _, page = _parse(out)
    assert len(page.rows) == len(ROWS)
    for row, shown in zip(ROWS, page.rows, strict=True):
        for column in ("series_instance_uid", "status", "n_slices", "ggo_volume_ml"):
            assert shown[column][0] == row.get(column, "")
    first = page.rows[0]
    assert first["ggo_volume_ml"][1] == "26.03"
    assert first["lung_volume_ml"][1] == "3130.5"
    assert first["ggo_percent_of_lung"][1] == "0.83"
    assert page.rows[2]["ggo_volume_ml"] == ("", "")  # failed: empty, not 0
    assert "study_instance_uid" not in page.headers and "seg_path" not in page.headers


def test_every_value_is_escaped(out: Path) -> None:
    write_report(out)
    page, parsed = _parse(out)
    assert "<script>alert" not in page and "<b>mm</b>" not in page and "<img src=x" not in page
    assert "Chest &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in page
    assert parsed.rows[0]["series_description"][0] == "Chest <script>alert('x')</script> & co"
    assert page.count("<script>") == 1  # the page's own
    assert "/secret" not in page  # the model's path is not shown


def test_no_network_reference(out: Path) -> None:
    write_report(out)
    page, parsed = _parse(out)
    assert parsed.addresses
    for address in parsed.addresses:
        assert not re.match(r"^\s*([a-z][a-z0-9+.-]*:|//)", address, re.I), address
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"@import|url\(", page)


def test_links_only_to_files_that_exist(out: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(PNG_BYTES)
    (_series_folder(out, OK2_UID) / "overlay.png").symlink_to(elsewhere)  # not followed
    rows = (*ROWS, _row("..", "ok"), {**_row(OK_UID, "ok"), "study_instance_uid": "../out"})
    _write_csv(out, rows, BASE_COLUMNS)
    write_report(out)
    _, page = _parse(out)
    links = [a for a in page.addresses if a.endswith(".png")]
    prefix = f"{STUDY}/{OK_UID}"
    assert set(links) == {
        f"{prefix}/overlay.png",
        f"{prefix}/{TREND_NAME}",
        f"{prefix}/gradcam/slice_0003.png",
        f"{prefix}/gradcam/slice_0011.png",
    }
    for link in links:
        assert (out / link).is_file()


def test_patient_column_only_when_the_csv_has_it(out: Path) -> None:
    write_report(out)
    page, parsed = _parse(out)
    assert "patient_id" not in parsed.headers and "Patient" not in page
    rows = tuple({**row, "patient_id": f"PAT-{k}"} for k, row in enumerate(ROWS))
    _write_csv(out, rows, (*BASE_COLUMNS, "patient_id"))
    write_report(out)
    page, parsed = _parse(out)
    assert parsed.headers[0] == "patient_id"
    assert [r["patient_id"][0] for r in parsed.rows] == ["PAT-0", "PAT-1", "PAT-2", "PAT-3"]
    rows = tuple({**row, "patient_pseudonym": "a1b2c3"} for row in ROWS)
    _write_csv(out, rows, (*BASE_COLUMNS, "patient_pseudonym"))
    write_report(out)
    _, parsed = _parse(out)
    assert parsed.headers[0] == "patient_pseudonym" and "patient_id" not in parsed.headers


def test_follow_up_columns_shown_when_present_unknown_ignored_missing_empty(out: Path) -> None:
    follow_up = {
        "prior_study_date": "2023-12-01",
        "days_since_prior": "32",
        "ggo_change_ml": "-1.500000",
        "ggo_percent_of_lung_change": "0.2500",
        "trend": "decreased",
        "consolidation_volume_ml": "SECRET-NEW-COLUMN",
    }
    rows = ({**ROWS[0], **follow_up}, *ROWS[1:])
    columns = tuple(c for c in BASE_COLUMNS if c != "left_ggo_percent")
    _write_csv(out, rows, (*columns, *follow_up))
    write_report(out)
    page, parsed = _parse(out)
    assert "SECRET-NEW-COLUMN" not in page
    first = parsed.rows[0]
    assert first["ggo_change_ml"] == ("-1.500000", "-1.50")
    assert first["ggo_percent_of_lung_change"] == ("0.2500", "+0.25")
    assert first["trend"][0] == "decreased" and first["days_since_prior"][1] == "32"
    assert first["left_ggo_percent"] == ("", "")  # a known column the CSV lacks: empty
    assert parsed.rows[1]["trend"] == ("", "")


def test_summary_from_the_manifest_and_without_one(out: Path) -> None:
    write_report(out)
    page, _ = _parse(out)
    summary = page[page.index('id="summary"') : page.index('id="results"')]
    for text in ("ggo-resnet50-unet 1.0", "cpu (asked: auto)", "precision int8", "300.2 s"):
        assert text in summary
    assert "failed 1" in summary and "thick_slices 1" in summary and "low_confidence" not in summary
    assert f"<code>{FAILED_UID}</code>: &lt;img src=x onerror=alert(1)&gt; spacing" in summary
    (out / MANIFEST_NAME).write_text("{not json", encoding="utf-8")
    write_report(out)
    page, parsed = _parse(out)
    assert "cannot be read" in page and len(parsed.rows) == len(ROWS)
    (out / MANIFEST_NAME).unlink()
    write_report(out)
    assert "No run_manifest.json" in _parse(out)[0]


def test_written_atomically_with_the_tree_modes(out: Path) -> None:
    path = write_report(out)
    assert path == out / REPORT_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    write_report(out, tree=OutputTree(out, group_readable=True))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_missing_folder_or_csv_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        write_report(tmp_path / "absent")
    with pytest.raises(InputError, match="has no ggo_volumes.csv"):
        write_report(tmp_path)
    (tmp_path / CSV_NAME).write_bytes(b"status\r\n\xff\xfe\r\n")
    with pytest.raises(InputError, match="cannot read"):
        write_report(tmp_path)
    assert not (tmp_path / REPORT_NAME).exists()


def test_consolidation_heat_maps_are_listed_after_ggo(out: Path) -> None:
    folder = _series_folder(out, OK_UID)
    (folder / "gradcam_consolidation").mkdir()
    (folder / "gradcam_consolidation" / "slice_0005.png").write_bytes(PNG_BYTES)
    write_report(out)
    page, parsed = _parse(out)
    prefix = f"{STUDY}/{OK_UID}"
    panels = [a for a in parsed.addresses if "/gradcam" in a]
    assert panels == [
        f"{prefix}/gradcam/slice_0003.png",
        f"{prefix}/gradcam/slice_0011.png",
        f"{prefix}/gradcam_consolidation/slice_0005.png",
    ]
    assert ">5 cons.</a>" in page and "GradCAM++ (3)" in page
