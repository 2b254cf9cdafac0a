"""CSV of GGO volumes: columns, number formats, patient id on request only, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ggo_cli.domain import GgoMeasurement, SeriesInfo, SeriesOutcome, SeriesStatus
from ggo_cli.errors import OutputError
from ggo_cli.writers.report_csv import CSV_COLUMNS, PATIENT_ID_COLUMN
from tests.writers.csv_rows import read_csv, write_outcomes

PATIENT_ID = "PAT-000123"
ROW_MM, COL_MM, SLICE_MM = 0.646484375, 0.646484375, 8.0
VOXEL_ML = ROW_MM * COL_MM * SLICE_MM / 1000.0
GGO_VOXELS = 12_345
REQUIRED_ORDER = (
    "study_instance_uid",
    "series_instance_uid",
    "study_date",
    "series_description",
    "n_slices",
    "slice_spacing_mm",
    "pixel_spacing_mm",
    "voxel_volume_ml",
    "ggo_volume_ml",
    "ggo_slice_count",
    "status",
    "message",
    "model_name",
    "model_version",
    "seg_path",
    "processed_at",
)


def _series(uid: str, *, description: str = "CT Thorax", date: str = "20070425") -> SeriesInfo:
    return SeriesInfo(
        study_instance_uid="1.2.3",
        series_instance_uid=uid,
        files=(),
        location="study/series",
        study_date=date,
        series_description=description,
        patient_id=PATIENT_ID,
    )


def _outcomes(out_dir: Path) -> list[SeriesOutcome]:
    ok = SeriesOutcome(
        series=_series("1.2.3.1"),
        status=SeriesStatus.OK,
        n_slices=30,
        slice_spacing_mm=SLICE_MM,
        pixel_spacing_mm=(ROW_MM, COL_MM),
        measurement=GgoMeasurement(
            voxel_volume_ml=VOXEL_ML,
            ggo_voxels=GGO_VOXELS,
            ggo_volume_ml=GGO_VOXELS * VOXEL_ML,
            ggo_slice_count=4,
        ),
        seg_path=out_dir / "1.2.3" / "1.2.3.1" / "ggo.seg.dcm",
        processed_at="2026-01-02T03:04:05Z",
    )
    skipped = SeriesOutcome(
        series=_series("1.2.3.2", description='=HYPERLINK("x")', date=""),
        status=SeriesStatus.SKIPPED,
        message="only 3 slices;\nat least 10 required",
        n_slices=3,
    )
    failed = SeriesOutcome(
        series=_series("1.2.3.3"),
        status=SeriesStatus.FAILED,
        message="slice spacing varies 1.25-202.5 mm",
        n_slices=40,
        processed_at="2026-01-02T03:04:09Z",
    )
    return [ok, skipped, failed]


@pytest.fixture
def rows(tmp_path: Path) -> list[dict[str, str]]:
    """The three example rows, written and read back."""
    path = write_outcomes(
        _outcomes(tmp_path), tmp_path / "ggo_volumes.csv", model_name="m", model_version="1.2"
    )
    return read_csv(path)


def test_header_has_required_columns_in_order(tmp_path: Path) -> None:
    """The header is CSV_COLUMNS; the issue's columns appear in the issue's order."""
    path = write_outcomes([], tmp_path / "ggo_volumes.csv", model_name="m", model_version="1")
    header = path.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert tuple(header) == CSV_COLUMNS
    positions = [header.index(name) for name in REQUIRED_ORDER]
    assert positions == sorted(positions)
    assert "ggo_voxels" in header
    assert PATIENT_ID_COLUMN not in header


def test_one_row_per_outcome_with_status(rows: list[dict[str, str]]) -> None:
    """Every outcome gets its row, in order, with ok/skipped/failed."""
    assert [r["series_instance_uid"] for r in rows] == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    assert [r["status"] for r in rows] == ["ok", "skipped", "failed"]
    assert all(r["model_name"] == "m" and r["model_version"] == "1.2" for r in rows)


def test_number_formats_are_fixed(rows: list[dict[str, str]]) -> None:
    """Spacings to 6 significant digits, volumes fixed to 6 decimals, ISO date."""
    ok = rows[0]
    assert ok["study_date"] == "2007-04-25"
    assert ok["n_slices"] == "30"
    assert ok["slice_spacing_mm"] == "8"
    assert ok["pixel_spacing_mm"] == "0.646484 x 0.646484"
    assert ok["voxel_volume_ml"] == repr(VOXEL_ML)
    assert ok["ggo_voxels"] == str(GGO_VOXELS)
    assert ok["ggo_volume_ml"] == f"{GGO_VOXELS * VOXEL_ML:.6f}"
    assert ok["ggo_slice_count"] == "4"
    assert ok["processed_at"] == "2026-01-02T03:04:05Z"


def test_volume_equals_voxels_times_voxel_volume(rows: list[dict[str, str]]) -> None:
    """ggo_volume_ml is recomputable from the CSV to 1e-6 mL."""
    ok = rows[0]
    recomputed = int(ok["ggo_voxels"]) * float(ok["voxel_volume_ml"])
    assert abs(recomputed - float(ok["ggo_volume_ml"])) <= 1e-6
    assert float(ok["voxel_volume_ml"]) == VOXEL_ML  # exact round trip


def test_missing_values_are_empty_cells(rows: list[dict[str, str]]) -> None:
    """A skipped series has empty measurement cells, not zeros."""
    skipped = rows[1]
    for column in (
        "slice_spacing_mm",
        "pixel_spacing_mm",
        "voxel_volume_ml",
        "ggo_voxels",
        "ggo_volume_ml",
        "ggo_slice_count",
        "seg_path",
        "study_date",
    ):
        assert skipped[column] == "", column
    assert skipped["n_slices"] == "3"


def test_qc_flags_cell_joins_the_flags_and_is_empty_when_none(tmp_path: Path) -> None:
    """qc_flags sits just before status: names joined by ';', empty for an unflagged, a
    skipped and a failed series."""
    from dataclasses import replace

    ok, skipped, failed = _outcomes(tmp_path)
    flagged = replace(ok, qc_flags=("thick_slices", "low_confidence"))
    path = write_outcomes(
        [flagged, ok, skipped, failed], tmp_path / "qc.csv", model_name="m", model_version="1"
    )
    assert CSV_COLUMNS.index("qc_flags") + 1 == CSV_COLUMNS.index("status")
    cells = [r["qc_flags"] for r in read_csv(path)]
    assert cells == ["thick_slices;low_confidence", "", "", ""]


def test_seg_path_is_relative_to_the_output_folder(rows: list[dict[str, str]]) -> None:
    """seg_path uses '/' and is relative to the CSV's folder."""
    assert rows[0]["seg_path"] == "1.2.3/1.2.3.1/ggo.seg.dcm"


