"""Steps 3 and 4 of :func:`ggo_cli.analysis.lungs.segment_lungs`: the trachea and main
bronchi tracked slice by slice, and the two lungs among the components of the remaining air
(a merged pair cut at its junction). Method and limits: :mod:`ggo_cli.analysis.lungs`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK

from . import morphology as morph

log = logging.getLogger(__name__)

# SimpleITK ships without type hints: calls go through an Any alias, so that mypy --strict
# still checks everything around them.
sitk: Any = SimpleITK

AIRWAY_SEED_MAX_MEAN_HU = -800.0  # a trachea averages about -850 HU even on 8 mm slices
AIRWAY_MAX_AREA_MM2 = 1200.0  # adult trachea or main bronchus section: 2-6 cm^2
AIRWAY_SEED_MAX_BODY_FRACTION = 0.04  # adult trachea: about 2 % of the neck or chest section
AIRWAY_SEED_MAX_OFFSET_MM = 30.0  # from the body's centre column
AIRWAY_GROWTH_LIMIT = 2.0  # bronchi narrow: a larger region is lung cut off by vessels
SECOND_LUNG_MIN_FRACTION = 0.1  # of the largest component's voxels
MERGED_SIDE_MIN_FRACTION = 0.15  # share of a component's voxels on its minority side
SPLIT_DEPTHS_MM = (1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 18.0)  # erosions tried on a merged pair

BoolVolume = morph.BoolVolume


def track_airways(candidates: BoolVolume, hu: Callable[[int], npt.NDArray[Any]],
                   body_area: npt.NDArray[np.intp],
                   spacing: tuple[float, float, float], centre_col: float, *,
                   head_is_last: bool) -> BoolVolume:
    """Trachea and main bronchi: small air regions tracked down from the head end.

    ``body_area`` is the body's voxel count per slice; ``hu(k)`` is slice ``k``'s HU; ``hu``
    and ``candidates`` may be a box of the volume, with ``centre_col`` in the box's columns.
    """
    n, _, cols = candidates.shape
    max_pixels = AIRWAY_MAX_AREA_MM2 / (spacing[1] * spacing[2])
    airway = np.zeros_like(candidates)
    previous: BoolVolume | None = None
    seeding, largest_seed = True, 0.0
    for k in range(n - 1, -1, -1) if head_is_last else range(n):
        labels = morph.component_labels(candidates[k])
        areas = np.bincount(labels.ravel())
        small = areas <= max_pixels
        small[0] = False
        keep = np.zeros_like(small)
        if previous is not None:
            overlaps = np.bincount(labels[previous], minlength=areas.size) > 0
            keep |= small & overlaps & (areas <= AIRWAY_GROWTH_LIMIT * largest_seed)
        if seeding:
            safe = np.maximum(areas, 1)
            col = np.bincount(labels.ravel(), np.tile(np.arange(cols, dtype=float),
                                                      labels.shape[0])) / safe
            mean_hu = np.bincount(labels.ravel(), hu(k).ravel().astype(float)) / safe
            seeds = (small & (areas <= AIRWAY_SEED_MAX_BODY_FRACTION * int(body_area[k]))
                     & (np.abs(col - centre_col) * spacing[2] <= AIRWAY_SEED_MAX_OFFSET_MM)
                     & (mean_hu <= AIRWAY_SEED_MAX_MEAN_HU))
            keep |= seeds
            largest_seed = max([largest_seed, *areas[seeds].tolist()])
            seeding = bool(small[1:].all())  # lungs become large: no new seeds below
        if not keep.any():
            if seeding:
                continue
            break
        airway[k] = previous = keep[labels]
    return airway


def find_lungs(candidates: BoolVolume, spacing: tuple[float, float, float],
                centre_col: float) -> tuple[BoolVolume, BoolVolume]:
    """The lung at low columns and the one at high columns (either may be empty)."""
    components = morph.ranked_components(candidates)
    sizes = np.asarray([0, *components.sizes])  # index = rank + 1, as a bincount would give
    empty = np.zeros_like(candidates)
    if sizes.size < 2:
        return empty, empty.copy()
    middle = int(round(centre_col))
    first = components.mask(0)
    low_share = np.count_nonzero(first[..., :middle]) / sizes[1]
    if min(low_share, 1.0 - low_share) >= MERGED_SIDE_MIN_FRACTION:
        log.debug("lungs merged in one component: splitting at the junction")
        return _split(first, spacing, centre_col)
    second = empty
    if sizes.size > 2 and sizes[2] >= SECOND_LUNG_MIN_FRACTION * sizes[1]:
        second = components.mask(1)
        if (low_share >= 0.5) == (np.count_nonzero(second[..., :middle]) >= sizes[2] / 2):
            second = empty  # both on one side: the smaller one is not a lung
    return (first, second) if low_share >= 0.5 else (second, first)


def _split(merged: BoolVolume, spacing: tuple[float, float, float], centre_col: float) -> (
    tuple[BoolVolume, BoolVolume]
):
    """Cut a merged pair: erode until no core straddles the midline, then grow the cores of
    each side back by a marker watershed on the distance map."""
    box, pad = morph.padded_box(merged, [1, 1, 1])
    crop = np.pad(merged[box], pad)
    depth_mm = morph.distance_mm(~crop, spacing)
    low_cols = np.broadcast_to(np.arange(crop.shape[2]) - pad[2][0] + box[2].start < centre_col,
                               crop.shape).ravel()
    for depth in SPLIT_DEPTHS_MM:
        labels = morph.component_labels(depth_mm > depth)
        sizes = np.maximum(np.bincount(labels.ravel()), 1)
        low_share = np.bincount(labels.ravel(), low_cols) / sizes
        # Erode until no core straddles the midline; every core then marks its side's lung.
        if np.any(np.minimum(low_share, 1 - low_share)[1:] >= MERGED_SIDE_MIN_FRACTION):
            continue
        side = np.where(low_share >= 0.5, 1, 2).astype(np.uint32)
        side[0] = 0
        totals = [sizes[side == i].sum() for i in (1, 2)]
        if min(totals) < SECOND_LUNG_MIN_FRACTION * max(totals):
            continue
        grown = np.asarray(sitk.GetArrayFromImage(sitk.MorphologicalWatershedFromMarkers(
            morph.to_image(-depth_mm), morph.to_image(side[labels]), markWatershedLine=False,
            fullyConnected=False)))
        low, high = (morph.uncrop((grown == i) & crop, box, pad, merged.shape) for i in (1, 2))
        return low, high
    # No thin junction (e.g. a block): split where the columns hold half the voxels each.
    log.debug("merged lungs did not separate by erosion; splitting at the median column")
    per_col = np.count_nonzero(merged, axis=(0, 1)).cumsum()
    low = merged.copy()
    low[..., int(np.searchsorted(per_col, per_col[-1] / 2)) + 1:] = False
    return low, merged & ~low
