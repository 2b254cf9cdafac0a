"""Quality flags per series: conditions under which a series' volumes deserve a second look.

A flag never changes a measurement or a status; it names a reason to review the series. The
flags of a series go into the CSV ``qc_flags`` column (``;``-separated, empty when none), its
INFO line, ``--json``, the run manifest and the run summary ("review these").

Rules, in the fixed order of :class:`QcFlag` (thresholds below, each with its reason):

1. ``thick_slices``: slice spacing (from the slice positions) above 5.0 mm (0.01 mm allowed
   for the rounding of positions).
2. ``lung_volume_out_of_range``: both lungs outside 2000..9000 mL, or either lung outside
   700..5000 mL (lung mask only).
3. ``lung_at_fov_edge``: a lung voxel in the outermost row or column of the image, or
   4-adjacent (in-plane) to a pixel outside the reconstructed circle (at or below -1500 HU)
   (lung mask only).
4. ``lung_at_scan_end``: the first or the last slice holds a lung section of at least 25 % of
   the largest lung section of the series (lung mask only).
5. ``ggo_outside_lungs``: the lung mask removed at least 25 % of the predicted GGO voxels and
   at least 1.0 mL.
6. ``low_confidence``: of at least 100 predicted GGO voxels (before the lung restriction),
   more than 50 % have a probability below ``t + 0.1`` (GGO is ``p > t`` for the threshold
   ``t``); on the model's grid decided on the logits, below ``logit(t + 0.1)``.
7. ``variant_unchecked``: the model variant that ran (not the shipped float32 graph) was not
   checked numerically against float32 on this machine.

:func:`series_flags` is the rule set, a pure function of :class:`QcFacts`;
:func:`lung_coverage` measures the lung masks' geometry it needs, and :func:`assess_series`
gathers the facts of one computed series.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..domain import CtVolume, GgoMeasurement, HuArray, LungMeasurement, Prediction

if TYPE_CHECKING:  # the lung module (SimpleITK) is not needed to run the rules
    from .lungs import LungMasks


class QcFlag(StrEnum):
    """Quality flags of a series, in their fixed reporting order (CSV names, snake_case)."""

    THICK_SLICES = "thick_slices"
    LUNG_VOLUME_OUT_OF_RANGE = "lung_volume_out_of_range"
    LUNG_AT_FOV_EDGE = "lung_at_fov_edge"
    LUNG_AT_SCAN_END = "lung_at_scan_end"
    GGO_OUTSIDE_LUNGS = "ggo_outside_lungs"
    LOW_CONFIDENCE = "low_confidence"
    VARIANT_UNCHECKED = "variant_unchecked"


QC_SEPARATOR = ";"
"""Separates flag names in the CSV cell and the log line."""

# The training slices' thickness is not recorded (COVID-SemiSeg is a set of display images).
# Thin-section CT (<= 1.5 mm) is the norm for assessing GGO (Fleischner Society glossary and
# recommendations), and partial-volume averaging over slices thicker than 5 mm blurs faint GGO
# into the lung around it. 5 mm (the thickest routine chest reconstruction) is this project's
# decision, not a published limit.
MAX_SLICE_SPACING_MM = 5.0
# Positions are written with a few decimals: a 5 mm series whose computed spacing rounds to
# 5.000001 mm is not thicker than 5 mm.
SLICE_SPACING_ROUNDING_MM = 0.01

# Adult total lung capacity is about 4-7 L (Stocks & Quanjer, Eur Respir J 1995, reference
# values); CT at full inspiration measures about that. The bounds leave room for small adults
# and expiratory scans on the low side and for hyperinflation (emphysema) on the high side; a
# value outside them suggests a failed lung mask, a partial scan or a non-adult patient.
TOTAL_LUNG_MIN_ML = 2000.0
TOTAL_LUNG_MAX_ML = 9000.0
# One lung holds about 45 % (left) to 55 % (right) of the total.
SINGLE_LUNG_MIN_ML = 700.0
SINGLE_LUNG_MAX_ML = 5000.0

# Pixels outside the reconstructed circle are stored as a padding value far below air
# (-1000 HU): commonly -2000 or -3024 HU after the modality transform. Real tissue, air and
# noise stay above -1500 HU. A lung touching that padding (or the image border) is cut by the
# field of view, and the lung mask drops lung cut that way (see ggo_cli/analysis/lungs.py).
FOV_PADDING_MAX_HU = -1500.0

# A lung section on the first or last slice of at least a quarter of the largest section means
# the scan stops inside the lungs (apex and base taper to small sections), so lung volumes and
# GGO percentages are too low.
SCAN_END_MIN_AREA_FRACTION = 0.25

# The lung mask drops GGO calls outside both lungs (table, bowel, body surface). A large share
# dropped points to a failed lung mask (real lung lost) or a model misfiring outside the chest;
# the volume floor keeps a few stray voxels from flagging.
GGO_OUTSIDE_MIN_FRACTION = 0.25
GGO_OUTSIDE_MIN_ML = 1.0

# A probability within 0.1 above the threshold is a marginal call: if most of the GGO rests on
# such calls, a small shift in the image (kernel, dose, scanner) moves the volume a lot. Fewer
# than 100 voxels are too few for a share to mean anything.
NEAR_THRESHOLD_BAND = 0.1
LOW_CONFIDENCE_MIN_FRACTION = 0.5
LOW_CONFIDENCE_MIN_VOXELS = 100

_COVERAGE_SLAB_SLICES = 32  # slices examined at a time: bounded temporaries


@dataclass(frozen=True, slots=True)
class LungCoverage:
    """How the lung masks sit in the scanned volume.

    Attributes:
        at_fov_edge: a lung voxel lies in the outermost row or column of its slice or next
            (4-adjacent) to a pixel outside the reconstructed circle.
        end_area_fraction: the larger of the first and last slice's lung area as a fraction of
            the largest slice's lung area (0 when no lung is found).
    """

    at_fov_edge: bool
    end_area_fraction: float


@dataclass(frozen=True, slots=True)
class QcFacts:
    """What the quality rules look at, for one series.

    Attributes:
        slice_spacing_mm: distance between slice centres from positions, mm.
        voxel_volume_ml: volume of one voxel, mL.
        lungs: lung volumes; ``None`` with ``--no-lung-mask`` (lung rules not applied).
        coverage: the lung masks' geometry; ``None`` with ``--no-lung-mask``.
        predicted_ggo_voxels: GGO voxels the model predicted, before the lung restriction.
        kept_ggo_voxels: GGO voxels after the lung restriction (``predicted_ggo_voxels``
            without the lung mask).
        near_threshold_voxels: predicted GGO voxels with a probability below the threshold +
            :data:`NEAR_THRESHOLD_BAND`, before the lung restriction.
        variant_checked: whether the model variant that ran was checked against float32 on
            this machine (always true of float32 itself).
    """

    slice_spacing_mm: float
    voxel_volume_ml: float
    lungs: LungMeasurement | None
    coverage: LungCoverage | None
    predicted_ggo_voxels: int
    kept_ggo_voxels: int
    near_threshold_voxels: int
    variant_checked: bool


def series_flags(facts: QcFacts) -> tuple[QcFlag, ...]:
    """The quality flags of one series (rules and thresholds: module docstring).

    Args:
        facts: the series' measured values.

    Returns:
        The flags raised, in :class:`QcFlag` order; empty when nothing is flagged.
    """
    raised: set[QcFlag] = set()
    if facts.slice_spacing_mm > MAX_SLICE_SPACING_MM + SLICE_SPACING_ROUNDING_MM:
        raised.add(QcFlag.THICK_SLICES)
    if facts.lungs is not None and _lung_volume_out_of_range(facts.lungs):
        raised.add(QcFlag.LUNG_VOLUME_OUT_OF_RANGE)
    if facts.coverage is not None:
        if facts.coverage.at_fov_edge:
            raised.add(QcFlag.LUNG_AT_FOV_EDGE)
        if facts.coverage.end_area_fraction >= SCAN_END_MIN_AREA_FRACTION:
            raised.add(QcFlag.LUNG_AT_SCAN_END)
    predicted = facts.predicted_ggo_voxels
    removed = max(predicted - facts.kept_ggo_voxels, 0)
    if (
        removed > 0
        and removed >= GGO_OUTSIDE_MIN_FRACTION * predicted
        and removed * facts.voxel_volume_ml >= GGO_OUTSIDE_MIN_ML
    ):
        raised.add(QcFlag.GGO_OUTSIDE_LUNGS)
    if (
        predicted >= LOW_CONFIDENCE_MIN_VOXELS
        and facts.near_threshold_voxels > LOW_CONFIDENCE_MIN_FRACTION * predicted
    ):
        raised.add(QcFlag.LOW_CONFIDENCE)
    if not facts.variant_checked:
        raised.add(QcFlag.VARIANT_UNCHECKED)
    return tuple(flag for flag in QcFlag if flag in raised)


def _lung_volume_out_of_range(lungs: LungMeasurement) -> bool:
    """Whether the total or either lung's volume lies outside its plausible adult range."""
    if not TOTAL_LUNG_MIN_ML <= lungs.lung_volume_ml <= TOTAL_LUNG_MAX_ML:
        return True
    return any(
        not SINGLE_LUNG_MIN_ML <= volume_ml <= SINGLE_LUNG_MAX_ML
        for volume_ml in (lungs.left_lung_volume_ml, lungs.right_lung_volume_ml)
    )


