"""Step 5 of :func:`ggo_cli.analysis.lungs.segment_lungs`: dense lung kept in, per lung.

A 3-D closing with a ``CLOSING_RADIUS_MM`` ball (vessels, nodules up to about 2 cm, hilum),
3-D hole filling (consolidation surrounded by lung), and per slice the bites between the lung
and its convex hull (consolidation on the chest wall), each extended up to ``BITE_REACH_MM``
past the hull chord to a curved chest wall; a bite within ``MEDIAL_GUARD_DEG`` of the medial
direction is mediastinum, not lung. Details and limits: :mod:`ggo_cli.analysis.lungs`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK

from . import morphology as morph

# SimpleITK ships without type hints: calls go through an Any alias, so that mypy --strict
# still checks everything around them.
sitk: Any = SimpleITK

CLOSING_RADIUS_MM = 10.0
BITE_REACH_MM = 15.0
BITE_SLICES = 16
"""Slices whose chest-wall bites are found in one labelling."""
MEDIAL_GUARD_DEG = 60.0

BoolVolume = morph.BoolVolume


def refine_lung(lung: BoolVolume, other: BoolVolume, allowed: BoolVolume,
                spacing: tuple[float, float, float], *, medial_sign: float,
                cores: int) -> BoolVolume:
    """Close, fill holes and fill chest-wall bites of one lung (module docstring), on the grid
    it is given (the source's, or the coarse cells of :mod:`ggo_cli.analysis.lung_coarse`).

    Args:
        lung: the lung's air voxels. Shape: ``(slices, rows, cols)``.
        other: the other lung, never entered. Shape: as ``lung``.
        allowed: where the lung may grow (inside the body, outside the airway). Shape: as
            ``lung``.
        spacing: ``(slice, row, col)`` voxel spacing in mm.
        medial_sign: 1.0 when the mediastinum lies at higher columns than this lung, -1.0
            when at lower ones.
        cores: the cores its slice-by-slice work may use (:attr:`ggo_cli.host.HostLimits.cores`).

    Returns:
        The refined lung, a new array. Shape: as ``lung``.
    """
    if not lung.any():
        return lung.copy()
    # Pad so that background surrounds the lung by the closing radius also where it touches
    # the first or last slice: the closing then never adds voxels at the volume's edges.
    box, pad = morph.padded_box(lung, [int(math.ceil(CLOSING_RADIUS_MM / s)) + 1 for s in spacing])
    crop = np.pad(lung[box], pad)
    limit = np.pad(allowed[box] & ~other[box], pad)
    closed = close_ball(crop, spacing)
    grown = (closed & limit) | crop
    grown = (morph.fill_holes(grown) & limit) | crop
    grown |= _fill_bites(grown, limit, spacing, medial_sign=medial_sign, cores=cores)
    return morph.uncrop(grown, box, pad, lung.shape)


def close_ball(mask: BoolVolume, spacing: tuple[float, float, float]) -> BoolVolume:
    """Closing with a ``CLOSING_RADIUS_MM`` ball: dilation then erosion, each a threshold of an
    exact distance map in mm.

    Args:
        mask: the lung, with background of at least the radius plus a voxel on every side.
            Shape: ``(slices, rows, cols)``.
        spacing: ``(slice, row, col)`` voxel spacing in mm.

    Returns:
        The closed mask. Shape: as ``mask``.
    """
    dilated = morph.distance_mm(mask, spacing) <= CLOSING_RADIUS_MM
    return morph.distance_mm(~dilated, spacing) > CLOSING_RADIUS_MM


def _fill_bites(lung: BoolVolume, limit: BoolVolume, spacing: tuple[float, float, float], *,
                medial_sign: float, cores: int) -> BoolVolume:
    """Chest-wall bites of each slice, extended from the hull chord out to the chest wall."""
    # A bite voxel must have lung beneath and above it: a diaphragm dome or the heart has not.
    below = np.logical_or.accumulate(lung, axis=0)
    above = np.logical_or.accumulate(lung[::-1], axis=0)[::-1]
    limit = limit & below & above & ~lung
    bites = np.zeros_like(lung)

    def bite(index: int) -> None:
        block = np.s_[index * BITE_SLICES : (index + 1) * BITE_SLICES]
        bites[block] = _bites(lung[block], spacing, medial_sign=medial_sign)
        bites[block] &= limit[block]

    morph.each_slice(bite, -(-lung.shape[0] // BITE_SLICES), cores=cores)
    if not bites.any():
        return bites
    # A curved chest wall bulges beyond the hull chord: extend each bite in its slice over the
    # allowed voxels connected to it, up to BITE_REACH_MM away.
    # All of it happens within the reach of the bites: in their box grown by that reach in
    # the slice plane (bites are few; dilating the whole crop took 0.2 s a lung).
    radius = [int(math.ceil(BITE_REACH_MM / s)) for s in (spacing[2], spacing[1])] + [0]
    box = morph.bounding_box(bites, [0, radius[1], radius[0]])
    seeds = np.ascontiguousarray(bites[box])
    near = morph.to_mask(sitk.BinaryDilate(morph.to_image(seeds), radius, sitk.sitkBall))
    reach = seeds | (near & limit[box])
    del near
    bites[box] = morph.Components(lambda z: reach[z], reach.shape[0],
                                  sized=False).touching(seeds)
    return bites


def _bites(block: BoolVolume, spacing: tuple[float, float, float], *,
           medial_sign: float) -> BoolVolume:
    """Concave regions between each slice's lung section and its convex hull that face the
    chest wall, for a block of slices.

    The regions of all the block's slices are labelled in one call: the slices are the rows
    of one tall 2-D image, a background row between each two, so that no region crosses
    slices (the same regions as labelling slice by slice, in raster order).
    """
    n, n_rows, n_cols = block.shape
    present: BoolVolume = np.asarray(block.any(axis=2))
    first = block.argmax(axis=2)
    last = n_cols - 1 - block[..., ::-1].argmax(axis=2)
    # Per row, the hull's first and last columns (none: rows outside the section's).
    low = np.full((n, n_rows), np.inf)
    high = np.full((n, n_rows), -np.inf)
    r = np.arange(n_rows)
    for k in np.flatnonzero(present.any(axis=1)).tolist():
        rows = np.flatnonzero(present[k])
        span = np.s_[int(rows[0]) : int(rows[-1]) + 1]
        low[k, span] = np.ceil(np.interp(r[span], *hull_envelope(
            rows, first[k, rows], lower=True)) - 1e-6)
        high[k, span] = np.floor(np.interp(r[span], *hull_envelope(
            rows, last[k, rows], lower=False)) + 1e-6)
    c = np.arange(n_cols)
    tall = np.zeros((n, n_rows + 1, n_cols), dtype=np.bool_)
    regions = tall[:, 1:]
    np.greater_equal(c, low[..., None], out=regions)
    regions &= c <= high[..., None]
    regions &= ~block
    labels = morph.component_labels(tall.reshape(-1, n_cols)).reshape(tall.shape)
    del tall, regions
    # Direction from each section's centroid to each region's centroid, in mm (sums of whole
    # pixel indices: exact, as the means of np.nonzero's indices per slice were).
    area = np.count_nonzero(block, axis=(1, 2))
    safe_area = np.maximum(area, 1)
    centre_row = (np.count_nonzero(block, axis=2) @ r) / safe_area
    centre_col = (np.count_nonzero(block, axis=1) @ c) / safe_area
    flat = labels.ravel()
    where = np.flatnonzero(flat)
    found = flat[where]
    m = int(found.max(initial=0)) + 1
    counts = np.maximum(np.bincount(found, minlength=m), 1)
    tall_row, col_of = np.divmod(where, n_cols)
    slice_of, row_of = np.divmod(tall_row, n_rows + 1)
    row_of -= 1
    slice_of_label = np.zeros(m, dtype=np.intp)
    slice_of_label[found] = slice_of
    d_row = (np.bincount(found, row_of, m) / counts - centre_row[slice_of_label]) * spacing[1]
    d_col = (np.bincount(found, col_of, m) / counts - centre_col[slice_of_label]) * spacing[2]
    medial = d_col * medial_sign > math.cos(math.radians(MEDIAL_GUARD_DEG)) * np.hypot(
        d_row, d_col)
    keep = ~medial
    keep[0] = False
    for k in np.flatnonzero(area).tolist():  # the region around the centroid: a ringed dome
        keep[labels[k, int(round(float(centre_row[k]))) + 1,
                    int(round(float(centre_col[k])))]] = False
    out = np.empty(block.shape, dtype=np.bool_)
    for k in range(n):  # slice by slice: np.take's index copy stays a slice's
        np.take(keep, labels[k, 1:], out=out[k])
    return out


def hull_envelope(x: npt.NDArray[np.int64], y: npt.NDArray[np.int64], *, lower: bool) -> (
    tuple[list[float], list[float]]
):
    """Vertices of the lower (convex minorant) or upper (concave majorant) hull of points
    sorted by ``x`` (Andrew's monotone chain)."""
    sign = 1 if lower else -1
    # A point on or beyond the chord of its two neighbours is no vertex: drop such points in
    # whole-array passes first, so that the loop below sees few (the same vertices result).
    x, y = np.asarray(x, dtype=np.int64), np.asarray(y, dtype=np.int64)
    while x.size > 2:
        turn = (x[1:-1] - x[:-2]) * (y[2:] - y[:-2]) - (y[1:-1] - y[:-2]) * (x[2:] - x[:-2])
        inner = sign * turn <= 0
        if not inner.any():
            break
        keep = np.ones(x.size, dtype=np.bool_)
        keep[1:-1] = ~inner
        x, y = x[keep], y[keep]
    hx: list[float] = []
    hy: list[float] = []
    for xi, yi in zip(x.tolist(), y.tolist(), strict=True):
        while len(hx) >= 2 and sign * ((hx[-1] - hx[-2]) * (yi - hy[-2])
                                       - (hy[-1] - hy[-2]) * (xi - hx[-2])) <= 0:
            hx.pop()
            hy.pop()
        hx.append(float(xi))
        hy.append(float(yi))
    return hx, hy
