"""The content of a ggo-cli measurement report (TID 1500): which values it holds, how each is
coded, and the highdicom content tree that holds them.

Values (:func:`reported_values`) are the CSV's cells as numbers: each is rounded exactly as
:mod:`ggo_cli.writers.report_csv` prints it (volumes to :data:`VOLUME_DECIMALS`, percentages to
:data:`PERCENT_DECIMALS`) and a value whose cell is empty (an undefined percentage) is left
out, so the SR and the CSV agree to the last printed digit.

Coding choices (DICOM PS3.16):

- Volumes: concept (118565006, SCT, "Volume"), unit (ml, UCUM, "milliliter").
- Percentages: concept (118586006, SCT, "Ratio"), unit (%, UCUM, "Percent"). The value is the
  ratio of two volumes (GGO inside a lung / that lung), so the generic SNOMED CT property
  "Ratio", with UCUM ``%`` as the unit of the ratio, states exactly that; CID 7469 (Generic
  Intensity and Size Measurements) has no "percent of organ involved" concept, and the
  specific percent-of-volume codes of DCM (e.g. 112019, calcification extent) name other
  findings.
- Which lung a value belongs to: a Finding Site (363698007, SCT) Lung (39607008, SCT) with
  laterality Right (24028007), Left (7771000) or Right and left (51440002) on the measurement
  (TID 300 row "Finding Site", TID 1419).
- Groups (TID 1411, one per referenced SEG segment): "GGO" (the model's channel 0: GGO volume,
  GGO volume per lung and GGO percent of each lung and of both), "Consolidation" (a model with
  a consolidation channel, :func:`ggo_cli.analysis.measurements.consolidation_channel`:
  consolidation volume, per lung, and percent of both lungs; finding the channel's segmented
  property type, SCT 9656002 "Consolidation"), "Right lung" and "Left lung" (their volumes),
  each with its tracking identifier and UID, finding, finding site and the Algorithm
  Identification (TID 4019) of the segment it references, as the SEG records it.
- The lesion (GGO or consolidation): one TID 1501 group, coded in
  :mod:`ggo_cli.writers.sr_change` (it unites two segments; TID 1411 references one).
- QC flags: TID 1500 rows 12-14 hold a "Qualitative Evaluations" container (C0034375, UMLS)
  with CODE or TEXT items about the whole report. There are no standard codes for ggo-cli's
  flags, so each flag is a TEXT item (row 14), concept (121106, DCM, "Comment"), value the
  flag's CSV name (:class:`ggo_cli.analysis.quality.QcFlag`); the container is left out when
  nothing is flagged (it is Type U).
- Observer (TID 1001/1004): the algorithm as a device observer: Device Observer UID
  (:func:`~ggo_cli.writers.seg_segments.algorithm_device_uid`, the Device UID of the
  algorithm's Contributing Equipment item), name = model name, manufacturer ``ggo-cli``,
  model name = model name and version, serial number = the SEG's Device Serial Number (the
  graph digest).
- Procedure reported (CID 100): (25045-6, LN, "CT unspecified body region").
- The change since the prior study (a study's representative series with a prior): one more
  group, TID 1501, coded in :mod:`ggo_cli.writers.sr_change`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from ..analysis.measurements import consolidation_channel
from ..domain import ConsolidationMeasurement, CtVolume, GgoMeasurement, LungMeasurement
from ..onnx.model_info import ModelInfo, SegmentSpec
from .report_csv import PERCENT_DECIMALS, VOLUME_DECIMALS
from .seg_segments import LUNG_SEGMENTS

VOLUME_CONCEPT = codes.SCT.Volume
PERCENT_CONCEPT = codes.SCT.Ratio
ML_UNIT = Code("ml", "UCUM", "milliliter")
PERCENT_UNIT = codes.UCUM.Percent
LUNG_SITE = codes.SCT.Lung
BOTH_LUNGS = codes.SCT.RightAndLeft
QC_CONTAINER = Code("C0034375", "UMLS", "Qualitative Evaluations")
QC_FLAG_CONCEPT = codes.DCM.Comment
PROCEDURE_REPORTED = codes.cid100.CTUnspecifiedBodyRegion
GGO_TRACKING_ID = "GGO"
CONSOLIDATION_TRACKING_ID = "Consolidation"
LESION_TRACKING_ID = "Lesion"
_TRACKING_UID_NAMESPACE = "ggo-cli/sr-tracking/v1"


@dataclass(frozen=True, slots=True)
class ReportedValue:
    """One measurement of the report, as the CSV prints it.

    Attributes:
        column: the CSV column the value comes from.
        group: tracking identifier of its measurement group (``GGO``, ``Consolidation``,
            ``Lesion`` or a lung's label).
        concept: the measurement's concept name.
        unit: its UCUM unit.
        value: the value rounded as the CSV cell prints it.
        laterality: the lung(s) it is measured in (Finding Site laterality), or ``None`` for
            the whole referenced segment.
    """

    column: str
    group: str
    concept: Code
    unit: Code
    value: float
    laterality: Code | None = None


@dataclass(frozen=True, slots=True)
class SrSource:
    """The source series as the report needs it: headers only, no pixels.

    Attributes:
        series_instance_uid: the source series.
        datasets: its instances' headers (the first gives the patient and study modules; the
            others need only their UIDs and SOP class).
        acquisition_equipment: the source's acquisition equipment item (Contributing
            Equipment) for headers that lack the equipment attributes (headers rebuilt from a
            SEG); ``None``: highdicom takes it from ``datasets[0]``.
    """

    series_instance_uid: str
    datasets: tuple[Dataset, ...]
    acquisition_equipment: Dataset | None = None

    @classmethod
    def of(cls, volume: CtVolume | SrSource) -> SrSource:
        """The source of a loaded CT volume (or ``volume`` itself)."""
        if isinstance(volume, SrSource):
            return volume
        return cls(volume.series.series_instance_uid, volume.datasets)


@dataclass(frozen=True, slots=True)
class SegReference:
    """What the report takes from the SEG it references.

    Attributes:
        sop_class_uid: the SEG's SOPClassUID.
        sop_instance_uid: the SEG's SOPInstanceUID.
        source_series_uid: the CT series the SEG segments.
        segments: segment number per tracking identifier (``GGO``, ``Consolidation`` when
            the model has that channel, then the lungs found).
        algorithms: ``(name, version)`` of each segment's algorithm, by tracking identifier.
    """

    sop_class_uid: str
    sop_instance_uid: str
    source_series_uid: str
    segments: dict[str, int]
    algorithms: dict[str, tuple[str, str]]


def _rounded(value: float, decimals: int) -> float | None:
    """``value`` as the CSV prints it with ``decimals`` (``None``: an empty cell)."""
    if not math.isfinite(value):
        return None
    return float(format(value, f".{decimals}f"))


_Row = tuple[str, str, Code, Code, float | None, int, Code | None]


_LESION_COLUMNS = (  # column, group, percent (else volume), laterality
    ("consolidation_volume_ml", CONSOLIDATION_TRACKING_ID, False, None),
    ("right_consolidation_volume_ml", CONSOLIDATION_TRACKING_ID, False, codes.SCT.Right),
    ("left_consolidation_volume_ml", CONSOLIDATION_TRACKING_ID, False, codes.SCT.Left),
    ("consolidation_percent_of_lung", CONSOLIDATION_TRACKING_ID, True, BOTH_LUNGS),
    ("lesion_volume_ml", LESION_TRACKING_ID, False, None),
    ("lesion_percent_of_lung", LESION_TRACKING_ID, True, BOTH_LUNGS),
    ("right_lesion_percent", LESION_TRACKING_ID, True, codes.SCT.Right),
    ("left_lesion_percent", LESION_TRACKING_ID, True, codes.SCT.Left),
)


def _lesion_rows(consolidation: ConsolidationMeasurement) -> list[_Row]:
    """The consolidation and lesion values (a per-lung value is ``None`` without the lungs)."""
    return [
        (column, group, PERCENT_CONCEPT, PERCENT_UNIT, getattr(consolidation, column),
         PERCENT_DECIMALS, laterality)
        if percent else
        (column, group, VOLUME_CONCEPT, ML_UNIT, getattr(consolidation, column),
         VOLUME_DECIMALS, laterality)
        for column, group, percent, laterality in _LESION_COLUMNS
    ]


def reported_values(
    measurement: GgoMeasurement,
    lungs: LungMeasurement | None,
    consolidation: ConsolidationMeasurement | None = None,
) -> tuple[ReportedValue, ...]:
    """The report's measurements, rounded as the CSV prints them.

    Args:
        measurement: the series' GGO volumetry.
        lungs: the lung volumetry; ``None`` without a lung mask (GGO volume only).
        consolidation: the consolidation and lesion volumetry of a model with a consolidation
            channel; ``None``: not reported (a one-channel model's report is unchanged).

    Returns:
        Values in report order (GGO, consolidation, lesion, lungs); undefined percentages (a
        lung of volume 0) and per-lung values without the lungs are left out.
    """
    right, left = (lung.label for lung in LUNG_SEGMENTS)
    rows: list[_Row] = [
        ("ggo_volume_ml", GGO_TRACKING_ID, VOLUME_CONCEPT, ML_UNIT, measurement.ggo_volume_ml,
         VOLUME_DECIMALS, None),
    ]
    if lungs is not None:
        rows += [
            ("right_ggo_volume_ml", GGO_TRACKING_ID, VOLUME_CONCEPT, ML_UNIT,
             lungs.right_ggo_volume_ml, VOLUME_DECIMALS, codes.SCT.Right),
            ("left_ggo_volume_ml", GGO_TRACKING_ID, VOLUME_CONCEPT, ML_UNIT,
             lungs.left_ggo_volume_ml, VOLUME_DECIMALS, codes.SCT.Left),
            ("ggo_percent_of_lung", GGO_TRACKING_ID, PERCENT_CONCEPT, PERCENT_UNIT,
             lungs.ggo_percent_of_lung, PERCENT_DECIMALS, BOTH_LUNGS),
            ("right_ggo_percent", GGO_TRACKING_ID, PERCENT_CONCEPT, PERCENT_UNIT,
             lungs.right_ggo_percent, PERCENT_DECIMALS, codes.SCT.Right),
            ("left_ggo_percent", GGO_TRACKING_ID, PERCENT_CONCEPT, PERCENT_UNIT,
             lungs.left_ggo_percent, PERCENT_DECIMALS, codes.SCT.Left),
        ]
    if consolidation is not None:
        rows += _lesion_rows(consolidation)
    if lungs is not None:
        rows += [
            ("right_lung_volume_ml", right, VOLUME_CONCEPT, ML_UNIT, lungs.right_lung_volume_ml,
             VOLUME_DECIMALS, None),
            ("left_lung_volume_ml", left, VOLUME_CONCEPT, ML_UNIT, lungs.left_lung_volume_ml,
             VOLUME_DECIMALS, None),
        ]
    values = []
    for column, group, concept, unit, raw, decimals, laterality in rows:
        value = None if raw is None else _rounded(raw, decimals)
        if value is not None:
            values.append(ReportedValue(column, group, concept, unit, value, laterality))
    return tuple(values)


def _codes_equal(seq: Sequence[Dataset] | None, code: Code) -> bool:
    """Whether the first item of a code sequence is ``code`` (value and scheme)."""
    if not seq:
        return False
    return bool(
        seq[0].CodeValue == code.value and seq[0].CodingSchemeDesignator == code.scheme_designator
    )


def consolidation_spec(model: ModelInfo) -> SegmentSpec | None:
    """The model's consolidation segment (``None``: the model has no such channel)."""
    channel = consolidation_channel(model.segments)
    return None if channel is None else model.segments[channel]


def _is_segment(item: Dataset, spec: SegmentSpec) -> bool:
    """Whether a SEG's segment item is the model channel ``spec`` (label and property type)."""
    return bool(item.SegmentLabel == spec.label) and _codes_equal(
        item.get("SegmentedPropertyTypeCodeSequence"), spec.property_type
    )


def seg_reference(seg: Dataset, model: ModelInfo) -> SegReference:
    """Find the GGO, consolidation and lung segments of a ggo-cli SEG by their codes.

    Args:
        seg: the SEG (as written, or read back).
        model: the model; its channel 0 is the GGO segment, its consolidation channel
            (:func:`consolidation_spec`) the consolidation segment.

    Returns:
        The SEG's identity, segment numbers and algorithms.

    Raises:
        ValueError: the SEG has no segment coded as the model's GGO (a caller bug).
    """
    ggo_spec = model.segments[0]
    cons_spec = consolidation_spec(model)
    segments: dict[str, int] = {}
    algorithms: dict[str, tuple[str, str]] = {}
    for item in seg.SegmentSequence:
        key = None
        if _is_segment(item, ggo_spec):
            key = GGO_TRACKING_ID
        elif cons_spec is not None and _is_segment(item, cons_spec):
            key = CONSOLIDATION_TRACKING_ID
        for lung in LUNG_SEGMENTS:
            if _codes_equal(
                item.get("SegmentedPropertyTypeCodeSequence"), lung.property_type
            ) and _codes_equal(
                item.get("SegmentedPropertyTypeModifierCodeSequence"), lung.laterality
            ):
                key = lung.label
        if key is None or key in segments:
            continue
        segments[key] = int(item.SegmentNumber)
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        algorithms[key] = (str(algorithm.AlgorithmName), str(algorithm.AlgorithmVersion))
    if GGO_TRACKING_ID not in segments:
        raise ValueError(f"the SEG has no segment {ggo_spec.label!r} coded as the model's GGO")
    return SegReference(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        source_series_uid=str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID),
        segments=segments,
        algorithms=algorithms,
    )


