"""DICOM SR measurement report: values equal the CSV's cells, SEG references, copied modules,
contributing equipment, deterministic UIDs, QC flags, read-back check, dciodvfy."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

from ggo_cli.analysis.lungs import LungMasks
from ggo_cli.analysis.measurements import lung_measurements, measure_ggo
from ggo_cli.domain import (
    CtVolume,
    GgoMeasurement,
    LungMeasurement,
    Prediction,
    SeriesOutcome,
    SeriesStatus,
)
from ggo_cli.errors import InputError, OutputError
from ggo_cli.onnx.model_info import ModelInfo
from ggo_cli.writers.dicom_seg import build_seg
from ggo_cli.writers.dicom_sr import build_sr, write_sr
from ggo_cli.writers.report_csv import outcome_row
from ggo_cli.writers.seg_segments import algorithm_device_uid
from ggo_cli.writers.sr_content import reported_values
from ggo_cli.writers.sr_verify import verify_sr
from tests.dciodvfy import dciodvfy_errors
from tests.dicom_factory import make_ct_series
from tests.writers.ct_data import load_ct_volume, stack_segments
from tests.writers.test_dicom_seg import assert_known_dciodvfy_warnings

QC_FLAGS = ("thick_slices", "low_confidence")
SOFTWARE_VERSION = "9.9.9-test"
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
LATERALITY_COLUMNS = {
    ("GGO", "SCT:118565006", ""): "ggo_volume_ml",
    ("GGO", "SCT:118565006", "SCT:24028007"): "right_ggo_volume_ml",
    ("GGO", "SCT:118565006", "SCT:7771000"): "left_ggo_volume_ml",
    ("GGO", "SCT:118586006", "SCT:51440002"): "ggo_percent_of_lung",
    ("GGO", "SCT:118586006", "SCT:24028007"): "right_ggo_percent",
    ("GGO", "SCT:118586006", "SCT:7771000"): "left_ggo_percent",
    ("Right lung", "SCT:118565006", ""): "right_lung_volume_ml",
    ("Left lung", "SCT:118565006", ""): "left_lung_volume_ml",
}
"""Each SR measurement (group, concept, finding-site laterality) and its CSV column."""


@dataclass(frozen=True, slots=True)
class Case:
    """A series with its SEG and measurements, ready for an SR."""

    volume: CtVolume
    seg: hd.seg.Segmentation
    measurement: GgoMeasurement
    lungs: LungMeasurement | None


def _case(
    volume: CtVolume,
    model: ModelInfo,
    ggo: np.ndarray,
    lung: np.ndarray | None,
    split_col: int | None = None,
) -> Case:
    """SEG and measurements of a GGO mask (and lungs split at ``split_col``, else the middle)."""
    prediction = Prediction(masks=ggo[..., None].copy(), threshold=0.5)
    if lung is None:
        seg = build_seg(volume, prediction, model, software_version=SOFTWARE_VERSION)
        return Case(volume, seg, measure_ggo(prediction.ggo, volume.voxel_volume_ml), None)
    middle = lung.shape[2] // 2 if split_col is None else split_col
    right, left = lung.copy(), lung.copy()
    right[:, :, middle:] = False
    left[:, :, :middle] = False
    prediction, lungs = stack_segments(prediction, LungMasks(right=right, left=left))
    seg = build_seg(volume, prediction, model, software_version=SOFTWARE_VERSION, lungs=lungs)
    voxel_ml = volume.voxel_volume_ml
    return Case(
        volume,
        seg,
        measure_ggo(prediction.ggo, voxel_ml),
        lung_measurements(lungs, prediction.ggo, voxel_ml),
    )


@pytest.fixture(scope="module")
def real_case(lung_volume: CtVolume, lung_prediction: Prediction, model: ModelInfo) -> Case:
    """The shared real series: a GGO box, box lungs split across it (GGO in both lungs)."""
    n, rows, cols = lung_volume.hu.shape
    lung = np.zeros((n, rows, cols), dtype=bool)
    lung[:, rows // 4 : 3 * rows // 4, cols // 8 : 7 * cols // 8] = True
    # the GGO box spans columns cols // 4 .. cols // 4 + 50 (ct_data.blob_masks)
    return _case(lung_volume, model, lung_prediction.ggo, lung, split_col=cols // 4 + 20)


@pytest.fixture(scope="module")
def synthetic_case(tmp_path_factory: pytest.TempPathFactory, model: ModelInfo) -> Case:
    """A synthetic chest phantom with its true GGO and lungs."""
    fs = make_ct_series(tmp_path_factory.mktemp("ct"))
    volume = load_ct_volume(fs.paths[0].parent)
    return _case(volume, model, fs.ggo_mask, fs.lung_mask)


def _write(case: Case, model: ModelInfo, path: Path, **kwargs: object) -> Path:
    return write_sr(
        case.volume,
        case.seg,
        measurement=case.measurement,
        model=model,
        lungs=case.lungs,
        path=path,
        software_version=SOFTWARE_VERSION,
        **kwargs,  # type: ignore[arg-type]
    )


def _csv_cells(case: Case, qc_flags: tuple[str, ...] = ()) -> dict[str, str]:
    """The series' CSV row, as report_csv prints it."""
    outcome = SeriesOutcome(
        series=case.volume.series,
        status=SeriesStatus.OK,
        measurement=case.measurement,
        lungs=case.lungs,
        qc_flags=qc_flags,
    )
    return outcome_row(outcome, Path("."), model_name="m", model_version="v")


