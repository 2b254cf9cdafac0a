"""Read-back check of a written DICOM SR measurement report against its source series, its
SEG and the values it must hold.

The SR only counts as written once highdicom reads it back as a Comprehensive 3D SR whose
patient and study equal the source's, whose evidence lists the SEG, whose contributing
equipment names the algorithm, and whose measurement groups hold exactly the expected values,
units, concepts and finding sites, each referencing the right SEG segment (the consolidation
group coded as the model's consolidation segment, the lesion group, which references no
segment, coded "Lesion" with the GGO segment's algorithm); and whose change
since the prior study (:mod:`ggo_cli.writers.sr_change`) is exactly the expected one, or absent
when none is expected. Messages name the file and the failed check, never patient data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

from ..domain import CtVolume
from ..errors import OutputError
from ..onnx.model_info import ModelInfo
from .seg_segments import SEG_MANUFACTURER, algorithm_device_uid
from .seg_verify import COPIED_PATIENT_KEYWORDS
from .sr_change import (
    CHANGE_TRACKING_ID,
    GGO_TREND,
    LESION_FINDING,
    PRIOR_STUDY,
    STUDY_DATE_CONCEPT,
    STUDY_UID_CONCEPT,
    TREND_CODES,
    SrComparison,
    change_values,
)
from .sr_content import (
    CONSOLIDATION_TRACKING_ID,
    GGO_TRACKING_ID,
    LESION_TRACKING_ID,
    QC_CONTAINER,
    QC_FLAG_CONCEPT,
    ReportedValue,
    SegReference,
    SrSource,
    consolidation_spec,
    seg_reference,
)

log = logging.getLogger(__name__)

_READ_ERRORS = (
    OSError,
    InvalidDicomError,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    RuntimeError,
)

# (group, concept, unit, value, laterality) of one measurement, as compared
_Key = tuple[str, str, str, float, str]
_Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
)


def _fail(shown: Path, what: str) -> OutputError:
    """The read-back failure of the SR that is (or will be) at ``shown``."""
    return OutputError(f"DICOM SR {shown} failed its read-back check: {what}")


def _code_key(code: hd.sr.CodedConcept | None) -> str:
    """``scheme:value`` of a code, ``""`` for none."""
    return "" if code is None else f"{code.scheme_designator}:{code.value}"


def _expected_keys(values: Sequence[ReportedValue]) -> list[_Key]:
    """The measurements that must be read back, as comparable keys."""
    return sorted(
        (
            value.group,
            f"{value.concept.scheme_designator}:{value.concept.value}",
            f"{value.unit.scheme_designator}:{value.unit.value}",
            value.value,
            "" if value.laterality is None else _code_key(
                hd.sr.CodedConcept.from_code(value.laterality)
            ),
        )
        for value in values
    )


def _laterality(measurement: hd.sr.Measurement) -> str:
    """The laterality of a measurement's finding site (``""`` when it has none)."""
    sites = measurement.finding_sites
    if not sites:
        return ""
    for item in sites[0].get("ContentSequence", []):
        if _code_key(hd.sr.CodedConcept.from_dataset(item.ConceptNameCodeSequence[0])) == (
            _code_key(hd.sr.CodedConcept.from_code(codes.SCT.Laterality))
        ):
            return _code_key(hd.sr.CodedConcept.from_dataset(item.ConceptCodeSequence[0]))
    return ""


def _check_header(sr: Dataset, shown: Path, source: Dataset, seg: Dataset,
                  model: ModelInfo) -> None:
    """SOP class, study, copied patient attributes, evidence and contributing equipment."""
    if sr.SOPClassUID != Comprehensive3DSRStorage:
        raise _fail(shown, f"SOP class {sr.SOPClassUID} is not Comprehensive 3D SR")
    if sr.StudyInstanceUID != source.StudyInstanceUID:
        raise _fail(shown, f"StudyInstanceUID {sr.StudyInstanceUID} differs from the source's")
    for keyword in COPIED_PATIENT_KEYWORDS:
        if sr.get(keyword) != source.get(keyword):
            raise _fail(shown, f"{keyword} was not copied from the source")  # value never shown
    evidence = {
        str(series.SeriesInstanceUID): {
            str(item.ReferencedSOPInstanceUID) for item in series.ReferencedSOPSequence
        }
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.ReferencedSeriesSequence
    }
    if str(seg.SOPInstanceUID) not in evidence.get(str(seg.SeriesInstanceUID), set()):
        raise _fail(shown, f"the evidence does not list the SEG {seg.SOPInstanceUID}")
    device_uid = algorithm_device_uid(model)
    if not any(
        item.get("Manufacturer") == SEG_MANUFACTURER
        and item.get("ManufacturerModelName") == model.name
        and item.get("DeviceUID") == device_uid
        for item in sr.get("ContributingEquipmentSequence", [])
    ):
        raise _fail(shown, "no Contributing Equipment item names the algorithm")


