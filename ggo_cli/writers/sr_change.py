"""The groups of a ggo-cli measurement report (TID 1500) that reference no segment (TID 1501):
the lesion, and the change since the prior study: what they hold, how each item is coded.

The lesion (a model with a consolidation channel, :func:`lesion_group`): GGO or consolidation
per voxel (the masks are exclusive, :mod:`ggo_cli.analysis.measurements`), the CSV's
``lesion_volume_ml``, ``lesion_percent_of_lung``, ``right_lesion_percent`` and
``left_lesion_percent`` to the printed digit, coded as the GGO group's values (volume: SCT
118565006 in ml; percentages: SCT 118586006 "Ratio" in %, with the Finding Site Lung and its
laterality). Tracking Identifier ``Lesion``, finding (52988006, SCT, "Lesion"), category the
GGO's (49755003, SCT, "Morphologically abnormal structure"), finding site Lung, and the GGO
segment's Algorithm Identification (TID 4019; both segments come from the one model). It is a
TID 1501 "Measurement and Qualitative Evaluation Group" and not a TID 1411 group: the lesion is
the union of two SEG segments, while TID 1411 references exactly one region (its Referenced
Segment row has VM 1, and highdicom's volumetric group requires one region reference). TID
1500's Imaging Measurements container holds TID 1501 groups beside TID 1410 and 1411 (DICOM
PS3.16, TID 1500 and TID 1501), and TID 1501 measures without an image reference; the two
segments it unites are referenced by the report's GGO and Consolidation groups. dciodvfy
accepts it, and highdicom reads it back as an image measurement group.

A study's representative series that has a prior study (:mod:`ggo_cli.run.followup`) gets one
more group in the report's Imaging Measurements: a TID 1501 "Measurement and Qualitative
Evaluation Group" (TID 1500 row "Measurement Group"; it measures two studies, so it references
no segment). Its values are the CSV's follow-up cells (:func:`change_values`), to the printed
digit. Coding (DICOM PS3.16; a private code only where no standard concept fits):

- Tracking Identifier ``GGO change since prior study``, a Tracking UID of its own; finding
  type, category and site, and the Algorithm Identification (TID 4019), are the GGO group's.
- ``days_since_prior``: NUM (DAYS-SINCE-PRIOR, 99GGO, "Days since prior study"), unit (d, UCUM,
  "day"). The standard's "Longitudinal Temporal Offset from Event" (128740, DCM) of TID 1502
  (Time Point Context) is an offset from a protocol event named by an event type (128741,
  DCM), not the interval between two studies.
- ``ggo_change_ml``: NUM (GGO-VOL-CHANGE, 99GGO, "GGO volume change since prior study"), unit
  (ml, UCUM). No standard concept names a signed change of a volume; (118565006, SCT, "Volume")
  would let a viewer show a negative number as the GGO volume.
- ``ggo_percent_of_lung_change``: NUM (GGO-PCT-CHANGE, 99GGO, "GGO percent of lung change since
  prior study"), unit (%, UCUM), in percentage points, with the Finding Site Lung, Right and
  left, as ``ggo_percent_of_lung``.
- ``consolidation_change_ml`` (a model with a consolidation channel, where both studies have
  it): NUM (CONS-VOL-CHANGE, 99GGO, "Consolidation volume change since prior study"), unit
  (ml, UCUM), for the reason ``ggo_change_ml`` has a private code.
- ``lesion_percent_of_lung_change`` (idem): NUM (LESION-PCT-CHANGE, 99GGO, "Lesion percent of
  lung change since prior study"), unit (%, UCUM), in percentage points, with the Finding Site
  Lung, Right and left. Both are left out where the CSV's cell is empty, so a one-channel
  model's group (and the SR's UIDs) are as before.
- ``trend``: a qualitative evaluation (TID 1501 row "Qualitative Evaluations", CODE), concept
  (GGO-TREND, 99GGO, "GGO trend since prior study"), value a SNOMED CT qualifier:
  ``increased`` (35105006, SCT, "Increased"), ``decreased`` (1250004, SCT, "Decreased"),
  ``stable`` (58158008, SCT, "Stable"). Left out when the trend is undefined.
- The prior study: a CONTAINER (121066, DCM, "Prior Procedure Descriptions", a CID 7001
  report heading) at the end of the group, holding the UIDREF (110180, DCM, "Study Instance
  UID") and the DATE (111060, DCM, "Study Date") of the prior study. TID 1501 lists no row
  for another study, so this is an extension of the template (the Comprehensive 3D SR IOD
  allows CONTAINER, UIDREF and DATE under CONTAINS; dciodvfy accepts it and highdicom reads
  the group back). The prior study's representative SEG is also listed in the SR's Pertinent
  Other Evidence Sequence (SR Document General Module, PS3.3 C.17.2), where highdicom puts
  every evidence item of another study.

The private codes use the coding scheme designator ``99GGO`` (a private designator begins
with "99", PS3.3 section 8.2), identified in the SR's Coding Scheme Identification Sequence
(:func:`private_scheme_item`); dciodvfy warns that it does not know the designator.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from ..domain import Trend
from ..onnx.model_info import ModelInfo
from .report_csv import PERCENT_DECIMALS, VOLUME_DECIMALS
from .sr_content import (
    BOTH_LUNGS,
    GGO_TRACKING_ID,
    LESION_TRACKING_ID,
    LUNG_SITE,
    ML_UNIT,
    PERCENT_UNIT,
    ReportedValue,
    SegReference,
    algorithm_identification,
    measurements,
    tracking_identifier,
)

PRIVATE_SCHEME = "99GGO"
PRIVATE_SCHEME_NAME = "ggo-cli measurement codes"
PRIVATE_SCHEME_ORGANIZATION = "ggo-cli"
DAYS_SINCE_PRIOR = Code("DAYS-SINCE-PRIOR", PRIVATE_SCHEME, "Days since prior study")
GGO_VOLUME_CHANGE = Code("GGO-VOL-CHANGE", PRIVATE_SCHEME, "GGO volume change since prior study")
GGO_PERCENT_CHANGE = Code(
    "GGO-PCT-CHANGE", PRIVATE_SCHEME, "GGO percent of lung change since prior study"
)
CONSOLIDATION_VOLUME_CHANGE = Code(
    "CONS-VOL-CHANGE", PRIVATE_SCHEME, "Consolidation volume change since prior study"
)
LESION_PERCENT_CHANGE = Code(
    "LESION-PCT-CHANGE", PRIVATE_SCHEME, "Lesion percent of lung change since prior study"
)
LESION_FINDING = Code("52988006", "SCT", "Lesion")
GGO_TREND = Code("GGO-TREND", PRIVATE_SCHEME, "GGO trend since prior study")
DAY_UNIT = codes.UCUM.Day
TREND_CODES: dict[Trend, Code] = {
    Trend.INCREASED: Code("35105006", "SCT", "Increased"),
    Trend.DECREASED: Code("1250004", "SCT", "Decreased"),
    Trend.STABLE: Code("58158008", "SCT", "Stable"),
}
PRIOR_STUDY = codes.DCM.PriorProcedureDescriptions
STUDY_UID_CONCEPT = codes.DCM.StudyInstanceUID
STUDY_DATE_CONCEPT = codes.DCM.StudyDate
CHANGE_TRACKING_ID = "GGO change since prior study"
_TRACKING_UID_NAMESPACE = "ggo-cli/sr-change-tracking/v1"


@dataclass(frozen=True, slots=True)
class SrComparison:
    """What the SR of a study's representative series reports of the change since the prior.

    Attributes:
        prior_study_instance_uid: the prior study's StudyInstanceUID.
        prior_study_date: its StudyDate.
        days_since_prior: days between the two StudyDates.
        ggo_change_ml: GGO mL now minus then (the CSV's digits), ``None`` when unknown.
        ggo_percent_of_lung_change: GGO percent of lung now minus then, percentage points,
            ``None`` when undefined.
        trend: the trend word, ``None`` when undefined.
        prior_seg_series_instance_uid: the prior representative's SEG series (Pertinent Other
            Evidence); ``""``: not listed.
        prior_seg_sop_instance_uid: that SEG's SOPInstanceUID; ``""``: not listed.
        consolidation_change_ml: consolidation mL now minus then, ``None`` when unknown (a
            one-channel model, or a study without the value).
        lesion_percent_of_lung_change: lesion percent of lung now minus then, percentage
            points, ``None`` when unknown or undefined.
    """

    prior_study_instance_uid: str
    prior_study_date: dt.date
    days_since_prior: int
    ggo_change_ml: Decimal | None
    ggo_percent_of_lung_change: Decimal | None
    trend: Trend | None
    prior_seg_series_instance_uid: str = ""
    prior_seg_sop_instance_uid: str = ""
    consolidation_change_ml: Decimal | None = None
    lesion_percent_of_lung_change: Decimal | None = None

    def uid_entropy(self) -> list[str]:
        """Everything the comparison adds to the report, as text for the SR's UIDs."""
        return [
            f"prior_study_instance_uid={self.prior_study_instance_uid}",
            f"prior_study_date={self.prior_study_date.isoformat()}",
            f"trend={'' if self.trend is None else self.trend.value}",
            f"prior_seg={self.prior_seg_series_instance_uid}/{self.prior_seg_sop_instance_uid}",
            *(f"{v.column}={v.value!r}" for v in change_values(self)),
        ]


