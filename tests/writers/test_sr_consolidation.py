"""Consolidation and the lesion in the SR (issue 20): a two-channel model's report holds the
CSV's consolidation and lesion cells (TID 1411 "Consolidation" group, TID 1501 "Lesion" group)
and its change since the prior study the consolidation and lesion changes; dciodvfy; the
read-back check catches a wrong value; a one-channel report keeps its content and UIDs."""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from typer.testing import CliRunner

from ggo_cli.analysis.quality import parse_flags
from ggo_cli.cli.app import app
from ggo_cli.config import SR_NAME
from ggo_cli.domain import GgoMeasurement, LungMeasurement, Trend
from ggo_cli.errors import OutputError
from ggo_cli.onnx.model_info import ModelInfo, load_model_info
from ggo_cli.run.followup_sr import consolidation_from_row, measurements_from_row, source_from_seg
from ggo_cli.writers.dicom_sr import derive_sr_uids, report_uids, write_sr
from ggo_cli.writers.sr_change import CHANGE_TRACKING_ID, SrComparison
from ggo_cli.writers.sr_content import reported_values
from ggo_cli.writers.sr_verify import verify_sr
from tests.dciodvfy import dciodvfy_errors, dciodvfy_path, dciodvfy_warnings
from tests.dicom_factory import FactorySeries, make_ct_series
from tests.onnx_models import write_band_model, write_two_channel_model
from tests.phantoms import LESION_PHANTOM_SHAPE, make_lesion_phantom
from tests.run.test_followup_sr import _study
from tests.shared_data import in_ci
from tests.writers.test_dicom_seg import DEVICE_UID_WARNINGS
from tests.writers.test_sr_change import assert_sr_dciodvfy_warnings

SIZE = LESION_PHANTOM_SHAPE[1]
SCT = "SCT"
CONSOLIDATION_COLUMNS = {  # column: (group, concept, laterality), as the SR codes them
    "consolidation_volume_ml": ("Consolidation", "118565006", ""),
    "right_consolidation_volume_ml": ("Consolidation", "118565006", "24028007"),
    "left_consolidation_volume_ml": ("Consolidation", "118565006", "7771000"),
    "consolidation_percent_of_lung": ("Consolidation", "118586006", "51440002"),
    "lesion_volume_ml": ("Lesion", "118565006", ""),
    "lesion_percent_of_lung": ("Lesion", "118586006", "51440002"),
    "right_lesion_percent": ("Lesion", "118586006", "24028007"),
    "left_lesion_percent": ("Lesion", "118586006", "7771000"),
}
ONE_CHANNEL_COLUMNS = (
    "ggo_volume_ml", "right_ggo_volume_ml", "left_ggo_volume_ml", "ggo_percent_of_lung",
    "right_ggo_percent", "left_ggo_percent", "right_lung_volume_ml", "left_lung_volume_ml",
)
"""The values a one-channel SR printed into its UIDs before consolidation existed, in order."""


def _run(series: FactorySeries, model: Path, out: Path) -> tuple[dict[str, str], Path]:
    result = CliRunner().invoke(app, ["segment", str(series.root), "-o", str(out), "-m",
                                      str(model), "--no-progress", "--settle", "0", "--sc", "none",
                                      "--png", "none"])
    assert result.exit_code == 0, result.output
    with (out / "ggo_volumes.csv").open(newline="", encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["status"] == "ok", row["message"]
    return row, (out / row["seg_path"]).parent / SR_NAME


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> FactorySeries:
    return make_ct_series(tmp_path_factory.mktemp("lesions"), phantom=make_lesion_phantom().phantom)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, series: FactorySeries
        ) -> tuple[dict[str, str], Path, ModelInfo]:
    root = tmp_path_factory.mktemp("two")
    model = write_two_channel_model(root / "two.onnx", SIZE)
    row, sr = _run(series, model, root / "out")
    return row, sr, load_model_info(model)


def _values(groups: list[hd.sr.MeasurementsAndQualitativeEvaluations]
            ) -> dict[tuple[str, str, str], float]:
    """(group, concept, laterality) -> value of every measurement of ``groups``."""
    found = {}
    for group in groups:
        for m in group.get_measurements():
            laterality = ""
            for site in m.finding_sites:
                for item in site.get("ContentSequence", []):
                    laterality = str(item.ConceptCodeSequence[0].CodeValue)
            found[(str(group.tracking_identifier), str(m.name.value), laterality)] = float(m.value)
    return found