def _check_qc(report: hd.sr.MeasurementReport, shown: Path, qc_flags: Sequence[str]) -> None:
    """The QC flags are the TEXT items of the Qualitative Evaluations container, in order."""
    found: list[str] = []
    for item in report[0].ContentSequence:
        if item.ValueType == "CONTAINER" and _code_key(item.name) == _code_key(
            hd.sr.CodedConcept.from_code(QC_CONTAINER)
        ):
            found += [
                str(text.TextValue)
                for text in item.ContentSequence
                if _code_key(text.name) == _code_key(hd.sr.CodedConcept.from_code(QC_FLAG_CONCEPT))
            ]
    if found != list(qc_flags):
        raise _fail(shown, f"QC flags {found}, expected {list(qc_flags)}")


def _child(item: Dataset, value_type: str, code: object) -> Dataset | None:
    """The first child of a content item of a value type and concept name."""
    wanted = _code_key(hd.sr.CodedConcept.from_code(code))  # type: ignore[arg-type]
    for child in item.get("ContentSequence", []):
        if child.ValueType == value_type and _code_key(
            hd.sr.CodedConcept.from_dataset(child.ConceptNameCodeSequence[0])
        ) == wanted:
            return child  # type: ignore[no-any-return]
    return None


def _prior_study(group: Dataset) -> tuple[str, str]:
    """``(StudyInstanceUID, StudyDate)`` of the change group's prior study (``""`` missing)."""
    prior = _child(group, "CONTAINER", PRIOR_STUDY)
    if prior is None:
        return "", ""
    uid = _child(prior, "UIDREF", STUDY_UID_CONCEPT)
    date = _child(prior, "DATE", STUDY_DATE_CONCEPT)
    return (
        "" if uid is None else str(uid.UID),
        "" if date is None else str(date.Date),
    )


def _pertinent(sr: Dataset) -> set[str]:
    """SOPInstanceUIDs listed in the Pertinent Other Evidence Sequence."""
    return {
        str(item.ReferencedSOPInstanceUID)
        for study in sr.get("PertinentOtherEvidenceSequence", [])
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }


def _check_change(
    sr: Dataset,
    report: hd.sr.MeasurementReport,
    shown: Path,
    comparison: SrComparison | None,
) -> None:
    """The change since the prior study is exactly ``comparison`` (absent when ``None``)."""
    groups = [g for g in report.get_image_measurement_groups()
              if str(g.tracking_identifier) != LESION_TRACKING_ID]
    if comparison is None:
        if groups:
            raise _fail(shown, "it reports a change since a prior study; none expected")
        return
    if [str(g.tracking_identifier) for g in groups] != [CHANGE_TRACKING_ID]:
        raise _fail(shown, f"no single {CHANGE_TRACKING_ID!r} group")
    group = groups[0]
    found = sorted(_measured(CHANGE_TRACKING_ID, group))
    wanted = _expected_keys(change_values(comparison))
    if found != wanted:
        raise _fail(shown, f"change {found} differs from {wanted}")
    trends = [
        _code_key(hd.sr.CodedConcept.from_dataset(e[0].ConceptCodeSequence[0]))
        for e in group.get_qualitative_evaluations()
        if _code_key(e.name) == _code_key(hd.sr.CodedConcept.from_code(GGO_TREND))
    ]
    expected = (
        [] if comparison.trend is None
        else [_code_key(hd.sr.CodedConcept.from_code(TREND_CODES[comparison.trend]))]
    )
    if trends != expected:
        raise _fail(shown, f"trend {trends}, expected {expected}")
    prior = (comparison.prior_study_instance_uid, comparison.prior_study_date.strftime("%Y%m%d"))
    if _prior_study(group[0]) != prior:
        raise _fail(shown, "the prior study's UID or date differs from the comparison's")
    seg_uid = comparison.prior_seg_sop_instance_uid
    if seg_uid and seg_uid not in _pertinent(sr):
        raise _fail(shown, f"the Pertinent Other Evidence does not list the prior SEG {seg_uid}")


def _measured(key: str, group: _Group) -> list[_Key]:
    """A group's measurements as comparable keys, under tracking identifier ``key``."""
    return [
        (key, _code_key(m.name), _code_key(m.unit), float(m.value), _laterality(m))
        for m in group.get_measurements()
    ]


