"""The lung mask's coarse grid: the whole-volume steps of
:func:`ggo_cli.analysis.lungs.segment_lungs` on cells of whole voxels, the answer painted back
on the source grid with the air threshold deciding the voxels along each lung's edge.

A cell groups ``factors`` voxels per axis (:func:`coarse_factors`: edges up to
``COARSE_CELL_MM``; an axis with coarser voxels keeps them). From the count of air voxels in
each cell (:func:`air_counts`, the only full-resolution pass before the painting):

* the body, the lungs' components and the refinement see a cell as air only when all its
  voxels are: a tissue voxel anywhere in a cell keeps a thin wall (the anterior junction, a
  bronchus wall) between the air on either side;
* the airways are tracked in the cells at least half air (a lumen at its extent, joining
  the lung in a slice about where it does on the source grid), and before the refinement
  each lung takes in the cells next to it at least half air, so that the closing starts
  from the lung's extent, not from a cell inside it.

:func:`cell_codes` and :func:`paint` then write the source grid: a refined lung's cells are
lung on all their voxels (vessels, the closing's additions) but for its edge cells that it
held before the refinement, where, as in the cells next to it (26-connected; not near the
other lung, inside the body, outside the airway), the voxels below the threshold are lung.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..domain import HuArray

BoolVolume = npt.NDArray[np.bool_]
Box = tuple[slice, slice, slice]

COARSE_CELL_MM = 2.1
"""Largest cell edge (voxels grouped by whole numbers per axis; an axis with coarser voxels
keeps them): 2 x 3 x 3 voxels of a 0.8 mm series of 0.7 mm pixels (1.6 x 2.1 x 2.1 mm),
1 x 3 x 3 on thick slices. At 1.6 (2 x 2 x 2 voxels) the 300-slice lung mask took 1.2 to
1.35 core-seconds, not 0.7, for a real-series Dice of 0.9955 against 0.9938 (issue 18)."""
CELL_SLABS = 16
"""Cell slices pooled or painted at a time (a few MB of full-resolution temporaries)."""

# Codes of a cell (cell_codes).
_LOW, _HIGH, _LOW_RIM, _HIGH_RIM = 1, 2, 3, 4


def coarse_factors(spacing: tuple[float, float, float]) -> list[int]:
    """Voxels per cell along ``(slice, row, col)``: the most whose cell edge stays within
    ``COARSE_CELL_MM`` (1 where a voxel is already that coarse)."""
    return [max(1, int(COARSE_CELL_MM / s + 1e-6)) for s in spacing]


def cell_shape(shape: tuple[int, ...], factors: list[int]) -> tuple[int, int, int]:
    """The cell grid's shape: ``ceil(shape / factors)`` per axis."""
    n = [-(-size // f) for size, f in zip(shape, factors, strict=True)]
    return n[0], n[1], n[2]


def air_counts(hu: HuArray, threshold: np.float32, factors: list[int]) -> (
    npt.NDArray[np.uint8]
):
    """Voxels below ``threshold`` in each cell (a cell past the volume's end counts its
    voxels inside; at most 255 voxels a cell).

    The threshold runs on :data:`CELL_SLABS` cell slices at a time: no full-size mask.

    Args:
        hu: the volume. Shape: ``(slice, row, col)``.
        threshold: upper HU of air.
        factors: voxels per cell along each axis.

    Returns:
        The counts. Shape: :func:`cell_shape`.
    """
    counts = np.zeros(cell_shape(hu.shape, factors), dtype=np.uint8)
    for start in range(0, counts.shape[0], CELL_SLABS):
        stop = min(start + CELL_SLABS, counts.shape[0])
        pooled = np.less(hu[start * factors[0] : stop * factors[0]], threshold).view(np.uint8)
        for axis, f in enumerate(factors):
            if f > 1:
                parts = [pooled[(slice(None),) * axis + (slice(j, None, f),)] for j in range(f)]
                summed = parts[0].copy()
                for part in parts[1:]:
                    summed[(slice(None),) * axis + (slice(0, part.shape[axis]),)] += part
                pooled = summed
        counts[start:stop] = pooled
    return counts


def cell_hu(hu: HuArray, k: int, factors: list[int], rows: slice, cols: slice) -> (
    npt.NDArray[np.float64]
):
    """Mean HU of each cell of cell slice ``k``, in a box of cell rows and columns (a cell
    past the volume's edge: the mean of its voxels inside)."""
    fz, fy, fx = factors
    r0, r1 = rows.start * fy, min(rows.stop * fy, hu.shape[1])
    c0, c1 = cols.start * fx, min(cols.stop * fx, hu.shape[2])
    part = hu[k * fz : (k + 1) * fz, r0:r1, c0:c1]
    ny, nx = rows.stop - rows.start, cols.stop - cols.start
    sums = np.zeros((ny * fy, nx * fx))
    counts = np.zeros((ny * fy, nx * fx))
    sums[: r1 - r0, : c1 - c0] = part.sum(axis=0, dtype=np.float64)
    counts[: r1 - r0, : c1 - c0] = part.shape[0]
    cell_sums = sums.reshape(ny, fy, nx, fx).sum(axis=(1, 3))
    cell_counts = np.maximum(counts.reshape(ny, fy, nx, fx).sum(axis=(1, 3)), 1.0)
    return np.asarray(cell_sums / cell_counts, dtype=np.float64)


def dilate_cells(mask: BoolVolume) -> BoolVolume:
    """Dilation by one cell in each of the 26 directions (a 3 x 3 x 3 cube), separable."""
    out = mask.copy()
    for axis in range(3):
        grown = out.copy()
        lead = [slice(None)] * 3
        lag = [slice(None)] * 3
        lead[axis], lag[axis] = slice(1, None), slice(None, -1)
        grown[tuple(lead)] |= out[tuple(lag)]
        grown[tuple(lag)] |= out[tuple(lead)]
        out = grown
    return out


def expand_cells(cells: npt.NDArray[np.uint8], factors: list[int]) -> npt.NDArray[np.uint8]:
    """Each cell on all its voxels: shape ``cells.shape * factors`` (uncropped).

    Columns are doubled or quadrupled as 2- or 4-byte words of equal bytes (a twentieth of a
    6-D broadcast's time); rows and slices repeat whole rows.
    """
    fz, fy, fx = factors
    cols: npt.NDArray[np.uint8]
    if fx == 2:
        cols = np.multiply(cells, 0x0101, dtype=np.uint16).view(np.uint8)
    elif fx == 4:
        cols = np.multiply(cells, 0x01010101, dtype=np.uint32).view(np.uint8)
    elif fx > 1:
        cols = np.repeat(cells, fx, axis=2)
    else:
        cols = cells
    n, r, c = cols.shape
    out = np.empty((n, fz, r, fy, c), dtype=np.uint8)
    out[...] = cols[:, None, :, None, :]
    return out.reshape(n * fz, r * fy, c)


def cell_codes(lungs: tuple[BoolVolume, BoolVolume], refined: tuple[BoolVolume, BoolVolume],
               allowed: BoolVolume) -> npt.NDArray[np.uint8]:
    """How :func:`paint` fills each cell of two refined coarse lungs (module docstring).

    A refined lung's cells are lung on all their voxels, but for those on its edge that the
    lung held before the refinement (they straddle its wall): there, and in the cells next
    to the lung (not near the other, inside ``allowed``), the voxels below the threshold.

    Args:
        lungs: the lungs at low and at high columns before the refinement. Shape: the box's.
        refined: the refined lungs (disjoint, each holding its lung). Shape: the box's.
        allowed: cells the lungs may hold (inside the body, outside the airway). Shape: the
            box's.

    Returns:
        Per cell 0 (neither lung), 1 or 2 (all the voxels of the lung at low or at high
        columns), 3 or 4 (their air voxels). Shape: the box's.
    """
    code = np.zeros(allowed.shape, dtype=np.uint8)
    near = [dilate_cells(lung) for lung in lungs]
    for side in (0, 1):
        lung, done, other = lungs[side], refined[side], refined[1 - side]
        whole_code, air_code = (_LOW, _LOW_RIM) if side == 0 else (_HIGH, _HIGH_RIM)
        rim = near[side] & ~near[1 - side] & allowed & ~done & ~other
        code[rim] = air_code
        edge = done & ~_erode_cells(done) & lung
        code[done] = whole_code
        code[edge] = air_code
    return code


def _erode_cells(mask: BoolVolume) -> BoolVolume:
    """Erosion by one cell in the 26 directions (cells past the edges count as set)."""
    return np.logical_not(dilate_cells(np.logical_not(mask)))


def paint(out_low: BoolVolume, out_high: BoolVolume, hu: HuArray, threshold: np.float32,
          factors: list[int], box: Box, code: npt.NDArray[np.uint8]) -> None:
    """Write the lungs' voxels by their cells' codes (:func:`cell_codes`).

    :data:`CELL_SLABS` cell slices at a time, each lung only within the rows and columns
    its codes reach in the slab, and only its True voxels written: pages of the outputs
    that stay False are never touched.

    Args:
        out_low: the source-grid mask of the lung at low columns (all False in the box).
        out_high: that of the lung at high columns.
        hu: the volume. Shape: ``(slice, row, col)``, as the outputs.
        threshold: upper HU of air.
        factors: voxels per cell along each axis.
        box: the cells ``code`` covers (cell indices).
        code: the cells' codes.
    """
    fz, fy, fx = factors
    shape = hu.shape
    for start in range(0, code.shape[0], CELL_SLABS):
        part = code[start : start + CELL_SLABS]
        for out, whole, rim in ((out_low, _LOW, _LOW_RIM), (out_high, _HIGH, _HIGH_RIM)):
            mine = (part == whole) | (part == rim)
            rows = np.flatnonzero(mine.any(axis=(0, 2)))
            cols = np.flatnonzero(mine.any(axis=(0, 1)))
            if not rows.size:
                continue
            cells = part[:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            z0 = (box[0].start + start) * fz
            r0 = (box[1].start + int(rows[0])) * fy
            c0 = (box[2].start + int(cols[0])) * fx
            z1 = min(z0 + cells.shape[0] * fz, shape[0])
            r1 = min(r0 + cells.shape[1] * fy, shape[1])
            c1 = min(c0 + cells.shape[2] * fx, shape[2])
            voxels = expand_cells(cells, factors)[: z1 - z0, : r1 - r0, : c1 - c0]
            lung = np.less(hu[z0:z1, r0:r1, c0:c1], threshold)
            lung &= voxels == rim
            lung |= voxels == whole
            # Only the True voxels are written: a page with none stays uncommitted.
            np.copyto(out[z0:z1, r0:r1, c0:c1], lung, where=lung)