def test_seg_path_relative_to_an_explicit_output_folder(tmp_path: Path) -> None:
    """out_dir overrides the CSV's folder as the base of seg_path."""
    out = tmp_path / "results"
    path = write_outcomes(
        _outcomes(out),
        tmp_path / "elsewhere" / "ggo_volumes.csv",
        model_name="m",
        model_version="1",
        out_dir=out,
    )
    assert read_csv(path)[0]["seg_path"] == "1.2.3/1.2.3.1/ggo.seg.dcm"


def test_text_cells_are_single_line_and_formula_safe(rows: list[dict[str, str]]) -> None:
    """Newlines in messages are escaped; cells starting with '=' cannot run as formulas."""
    skipped = rows[1]
    assert skipped["message"] == "only 3 slices;\\nat least 10 required"
    assert skipped["series_description"] == '\'=HYPERLINK("x")'


def test_patient_id_only_on_request(tmp_path: Path) -> None:
    """Without the option no patient ID is in the file; with it, a last patient_id column."""
    outcomes = _outcomes(tmp_path)
    plain = write_outcomes(outcomes, tmp_path / "plain.csv", model_name="m", model_version="1")
    assert PATIENT_ID not in plain.read_text(encoding="utf-8")
    with_id = write_outcomes(
        outcomes,
        tmp_path / "with_id.csv",
        model_name="m",
        model_version="1",
        include_patient_id=True,
    )
    rows = read_csv(with_id)
    header = with_id.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header == [*CSV_COLUMNS, PATIENT_ID_COLUMN]
    assert [r[PATIENT_ID_COLUMN] for r in rows] == [PATIENT_ID] * 3


def test_file_is_rfc4180_utf8_and_rewritten_atomically(tmp_path: Path) -> None:
    """CRLF line ends, UTF-8 without BOM, old file replaced, no temp file left."""
    target = tmp_path / "ggo_volumes.csv"
    target.write_text("stale")
    outcomes = [
        SeriesOutcome(
            series=_series("1.9", description="Thorax \u00e9t\u00e9"),
            status=SeriesStatus.SKIPPED,
            message="x",
        )
    ]
    write_outcomes(outcomes, target, model_name="m", model_version="1")
    data = target.read_bytes()
    assert not data.startswith(b"\xef\xbb\xbf")
    assert data.count(b"\r\n") == 2
    assert "Thorax \u00e9t\u00e9".encode() in data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ggo_volumes.csv"]


