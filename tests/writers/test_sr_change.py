"""The change since the prior study in the SR (issue 21): its TID 1501 group as written and read
back with highdicom, the read-back check, UIDs that follow the comparison, an SR rebuilt from
the SEG's header alone equal to one built from the CT, dciodvfy."""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset

from ggo_cli.domain import Trend
from ggo_cli.errors import OutputError
from ggo_cli.onnx.model_info import ModelInfo
from ggo_cli.run.followup_sr import source_from_seg
from ggo_cli.writers.dicom_sr import build_sr, write_sr
from ggo_cli.writers.sr_change import CHANGE_TRACKING_ID, SrComparison
from ggo_cli.writers.sr_content import reported_values
from ggo_cli.writers.sr_verify import verify_sr
from tests.dciodvfy import dciodvfy_errors, dciodvfy_path, dciodvfy_warnings
from tests.dicom_factory import make_ct_series
from tests.shared_data import in_ci
from tests.writers.ct_data import load_ct_volume
from tests.writers.test_dicom_seg import DEVICE_UID_WARNINGS, SOURCE_QUIRKS
from tests.writers.test_dicom_sr import Case, _case

COMPARISON = SrComparison(
    prior_study_instance_uid="1.2.826.0.1.3680043.8.498.1",
    prior_study_date=dt.date(2024, 1, 1),
    days_since_prior=31,
    ggo_change_ml=Decimal("12.345678"),
    ggo_percent_of_lung_change=Decimal("-1.2500"),
    trend=Trend.DECREASED,
    prior_seg_series_instance_uid="1.2.826.0.1.3680043.8.498.2",
    prior_seg_sop_instance_uid="1.2.826.0.1.3680043.8.498.3",
)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory, model: ModelInfo) -> Case:
    """A synthetic chest phantom with its GGO and lungs, and a SEG read back as a file."""
    fs = make_ct_series(tmp_path_factory.mktemp("ct"))
    built = _case(load_ct_volume(fs.paths[0].parent), model, fs.ggo_mask, fs.lung_mask)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, built.seg, enforce_file_format=True)
    buffer.seek(0)
    return replace(built, seg=pydicom.dcmread(buffer, stop_before_pixels=True))


def _write(case: Case, model: ModelInfo, path: Path, **kwargs: object) -> Path:
    return write_sr(case.volume, case.seg, measurement=case.measurement, model=model,
                    lungs=case.lungs, path=path, **kwargs)  # type: ignore[arg-type]


def _change_group(path: Path) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(path).content)
    (group,) = report.get_image_measurement_groups()
    return group


def test_the_change_group_reads_back_with_its_values(
    case: Case, model: ModelInfo, tmp_path: Path
) -> None:
    path = _write(case, model, tmp_path / "sr.dcm", comparison=COMPARISON)
    group = _change_group(path)
    assert str(group.tracking_identifier) == CHANGE_TRACKING_ID
    found = {(m.name.value, m.unit.value): float(m.value) for m in group.get_measurements()}
    assert found == {
        ("DAYS-SINCE-PRIOR", "d"): 31.0,
        ("GGO-VOL-CHANGE", "ml"): 12.345678,
        ("GGO-PCT-CHANGE", "%"): -1.25,
    }
    trends = [e[0].ConceptCodeSequence[0].CodeValue for e in group.get_qualitative_evaluations()
              if e.name.value == "GGO-TREND"]  # highdicom lists the finding category too
    assert trends == ["1250004"]
    sr = pydicom.dcmread(path)
    prior = sr.PertinentOtherEvidenceSequence[0]
    assert prior.StudyInstanceUID == COMPARISON.prior_study_instance_uid
    assert prior.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID \
        == COMPARISON.prior_seg_sop_instance_uid
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99GGO"
    # the volumetric groups are those of an SR without a comparison
    plain = hd.sr.MeasurementReport.from_sequence(
        hd.sr.srread(_write(case, model, tmp_path / "plain.dcm")).content)
    assert not plain.get_image_measurement_groups()


def test_uids_follow_the_comparison(case: Case, model: ModelInfo) -> None:
    """No comparison: the UIDs an SR had before comparisons existed; each change: new ones."""
    def uid(comparison: SrComparison | None) -> str:
        return str(build_sr(case.volume, case.seg, measurement=case.measurement, model=model,
                            lungs=case.lungs, comparison=comparison).SOPInstanceUID)

    others = [
        replace(COMPARISON, prior_study_instance_uid="1.2.3"),
        replace(COMPARISON, trend=Trend.STABLE),
        replace(COMPARISON, ggo_change_ml=Decimal("12.345679")),
        replace(COMPARISON, prior_seg_sop_instance_uid="1.2.4"),
    ]
    uids = {uid(None), uid(COMPARISON), *(uid(c) for c in others)}
    assert len(uids) == 2 + len(others)
    assert uid(COMPARISON) == uid(replace(COMPARISON))


