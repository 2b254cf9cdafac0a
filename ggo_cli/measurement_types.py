"""The measurements of a series as typed values: its volumetry (GGO, the lungs, consolidation)
and its change since the patient's prior study.

Frozen dataclasses, re-exported by :mod:`ggo_cli.domain` (import them from either);
:class:`~ggo_cli.domain.SeriesOutcome` carries a series' measurements.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class GgoMeasurement:
    """GGO volumetry of one series.

    Attributes:
        voxel_volume_ml: volume of one voxel in mL.
        ggo_voxels: number of GGO voxels.
        ggo_volume_ml: ``ggo_voxels * voxel_volume_ml``.
        ggo_slice_count: slices with at least one GGO voxel.
    """

    voxel_volume_ml: float
    ggo_voxels: int
    ggo_volume_ml: float
    ggo_slice_count: int


@dataclass(frozen=True, slots=True)
class LungMeasurement:
    """Lung volumes and the GGO share of each lung.

    Percentages are ``100 * GGO mL / lung mL`` and count only GGO inside that lung; they are
    ``nan`` (undefined, not "no involvement") when the lung's volume is 0.

    Attributes:
        lung_volume_ml: both lungs, mL (``left + right``).
        left_lung_volume_ml: left lung, mL.
        right_lung_volume_ml: right lung, mL.
        ggo_percent_of_lung: GGO inside both lungs as a percentage of ``lung_volume_ml``.
        left_ggo_volume_ml: GGO inside the left lung, mL.
        right_ggo_volume_ml: GGO inside the right lung, mL.
        left_ggo_percent: ``left_ggo_volume_ml`` as a percentage of the left lung.
        right_ggo_percent: ``right_ggo_volume_ml`` as a percentage of the right lung.
    """

    lung_volume_ml: float
    left_lung_volume_ml: float
    right_lung_volume_ml: float
    ggo_percent_of_lung: float
    left_ggo_volume_ml: float
    right_ggo_volume_ml: float
    left_ggo_percent: float
    right_ggo_percent: float


@dataclass(frozen=True, slots=True)
class ConsolidationMeasurement:
    """Consolidation and lesion (GGO or consolidation) volumetry of one series, for a model
    with a consolidation channel; the masks are exclusive, so ``lesion = GGO + consolidation``
    (:mod:`ggo_cli.analysis.measurements`: which channel, the lesion rule).

    Lung fields are ``None`` without the lung mask; a percentage is ``nan`` (undefined) when its
    lung's volume is 0, as in :class:`LungMeasurement`.

    Attributes:
        consolidation_voxels: number of consolidation voxels.
        consolidation_volume_ml: ``consolidation_voxels * voxel_volume_ml``.
        consolidation_slice_count: slices with at least one consolidation voxel.
        lesion_voxels: GGO voxels + consolidation voxels.
        lesion_volume_ml: ``lesion_voxels * voxel_volume_ml``.
        left_consolidation_volume_ml: consolidation inside the left lung, mL.
        right_consolidation_volume_ml: consolidation inside the right lung, mL.
        consolidation_percent_of_lung: consolidation inside both lungs, percent of both.
        lesion_percent_of_lung: lesion inside both lungs, percent of both.
        left_lesion_percent: lesion inside the left lung, percent of the left lung.
        right_lesion_percent: lesion inside the right lung, percent of the right lung.
    """

    consolidation_voxels: int
    consolidation_volume_ml: float
    consolidation_slice_count: int
    lesion_voxels: int
    lesion_volume_ml: float
    left_consolidation_volume_ml: float | None = None
    right_consolidation_volume_ml: float | None = None
    consolidation_percent_of_lung: float | None = None
    lesion_percent_of_lung: float | None = None
    left_lesion_percent: float | None = None
    right_lesion_percent: float | None = None


class Trend(StrEnum):
    """The ``trend`` word: how GGO percent of lung changed since the prior study."""

    INCREASED = "increased"
    DECREASED = "decreased"
    STABLE = "stable"


@dataclass(frozen=True, slots=True)
class Comparison:
    """A study's representative series against the prior study's.

    Attributes:
        prior_study_date: the prior study's StudyDate.
        days_since_prior: days between the two StudyDates (> 0).
        ggo_change_ml: GGO mL now minus then; ``None`` when either is missing.
        ggo_percent_of_lung_change: GGO percent of lung now minus then (percentage points);
            ``None`` when either is undefined.
        trend: the :class:`Trend`; ``None`` when the percentage change is undefined.
        consolidation_change_ml: consolidation mL now minus then; ``None`` unless both
            studies have it (a model with a consolidation channel).
        lesion_percent_of_lung_change: lesion (GGO + consolidation) percent of lung now minus
            then (percentage points); ``None`` unless both studies have it.
    """

    prior_study_date: dt.date
    days_since_prior: int
    ggo_change_ml: Decimal | None
    ggo_percent_of_lung_change: Decimal | None
    trend: Trend | None
    consolidation_change_ml: Decimal | None = None
    lesion_percent_of_lung_change: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Followup:
    """The follow-up of one series.

    Attributes:
        representative: whether the series represents its study (``None``: not analysed or
            not linkable, so never compared).
        comparison: against the prior study; only for a representative that has a prior.
    """

    representative: bool | None = None
    comparison: Comparison | None = None


@dataclass(frozen=True, slots=True)
class TrendPoint:
    """One study on a patient's trend picture: its representative series.

    Attributes:
        study_date: StudyDate.
        ggo_percent_of_lung: GGO percent of lung of the representative series.
        series_instance_uid: the representative series (its folder holds the picture when the
            point is the latest).
    """

    study_date: dt.date
    ggo_percent_of_lung: Decimal
    series_instance_uid: str