def test_unwritable_destination_raises_output_error(tmp_path: Path) -> None:
    """A CSV that cannot be written is an OutputError naming the path."""
    (tmp_path / "not-a-folder").write_text("x")
    with pytest.raises(OutputError, match="not-a-folder"):
        write_outcomes(
            [], tmp_path / "not-a-folder" / "ggo_volumes.csv", model_name="m", model_version="1"
        )


FORGED_UID = "1.2.3\n4,\"x\"\r\n\x1b[31m5"


@pytest.mark.parametrize("prefix", ["=", "+", "-", "@"])
def test_uid_cells_get_the_formula_prefix(tmp_path: Path, prefix: str) -> None:
    """The two UID columns come from headers too: a UID that starts a formula is neutralised."""
    series = SeriesInfo(
        study_instance_uid=f"{prefix}HYPERLINK(1)",
        series_instance_uid=f"{prefix}1+1",
        files=(),
        location="study/series",
    )
    path = write_outcomes(
        [SeriesOutcome(series=series, status=SeriesStatus.SKIPPED, message="x")],
        tmp_path / "ggo_volumes.csv",
        model_name="m",
        model_version="1",
    )
    (row,) = read_csv(path)
    assert row["study_instance_uid"] == f"'{prefix}HYPERLINK(1)"
    assert row["series_instance_uid"] == f"'{prefix}1+1"


def test_control_characters_in_any_text_cell_cannot_split_a_row(tmp_path: Path) -> None:
    """A UID or message with newlines and escape sequences stays one line and one row."""
    series = SeriesInfo(
        study_instance_uid=FORGED_UID,
        series_instance_uid=FORGED_UID,
        files=(),
        location="study/series",
        study_date="2007\n0425",
        series_description="a\x1b[31mb",
    )
    outcomes = [
        SeriesOutcome(series=series, status=SeriesStatus.FAILED, message="m\r\nx\x85y\x7f"),
        SeriesOutcome(series=_series("1.2.9"), status=SeriesStatus.SKIPPED, message="ok"),
    ]
    path = write_outcomes(outcomes, tmp_path / "ggo_volumes.csv", model_name="m", model_version="1")
    data = path.read_bytes()
    assert data.count(b"\r\n") == 3 and data.count(b"\n") == 3  # header + two rows
    assert b"\x1b" not in data and b"\r" not in data.replace(b"\r\n", b"")
    first, second = read_csv(path)
    assert first["series_instance_uid"] == '1.2.3\\n4,"x"\\r\\n\\x1b[31m5'
    assert first["study_date"] == "2007\\n0425"
    assert first["series_description"] == "a\\x1b[31mb"
    assert first["message"] == "m\\r\\nx\\x85y\\x7f"
    assert second["series_instance_uid"] == "1.2.9"


def test_the_message_names_no_folder_or_file_of_the_series(tmp_path: Path) -> None:
    """Hospital exports name folders and files after the patient: the CSV says folder #id."""
    folder = tmp_path / "in" / "DOE^JANE_12345" / "CT"
    series = SeriesInfo(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        files=(folder / "DOE^JANE_12345_001.dcm", folder / "DOE^JANE_12345_002.dcm"),
        location="DOE^JANE_12345/CT",
        patient_id="12345",
    )
    message = (
        "series 1.2.3.4: file DOE^JANE_12345_002.dcm cannot be read (InvalidDicomError: "
        f"{folder / 'DOE^JANE_12345_002.dcm'}); in DOE^JANE_12345/CT, patient 12345"
    )
    outcome = SeriesOutcome(series=series, status=SeriesStatus.FAILED, message=message)
    path = write_outcomes(
        [outcome], tmp_path / "ggo_volumes.csv", model_name="m", model_version="1"
    )
    text = path.read_text(encoding="utf-8")
    assert "DOE" not in text and "JANE" not in text and "12345" not in text, text
    (row,) = read_csv(path)
    assert row["message"] == (
        "series 1.2.3.4: file <file> cannot be read (InvalidDicomError: <file>); "
        f"in <folder #{series.folder_id}>, patient <PatientID>"
    )
