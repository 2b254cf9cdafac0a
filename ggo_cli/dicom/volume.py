"""Load an eligible CT series as a Hounsfield-unit volume in DICOM patient space.

Slices are ordered by their position along the slice normal (the cross product of the row
and column direction cosines), never by file name or InstanceNumber. Slice spacing comes from
the positions, not from SliceThickness. Gaps, uneven spacing, duplicate positions and sheared
stacks are errors: a measurement in mL is only honest on a regular grid. Nothing is flipped or
resampled; ``CtVolume.datasets[i]`` is the source instance of slice ``i``.

Each header is read once (:mod:`ggo_cli.dicom.header_scan`, pydicom's reader for unusual
files), and an uncompressed slice's pixels are then read from the offset that read found,
straight into the int16 volume (:mod:`ggo_cli.dicom.native_pixels`; the same HU bit for bit).
Other slices, and files changed since their header was read, are decoded by pydicom, in a
:class:`~ggo_cli.dicom.decode_pool.DecodePool` (worker processes, one per usable core by
default; :mod:`ggo_cli.dicom.decode_pool`) when it runs the series.

Nothing is trusted (issue 15, values in :mod:`ggo_cli.dicom.budgets`): every header is read within
the header budget, the geometry budgets and every RescaleSlope/RescaleIntercept are checked
before the volume is allocated, each file is read for decoding within the header budget plus
twice its announced pixel bytes (a deflated file is inflated no further), and each slice is
checked by :mod:`ggo_cli.dicom.slice_decoding`. A file that fails is named by its index in the
series and a digest of its path (``instance 7 of 30 (file #3f9a2c)``); the path itself is
logged at DEBUG only, since file names may hold patient names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import UID

from ..config import SPACING_ABS_TOLERANCE_MM, SelectionRules
from ..domain import CtVolume, HuArray, SeriesInfo
from ..errors import SeriesGeometryError, UnsupportedSeriesError
from .budgets import (
    HEADER_READ_BYTES,
    SLICE_SPACING_MM_RANGE,
    file_tag,
    geometry_problem,
    read_bounded,
    rescale_of,
    scan_bounded,
)
from .decode_pool import DecodePool, DecodeTask, decode_slices
from .native_pixels import NativeSlice, native_hu, plan_native, read_native

log = logging.getLogger(__name__)

SHEAR_TOLERANCE_PIXELS = 0.5
"""Largest in-plane drift of slice origins (in pixels) accepted for a straight stack."""


def slice_normal(orientation: Sequence[float]) -> npt.NDArray[np.float64]:
    """Return the unit slice normal for an ImageOrientationPatient value.

    Args:
        orientation: six direction cosines (row direction, then column direction).

    Returns:
        The unit normal ``row x column``. Shape: ``(3,)``.
    """
    values = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(values[:3], values[3:])
    return normal / np.linalg.norm(normal)


def sort_by_position(
    datasets: Sequence[Dataset],
) -> tuple[list[Dataset], npt.NDArray[np.float64]]:
    """Sort slices along the slice normal.

    Args:
        datasets: headers of one series (ImagePositionPatient and ImageOrientationPatient set).

    Returns:
        The sorted datasets and their positions along the normal in mm, ascending.
    """
    normal = slice_normal([float(v) for v in datasets[0].ImageOrientationPatient])
    distances = np.array(
        [float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for ds in datasets]
    )
    order = np.argsort(distances, kind="stable")
    return [datasets[i] for i in order], distances[order]


def check_spacing(
    distances: npt.NDArray[np.float64], *, tolerance: float, series_uid: str
) -> float:
    """Check that slices are evenly spaced and return the spacing in mm.

    Args:
        distances: sorted slice positions along the normal in mm. Shape: ``(n,)``.
        tolerance: largest relative deviation of a gap from the median gap.
        series_uid: for messages.

    Returns:
        The median gap in mm.

    Raises:
        SeriesGeometryError: on duplicate positions, gaps or uneven spacing.
    """
    gaps = np.diff(distances)
    if gaps.size == 0:
        raise SeriesGeometryError(f"series {series_uid}: a volume needs at least two slices")
    if float(gaps.min()) <= SPACING_ABS_TOLERANCE_MM:
        raise SeriesGeometryError(
            f"series {series_uid}: two slices share a position (duplicate or overlapping "
            "acquisitions); one slice per position is required (use --series to choose another)"
        )
    spacing = float(np.median(gaps))
    allowed = max(SPACING_ABS_TOLERANCE_MM, tolerance * spacing)
    if float(np.abs(gaps - spacing).max()) > allowed:
        raise SeriesGeometryError(
            f"series {series_uid}: slice spacing varies {gaps.min():.3g}-{gaps.max():.3g} mm "
            f"(median {spacing:.3g} mm, tolerance {100 * tolerance:g} %); evenly spaced slices "
            "without gaps are required (see --spacing-tolerance)"
        )
    return spacing


def _check_stack(datasets: Sequence[Dataset], pixel_mm: float, series_uid: str) -> None:
    """Reject stacks whose slice origins drift in-plane (gantry tilt, stitched series)."""
    orientation = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient])
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    in_plane = positions @ np.stack([orientation[:3], orientation[3:]]).T
    drift = float(np.abs(in_plane - in_plane[0]).max())
    if drift > SHEAR_TOLERANCE_PIXELS * pixel_mm:
        raise SeriesGeometryError(
            f"series {series_uid}: slice origins drift {drift:.2f} mm in-plane (gantry tilt or "
            "a stitched series); a straight stack of slices is required"
        )


PIXEL_READ_SLACK_BYTES = 64 << 10
"""Allowed beyond the header budget and twice the announced pixel bytes when a file is read
for decoding (lossless JPEG 2000 of noise can be a little larger than the raw pixels)."""


def _header_problem(headers: Sequence[Dataset]) -> str | None:
    """The budgets of :func:`~ggo_cli.dicom.budgets.geometry_problem` on loaded headers (discovery
    checked them too; a series may come from elsewhere), before anything is allocated."""
    try:
        first = headers[0]
        sizes = {(int(ds.Rows), int(ds.Columns)) for ds in headers}
        if len(sizes) != 1:
            return f"mixed image sizes {sorted(sizes)}; all slices must have the same size"
        return geometry_problem(
            rows=int(first.Rows),
            columns=int(first.Columns),
            pixel_spacing=[float(v) for v in first.PixelSpacing],
            orientation=[float(v) for v in first.ImageOrientationPatient],
            positions=[[float(v) for v in ds.ImagePositionPatient] for ds in headers],
        )
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
        return f"slice geometry is missing or malformed ({type(exc).__name__})"


def _compressed(header: Dataset) -> bool:
    """Whether a header's pixel data is encapsulated (decoded by a native library)."""
    meta = getattr(header, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None)
    try:
        return bool(syntax is not None and UID(str(syntax)).is_compressed)
    except (ValueError, AttributeError):  # an unknown syntax: decoded where nothing else runs
        return True