def lung_coverage(hu: HuArray, lungs: LungMasks) -> LungCoverage:
    """Measure whether the lungs reach the field of view's edge or the scan's ends.

    Works through the volume a slab of slices at a time (bounded temporaries); about 0.2 s
    for 300 x 512 x 512 voxels with padding outside the circle on the 2-core CI-like machine.

    Args:
        hu: Hounsfield units. Shape: ``(slices, rows, cols)``.
        lungs: the lung masks. Shape: each as ``hu``.

    Returns:
        The coverage facts.

    Raises:
        ValueError: the shapes differ.
    """
    if lungs.right.shape != hu.shape or lungs.left.shape != hu.shape:
        raise ValueError(
            f"lung shapes {lungs.right.shape}, {lungs.left.shape} differ from the "
            f"HU shape {hu.shape}"
        )
    n = hu.shape[0]
    areas = np.zeros(n, dtype=np.int64)
    at_edge = False
    for start in range(0, n, _COVERAGE_SLAB_SLICES):
        z = slice(start, start + _COVERAGE_SLAB_SLICES)
        both = np.logical_or(lungs.right[z], lungs.left[z])
        areas[z] = np.count_nonzero(both, axis=(1, 2))
        if not at_edge and areas[z].any():
            at_edge = _touches_fov_edge(both, hu[z])
    largest = int(areas.max()) if n else 0
    fraction = max(int(areas[0]), int(areas[-1])) / largest if largest else 0.0
    return LungCoverage(at_fov_edge=at_edge, end_area_fraction=fraction)


