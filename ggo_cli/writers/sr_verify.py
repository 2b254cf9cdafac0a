"""Read-back check of a written DICOM SR measurement report against its source series, its
SEG and the values it must hold.

The SR only counts as written once highdicom reads it back as a Comprehensive 3D SR whose
patient and study equal the source's, whose evidence lists the SEG, whose contributing
equipment names the algorithm, and whose measurement groups hold exactly the expected values,
units, concepts and finding sites, each referencing the right SEG segment. Messages name the
file and the failed check, never patient data.
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
from .sr_content import (
    QC_CONTAINER,
    QC_FLAG_CONCEPT,
    ReportedValue,
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


def _check_header(sr: Dataset, shown: Path, volume: CtVolume, seg: Dataset,
                  model: ModelInfo) -> None:
    """SOP class, study, copied patient attributes, evidence and contributing equipment."""
    source = volume.datasets[0]
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


def verify_sr(
    path: Path,
    volume: CtVolume,
    seg: Dataset,
    *,
    values: Sequence[ReportedValue],
    model: ModelInfo,
    qc_flags: Sequence[str] = (),
    shown: Path | None = None,
) -> None:
    """Read a written SR back with highdicom and check it against its sources and values.

    Checks: Comprehensive 3D SR; study and patient attributes equal the source's; the
    evidence lists the SEG; a Contributing Equipment item names the algorithm (with its
    Device UID); each measurement group references the SEG's SOP Instance UID and the
    segment its tracking identifier names, with that segment's algorithm name and version;
    the measurements (group, concept, unit, value, laterality) are exactly ``values``; the
    QC flags are exactly ``qc_flags``.

    Args:
        path: the SR file.
        volume: the source volume.
        seg: the SEG the SR references.
        values: the values the SR must hold (from
            :func:`ggo_cli.writers.sr_content.reported_values`).
        model: the model that made the SEG.
        qc_flags: the QC flag names the SR must hold, in order.
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
    _check_header(sr, shown, volume, seg, model)
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
        names = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmName)
        versions = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmVersion)
        if [n.TextValue for n in names] != [ref.algorithms[key][0]] or [
            v.TextValue for v in versions
        ] != [ref.algorithms[key][1]]:
            raise _fail(shown, f"group {key!r} lacks its segment's algorithm identification")
        found += [
            (
                key,
                _code_key(measurement.name),
                _code_key(measurement.unit),
                float(measurement.value),
                _laterality(measurement),
            )
            for measurement in group.get_measurements()
        ]
    if sorted(found) != _expected_keys(values):
        raise _fail(shown, f"measurements {sorted(found)} differ from {_expected_keys(values)}")
    _check_qc(report, shown, qc_flags)
    log.debug("SR %s verified: %d measurements", shown, len(found))