def test_verify_checks_the_comparison(case: Case, model: ModelInfo, tmp_path: Path) -> None:
    path = _write(case, model, tmp_path / "sr.dcm", comparison=COMPARISON)
    values = reported_values(case.measurement, case.lungs)

    def check(comparison: SrComparison | None) -> None:
        verify_sr(path, case.volume, case.seg, values=values, model=model, comparison=comparison)

    check(COMPARISON)
    with pytest.raises(OutputError, match="none expected"):
        check(None)
    with pytest.raises(OutputError, match="trend"):
        check(replace(COMPARISON, trend=Trend.INCREASED))
    with pytest.raises(OutputError, match="change .* differs"):
        check(replace(COMPARISON, days_since_prior=30))
    with pytest.raises(OutputError, match="prior study's UID or date"):
        check(replace(COMPARISON, prior_study_date=dt.date(2024, 1, 2)))
    with pytest.raises(OutputError, match="Pertinent Other Evidence"):
        check(replace(COMPARISON, prior_seg_sop_instance_uid="1.2.5"))
    plain = _write(case, model, tmp_path / "plain.dcm")
    with pytest.raises(OutputError, match="no single"):
        verify_sr(plain, case.volume, case.seg, values=values, model=model,
                  comparison=COMPARISON)


def _comparable(sr: Dataset) -> Dataset:
    """An SR less what differs between two builds (creation, content and contribution times;
    the order of the evidence)."""
    out = pydicom.dcmread(io.BytesIO(_bytes(sr)))
    for keyword in ("InstanceCreationDate", "InstanceCreationTime", "ContentDate",
                    "ContentTime", "CurrentRequestedProcedureEvidenceSequence"):
        if keyword in out:
            delattr(out, keyword)
    for item in out.ContributingEquipmentSequence[1:]:  # the algorithm's: when built
        del item.ContributionDateTime
    return out


def _bytes(sr: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, sr, enforce_file_format=True)
    return buffer.getvalue()


def _evidence(sr: Dataset) -> set[tuple[str, str, str]]:
    return {
        (str(series.SeriesInstanceUID), str(item.ReferencedSOPClassUID),
         str(item.ReferencedSOPInstanceUID))
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }


@pytest.mark.parametrize("comparison", [None, COMPARISON])
def test_an_sr_from_the_segs_header_equals_one_from_the_ct(
    comparison: SrComparison | None, case: Case, model: ModelInfo
) -> None:
    """Patient, study, equipment, evidence and content: the CT is not needed to write it again."""
    def build(source: object) -> Dataset:
        return build_sr(source, case.seg, measurement=case.measurement,  # type: ignore[arg-type]
                        model=model, lungs=case.lungs, comparison=comparison)

    from_ct, from_seg = build(case.volume), build(source_from_seg(case.seg))
    assert _evidence(from_ct) == _evidence(from_seg)
    assert len(_evidence(from_ct)) == len(case.volume.datasets) + 1  # the CT and the SEG
    assert _comparable(from_ct) == _comparable(from_seg)
    assert from_ct.ContributingEquipmentSequence[0].Manufacturer == case.volume.datasets[
        0].Manufacturer  # the CT's acquisition equipment, first


def test_dciodvfy_reports_no_errors_with_a_comparison(
    case: Case, model: ModelInfo, tmp_path: Path
) -> None:
    if dciodvfy_path() is None and in_ci():
        pytest.fail("dciodvfy (Debian package dicom3tools) is not installed")
    path = write_sr(source_from_seg(case.seg), case.seg, measurement=case.measurement,
                    model=model, lungs=case.lungs, path=tmp_path / "sr.dcm",
                    comparison=replace(COMPARISON, trend=None, ggo_percent_of_lung_change=None))
    assert dciodvfy_errors(path) == []
    assert_sr_dciodvfy_warnings(path)


PRIVATE_SCHEME_WARNING = (
    "Warning - Unrecognized defined term <99GGO> for value 1 of attribute "
    "<Coding Scheme Designator>"
)


def assert_sr_dciodvfy_warnings(path: Path) -> None:
    """The SEG's known warnings (the Device UID), and that the private scheme ``99GGO`` is not
    one dciodvfy knows (a private scheme may be any designator that starts with 99)."""
    warnings = [line.strip() for line in dciodvfy_warnings(path)]
    assert PRIVATE_SCHEME_WARNING in warnings
    for line in warnings:
        assert line == PRIVATE_SCHEME_WARNING or line in DEVICE_UID_WARNINGS or any(
            quirk in line for quirk in SOURCE_QUIRKS), line