def _touches_fov_edge(both: npt.NDArray[np.bool_], hu: HuArray) -> bool:
    """Whether lung voxels of a slab lie on the image border or beside FOV padding (in-plane)."""
    if both[:, 0, :].any() or both[:, -1, :].any() or both[:, :, 0].any() or both[:, :, -1].any():
        return True
    outside = hu <= FOV_PADDING_MAX_HU
    if not outside.any():
        return False
    near = outside.copy()
    near[:, 1:, :] |= outside[:, :-1, :]
    near[:, :-1, :] |= outside[:, 1:, :]
    near[:, :, 1:] |= outside[:, :, :-1]
    near[:, :, :-1] |= outside[:, :, 1:]
    return bool(np.logical_and(near, both).any())


def assess_series(
    volume: CtVolume,
    prediction: Prediction,
    measurement: GgoMeasurement,
    *,
    lungs: LungMasks | None,
    lung_measurement: LungMeasurement | None,
    variant_checked: bool,
) -> tuple[QcFlag, ...]:
    """The quality flags of a computed series.

    Args:
        volume: the CT volume.
        prediction: the prediction (its GGO counts from before the lung restriction).
        measurement: GGO volumetry after the lung restriction.
        lungs: the lung masks; ``None`` with ``--no-lung-mask``.
        lung_measurement: lung volumes; ``None`` with ``--no-lung-mask``.
        variant_checked: the segmenter's ``variant_checked``.

    Returns:
        The flags, in :class:`QcFlag` order.
    """
    coverage = lung_coverage(volume.hu, lungs) if lungs is not None else None
    return series_flags(
        QcFacts(
            slice_spacing_mm=volume.slice_spacing_mm,
            voxel_volume_ml=volume.voxel_volume_ml,
            lungs=lung_measurement if lungs is not None else None,
            coverage=coverage,
            predicted_ggo_voxels=prediction.predicted_ggo_voxels,
            kept_ggo_voxels=measurement.ggo_voxels,
            near_threshold_voxels=prediction.near_threshold_voxels,
            variant_checked=variant_checked,
        )
    )


def near_threshold_logit(threshold: float) -> float:
    """The logit of ``threshold + NEAR_THRESHOLD_BAND``: below it a GGO call is marginal.

    Args:
        threshold: the probability threshold ``t``, ``0 < t < 1``.

    Returns:
        ``ln(p / (1 - p))`` for ``p = t + 0.1``; ``inf`` when ``p >= 1`` (every call marginal).
    """
    upper = threshold + NEAR_THRESHOLD_BAND
    return math.inf if upper >= 1.0 else math.log(upper / (1.0 - upper))


def format_flags(flags: Iterable[str]) -> str:
    """Flag names joined for the CSV cell and the log line (``""`` when none)."""
    return QC_SEPARATOR.join(flags)


def parse_flags(cell: str) -> tuple[str, ...]:
    """Flag names from a CSV cell (``""``, or missing in an older store: none)."""
    return tuple(name for name in (part.strip() for part in cell.split(QC_SEPARATOR)) if name)