def _code(code: hd.sr.CodedConcept) -> str:
    return f"{code.scheme_designator}:{code.value}"


def _measurements(path: Path) -> dict[str, tuple[str, str, float, str]]:
    """Per CSV column: (concept, unit, FloatingPointValue, NumericValue DS text)."""
    sr = hd.sr.srread(path)
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    found = {}
    for group in report.get_volumetric_roi_measurement_groups():
        for measurement in group.get_measurements():
            laterality = ""
            for site in measurement.finding_sites:
                for item in site.ContentSequence:
                    laterality = _code(hd.sr.CodedConcept.from_dataset(item.ConceptCodeSequence[0]))
            key = (str(group.tracking_identifier), _code(measurement.name), laterality)
            column = LATERALITY_COLUMNS[key]
            assert column not in found, f"{key} twice"
            value_item = measurement[0].MeasuredValueSequence[0]
            found[column] = (
                _code(measurement.name),
                _code(measurement.unit),
                float(value_item.FloatingPointValue),
                str(value_item.NumericValue),
            )
    return found


@pytest.mark.parametrize("which", ["real", "synthetic"])
def test_values_units_and_concepts_equal_the_csv_cells(
    which: str, real_case: Case, synthetic_case: Case, model: ModelInfo, tmp_path: Path
) -> None:
    """Every lung and GGO cell of the CSV is in the SR, to the last printed digit."""
    case = real_case if which == "real" else synthetic_case
    path = _write(case, model, tmp_path / "ggo.sr.dcm")
    cells = _csv_cells(case)
    found = _measurements(path)
    assert set(found) == set(LATERALITY_COLUMNS.values())
    for column, (concept, unit, value, text) in found.items():
        assert cells[column], column
        assert value == float(cells[column]), column
        assert float(text) == float(cells[column]), column
        is_percent = column.endswith("percent") or "percent_" in column
        assert concept == ("SCT:118586006" if is_percent else "SCT:118565006"), column
        assert unit == ("UCUM:%" if is_percent else "UCUM:ml"), column
    assert found["ggo_volume_ml"][2] > 0
    assert found["right_ggo_volume_ml"][2] > 0 and found["left_ggo_volume_ml"][2] > 0


def test_groups_reference_the_seg_instance_and_its_segments(
    real_case: Case, model: ModelInfo, tmp_path: Path
) -> None:
    """Each group names the SEG's SOP Instance UID, its segment and that segment's algorithm."""
    path = _write(real_case, model, tmp_path / "ggo.sr.dcm")
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(path).content)
    labels = {int(s.SegmentNumber): s.SegmentLabel for s in real_case.seg.SegmentSequence}
    refs = {}
    for group in report.get_volumetric_roi_measurement_groups():
        segment = group.referenced_segment
        assert segment is not None
        assert segment.referenced_sop_instance_uid == real_case.seg.SOPInstanceUID
        assert segment.referenced_sop_class_uid == real_case.seg.SOPClassUID
        refs[str(group.tracking_identifier)] = segment.referenced_segment_numbers
        names = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmName)
        assert len(names) == 1
    assert refs == {"GGO": [1], "Right lung": [2], "Left lung": [3]}
    assert labels == {1: "GGO", 2: "Right lung", 3: "Left lung"}
    ggo_group = report.get_volumetric_roi_measurement_groups()[0]
    assert ggo_group.tracking_identifier == "GGO"
    assert _code(ggo_group.finding_type) == "DCM:112120"
    sources = hd.sr.utils.find_content_items(
        ggo_group[0], name=codes.DCM.SourceSeriesForSegmentation, recursive=True
    )
    assert [s.UID for s in sources] == [real_case.volume.series.series_instance_uid]


