"""Load an eligible CT series as a Hounsfield-unit volume in DICOM patient space.

Slices are ordered by their position along the slice normal (the cross product of the row
and column direction cosines), never by file name or InstanceNumber. Slice spacing comes from
the positions, not from SliceThickness. Gaps, uneven spacing, duplicate positions and sheared
stacks are errors: a measurement in mL is only honest on a regular grid. Nothing is flipped or
resampled; ``CtVolume.datasets[i]`` is the source instance of slice ``i``.

Decoding can run in a :class:`DecodePool` (worker processes, one per usable core by default):
compressed pixel data (JPEG Lossless about 130, JPEG 2000 about 25 slices/s per core here) is
then decoded on every core, and a series can be decoded while another one is segmented.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from .config import SPACING_ABS_TOLERANCE_MM, SelectionRules
from .domain import CtVolume, HuArray, SeriesInfo
from .errors import SeriesGeometryError, UnsupportedSeriesError
from .logs import quiet_pydicom

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


def _hu_slice(ds: Dataset, series_uid: str) -> HuArray:
    """Decode one slice and apply the modality transform (Rescale Slope/Intercept).

    Returns int16 when the Hounsfield units are exact integers in the int16 range (an integer
    slope and intercept, as CT scanners write: half the memory of float32), float32 otherwise
    (a fractional rescale or a Modality LUT).
    """
    if "ModalityLUTSequence" not in ds and (
        ds.get("RescaleIntercept") is None or ds.get("RescaleSlope") is None
    ):
        raise UnsupportedSeriesError(
            f"series {series_uid}: instance without RescaleIntercept/RescaleSlope; Hounsfield "
            "units cannot be derived (the CT Image module requires both)"
        )
    try:
        # pydicom.pixels re-exports without __all__, so mypy sees no explicit export.
        pixels = pydicom.pixels.pixel_array(ds)  # type: ignore[attr-defined]
    except (RuntimeError, NotImplementedError, ValueError, AttributeError, KeyError) as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise UnsupportedSeriesError(
            f"series {series_uid}: pixel data cannot be decoded (transfer syntax {name}): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    if "ModalityLUTSequence" in ds:
        hu_lut = pydicom.pixels.apply_modality_lut(pixels, ds)  # type: ignore[attr-defined]
        return np.asarray(hu_lut, dtype=np.float32)
    slope = float(ds.RescaleSlope)
    intercept = float(ds.RescaleIntercept)
    if pixels.dtype.kind in "iu" and pixels.size and slope.is_integer() and intercept.is_integer():
        # The range is checked on the stored values in Python integers, so the int32
        # arithmetic below can neither overflow nor wrap when it lands in int16.
        factor, offset = int(slope), int(intercept)
        ends = [int(pixels.min()) * factor, int(pixels.max()) * factor]
        if max(map(abs, ends)) < 2**31 and (
            HU_INT16_MIN <= min(ends) + offset and max(ends) + offset <= HU_INT16_MAX
        ):
            scaled = pixels if factor == 1 else np.multiply(pixels, factor, dtype=np.int32)
            hu16 = np.empty(pixels.shape, dtype=np.int16)
            np.add(scaled, offset, out=hu16, dtype=np.int32, casting="unsafe")
            return hu16
    hu = pixels.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    return hu


HU_INT16_MIN = int(np.iinfo(np.int16).min)
HU_INT16_MAX = int(np.iinfo(np.int16).max)

MAX_DECODE_WORKERS = 8
DECODE_CHUNK_SLICES = 8
MIN_POOL_SLICES = 32
"""Smaller series decode in the calling thread: starting worker processes costs more."""


_core_budget: int | None = None


def set_core_budget(cores: int | None) -> None:
    """Cap :func:`usable_cores` in this process (a ``--jobs`` worker's share); ``None``: no cap."""
    global _core_budget
    _core_budget = None if cores is None else max(1, cores)


def core_budget() -> int | None:
    """The cap set by :func:`set_core_budget`, or ``None``."""
    return _core_budget


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS has one, within the
    process's budget), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    return cores if _core_budget is None else min(cores, _core_budget)


def default_decode_workers() -> int:
    """Worker processes for decoding: one per usable core (at most 8); 0 on a single core."""
    cores = usable_cores()
    return 0 if cores < 2 else min(cores, MAX_DECODE_WORKERS)


def _decode_file(path: str, series_uid: str) -> HuArray:
    """Worker task: read one file and return its slice in HU (runs in a DecodePool process)."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - unreadable file: the series fails
        raise UnsupportedSeriesError(
            f"series {series_uid}: file {Path(path).name} cannot be read "
            f"({type(exc).__name__}: {exc})"
        ) from None
    return _hu_slice(ds, series_uid)


class DecodePool:
    """Worker processes that decode slices (a context manager; ``workers=0``: no processes).

    The processes start on first use (``forkserver`` on Linux, so they never inherit ONNX
    Runtime's threads; ``spawn`` elsewhere). A worker that dies (a decoder crash) fails only
    the series being decoded: the pool is rebuilt for the next one.

    Args:
        workers: number of processes; 0 decodes in the calling thread.
        min_slices: series with fewer slices are decoded in the calling thread.
    """

    def __init__(self, workers: int, *, min_slices: int = MIN_POOL_SLICES) -> None:
        self.workers = max(0, workers)
        self.min_slices = min_slices
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else (
                "spawn"
            )
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context(method),
                initializer=quiet_pydicom,
            )
        return self._executor

    def iter_decode(
        self, paths: Sequence[str], series_uid: str
    ) -> Iterator[HuArray]:
        """Decode files to HU slices, yielded in order as they arrive.

        Raises:
            UnsupportedSeriesError: a file cannot be read or decoded, or a worker died.
        """
        try:
            yield from self._pool().map(
                _decode_file,
                paths,
                [series_uid] * len(paths),
                chunksize=DECODE_CHUNK_SLICES,
            )
        except BrokenProcessPool as exc:
            self.close()
            raise UnsupportedSeriesError(
                f"series {series_uid}: a decoder process died while decoding its pixel data"
            ) from exc

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`decode` starts new ones)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


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
        pool: decode in these worker processes (``None``, 0 workers or a series shorter than
            the pool's ``min_slices``: in this thread).

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
    headers = []
    for path in series.files:
        try:
            headers.append(pydicom.dcmread(path, defer_size="1 KB"))
        except Exception as exc:  # noqa: BLE001 - unreadable file: the series fails, run goes on
            raise UnsupportedSeriesError(
                f"series {uid}: file {path.name} cannot be read ({type(exc).__name__}: {exc})"
            ) from exc
    ordered, distances = sort_by_position(headers)
    spacing = check_spacing(distances, tolerance=rules.spacing_tolerance, series_uid=uid)
    pixel_spacing = (float(ordered[0].PixelSpacing[0]), float(ordered[0].PixelSpacing[1]))
    _check_stack(ordered, min(pixel_spacing), uid)
    rows, cols = int(ordered[0].Rows), int(ordered[0].Columns)
    # int16 while every slice's HU are exact integers (CT as scanners write it); the first
    # fractional slice turns the volume into float32 (one copy, then no more).
    hu: HuArray = np.empty((len(ordered), rows, cols), dtype=np.int16)
    source: Iterator[HuArray]
    if pool is not None and pool.workers > 0 and len(ordered) >= pool.min_slices:
        for ds in ordered:
            if "ModalityLUTSequence" not in ds and (
                ds.get("RescaleIntercept") is None or ds.get("RescaleSlope") is None
            ):
                _hu_slice(ds, uid)  # raises the missing-rescale error before any decoding
        source = pool.iter_decode([str(ds.filename) for ds in ordered], uid)
    else:
        source = (_hu_slice(ds, uid) for ds in ordered)
    for index, (ds, slice_hu) in enumerate(zip(ordered, source, strict=True)):
        if slice_hu.shape != (rows, cols):
            raise SeriesGeometryError(
                f"series {uid}: slice {index + 1} decodes to {slice_hu.shape}, expected "
                f"{(rows, cols)}; all slices must have the same size"
            )
        if slice_hu.dtype != hu.dtype and hu.dtype == np.int16:
            hu = hu.astype(np.float32)
        hu[index] = slice_hu
        # Keep the header for the SEG's references, drop the (large) pixel bytes.
        del ds.PixelData
        if on_slice is not None:
            on_slice(1)
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
