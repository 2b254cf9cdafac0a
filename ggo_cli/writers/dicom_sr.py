"""DICOM SR measurement report (TID 1500, Comprehensive 3D SR) of a series' SEG: build with
highdicom, write atomically, read back and check.

One report per series, next to its SEG (issue 17 items 1 and 6):

- Content (:mod:`ggo_cli.writers.sr_content`): TID 1411 volumetric groups that reference the
  SEG's segments (GGO; consolidation for a model with that channel; right and left lung when
  the SEG has them) with the GGO volume, each lung's volume, the GGO volume per lung and the
  GGO percent of each lung and of both, the consolidation volume, per lung and percent of both
  lungs, and (:func:`~ggo_cli.writers.sr_change.lesion_group`, TID 1501) the lesion volume and
  percent of each lung and of both, each rounded exactly as the CSV prints it; the algorithm
  as device observer and, per group, the Algorithm Identification (TID 4019) the SEG records
  for that segment; the QC flags as TEXT qualitative evaluations of the report (TID 1500 row
  14).
- Evidence: the SEG and the source CT instances (Current Requested Procedure Evidence
  Sequence, same study), so a PACS can link the SR to the SEG series and the CT.
- Patient and study modules: copied by highdicom from the first source CT header, as the SEG
  copies them; nothing is invented (a missing Type 2 attribute is refused, see
  :func:`ggo_cli.writers.seg_source.check_source_headers`).
- Equipment: Manufacturer ``ggo-cli``, Manufacturer's Model Name = model name, Software
  Versions = ggo-cli's version, Device Serial Number = the graph digest's first 16 hex digits,
  and the algorithm as Contributing Equipment (IHE AI Results) built by
  :func:`ggo_cli.writers.seg_segments.algorithm_equipment`, the same item as in the SEG and SC,
  Device UID (0018,1002) included.
- Flags: COMPLETE, UNVERIFIED, PRELIMINARY (an algorithm's output that no person has
  verified; PS3.3 C.17.2).
- Change since the prior study (:mod:`ggo_cli.writers.sr_change`): for a study's
  representative series with a prior study, one TID 1501 group with the CSV's follow-up
  cells and the prior study's UID and date; the prior's SEG in the Pertinent Other Evidence.
- Deterministic UIDs (:func:`derive_sr_uids`): from the SEG's SOP Instance UID (which already
  depends on the source series, model, threshold, lungs and SEG series identity), the printed
  values (the consolidation and lesion values only for a model with that channel, so a
  one-channel report keeps its UIDs), the comparison (when there is one), the QC flags and the
  SR's series number and description, in a namespace of their own. An SR without a comparison
  keeps the UIDs it had before the comparison existed.
- Sources: the CT volume's headers, or (:class:`SrSource`) headers rebuilt from the SEG, so that
  an SR can be written again without the CT (:mod:`ggo_cli.run.followup_sr`).
- Transfer syntax Explicit VR Little Endian, as the SEG.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .. import __version__
from ..atomic_output import atomic_write_path
from ..domain import ConsolidationMeasurement, CtVolume, GgoMeasurement, LungMeasurement
from ..fsutil import OutputTree
from ..onnx.model_info import ModelInfo
from .seg_segments import SEG_MANUFACTURER, algorithm_device_uid, algorithm_equipment
from .seg_source import (
    check_series_options,
    check_source_headers,
    highdicom_build,
    source_character_set,
)
from .sr_change import (
    SrComparison,
    change_group,
    lesion_group,
    prior_evidence,
    private_scheme_item,
)
from .sr_content import (
    PROCEDURE_REPORTED,
    QC_CONTAINER,
    QC_FLAG_CONCEPT,
    ReportedValue,
    SrSource,
    reported_values,
    seg_reference,
    segment_groups,
)
from .sr_verify import verify_sr

__all__ = [
    "SrComparison",
    "SrSource",
    "build_sr",
    "derive_sr_uids",
    "report_uids",
    "verify_sr",
    "write_sr",
]

log = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "GGO AI measurements - research use only"
SR_INSTANCE_NUMBER = 1
SR_TRANSFER_SYNTAX_UID = ExplicitVRLittleEndian
_UID_NAMESPACE = "ggo-cli/sr/v1"
_BUILD_ERRORS = (ValueError, TypeError, AttributeError)
_Group = (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def derive_sr_uids(
    seg_sop_instance_uid: str,
    *,
    values: Sequence[str],
    qc_flags: Sequence[str],
    series_number: int,
    series_description: str,
) -> tuple[str, str]:
    """Derive the SR's SeriesInstanceUID and SOPInstanceUID deterministically.

    As :func:`ggo_cli.writers.seg_source.derive_seg_uids`: ``generate_uid`` over a SHA-512 of
    the entropy sources, in the ``ggo-cli/sr/v1`` namespace. A rerun with the same SEG and
    values reproduces the UIDs; another SEG, value, flag or series identity gets new ones.

    Args:
        seg_sop_instance_uid: the referenced SEG's SOPInstanceUID.
        values: the reported values as printed (``column=value``).
        qc_flags: the QC flag names.
        series_number: the SR's SeriesNumber.
        series_description: the SR's SeriesDescription.

    Returns:
        ``(series_instance_uid, sop_instance_uid)``.
    """
    common = [
        _UID_NAMESPACE,
        seg_sop_instance_uid,
        *values,
        "qc:" + ";".join(qc_flags),
        str(series_number),
        series_description,
    ]
    series_uid = generate_uid(entropy_srcs=[*common, "SeriesInstanceUID"])
    sop_uid = generate_uid(entropy_srcs=[*common, "SOPInstanceUID"])
    return str(series_uid), str(sop_uid)


def report_uids(
    seg_sop_instance_uid: str,
    values: Sequence[ReportedValue],
    *,
    qc_flags: Sequence[str],
    comparison: SrComparison | None = None,
    series_number: int = SR_SERIES_NUMBER,
    series_description: str = SR_SERIES_DESCRIPTION,
) -> tuple[str, str]:
    """The UIDs of the report of these values (:func:`derive_sr_uids` over their printed form).

    Args:
        seg_sop_instance_uid: the referenced SEG's SOPInstanceUID.
        values: from :func:`~ggo_cli.writers.sr_content.reported_values`.
        qc_flags: the QC flag names.
        comparison: the change since the prior study, when reported.
        series_number: the SR's SeriesNumber.
        series_description: the SR's SeriesDescription.

    Returns:
        ``(series_instance_uid, sop_instance_uid)``.
    """
    printed = [f"{value.column}={value.value!r}" for value in values]
    if comparison is not None:
        printed += comparison.uid_entropy()
    return derive_sr_uids(
        seg_sop_instance_uid,
        values=printed,
        qc_flags=qc_flags,
        series_number=series_number,
        series_description=series_description,
    )


def observation_context(model: ModelInfo) -> hd.sr.ObservationContext:
    """The algorithm as the report's device observer (TID 1001, TID 1004)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=algorithm_device_uid(model),
        name=model.name,
        manufacturer_name=SEG_MANUFACTURER,
        model_name=f"{model.name} {model.version}",
        serial_number=model.recorded_sha256[:16],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def measurement_report(
    groups: Sequence[_Group],
    model: ModelInfo,
    *,
    qc_flags: Sequence[str],
) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree: observer, procedure, the measurement groups, QC flags.

    Args:
        groups: the Imaging Measurements (the segments' groups, then the TID 1501 groups).
        model: the model (the device observer).
        qc_flags: QC flag names, in reporting order (TEXT items of a Qualitative Evaluations
            container; none: no container).
    """
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(model),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=list(groups),
    )
    if qc_flags:
        container = hd.sr.ContainerContentItem(
            name=QC_CONTAINER, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        container.ContentSequence = hd.sr.ContentSequence([
            hd.sr.TextContentItem(name=QC_FLAG_CONCEPT, value=str(flag),
                                  relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
            for flag in qc_flags
        ])
        report[0].ContentSequence.append(container)
    return report


def build_sr(
    volume: CtVolume | SrSource,
    seg: Dataset,
    *,
    measurement: GgoMeasurement,
    model: ModelInfo,
    lungs: LungMeasurement | None = None,
    qc_flags: Sequence[str] = (),
    comparison: SrComparison | None = None,
    series_number: int = SR_SERIES_NUMBER,
    series_description: str = SR_SERIES_DESCRIPTION,
    software_version: str = __version__,
    consolidation: ConsolidationMeasurement | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the measurement report of a series (in memory).

    Args:
        volume: the source CT volume (``volume.datasets`` are its headers, no pixels needed),
            or its headers alone (:class:`SrSource`, e.g. rebuilt from the SEG).
        seg: the SEG written for the series (from :func:`ggo_cli.writers.dicom_seg.build_seg`
            or read back).
        measurement: the GGO volumetry (as the CSV row).
        model: the model that made the SEG.
        lungs: the lung volumetry; needs the SEG's lung segments. ``None`` without a lung mask.
        qc_flags: the series' QC flag names (:class:`ggo_cli.analysis.quality.QcFlag`).
        comparison: the change since the prior study (a study's representative series with a
            prior); ``None``: not reported.
        series_number: SeriesNumber of the SR.
        series_description: SeriesDescription of the SR (mark it as AI research output).
        software_version: ggo-cli's version (Software Versions).
        consolidation: the consolidation and lesion volumetry (as the CSV row) of a model with
            a consolidation channel; needs the SEG's consolidation segment. ``None``: none.

    Returns:
        The Comprehensive 3D SR.

    Raises:
        InputError: series number or description out of range.
        UnsupportedSeriesError: the source headers lack attributes the SR copies.
        OutputError: highdicom refused to build the SR (the message says why).
        ValueError: the SEG does not belong to the series or lacks a measured segment (a bug
            in the caller).
    """
    source = SrSource.of(volume)
    series_uid = source.series_instance_uid
    check_series_options("SR", series_number, series_description)
    if not isinstance(volume, SrSource):  # headers rebuilt from a SEG passed this as the SEG's
        check_source_headers(source.datasets, series_uid)
    ref = seg_reference(seg, model)
    if ref.source_series_uid != series_uid or seg.StudyInstanceUID != source.datasets[0].get(
        "StudyInstanceUID"
    ):
        raise ValueError(f"the SEG {ref.sop_instance_uid} is not of series {series_uid}")
    values = reported_values(measurement, lungs, consolidation)
    flags = [str(flag) for flag in qc_flags]
    sr_series_uid, sr_sop_uid = report_uids(
        ref.sop_instance_uid,
        values,
        qc_flags=flags,
        comparison=comparison,
        series_number=series_number,
        series_description=series_description,
    )
    groups: list[_Group] = [*segment_groups(values, ref, model, tracking_seed=sr_sop_uid)]
    lesion = lesion_group(values, ref, model, tracking_seed=sr_sop_uid)
    if lesion is not None:
        groups.append(lesion)
    if comparison is not None:
        groups.append(change_group(comparison, ref, model, tracking_seed=sr_sop_uid))
    report = measurement_report(groups, model, qc_flags=flags)
    equipment = algorithm_equipment(model)  # with its Device UID, as in the SEG and SC
    evidence = [*source.datasets, seg]
    if comparison is not None:
        evidence += prior_evidence(comparison)  # another study: Pertinent Other Evidence
    # highdicom quotes source values in warnings: record them, log them redacted.
    with highdicom_build("DICOM SR", series_uid, source.datasets[0], _BUILD_ERRORS):
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=sr_series_uid,
            series_number=series_number,
            sop_instance_uid=sr_sop_uid,
            instance_number=SR_INSTANCE_NUMBER,
            manufacturer=SEG_MANUFACTURER,
            is_complete=True,
            transfer_syntax_uid=SR_TRANSFER_SYNTAX_UID,
            contributing_equipment=[equipment],
            series_description=series_description,
            manufacturer_model_name=model.name,
            software_versions=software_version,
            device_serial_number=model.recorded_sha256[:16],
            specific_character_set=source_character_set(source.datasets[0]),
        )
    if source.acquisition_equipment is not None:  # first, where highdicom puts it
        sr["ContributingEquipmentSequence"].value.insert(
            0, copy.deepcopy(source.acquisition_equipment)
        )
    if comparison is not None:  # lesion and consolidation use standard codes only
        sr.CodingSchemeIdentificationSequence = [private_scheme_item()]
    log.debug("series %s: SR %s built, %d values", series_uid, sr_sop_uid, len(values))
    return sr