def _printed(value: Decimal, decimals: int) -> float:
    """A change as the CSV prints it (``decimals`` places), as a float."""
    return float(value.quantize(Decimal(1).scaleb(-decimals)) + 0)


def change_values(comparison: SrComparison) -> tuple[ReportedValue, ...]:
    """The numbers of the change group, in report order; an unknown change is left out."""
    values = [
        ReportedValue("days_since_prior", CHANGE_TRACKING_ID, DAYS_SINCE_PRIOR, DAY_UNIT,
                      float(comparison.days_since_prior)),
    ]
    if comparison.ggo_change_ml is not None:
        values.append(ReportedValue("ggo_change_ml", CHANGE_TRACKING_ID, GGO_VOLUME_CHANGE,
                                    ML_UNIT, _printed(comparison.ggo_change_ml, VOLUME_DECIMALS)))
    if comparison.ggo_percent_of_lung_change is not None:
        values.append(ReportedValue(
            "ggo_percent_of_lung_change", CHANGE_TRACKING_ID, GGO_PERCENT_CHANGE, PERCENT_UNIT,
            _printed(comparison.ggo_percent_of_lung_change, PERCENT_DECIMALS), BOTH_LUNGS,
        ))
    if comparison.consolidation_change_ml is not None:
        values.append(ReportedValue(
            "consolidation_change_ml", CHANGE_TRACKING_ID, CONSOLIDATION_VOLUME_CHANGE, ML_UNIT,
            _printed(comparison.consolidation_change_ml, VOLUME_DECIMALS),
        ))
    if comparison.lesion_percent_of_lung_change is not None:
        values.append(ReportedValue(
            "lesion_percent_of_lung_change", CHANGE_TRACKING_ID, LESION_PERCENT_CHANGE,
            PERCENT_UNIT, _printed(comparison.lesion_percent_of_lung_change, PERCENT_DECIMALS),
            BOTH_LUNGS,
        ))
    return tuple(values)