def _group(
    key: str,
    values: Sequence[ReportedValue],
    ref: SegReference,
    *,
    finding: Code,
    category: Code,
    site: hd.sr.FindingSite,
    tracking_seed: str,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """One TID 1411 group: the measurements of one referenced segment."""
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking_identifier(key, tracking_seed),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=ref.sop_class_uid,
            sop_instance_uid=ref.sop_instance_uid,
            segment_number=ref.segments[key],
            source_series=hd.sr.SourceSeriesForSegmentation(ref.source_series_uid),
        ),
        finding_type=finding,
        finding_category=category,
        finding_sites=[site],
        algorithm_id=algorithm_identification(ref, key),
        measurements=measurements(values),
    )


def measurements(values: Sequence[ReportedValue]) -> list[hd.sr.Measurement]:
    """The TID 300 measurements of ``values`` (a lateral value's finding site: Lung, its
    laterality)."""
    return [
        hd.sr.Measurement(
            name=value.concept,
            value=value.value,
            unit=value.unit,
            finding_sites=(
                [hd.sr.FindingSite(LUNG_SITE, laterality=value.laterality)]
                if value.laterality is not None
                else None
            ),
        )
        for value in values
    ]


def tracking_identifier(key: str, tracking_seed: str) -> hd.sr.TrackingIdentifier:
    """A group's tracking identifier and its UID, unique to the report."""
    return hd.sr.TrackingIdentifier(
        uid=str(generate_uid(entropy_srcs=[_TRACKING_UID_NAMESPACE, tracking_seed, key])),
        identifier=key,
    )