def write_sr(
    volume: CtVolume | SrSource,
    seg: Dataset,
    *,
    measurement: GgoMeasurement,
    model: ModelInfo,
    path: Path,
    lungs: LungMeasurement | None = None,
    qc_flags: Sequence[str] = (),
    comparison: SrComparison | None = None,
    series_number: int = SR_SERIES_NUMBER,
    series_description: str = SR_SERIES_DESCRIPTION,
    software_version: str = __version__,
    verify: bool = True,
    tree: OutputTree | None = None,
    consolidation: ConsolidationMeasurement | None = None,
) -> Path:
    """Build the SR, write it atomically and (by default) verify it before it appears.

    The SR goes to a hidden temporary file beside ``path``, is read back and checked with
    :func:`verify_sr`, and only then renamed to ``path``; an SR that fails its check is never
    left at ``path`` (an older file there stays as it was).

    Args:
        volume: the source CT volume, or its headers (:class:`SrSource`).
        seg: the SEG written for the series.
        measurement: the GGO volumetry.
        model: the model that made the SEG.
        path: the destination file (parents are created).
        lungs: the lung volumetry (the SEG must have the lung segments); ``None`` without.
        qc_flags: the series' QC flag names.
        comparison: the change since the prior study; ``None``: not reported.
        series_number: SeriesNumber of the SR.
        series_description: SeriesDescription of the SR.
        software_version: ggo-cli's version.
        verify: read the file back and check it before renaming it into place.
        tree: the output folder ``path`` lies in (no link followed, the tree's file mode:
            ``0600`` by default, the SR holds patient data).
        consolidation: the consolidation and lesion volumetry (a model with a consolidation
            channel); ``None``: none.

    Returns:
        ``path``.

    Raises:
        InputError: series number or description out of range.
        UnsupportedSeriesError: the source headers lack attributes the SR copies.
        OutputError: the SR cannot be built, written, or fails its read-back check.
    """
    sr = build_sr(
        volume,
        seg,
        measurement=measurement,
        model=model,
        lungs=lungs,
        qc_flags=qc_flags,
        comparison=comparison,
        series_number=series_number,
        series_description=series_description,
        software_version=software_version,
        consolidation=consolidation,
    )
    source = SrSource.of(volume)
    with atomic_write_path(path, tree=tree) as temp:
        dcmwrite(temp, sr, enforce_file_format=True)
        if verify:
            verify_sr(
                temp,
                source,
                seg,
                values=reported_values(measurement, lungs, consolidation),
                model=model,
                qc_flags=[str(flag) for flag in qc_flags],
                comparison=comparison,
                shown=path,
            )
    log.debug("series %s: SR written to %s", source.series_instance_uid, path)
    return path