def test_header_copies_patient_and_study_and_names_the_algorithm(
    real_case: Case, model: ModelInfo, tmp_path: Path
) -> None:
    """Patient/study modules equal the source's; evidence lists the SEG; AIR equipment."""
    path = _write(real_case, model, tmp_path / "ggo.sr.dcm", qc_flags=QC_FLAGS)
    sr = pydicom.dcmread(path)
    source = real_case.volume.datasets[0]
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.Modality == "SR"
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert sr.get(keyword) == source.get(keyword), keyword
    assert sr.SeriesInstanceUID not in (real_case.seg.SeriesInstanceUID, source.SeriesInstanceUID)
    evidence = {
        series.SeriesInstanceUID: {
            item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence
        }
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
    }
    assert evidence[real_case.seg.SeriesInstanceUID] == {real_case.seg.SOPInstanceUID}
    assert evidence[source.SeriesInstanceUID] == set(real_case.volume.sop_instance_uids)
    algorithm = [
        item for item in sr.ContributingEquipmentSequence if item.get("Manufacturer") == "ggo-cli"
    ]
    assert len(algorithm) == 1
    item = algorithm[0]
    assert item.ManufacturerModelName == model.name
    assert item.SoftwareVersions == model.version
    assert item.DeviceUID == algorithm_device_uid(model)
    assert item.PurposeOfReferenceCodeSequence[0].CodeValue == codes.DCM.ProcessingEquipment.value
    (seg_item,) = (
        seg_item
        for seg_item in real_case.seg.ContributingEquipmentSequence
        if seg_item.get("ManufacturerModelName") == model.name
    )
    # the SEG's algorithm item, Device UID included (only the contribution time differs)
    assert {e.keyword: e.value for e in item if e.keyword != "ContributionDateTime"} == {
        e.keyword: e.value for e in seg_item if e.keyword != "ContributionDateTime"
    }
    assert (sr.Manufacturer, sr.SoftwareVersions) == ("ggo-cli", SOFTWARE_VERSION)
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    observer = hd.sr.MeasurementReport.from_sequence(
        hd.sr.srread(path).content
    ).get_observer_contexts(observer_type=codes.DCM.Device)
    assert len(observer) == 1
    device = observer[0].observer_identifying_attributes
    assert device.uid == algorithm_device_uid(model)
    assert device.manufacturer_name == "ggo-cli"
    assert device.model_name == f"{model.name} {model.version}"


def test_qc_flags_are_text_qualitative_evaluations(
    real_case: Case, model: ModelInfo, tmp_path: Path
) -> None:
    """The flags are TEXT items (121106, DCM) of the Qualitative Evaluations container."""
    path = _write(real_case, model, tmp_path / "ggo.sr.dcm", qc_flags=QC_FLAGS)
    root = pydicom.dcmread(path)
    containers = [
        item
        for item in root.ContentSequence
        if item.ValueType == "CONTAINER"
        and item.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    ]
    assert len(containers) == 1
    texts = [
        (i.ConceptNameCodeSequence[0].CodeValue, i.TextValue) for i in containers[0].ContentSequence
    ]
    assert texts == [("121106", flag) for flag in QC_FLAGS]
    assert ";".join(t for _, t in texts) == _csv_cells(real_case, QC_FLAGS)["qc_flags"]
    plain = _write(real_case, model, tmp_path / "plain.sr.dcm")
    assert not any(
        item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "C0034375"
        for item in pydicom.dcmread(plain).ContentSequence
    )


def test_uids_are_deterministic_and_follow_content(
    real_case: Case, model: ModelInfo, tmp_path: Path
) -> None:
    """Two writes give the same UIDs; another flag or series number gives new ones."""
    first = pydicom.dcmread(_write(real_case, model, tmp_path / "a.sr.dcm"))
    second = pydicom.dcmread(_write(real_case, model, tmp_path / "b.sr.dcm"))
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        second.SeriesInstanceUID,
        second.SOPInstanceUID,
    )
    flagged = pydicom.dcmread(_write(real_case, model, tmp_path / "c.sr.dcm", qc_flags=QC_FLAGS))
    renumbered = pydicom.dcmread(_write(real_case, model, tmp_path / "d.sr.dcm", series_number=7))
    uids = {first.SOPInstanceUID, flagged.SOPInstanceUID, renumbered.SOPInstanceUID}
    assert len(uids) == 3
    assert renumbered.SeriesNumber == 7