def prior_evidence(comparison: SrComparison) -> list[Dataset]:
    """The prior representative's SEG as an evidence item (none when not known)."""
    if not (comparison.prior_seg_series_instance_uid and comparison.prior_seg_sop_instance_uid):
        return []
    item = Dataset()
    item.StudyInstanceUID = comparison.prior_study_instance_uid
    item.SeriesInstanceUID = comparison.prior_seg_series_instance_uid
    item.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    item.SOPInstanceUID = comparison.prior_seg_sop_instance_uid
    return [item]


def private_scheme_item() -> Dataset:
    """The Coding Scheme Identification Sequence item of the ``99GGO`` scheme."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_ORGANIZATION
    return item


def change_group(
    comparison: SrComparison, ref: SegReference, model: ModelInfo, *, tracking_seed: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of the change since the prior study (see the module docstring).

    Args:
        comparison: what to report.
        ref: the SEG of this series (the GGO segment's algorithm identification).
        model: the model (the GGO finding's codes).
        tracking_seed: makes the tracking UID unique to this report (its SOP Instance UID).
    """
    ggo = model.segments[0]
    evaluations = (
        None
        if comparison.trend is None
        else [hd.sr.QualitativeEvaluation(GGO_TREND, TREND_CODES[comparison.trend])]
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=str(generate_uid(entropy_srcs=[_TRACKING_UID_NAMESPACE, tracking_seed])),
            identifier=CHANGE_TRACKING_ID,
        ),
        finding_type=ggo.property_type,
        finding_category=ggo.property_category,
        finding_sites=[hd.sr.FindingSite(LUNG_SITE)],
        algorithm_id=algorithm_identification(ref, GGO_TRACKING_ID),
        measurements=measurements(change_values(comparison)),
        qualitative_evaluations=evaluations,
    )
    prior = hd.sr.ContainerContentItem(
        name=PRIOR_STUDY, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    prior.ContentSequence = hd.sr.ContentSequence([
        hd.sr.UIDRefContentItem(
            name=STUDY_UID_CONCEPT,
            value=comparison.prior_study_instance_uid,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
        hd.sr.DateContentItem(
            name=STUDY_DATE_CONCEPT,
            value=comparison.prior_study_date,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
    ])
    group[0].ContentSequence.append(prior)
    return group


def lesion_group(
    values: Sequence[ReportedValue], ref: SegReference, model: ModelInfo, *, tracking_seed: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations | None:
    """The TID 1501 group of the lesion (see the module docstring); ``None`` without lesion
    values (a one-channel model).

    Args:
        values: the report's values (:func:`ggo_cli.writers.sr_content.reported_values`); only
            those of the ``Lesion`` group are taken.
        ref: the SEG of this series (the GGO segment's algorithm identification).
        model: the model (the GGO finding's category).
        tracking_seed: makes the tracking UID unique to this report (its SOP Instance UID).
    """
    lesion = [value for value in values if value.group == LESION_TRACKING_ID]
    if not lesion:
        return None
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking_identifier(LESION_TRACKING_ID, tracking_seed),
        finding_type=LESION_FINDING,
        finding_category=model.segments[0].property_category,
        finding_sites=[hd.sr.FindingSite(LUNG_SITE)],
        algorithm_id=algorithm_identification(ref, GGO_TRACKING_ID),
        measurements=measurements(lesion),
    )