def _check_algorithm(
    group: _Group, shown: Path, ref: SegReference,
    key: str, segment: str,
) -> None:
    """Group ``key`` names the algorithm the SEG records for ``segment``."""
    names = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmName)
    versions = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmVersion)
    if [n.TextValue for n in names] != [ref.algorithms[segment][0]] or [
        v.TextValue for v in versions
    ] != [ref.algorithms[segment][1]]:
        raise _fail(shown, f"group {key!r} lacks its segment's algorithm identification")


def _lesion(report: hd.sr.MeasurementReport, shown: Path, ref: SegReference) -> list[_Key]:
    """The lesion group's measurements (none without it); its finding and algorithm checked."""
    found: list[_Key] = []
    for group in report.get_image_measurement_groups():
        if str(group.tracking_identifier) != LESION_TRACKING_ID:
            continue
        if _code_key(group.finding_type) != _code_key(
            hd.sr.CodedConcept.from_code(LESION_FINDING)
        ):
            raise _fail(shown, f"group {LESION_TRACKING_ID!r} is not coded as a lesion")
        _check_algorithm(group, shown, ref, LESION_TRACKING_ID, GGO_TRACKING_ID)
        found += _measured(LESION_TRACKING_ID, group)
    return found


def verify_sr(
    path: Path,
    volume: CtVolume | SrSource,
    seg: Dataset,
    *,
    values: Sequence[ReportedValue],
    model: ModelInfo,
    qc_flags: Sequence[str] = (),
    comparison: SrComparison | None = None,
    shown: Path | None = None,
) -> None:
    """Read a written SR back with highdicom and check it against its sources and values.

    Checks: Comprehensive 3D SR; study and patient attributes equal the source's; the
    evidence lists the SEG; a Contributing Equipment item names the algorithm (with its
    Device UID); each measurement group references the SEG's SOP Instance UID and the
    segment its tracking identifier names, with that segment's algorithm name and version
    (the consolidation group coded as the model's consolidation segment; the lesion group,
    which references no segment, coded "Lesion" with the GGO segment's algorithm);
    the measurements (group, concept, unit, value, laterality) are exactly ``values``; the
    QC flags are exactly ``qc_flags``; the change since the prior study (values, trend, the
    prior study's UID and date, the prior SEG in the Pertinent Other Evidence) is exactly
    ``comparison``, and absent when it is ``None``.

    Args:
        path: the SR file.
        volume: the source volume, or its headers.
        seg: the SEG the SR references.
        values: the values the SR must hold (from
            :func:`ggo_cli.writers.sr_content.reported_values`).
        model: the model that made the SEG.
        qc_flags: the QC flag names the SR must hold, in order.
        comparison: the change since the prior study the SR must hold (``None``: none).
        shown: the path to name in messages (the final path when ``path`` is a temp file).

    Raises:
        OutputError: the file cannot be read as an SR or a check fails; the message names the
            file and the failed check, never patient data.
    """
    shown = path if shown is None else shown
    try:
        sr = hd.sr.srread(path)
        report = hd.sr.MeasurementReport.from_sequence(sr.content)
        groups = report.get_volumetric_roi_measurement_groups()
    except _READ_ERRORS as exc:
        raise _fail(shown, f"highdicom cannot read it ({type(exc).__name__}: {exc})") from exc
    _check_header(sr, shown, SrSource.of(volume).datasets[0], seg, model)
    ref = seg_reference(seg, model)
    found: list[_Key] = []
    for group in groups:
        key = str(group.tracking_identifier)
        segment = group.referenced_segment
        if (
            key not in ref.segments
            or segment is None
            or str(segment.referenced_sop_instance_uid) != ref.sop_instance_uid
            or segment.referenced_segment_numbers != [ref.segments[key]]
        ):
            raise _fail(shown, f"group {key!r} does not reference its SEG segment")
        _check_algorithm(group, shown, ref, key, key)
        if key == CONSOLIDATION_TRACKING_ID and (spec := consolidation_spec(model)) and (
            _code_key(group.finding_type)
            != _code_key(hd.sr.CodedConcept.from_code(spec.property_type))
        ):
            raise _fail(shown, f"group {key!r} is not coded as the model's consolidation")
        found += _measured(key, group)
    try:
        found += _lesion(report, shown, ref)
    except _READ_ERRORS as exc:
        raise _fail(shown, f"its lesion group cannot be read ({exc})") from exc
    if sorted(found) != _expected_keys(values):
        raise _fail(shown, f"measurements {sorted(found)} differ from {_expected_keys(values)}")
    _check_qc(report, shown, qc_flags)
    try:
        _check_change(sr, report, shown, comparison)
    except _READ_ERRORS as exc:
        raise _fail(shown, f"its change since the prior study cannot be read ({exc})") from exc
    log.debug("SR %s verified: %d measurements", shown, len(found))