def algorithm_identification(ref: SegReference, key: str) -> hd.sr.AlgorithmIdentification:
    """The Algorithm Identification (TID 4019) the SEG records for segment ``key``."""
    name, version = ref.algorithms[key]
    return hd.sr.AlgorithmIdentification(name=name, version=version)


def segment_groups(
    values: Sequence[ReportedValue], ref: SegReference, model: ModelInfo, *, tracking_seed: str
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """The TID 1411 groups of the report: one per segment measured, in the order of ``values``
    (the lesion's values are left to :func:`ggo_cli.writers.sr_change.lesion_group`).

    Args:
        values: from :func:`reported_values`.
        ref: from :func:`seg_reference`.
        model: the model (the GGO and consolidation findings' codes).
        tracking_seed: makes the tracking UIDs unique to this report (its SOP Instance UID).

    Returns:
        The groups.

    Raises:
        ValueError: a value belongs to a segment the SEG does not have (lungs measured but
            no lung segments: a caller bug).
    """
    ggo_spec, cons_spec = model.segments[0], consolidation_spec(model)
    groups = []
    for key in dict.fromkeys(value.group for value in values):
        if key == LESION_TRACKING_ID:  # two segments united: not a TID 1411 group
            continue
        if key not in ref.segments:
            raise ValueError(f"{key} measured, but the SEG has no {key} segment")
        site = hd.sr.FindingSite(LUNG_SITE)
        if key == GGO_TRACKING_ID:
            finding, category = ggo_spec.property_type, ggo_spec.property_category
        elif key == CONSOLIDATION_TRACKING_ID and cons_spec is not None:
            finding, category = cons_spec.property_type, cons_spec.property_category
        else:
            lung = next(spec for spec in LUNG_SEGMENTS if spec.label == key)
            site = hd.sr.FindingSite(LUNG_SITE, laterality=lung.laterality)
            finding, category = lung.property_type, lung.category
        members = [value for value in values if value.group == key]
        groups.append(
            _group(key, members, ref, finding=finding, category=category, site=site,
                   tracking_seed=tracking_seed)
        )
    return groups