def test_two_channel_sr_holds_the_csv_consolidation_and_lesion(
    two: tuple[dict[str, str], Path, ModelInfo],
) -> None:
    row, path, _ = two
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(path).content)
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in volumetric] == [
        "GGO", "Consolidation", "Right lung", "Left lung"]
    consolidation = volumetric[1]
    assert consolidation.finding_type.value == "9656002"
    assert consolidation.referenced_segment.referenced_segment_numbers == [2]  # the SEG's
    (lesion,) = report.get_image_measurement_groups()
    assert str(lesion.tracking_identifier) == "Lesion"
    assert (lesion.finding_type.value, lesion.finding_type.scheme_designator) == ("52988006", SCT)
    found = _values([*volumetric, lesion])
    for column, key in CONSOLIDATION_COLUMNS.items():
        assert row[column], column
        assert found[key] == float(row[column]), column
    assert found[("Consolidation", "118565006", "")] > 0
    assert found[("Lesion", "118565006", "")] == pytest.approx(
        float(row["ggo_volume_ml"]) + float(row["consolidation_volume_ml"]), abs=1e-6)
    # The end-of-run rewrite derives the same report from the stored row: nothing to rewrite.
    measured = measurements_from_row(row)
    assert measured is not None
    values = reported_values(*measured, consolidation_from_row(row))
    seg = pydicom.dcmread(path.parent / Path(row["seg_path"]).name, stop_before_pixels=True)
    assert report_uids(str(seg.SOPInstanceUID), values,
                       qc_flags=parse_flags(row["qc_flags"]))[1] == pydicom.dcmread(
        path).SOPInstanceUID


def test_two_channel_sr_passes_dciodvfy(two: tuple[dict[str, str], Path, ModelInfo]) -> None:
    if dciodvfy_path() is None and in_ci():
        pytest.fail("dciodvfy (Debian package dicom3tools) is not installed")
    _, path, _ = two
    assert dciodvfy_errors(path) == []
    for line in dciodvfy_warnings(path):
        assert line.strip() in DEVICE_UID_WARNINGS, line


def _seg(row: dict[str, str], sr: Path) -> Dataset:
    return pydicom.dcmread(sr.parent / Path(row["seg_path"]).name, stop_before_pixels=True)


def test_read_back_catches_a_wrong_consolidation_value(
    two: tuple[dict[str, str], Path, ModelInfo],
) -> None:
    row, path, model = two
    seg = _seg(row, path)
    measured = measurements_from_row(row)
    consolidation = consolidation_from_row(row)
    assert measured is not None and consolidation is not None
    verify_sr(path, source_from_seg(seg), seg, values=reported_values(*measured, consolidation),
              model=model, qc_flags=parse_flags(row["qc_flags"]))
    for wrong in (
        reported_values(*measured),  # no consolidation expected
        reported_values(*measured, replace(consolidation, lesion_percent_of_lung=1.0)),
    ):
        with pytest.raises(OutputError, match="differ"):
            verify_sr(path, source_from_seg(seg), seg, values=wrong, model=model,
                      qc_flags=parse_flags(row["qc_flags"]))


def test_change_group_holds_the_consolidation_and_lesion_changes(
    two: tuple[dict[str, str], Path, ModelInfo], tmp_path: Path,
) -> None:
    row, path, model = two
    seg = _seg(row, path)
    measured = measurements_from_row(row)
    assert measured is not None
    comparison = SrComparison(
        prior_study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        prior_study_date=dt.date(2024, 1, 1), days_since_prior=1,
        ggo_change_ml=Decimal("1.000000"), ggo_percent_of_lung_change=Decimal("0.1000"),
        trend=Trend.INCREASED, consolidation_change_ml=Decimal("-2.5000004"),
        lesion_percent_of_lung_change=Decimal("0.12345"),
    )
    out = write_sr(source_from_seg(seg), seg, measurement=measured[0], model=model,
                   lungs=measured[1], consolidation=consolidation_from_row(row),
                   path=tmp_path / "sr.dcm", comparison=comparison)
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(out).content)
    change = [g for g in report.get_image_measurement_groups()
              if str(g.tracking_identifier) == CHANGE_TRACKING_ID]
    found = _values(change)
    assert found[(CHANGE_TRACKING_ID, "CONS-VOL-CHANGE", "")] == -2.5
    assert found[(CHANGE_TRACKING_ID, "LESION-PCT-CHANGE", "51440002")] == 0.1234
    if dciodvfy_path() is None and in_ci():
        pytest.fail("dciodvfy (Debian package dicom3tools) is not installed")
    assert dciodvfy_errors(out) == []  # skipped (not silently) without dciodvfy
    assert_sr_dciodvfy_warnings(out)