class _Stack:
    """The HU volume being filled: int16 while every slice's HU are exact integers (CT as
    scanners write it); the first fractional slice turns it into float32 (one copy, then no
    more). Native reads land in it in place while it is int16."""

    def __init__(self, n_slices: int, rows: int, cols: int) -> None:
        self.hu: HuArray = np.empty((n_slices, rows, cols), dtype=np.int16)
        self._in_place = -1  # the slice index last read in place

    def read_native(
        self, index: int, plan: NativeSlice, header: Dataset, limit: int, where: str
    ) -> HuArray | None:
        """Slice ``index`` by :mod:`ggo_cli.dicom.native_pixels`, or ``None`` when its file
        changed since its header was read (then the pydicom path decodes it)."""
        in_place = self.hu.dtype == np.int16
        target = self.hu[index] if in_place else np.empty(self.hu.shape[1:], np.int16)
        try:
            if not read_native(plan, target, limit_bytes=limit):
                log.debug("%s: changed since its header was read; decoded by pydicom", where)
                return None
        except OSError as exc:
            raise UnsupportedSeriesError(
                f"{where} cannot be read ({type(exc).__name__}); fix or remove the file"
            ) from None
        slice_hu = native_hu(plan, target, header, where)
        if in_place and slice_hu is target:
            self._in_place = index
        return slice_hu

    def put(self, index: int, slice_hu: HuArray) -> None:
        """Store slice ``index`` (unless it was read in place)."""
        if slice_hu.dtype != self.hu.dtype and self.hu.dtype == np.int16:
            self.hu = self.hu.astype(np.float32)
        if self._in_place != index:
            self.hu[index] = slice_hu


