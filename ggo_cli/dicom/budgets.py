"""Budgets for untrusted DICOM input: what a file may cost to read and what a header may claim.

Every value here is checked from headers *before* anything is allocated or decoded, so that a
malformed or hostile file costs a bounded amount of memory and time (issue 15). The values and
their reasons (the README's "Threat model and limits" cites this list):

* ``HEADER_READ_BYTES`` = 2 MiB: discovery reads at most this much of a file (the header; CT
  headers are a few kB, up to a few hundred kB with private CSA blocks). A header that does
  not end within it is read as far as it goes (parsing garbage is slow: docs/benchmarks.md).
* ``MAX_INFLATED_FILE_BYTES`` = 18 MiB: a Deflated Explicit VR Little Endian file (PS3.5 A.5)
  is inflated by us, never by pydicom (which inflates the whole file at once: a 1 MB bomb
  became 2.3 GB). Discovery inflates a deflated file completely, but to at most the header
  budget plus the largest slice allowed (2048 x 2048 x 2 bytes, twice); a file that inflates
  further is refused as broken (its folder's series are skipped naming it), so no later
  reader of the series' files meets a bomb. Loading inflates at most the header budget plus
  twice the pixel bytes its header announces.
* A file without the 128-byte preamble and ``DICM`` is parsed only when it starts with a group
  0002 or 0008 element (how ACR-NEMA style datasets start); a zero-filled file is not DICOM.
* ``ROWS_COLUMNS_RANGE`` = 16..2048 pixels (CT is 512 x 512, at most 1024 or 2048 on
  high-resolution reconstructions); ``PIXEL_SPACING_MM_RANGE`` = 0.1..5 mm (a field of view of
  at most 10 m and at least 1.6 mm); ``SLICE_SPACING_MM_RANGE`` = 0.1..20 mm, from the
  positions; ``MAX_SLICES`` = 2000 and ``MAX_SERIES_VOXELS`` = 2**29 (2048 slices of 512 x 512:
  1 GiB as int16, 2 GiB as float32): a series beyond them is skipped at selection.
* ``POSITION_LIMIT_MM`` = 1e5 (100 m) on every ImagePositionPatient coordinate; every
  geometry value must be finite; ImageOrientationPatient must be two unit vectors (within
  ``ORIENTATION_UNIT_TOLERANCE`` = 0.01) that are orthogonal (|dot| within the same).
* ``RESCALE_SLOPE_RANGE`` = 1e-3..1e3 on |RescaleSlope| (scanners write 1, sometimes 0.5 or 2;
  0, NaN, infinity and text are refused); |RescaleIntercept| at most ``RESCALE_INTERCEPT_LIMIT``
  = 1e5.
* ``HU_RANGE`` = -8192..32767 HU after the modality transform, padding excluded: air is
  -1000, vendors pad outside the field of view with -2000, -3024 or -3072, and extended-scale
  CT reaches the int16 maximum for metal; stored values equal to PixelPaddingValue (up to
  PixelPaddingRangeLimit) are not checked. Stored values must also fit BitsStored.
* Decoders: a Python warning raised, or a WARNING/ERROR logged by ``pydicom.pixels``, while a
  slice decodes fails the series (a plugin that failed before another one succeeded means the
  data is damaged). JPEG 2000 is decoded only by pylibjpeg-openjpeg, never by python-gdcm,
  whose decoder aborts the whole process on some malformed codestreams. JPEG 2000 has no
  checksum: a bit flip inside its entropy-coded data decodes to plausible values and cannot
  be detected.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from ..errors import UnsupportedSeriesError
from .header_scan import PREAMBLE_BYTES, Incomplete, PixelElement, scan_header

HEADER_READ_BYTES = 2 << 20
ROWS_COLUMNS_RANGE = (16, 2048)
PIXEL_SPACING_MM_RANGE = (0.1, 5.0)
SLICE_SPACING_MM_RANGE = (0.1, 20.0)
MAX_INFLATED_FILE_BYTES = HEADER_READ_BYTES + 2 * ROWS_COLUMNS_RANGE[1] ** 2 * 2
MAX_SLICES = 2000
MAX_SERIES_VOXELS = 2**29
POSITION_LIMIT_MM = 1e5
ORIENTATION_UNIT_TOLERANCE = 0.01
RESCALE_SLOPE_RANGE = (1e-3, 1e3)
RESCALE_INTERCEPT_LIMIT = 1e5
HU_RANGE = (-8192.0, 32767.0)
_PREAMBLE_LESS_GROUPS = frozenset({0x0002, 0x0008})
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
_INFLATE_CHUNK = 1 << 16
HEADER_CHUNK_BYTES = 64 << 10
"""A header read first reads this much, and the rest of its budget only when the header goes
on (CT headers are a few kB)."""
_DIGEST_CHARS = 6


def file_tag(relative_path: str | Path) -> str:
    """A short, stable name for a file that never shows its path (names may hold patient
    names): ``#`` and the first 6 hex digits of the SHA-256 of its path relative to the
    input."""
    digest = hashlib.sha256(str(relative_path).encode("utf-8", "surrogateescape")).hexdigest()
    return "#" + digest[:_DIGEST_CHARS]


class _CappedReader(io.RawIOBase):
    """A read-only view of a binary file that ends after ``limit`` bytes."""

    def __init__(self, raw: io.BufferedReader, limit: int) -> None:
        self._raw = raw
        self._limit = limit
        self.name = raw.name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        left = self._limit - self._raw.tell()
        if left <= 0:
            return 0
        view = memoryview(buffer)[: min(len(buffer), left)]
        return self._raw.readinto(view)


def _at_pixels(tag: object, vr: str | None, length: int) -> bool:
    """``stop_when`` for :func:`pydicom.filereader.read_dataset`: stop at the pixel data."""
    return int(tag) in _PIXEL_TAGS  # type: ignore[call-overload]


def read_bounded(
    path: Path,
    *,
    limit_bytes: int,
    stop_before_pixels: bool,
    specific_tags: Sequence[str] | None = None,
) -> FileDataset:
    """Read a DICOM file, never reading or inflating more than ``limit_bytes`` of it.

    Args:
        path: the file.
        limit_bytes: the most bytes read from the file; a deflated dataset is inflated to at
            most this (a full read) or :data:`MAX_INFLATED_FILE_BYTES` (a header read).
        stop_before_pixels: stop at the pixel data (a header).
        specific_tags: read only these keywords (and the file meta).

    Returns:
        The dataset (partial where the file or its inflated dataset goes past the limit).

    Raises:
        InvalidDicomError: not DICOM (no preamble and no plausible first element).
        OSError: the file cannot be opened or read.
        UnsupportedSeriesError: a deflated dataset that would inflate past its limit.
        Exception: whatever pydicom raises on a malformed file (callers treat it as
            unreadable).
    """
    if stop_before_pixels:
        tags = frozenset(int(Tag(t)) for t in specific_tags) if specific_tags else None
        found = scan_bounded(path, limit_bytes=limit_bytes, specific_tags=tags)
        if found is not None:
            return found[0]
    with open(path, "rb") as raw:
        capped = io.BufferedReader(_CappedReader(raw, limit_bytes))
        preamble = capped.read(132)
        has_preamble = len(preamble) == 132 and preamble[128:] == b"DICM"
        if not has_preamble:
            group = int.from_bytes(preamble[:2], "little") if len(preamble) >= 2 else 0
            if group not in _PREAMBLE_LESS_GROUPS:
                raise InvalidDicomError(f"{path.name}: no DICOM preamble or first element")
            capped.seek(0)
            return pydicom.dcmread(
                capped,
                force=True,
                stop_before_pixels=stop_before_pixels,
                specific_tags=list(specific_tags) if specific_tags else None,
            )
        # The file meta (group 0002) tells whether the dataset is deflated.
        meta = pydicom.filereader._read_file_meta_info(capped)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            capped.seek(0)
            return pydicom.dcmread(
                capped,
                stop_before_pixels=stop_before_pixels,
                specific_tags=list(specific_tags) if specific_tags else None,
            )
        raw.seek(capped.tell())  # the buffered view has read ahead
        # A header read inflates the whole dataset too (to MAX_INFLATED_FILE_BYTES at most):
        # a file that would inflate further is refused here, before any other reader sees it.
        inflate_limit = MAX_INFLATED_FILE_BYTES if stop_before_pixels else limit_bytes
        inflated = _inflate(raw, max(limit_bytes, inflate_limit))
    dataset = read_dataset(
        cast(BinaryIO, DicomBytesIO(inflated)),
        is_implicit_VR=False,
        is_little_endian=True,
        stop_when=_at_pixels if stop_before_pixels else None,
        specific_tags=[Tag(t) for t in specific_tags] if specific_tags else None,
    )
    result = FileDataset(
        str(path), dataset, preamble=preamble[:128], file_meta=FileMetaDataset(meta)
    )
    return result


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What identifies a file's content between two reads: device, inode, size and
    modification time in nanoseconds (from ``fstat`` of the open file)."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, fd: int) -> FileStamp:
        """The stamp of an open file descriptor."""
        stat = os.fstat(fd)
        return cls(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def scan_bounded(
    path: Path, *, limit_bytes: int, specific_tags: frozenset[int] | None = None
) -> tuple[FileDataset, PixelElement | None, FileStamp] | None:
    """Read a file's header with :func:`~ggo_cli.dicom.header_scan.scan_header`, within
    ``limit_bytes`` of it: the first :data:`HEADER_CHUNK_BYTES`, then the rest of the budget
    only when the header goes on.

    Args:
        path: the file.
        limit_bytes: the most bytes read from the file.
        specific_tags: keep only these tags (as pydicom's ``specific_tags``).

    Returns:
        The header (as ``read_bounded(..., stop_before_pixels=True)`` returns it), its pixel
        data element and the file's stamp when the read began; ``None`` when the file is not
        of the common shape (:func:`read_bounded` then reads it with pydicom).

    Raises:
        OSError: the file cannot be opened or read.
    """
    with open(path, "rb") as raw:
        stamp = FileStamp.of(raw.fileno())
        first = min(limit_bytes, HEADER_CHUNK_BYTES)
        data = raw.read(first)
        if len(data) < PREAMBLE_BYTES:
            return None
        try:
            found = scan_header(
                data, raw.name, complete=len(data) < first or first == limit_bytes,
                specific_tags=specific_tags,
            )
        except Incomplete:
            data += raw.read(limit_bytes - len(data))
            found = scan_header(data, raw.name, complete=True, specific_tags=specific_tags)
    return None if found is None else (found[0], found[1], stamp)


def _inflate(raw: io.BufferedReader, limit_bytes: int) -> bytes:
    """Inflate the rest of ``raw`` (a raw deflate stream), refusing more than ``limit_bytes``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    parts: list[bytes] = []
    size = 0
    while size < limit_bytes:
        chunk = inflater.unconsumed_tail or raw.read(_INFLATE_CHUNK)
        if not chunk:
            break
        part = inflater.decompress(chunk, limit_bytes - size)
        parts.append(part)
        size += len(part)
        if inflater.eof:
            break
    if size >= limit_bytes and not inflater.eof:
        raise UnsupportedSeriesError(
            f"deflated file inflates beyond {limit_bytes} bytes, more than its header announces "
            "(a decompression bomb?); remove it or re-export it uncompressed"
        )
    return b"".join(parts)


def geometry_problem(
    *,
    rows: object,
    columns: object,
    pixel_spacing: Sequence[float],
    orientation: Sequence[float],
    positions: Sequence[Sequence[float]],
) -> str | None:
    """Check a series' header geometry against the budgets.

    Args:
        rows: Rows of the series (one value). columns: Columns.
        pixel_spacing: PixelSpacing (row, column) in mm.
        orientation: ImageOrientationPatient (six direction cosines).
        positions: ImagePositionPatient of every instance, in mm.

    Returns:
        A one-line reason naming the value and the limit, or ``None`` when plausible.
    """
    low, high = ROWS_COLUMNS_RANGE
    for keyword, value in (("Rows", rows), ("Columns", columns)):
        if not isinstance(value, int) or not low <= value <= high:
            return f"{keyword} {value} outside {low}..{high}; not a CT slice this tool supports"
    n_voxels = len(positions) * rows * columns  # type: ignore[operator]
    if len(positions) > MAX_SLICES or n_voxels > MAX_SERIES_VOXELS:
        return (
            f"{len(positions)} slices of {rows} x {columns} exceed the series budget "
            f"({MAX_SLICES} slices, {MAX_SERIES_VOXELS} voxels); split or subsample the series"
        )
    low_mm, high_mm = PIXEL_SPACING_MM_RANGE
    if len(pixel_spacing) != 2 or not all(
        math.isfinite(v) and low_mm <= v <= high_mm for v in pixel_spacing
    ):
        shown = "/".join(f"{v:g}" for v in pixel_spacing)
        return f"PixelSpacing {shown} mm outside {low_mm:g}..{high_mm:g} mm"
    if len(orientation) != 6 or not all(math.isfinite(v) for v in orientation):
        return "ImageOrientationPatient is not six finite direction cosines"
    row, col = orientation[:3], orientation[3:]
    norms = (math.sqrt(sum(v * v for v in row)), math.sqrt(sum(v * v for v in col)))
    dot = sum(a * b for a, b in zip(row, col, strict=True))
    if any(abs(n - 1) > ORIENTATION_UNIT_TOLERANCE for n in norms) or (
        abs(dot) > ORIENTATION_UNIT_TOLERANCE
    ):
        return (
            "ImageOrientationPatient is not two orthogonal unit vectors "
            f"(lengths {norms[0]:.3g}, {norms[1]:.3g}, dot {dot:.3g})"
        )
    for position in positions:
        if len(position) != 3 or not all(
            math.isfinite(v) and abs(v) <= POSITION_LIMIT_MM for v in position
        ):
            return (
                "ImagePositionPatient is not three finite coordinates within "
                f"{POSITION_LIMIT_MM:g} mm"
            )
    return None


def rescale_of(ds: Dataset, where: str) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept of an instance, checked against the budgets.

    Args:
        ds: the header.
        where: the series and instance, for messages.

    Returns:
        ``(slope, intercept)``.

    Raises:
        UnsupportedSeriesError: missing, not a number, zero, non-finite or implausible.
    """
    values = []
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        try:
            raw = ds.get(keyword)
        except (TypeError, ValueError, OverflowError):  # a DS that is not a number
            element = ds.get_item(keyword)
            raw = getattr(element, "value", b"")
            raw = raw.decode("ascii", "replace").strip() if isinstance(raw, bytes) else raw
        if raw is None or raw == "":
            raise UnsupportedSeriesError(
                f"{where}: instance without RescaleIntercept/RescaleSlope; Hounsfield units "
                "cannot be derived (the CT Image module requires both)"
            )
        try:
            values.append(float(raw))
        except (TypeError, ValueError):
            raise UnsupportedSeriesError(
                f"{where}: {keyword} {str(raw)[:20]!r} is not a number; Hounsfield units "
                "cannot be derived"
            ) from None
    slope, intercept = values
    low, high = RESCALE_SLOPE_RANGE
    if not (math.isfinite(slope) and low <= abs(slope) <= high):
        raise UnsupportedSeriesError(
            f"{where}: RescaleSlope {slope:g} outside {low:g}..{high:g} (in magnitude); "
            "Hounsfield units cannot be derived"
        )
    if not (math.isfinite(intercept) and abs(intercept) <= RESCALE_INTERCEPT_LIMIT):
        raise UnsupportedSeriesError(
            f"{where}: RescaleIntercept {intercept:g} outside "
            f"+-{RESCALE_INTERCEPT_LIMIT:g}; Hounsfield units cannot be derived"
        )
    return slope, intercept