def test_followup_run_reports_the_csv_consolidation_change(tmp_path: Path) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    _study(inputs, "20240101", 1)
    _study(inputs, "20240201", 2)
    model = write_two_channel_model(tmp_path / "two.onnx", 64)
    result = CliRunner().invoke(app, ["segment", str(inputs), "-o", str(out), "-m", str(model),
                                      "--no-progress", "--settle", "0", "--decode-workers", "0",
                                      "--png", "none", "--sc", "none"])
    assert result.exit_code == 0, result.output
    with (out / "ggo_volumes.csv").open(newline="", encoding="utf-8") as fh:
        rows = {r["study_date"]: r for r in csv.DictReader(fh)}
    later = rows["2024-02-01"]
    assert later["consolidation_change_ml"] and later["lesion_percent_of_lung_change"]
    sr = (out / later["seg_path"]).parent / SR_NAME
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(sr).content)
    found = _values([g for g in report.get_image_measurement_groups()
                     if str(g.tracking_identifier) == CHANGE_TRACKING_ID])
    assert found[(CHANGE_TRACKING_ID, "CONS-VOL-CHANGE", "")] == float(
        later["consolidation_change_ml"])
    assert found[(CHANGE_TRACKING_ID, "LESION-PCT-CHANGE", "51440002")] == float(
        later["lesion_percent_of_lung_change"])


def test_one_channel_report_keeps_its_uids(tmp_path: Path, series: FactorySeries) -> None:
    # Pinned before consolidation entered the SR (fixed SEG UID and values).
    measurement = GgoMeasurement(voxel_volume_ml=0.001, ggo_voxels=12345, ggo_volume_ml=12.345,
                                 ggo_slice_count=7)
    lungs = LungMeasurement(
        lung_volume_ml=3000.0, left_lung_volume_ml=1400.0, right_lung_volume_ml=1600.0,
        ggo_percent_of_lung=0.4115, left_ggo_volume_ml=5.0, right_ggo_volume_ml=7.345,
        left_ggo_percent=0.35714285, right_ggo_percent=0.45906)
    seg_uid = "1.2.826.0.1.3680043.8.498.1"
    assert report_uids(seg_uid, reported_values(measurement, lungs),
                       qc_flags=["low_slice_count"])[1] == (
        "1.2.826.0.1.3680043.8.498.12525456016126644906090018929359603975")
    assert report_uids(seg_uid, reported_values(measurement, None), qc_flags=[])[1] == (
        "1.2.826.0.1.3680043.8.498.31245873202334678626590269062215033551")
    # A one-channel run: no consolidation or lesion group, the UIDs of the values printed as
    # before (the GGO and lung cells, in their order).
    row, path = _run(series, write_band_model(tmp_path / "one.onnx", SIZE), tmp_path / "out")
    sr = pydicom.dcmread(path)
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(path).content)
    assert [str(g.tracking_identifier) for g in report.get_volumetric_roi_measurement_groups()
            ] == ["GGO", "Right lung", "Left lung"]
    assert report.get_image_measurement_groups() == []
    printed = [f"{column}={float(row[column])!r}" for column in ONE_CHANNEL_COLUMNS]
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == derive_sr_uids(
        str(_seg(row, path).SOPInstanceUID), values=printed,
        qc_flags=parse_flags(row["qc_flags"]), series_number=sr.SeriesNumber,
        series_description=sr.SeriesDescription)