def load_volume(
    series: SeriesInfo,
    rules: SelectionRules | None = None,
    *,
    on_slice: Callable[[int], None] | None = None,
    pool: DecodePool | None = None,
) -> CtVolume:
    """Read, decode and stack an eligible series.

    Args:
        series: an eligible series from discovery.
        rules: selection rules (the spacing tolerance is used).
        on_slice: optional callback, called with 1 after each decoded slice.
        pool: decode in these worker processes (see :class:`DecodePool` for when;
            ``None``: in this thread).

    Returns:
        The :class:`CtVolume`; its datasets keep every header attribute but no pixel data.

    Raises:
        SeriesGeometryError: irregular spacing, duplicate positions, sheared stack, or
            slices that differ in size.
        UnsupportedSeriesError: unreadable files, missing rescale attributes, undecodable
            pixel data.
    """
    rules = rules or SelectionRules()
    uid = series.series_instance_uid
    n_files = len(series.files)
    base = Path(os.path.commonpath([str(p.parent) for p in series.files]))
    headers: list[Dataset] = []
    where_of: dict[int, str] = {}
    path_of: dict[int, str] = {}
    native_of: dict[int, NativeSlice | None] = {}
    for index, path in enumerate(series.files):
        where = (
            f"series {uid}: instance {index + 1} of {n_files} "
            f"(file {file_tag(Path(series.location) / path.relative_to(base))})"
        )
        try:
            scanned = scan_bounded(path, limit_bytes=HEADER_READ_BYTES)
            if scanned is None:
                header = read_bounded(path, limit_bytes=HEADER_READ_BYTES, stop_before_pixels=True)
            else:
                header = scanned[0]
                native_of[id(header)] = plan_native(header, scanned[1], scanned[2], str(path))
        except UnsupportedSeriesError as exc:  # a deflate bomb
            log.debug("%s is %s", where, path)
            raise UnsupportedSeriesError(f"{where}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - unreadable file: the series fails, run goes on
            log.debug("%s is %s", where, path)
            raise UnsupportedSeriesError(
                f"{where} cannot be read ({type(exc).__name__}); fix or remove the file"
            ) from None
        headers.append(header)
        where_of[id(header)], path_of[id(header)] = where, str(path)
    problem = _header_problem(headers)
    if problem is not None:
        raise UnsupportedSeriesError(f"series {uid}: {problem}")
    ordered, distances = sort_by_position(headers)
    spacing = check_spacing(distances, tolerance=rules.spacing_tolerance, series_uid=uid)
    low_mm, high_mm = SLICE_SPACING_MM_RANGE
    if not low_mm <= spacing <= high_mm:
        raise SeriesGeometryError(
            f"series {uid}: slice spacing {spacing:g} mm outside {low_mm:g}..{high_mm:g} mm; "
            "not a CT volume this tool supports"
        )
    pixel_spacing = (float(ordered[0].PixelSpacing[0]), float(ordered[0].PixelSpacing[1]))
    _check_stack(ordered, min(pixel_spacing), uid)
    rows, cols = int(ordered[0].Rows), int(ordered[0].Columns)
    for ds in ordered:
        if "ModalityLUTSequence" not in ds:
            rescale_of(ds, where_of[id(ds)])  # every rescale is checked before any decoding
    bits = int(ordered[0].get("BitsAllocated", 16) or 16)
    limit = HEADER_READ_BYTES + 2 * rows * cols * max(1, bits // 8) + PIXEL_READ_SLACK_BYTES
    stack = _Stack(len(ordered), rows, cols)
    tasks = [
        DecodeTask(
            path_of[id(ds)],
            where_of[id(ds)],
            limit,
            None
            if (plan := native_of.get(id(ds))) is None
            else partial(stack.read_native, index, plan, ds, limit, where_of[id(ds)]),
        )
        for index, ds in enumerate(ordered)
    ]
    # Any encapsulated file sends the whole series to the pool: no native decoder runs here.
    compressed = any(_compressed(ds) for ds in ordered)
    source = decode_slices(tasks, uid, pool=pool, compressed=compressed)
    for index, slice_hu in enumerate(source):
        if slice_hu.shape != (rows, cols):
            raise SeriesGeometryError(
                f"series {uid}: slice {index + 1} decodes to {slice_hu.shape}, expected "
                f"{(rows, cols)}; all slices must have the same size"
            )
        stack.put(index, slice_hu)
        if on_slice is not None:
            on_slice(1)
    hu = stack.hu
    log.debug(
        "series %s: %d slices %dx%d, spacing %.4g mm, pixels %.4g x %.4g mm",
        uid,
        len(ordered),
        rows,
        cols,
        spacing,
        *pixel_spacing,
    )
    return CtVolume(
        series=series,
        hu=hu,
        datasets=tuple(ordered),
        slice_spacing_mm=spacing,
        pixel_spacing_mm=pixel_spacing,
    )
