"""Right and left lung masks from CT density alone (no network), and GGO per lung.

Method of :func:`segment_lungs`, with distances in mm (SimpleITK). Steps 2 to 5 run on a
grid of cells of whole voxels, up to 2.1 mm an edge (2 x 3 x 3 voxels of a 0.8 mm series of
0.7 mm pixels, 1 x 3 x 3 on thick slices; :mod:`ggo_cli.analysis.lung_coarse`): a cell is
air when all its voxels are, and the airways are tracked in the cells at least half air.
The refined lungs are painted back on the source grid, where the threshold decides each
lung's edge cells and the cells next to it. ``exact=True`` runs every step on the source
grid: the reference the default is tested against (``tests/analysis/test_lung_agreement.py``:
each lung's Dice >= 0.99 and volume within 1 %).

1. **Air**: voxels below ``threshold_hu`` (-320 HU). GGO (about -750 to -300 HU) is air-like.
2. **Body**: the largest 3-D component of non-air voxels, holes filled slice by slice. Air
   outside it (room air, air touching the image border, air in the table) is dropped.
3. **Trachea and main bronchi**, tracked slice by slice from the head end. Seeds: air regions
   under 12 cm^2 and 4 % of the body's section, averaging below -800 HU, within 30 mm of the
   body's centre column, sought until the lungs appear. Below, a region overlapping the
   tracked airway is airway while it stays under twice the largest seed; a branch ends where
   its bronchus joins lung in the slice (the hilum), so intrapulmonary airways stay lung.
4. **Lungs**: 3-D components of the remaining air. The largest is one lung and the second
   the other, if it lies on the other side of the body's centre and has 10 % of the voxels
   of the largest. A largest component with 15 % of its voxels on each side is a merged
   pair: it is eroded (distance map) until no core straddles the midline, and the cores of
   each side grow back by a marker watershed on the distance map, which cuts at the thin
   anterior or posterior junction. A junction too thick to erode is cut at the column that
   halves the voxels.
5. **Dense lung kept in**, per lung (on cells, from the lung's cells and the cells next to
   them at least half air): a 3-D closing with a 10 mm ball (vessels, nodules up
   to about 2 cm, hilum); 3-D hole filling (consolidation
   surrounded by lung); and per slice the bites between the lung and its convex hull
   (consolidation on the chest wall), each extended up to 15 mm past the hull chord to a
   curved chest wall. A bite voxel needs lung beneath and above it in its column (a
   diaphragm dome or the heart has none), and a bite within 60 degrees of the medial
   direction from the lung's centroid is mediastinum, not lung. Nothing is added outside
   the body, in the other lung or in the tracked airway. Holes are not filled slice by
   slice: near the base a lung section rings the liver dome (47 mL of liver on the demo
   phantom).
   This step is :func:`ggo_cli.analysis.lung_refine.refine_lung`.

Laterality: the patient's right is at low column indices when the row cosine points to +x
(``ImageOrientationPatient`` ``[1, 0, 0, ...]``) and at high ones when it points to -x.

Speed: a 300 x 512 x 512 series (0.8 mm slices, 0.7 mm pixels) takes 0.68 core-seconds on
the 2-core CI-like machine, 4.19 with every step on the source grid (ddbdca7, the closing
already on cells); a 1000-slice one 2.9 against 13.7 (medians of alternating fresh runs of
``benchmarks/lung_mask_time.py --planes 1`` under ``taskset -c 0``, other work running).
About half of it is the closing's four distance maps on the cells; the source grid is read
twice (the cells' air counts, the painting). The slice-by-slice steps label blocks of
slices in one call, as rows of one tall 2-D image with background between slices.

Memory: the whole-volume steps hold cell arrays (a sixth to an eighteenth of the voxels);
the source grid is thresholded 16 cell slices at a time, never as a whole-volume mask.
Connected components are labelled 64 slices at a time and merged across slabs
(:class:`ggo_cli.analysis.morphology.Components`); after the body everything works in a box
around the air inside the body; the result is written into caller-given arrays (the SEG's
planes), only its True voxels, so that pages it leaves False stay unmapped. A 1000-slice
series peaks at 1220 MiB, int16 HU (500 MiB) and the two lung planes' written pages
included, against 1447 to 1477 at ddbdca7 (``lung_mask_time.py --repeats 0 --planes 1``).

Limits:
    * Consolidation or effusion along a lung's whole dependent rim (no aerated lung along
      the chest wall on either side of it) is lost: without a rib-cage model it cannot be
      told from the chest wall. Consolidation resting on the diaphragm or beside the
      mediastinum is kept only within the 10 mm closing; a lung with no aerated part is lost.
    * After pneumonectomy, or with one lung under 10 % of the other, one mask is empty.
    * Axial series only; a lung cut by the field of view (air on the image border) is lost.
    * Bowel gas merged with a lung base, or a trachea touching a lung apex in a slice (thick
      slices), stays in the mask.
    * Noise that pushes soft tissue below -320 HU speckles the masks (Gaussian noise of SD
      150 HU kept phantom volumes within 1 % of the truth; low-dose streaks are untested).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK

from ..domain import CtVolume
from ..errors import UnsupportedSeriesError
from ..host import usable_cores
from . import lung_coarse as coarse
from . import morphology as morph
from .lung_parts import find_lungs, track_airways
from .lung_refine import CLOSING_RADIUS_MM, refine_lung

log = logging.getLogger(__name__)

# SimpleITK ships without type hints: calls go through an Any alias, so that mypy --strict
# still checks everything around them.
sitk: Any = SimpleITK

LUNG_THRESHOLD_HU = -320.0  # aerated lung and GGO below; soft tissue, consolidation above
BODY_FILL_SLICES = 16  # slices a labelling of the body's holes: 16 x 512 x 512 uint32, 17 MB

BoolVolume = morph.BoolVolume


@dataclass(frozen=True, slots=True)
class LungMasks:
    """The two lungs on the source voxel grid.

    Attributes:
        right: the patient's right lung. Shape: ``(slices, rows, cols)``.
        left: the patient's left lung (disjoint from ``right``). Shape: as ``right``.
    """

    right: BoolVolume
    left: BoolVolume

    @property
    def both(self) -> BoolVolume:
        """Both lungs. Shape: ``(slices, rows, cols)``."""
        return np.logical_or(self.right, self.left)


def segment_lungs(
    volume: CtVolume,
    *,
    threshold_hu: float = LUNG_THRESHOLD_HU,
    out: LungMasks | None = None,
    cores: int | None = None,
    exact: bool = False,
) -> LungMasks:
    """Segment the right and left lungs of a chest CT (method and limits: module docstring).

    Args:
        volume: the CT; its first header gives the orientation (laterality, head end).
        threshold_hu: upper density of aerated lung in HU.
        out: all-False bool arrays (or views, e.g. of the SEG's planes) to write the masks
            into; only the lungs' box is written, so untouched zero pages stay uncommitted.
        cores: the cores it may use (:attr:`ggo_cli.host.HostLimits.cores`); ``None``: every
            usable core of this process.
        exact: run step 5's closing on the source grid (the reference its default coarse
            grid is tested against; about 20 times the closing's work on thin slices).

    Returns:
        Disjoint right and left masks (either may be empty when no lung is found); ``out``
        when given. Shape: each ``volume.hu.shape``.

    Raises:
        UnsupportedSeriesError: the volume has no headers or is not axial.
    """
    cores = usable_cores() if cores is None else cores
    right_is_low_col, head_is_last = _orientation(volume)
    hu = volume.hu
    shape = hu.shape
    if out is None:
        out = LungMasks(right=np.zeros(shape, dtype=np.bool_), left=np.zeros(shape, dtype=np.bool_))
    elif out.right.shape != shape or out.left.shape != shape:
        raise ValueError(f"out masks {out.right.shape}, {out.left.shape} differ from {shape}")
    spacing = (volume.slice_spacing_mm, *volume.pixel_spacing_mm)
    threshold = np.float32(threshold_hu)
    factors = [1, 1, 1] if exact else coarse.coarse_factors(spacing)
    source_grid = factors == [1, 1, 1]
    mostly_air: BoolVolume | None = None
    if source_grid:
        air = np.less(hu, threshold)
        grid_spacing = spacing

        def hu_of(k: int, rows: slice, cols: slice) -> npt.NDArray[Any]:
            return hu[k, rows, cols]
    else:
        counts = coarse.air_counts(hu, threshold, factors)
        cell_voxels = factors[0] * factors[1] * factors[2]
        air = counts == cell_voxels
        mostly_air = counts >= (cell_voxels + 1) // 2
        del counts
        grid_spacing = (spacing[0] * factors[0], spacing[1] * factors[1],
                        spacing[2] * factors[2])

        def hu_of(k: int, rows: slice, cols: slice) -> npt.NDArray[Any]:
            return coarse.cell_hu(hu, k, factors, rows, cols)

    found = _lungs_on_grid(air, hu_of, grid_spacing, head_is_last=head_is_last, cores=cores,
                           mostly_air=mostly_air)
    del air, mostly_air
    if found is None:
        return out
    box, refined, lungs, allowed = found
    low_out, high_out = (out.right, out.left) if right_is_low_col else (out.left, out.right)
    if source_grid:
        low_out[box] = refined[0]
        high_out[box] = refined[1]
        return out
    code = coarse.cell_codes(lungs, refined, allowed)
    del found, refined, lungs, allowed  # the cells' arrays go before the source grid's work
    coarse.paint(low_out, high_out, hu, threshold, factors, box, code)
    return out


GridHu = Callable[[int, slice, slice], npt.NDArray[Any]]
"""HU of grid slice ``k`` in a box of grid rows and columns (a cell's mean on a coarse grid)."""


def _lungs_on_grid(air: BoolVolume, hu_of: GridHu, spacing: tuple[float, float, float], *,
                   head_is_last: bool, cores: int, mostly_air: BoolVolume | None = None) -> (
    tuple[tuple[slice, slice, slice], tuple[BoolVolume, BoolVolume],
          tuple[BoolVolume, BoolVolume], BoolVolume] | None
):
    """Steps 2 to 5 on one grid (the source's or the coarse cells'), from its air.

    Args:
        air: the air voxels (or cells); used up (it becomes the air inside the body).
        hu_of: the grid's HU (the airway seeds' mean).
        spacing: the grid's ``(slice, row, col)`` spacing in mm.
        head_is_last: the head end is at the last slice.
        cores: the cores it may use.
        mostly_air: on a coarse grid, the cells at least half air: those next to a lung's
            cells (wholly air) join it before the refinement, so that it starts from the
            lung's extent, not from a cell inside it.

    Returns:
        ``None`` without air in the body; else the box the lungs lie in, the refined lungs
        (at low columns, at high columns; disjoint; shape of the box), the lungs before the
        refinement, and where they could grow (inside the body, outside the airway).
    """
    body = _body(air, cores=cores)
    centre_col = _centre_col(body)
    body_area = np.count_nonzero(body, axis=(1, 2))
    candidates = air
    candidates &= body
    if not candidates.any():
        return None
    # The rest works in a box around the air inside the body, grown by more than the
    # refinement's reach: the same result as on the whole grid, with a fraction of its memory
    # (a 1000-slice series is 262 MB per mask).
    margins = [int(math.ceil(CLOSING_RADIUS_MM / s)) + 2 for s in spacing]
    box = morph.bounding_box(candidates, margins)
    candidates = candidates[box].copy()
    allowed = body[box].copy()
    del body, air
    col0 = box[2].start
    # On cells, airways are tracked in the cells at least half air: a lumen at its extent,
    # joining the lung in a slice about where it does on the source grid.
    tracked = candidates if mostly_air is None else mostly_air[box] & allowed
    airway = track_airways(tracked, lambda k: hu_of(box[0].start + k, box[1], box[2]),
                            body_area[box[0]], spacing, centre_col - col0,
                            head_is_last=head_is_last)
    candidates &= ~airway
    low, high = find_lungs(candidates, spacing, centre_col - col0)
    del candidates
    allowed &= ~airway
    log.debug("lungs: airway %d voxels", int(np.count_nonzero(airway)))
    del airway
    if mostly_air is not None:
        near_low, near_high = coarse.dilate_cells(low), coarse.dilate_cells(high)
        edge = mostly_air[box] & allowed & ~low & ~high
        low, high = low | (edge & near_low & ~near_high), high | (edge & near_high & ~near_low)
        del near_low, near_high, edge
    # The lungs are refined independently; with a second core, side by side (their distance
    # maps run on one thread each in ITK, and SimpleITK and numpy release the GIL).
    if cores > 1:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ggo-lung") as pool:
            high_future = pool.submit(refine_lung, high, low, allowed, spacing, medial_sign=-1.0,
                                      cores=cores)
            low_done = refine_lung(low, high, allowed, spacing, medial_sign=1.0, cores=cores)
            high_done = high_future.result()
    else:
        low_done = refine_lung(low, high, allowed, spacing, medial_sign=1.0, cores=cores)
        high_done = refine_lung(high, low, allowed, spacing, medial_sign=-1.0, cores=cores)
    # Neither refinement enters the other lung, so a voxel both claim is junction tissue.
    overlap = low_done & high_done
    low_done &= ~overlap
    high_done &= ~overlap
    del overlap
    log.debug("lungs: low-column %d, high-column %d grid voxels",
              int(np.count_nonzero(low_done)), int(np.count_nonzero(high_done)))
    return box, (low_done, high_done), (low, high), allowed


def _orientation(volume: CtVolume) -> tuple[bool, bool]:
    """Whether the patient's right is at low column indices, and whether the head is last."""
    if not volume.datasets or "ImageOrientationPatient" not in volume.datasets[0]:
        raise UnsupportedSeriesError(
            f"series {volume.series.series_instance_uid}: no ImageOrientationPatient; lung "
            "laterality needs the slice orientation")
    cosines = np.array([float(v) for v in volume.datasets[0].ImageOrientationPatient])
    normal = np.cross(cosines[:3], cosines[3:])
    if abs(cosines[0]) < math.cos(math.radians(45)) or abs(normal[2]) < math.cos(
            math.radians(45)):
        raise UnsupportedSeriesError(
            f"series {volume.series.series_instance_uid}: ImageOrientationPatient "
            f"{[round(float(v), 3) for v in cosines]} is not axial; lung masks need axial "
            "slices (use --no-lung-mask)")
    return bool(cosines[0] > 0), bool(normal[2] > 0)


def _centre_col(mask: BoolVolume) -> float:
    """Mean column index of a mask's voxels (the middle column when it is empty)."""
    per_col = np.count_nonzero(mask, axis=(0, 1))
    return float(per_col @ np.arange(per_col.size) / per_col.sum()) if per_col.any() else (
        (per_col.size - 1) / 2.0)


def _body(air: BoolVolume, *, cores: int) -> BoolVolume:
    """The largest non-air component with its holes (lungs, airways) filled slice by slice.

    The non-air mask is made slab by slab as the components are found (no full-size copy).
    """
    components = morph.Components(lambda z: np.logical_not(air[z]), air.shape[0])
    body = components.mask(0) if components.sizes else np.zeros(air.shape, dtype=np.bool_)
    del components
    _fill_slice_holes(body, cores=cores)
    return body


def _fill_slice_holes(mask: BoolVolume, *, cores: int) -> None:
    """Fill the holes of each slice in place: background not face-connected, in its slice, to
    the slice's edge (a 2-D binary fill per slice).

    One labelling covers :data:`BODY_FILL_SLICES` slices: their complements, cut to the mask's
    bounding rows and columns and each framed by a ring of background, are the rows of one
    tall 2-D image, so that no region crosses from one slice to the next and every region
    reaching a slice's edge joins the frames (the first label). Outside the box all is
    background joined to the edge, as before it. The same voxels as a fill per slice, in a
    twentieth of the calls.

    Args:
        mask: the voxels, filled in place. Shape: ``(slice, row, col)``.
        cores: the cores this process may use (:attr:`ggo_cli.host.HostLimits.cores`).
    """
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    if not rows.size:
        return
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    box = np.s_[int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1]
    height, width = int(rows[-1] - rows[0]) + 3, int(cols[-1] - cols[0]) + 3

    def fill(index: int) -> None:
        block = mask[index * BODY_FILL_SLICES : (index + 1) * BODY_FILL_SLICES]
        framed = np.ones((block.shape[0], height, width), dtype=np.uint8)
        np.logical_not(block[(slice(None), *box)], out=framed[:, 1:-1, 1:-1].view(np.bool_))
        connected = sitk.ConnectedComponentImageFilter()
        connected.SetFullyConnected(False)
        connected.SetNumberOfThreads(1)  # one thread a block; blocks run on threads
        image = connected.Execute(morph.to_image(framed.reshape(-1, width)))
        del framed
        labels = np.asarray(sitk.GetArrayViewFromImage(image)).reshape(-1, height, width)
        block[(slice(None), *box)] = labels[:, 1:-1, 1:-1] != labels[0, 0, 0]
        del labels, image

    morph.each_slice(fill, -(-mask.shape[0] // BODY_FILL_SLICES), cores=cores)