def test_no_lung_mask_reports_the_ggo_volume_only(
    lung_volume: CtVolume, lung_prediction: Prediction, model: ModelInfo, tmp_path: Path
) -> None:
    """Without lungs: one group, the GGO volume as the CSV prints it, no lung segments."""
    case = _case(lung_volume, model, lung_prediction.ggo, None)
    path = _write(case, model, tmp_path / "ggo.sr.dcm")
    found = _measurements(path)
    cells = _csv_cells(case)
    assert list(found) == ["ggo_volume_ml"]
    assert found["ggo_volume_ml"][2] == float(cells["ggo_volume_ml"])
    assert cells["lung_volume_ml"] == ""
    assert dciodvfy_errors(path) == []


def test_lungs_without_lung_segments_are_a_bug(
    lung_volume: CtVolume, lung_prediction: Prediction, real_case: Case, model: ModelInfo
) -> None:
    """Lung values need the SEG's lung segments."""
    case = _case(lung_volume, model, lung_prediction.ggo, None)
    with pytest.raises(ValueError, match="no Right lung segment"):
        build_sr(case.volume, case.seg, measurement=case.measurement, model=model,
                 lungs=real_case.lungs)


def test_undefined_percent_is_left_out_like_the_empty_cell(real_case: Case) -> None:
    """A lung of volume 0 has no percent: no SR value, an empty CSV cell."""
    assert real_case.lungs is not None
    lungs = dataclasses.replace(real_case.lungs, left_ggo_percent=float("nan"))
    columns = [v.column for v in reported_values(real_case.measurement, lungs)]
    assert "left_ggo_percent" not in columns and "right_ggo_percent" in columns
    outcome = SeriesOutcome(series=real_case.volume.series, status=SeriesStatus.OK,
                            measurement=real_case.measurement, lungs=lungs)
    assert outcome_row(outcome, Path("."), model_name="m", model_version="v")[
        "left_ggo_percent"] == ""


def test_verify_detects_a_different_value(
    real_case: Case, model: ModelInfo, tmp_path: Path
) -> None:
    """The read-back check fails when the file holds other values than expected."""
    path = _write(real_case, model, tmp_path / "ggo.sr.dcm")
    other = GgoMeasurement(
        voxel_volume_ml=real_case.measurement.voxel_volume_ml,
        ggo_voxels=real_case.measurement.ggo_voxels + 1,
        ggo_volume_ml=real_case.measurement.ggo_volume_ml + 0.001,
        ggo_slice_count=real_case.measurement.ggo_slice_count,
    )
    with pytest.raises(OutputError, match="measurements .* differ"):
        verify_sr(path, real_case.volume, real_case.seg,
                  values=reported_values(other, real_case.lungs), model=model)
    with pytest.raises(OutputError, match="QC flags"):
        verify_sr(path, real_case.volume, real_case.seg,
                  values=reported_values(real_case.measurement, real_case.lungs), model=model,
                  qc_flags=["thick_slices"])


def test_bad_series_options_raise_input_error(real_case: Case, model: ModelInfo) -> None:
    with pytest.raises(InputError, match="SR series number"):
        build_sr(real_case.volume, real_case.seg, measurement=real_case.measurement,
                 model=model, series_number=0)


def test_no_patient_data_in_logs(
    caplog: pytest.LogCaptureFixture, real_case: Case, model: ModelInfo, tmp_path: Path
) -> None:
    """Debug logs (highdicom's warnings included) carry no patient identifier."""
    with caplog.at_level(logging.DEBUG):
        _write(real_case, model, tmp_path / "ggo.sr.dcm", qc_flags=QC_FLAGS)
    source = real_case.volume.datasets[0]
    for keyword in ("PatientName", "PatientID"):
        value = str(source[keyword].value)
        assert value
        assert value not in caplog.text


@pytest.mark.parametrize("which", ["real", "synthetic"])
def test_dciodvfy_reports_no_errors(
    which: str, real_case: Case, synthetic_case: Case, model: ModelInfo, tmp_path: Path
) -> None:
    """dicom3tools' validator finds no Error in the SR, and warns only about the Device UID
    of the algorithm's Contributing Equipment item."""
    case = real_case if which == "real" else synthetic_case
    path = _write(case, model, tmp_path / "ggo.sr.dcm", qc_flags=QC_FLAGS)
    assert dciodvfy_errors(path) == []
    assert_known_dciodvfy_warnings(path)
