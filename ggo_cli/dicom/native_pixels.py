"""Uncompressed CT pixels read straight into the volume, with the same HU as pydicom's path.

For a slice in Explicit or Implicit VR Little Endian with 16 bits allocated, one sample,
MONOCHROME2 and a Pixel Data element of exactly Rows x Columns x 2 bytes that ends the file,
:func:`~ggo_cli.dicom.volume.load_volume` does not parse the file a second time: it reads the
pixel bytes from the offset the header read found (one bounded ``readinto`` into the slice of
the int16 volume) and applies the modality transform in place. The result is bit for bit what
:func:`~ggo_cli.dicom.slice_decoding.hu_slice` returns for the file (pydicom's native decoder
does no more than view the bytes as ``<u2``/``<i2`` and clear the unused high bits, PS3.5
8.1.1), and every check of that path holds: the rescale and HU budgets, and a slice whose
values leave the int16 fast path takes the same float32 path.

Everything is decided from the raw header bytes, before pydicom converts any value, so a
malformed value that would make pydicom's decoder warn (and fail the slice) never takes this
path. The file must not have changed since its header was read: its device, inode, size and
modification time must match, and the element header at the offset must read the same;
otherwise, and for anything unusual, the slice is decoded by the pydicom path as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom.uid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from ..domain import HuArray
from .budgets import HU_RANGE, FileStamp, rescale_of, scan_bounded
from .header_scan import PixelElement, transfer_syntax
from .slice_decoding import HU_INT16_MAX, HU_INT16_MIN, hu_from_pixels

NATIVE_SYNTAXES = frozenset(
    {pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian}
)
PIXEL_DATA_TAG = 0x7FE00010
BITS_ALLOCATED = 16
_MONOCHROME2 = (b"MONOCHROME2", b"MONOCHROME2 ")
_US_TAGS = {
    "SamplesPerPixel": 0x00280002,
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101,
    "PixelRepresentation": 0x00280103,
}
_PHOTOMETRIC_INTERPRETATION = 0x00280004
_NUMBER_OF_FRAMES = 0x00280008
_INT16_WRAP = 1 << 16


@dataclass(frozen=True, slots=True)
class NativeSlice:
    """Where one uncompressed slice's stored values are, and how to read them.

    Attributes:
        path: the file.
        pixel: its Pixel Data element, as the header read found it.
        stamp: the file's stamp when the header was read.
        rows: Rows. columns: Columns.
        signed: PixelRepresentation 1 (two's complement stored values).
        unused_bits: BitsAllocated - BitsStored (high bits cleared or sign-extended).
    """

    path: str
    pixel: PixelElement
    stamp: FileStamp
    rows: int
    columns: int
    signed: bool
    unused_bits: int


def _raw_us(header: Dataset, tag: int) -> int | None:
    """An unconverted US value written as one plain little-endian value, else ``None``."""
    element = header._dict.get(BaseTag(tag))  # raw elements, before any conversion
    if not isinstance(element, RawDataElement) or element.VR not in (None, "US"):
        return None
    value = element.value
    if not isinstance(value, bytes) or len(value) != 2:
        return None
    return int.from_bytes(value, "little")


def plan_native(
    header: Dataset, pixel: PixelElement | None, stamp: FileStamp, path: str
) -> NativeSlice | None:
    """Whether a slice can be read by :func:`read_native`, decided on the raw header.

    Call it right after the header is read, before any value is converted.

    Args:
        header: the header from :func:`~ggo_cli.dicom.budgets.scan_bounded`.
        pixel: its pixel data element (``None``: none found).
        stamp: the file's stamp from the same read.
        path: the file.

    Returns:
        The plan, or ``None`` for anything but the common uncompressed CT slice.
    """
    meta = getattr(header, "file_meta", None)
    if pixel is None or meta is None or pixel.tag != PIXEL_DATA_TAG:
        return None
    if pixel.vr not in (None, "OW", "OB") or "ModalityLUTSequence" in header:
        return None
    if transfer_syntax(meta) not in NATIVE_SYNTAXES:
        return None
    values = {keyword: _raw_us(header, tag) for keyword, tag in _US_TAGS.items()}
    photometric = header._dict.get(BaseTag(_PHOTOMETRIC_INTERPRETATION))
    rows, columns, stored = values["Rows"], values["Columns"], values["BitsStored"]
    if (
        not rows
        or not columns
        or stored is None
        or values["SamplesPerPixel"] != 1
        or values["BitsAllocated"] != BITS_ALLOCATED
        or not 1 <= stored <= BITS_ALLOCATED
        or values["PixelRepresentation"] not in (0, 1)
        or _NUMBER_OF_FRAMES in header._dict
        or not isinstance(photometric, RawDataElement)
        or photometric.VR not in (None, "CS")
        or photometric.value not in _MONOCHROME2
        or pixel.length != rows * columns * 2
        or stamp.size != pixel.value_offset + pixel.length
    ):
        return None
    return NativeSlice(
        path=path,
        pixel=pixel,
        stamp=stamp,
        rows=rows,
        columns=columns,
        signed=values["PixelRepresentation"] == 1,
        unused_bits=BITS_ALLOCATED - stored,
    )


def read_native(plan: NativeSlice, out: npt.NDArray[np.int16], *, limit_bytes: int) -> bool:
    """Read a slice's stored values into ``out`` (their bytes, as int16 storage).

    Args:
        plan: from :func:`plan_native`.
        out: the destination. Shape: ``(rows, cols)``, C-contiguous.
        limit_bytes: the most bytes the pydicom path may read of the file; a pixel element
            ending beyond it is left to that path (which reports it).

    Returns:
        ``False`` when the file changed since its header was read, or its element header or
        length differ, or it is cut short: decode it by the pydicom path instead.

    Raises:
        OSError: the file cannot be opened or read.
    """
    pixel = plan.pixel
    if out.shape != (plan.rows, plan.columns) or pixel.value_offset + pixel.length > limit_bytes:
        return False
    with open(plan.path, "rb", buffering=0) as raw:
        if FileStamp.of(raw.fileno()) != plan.stamp:
            return False
        raw.seek(pixel.offset)
        if raw.read(len(pixel.header)) != pixel.header:
            return False
        return raw.readinto(out.data.cast("B")) == pixel.length


def _wrapped(value: int) -> np.int16:
    """``value`` modulo 2**16 as an int16 (exact arithmetic for results within int16)."""
    return np.int16((value + 2**15) % _INT16_WRAP - 2**15)


def native_hu(
    plan: NativeSlice, stored: npt.NDArray[np.int16], header: Dataset, where: str
) -> HuArray:
    """Turn a slice read by :func:`read_native` into HU as :func:`hu_slice` would.

    Args:
        plan: from :func:`plan_native`.
        stored: the slice's bytes as read. Shape: ``(rows, cols)``.
        header: the slice's header (rescale, padding).
        where: the series and instance, for messages.

    Returns:
        ``stored`` itself, now in HU, on the int16 path; otherwise a new float32 slice (or
        int16 slice of an out-of-range check) from
        :func:`~ggo_cli.dicom.slice_decoding.hu_from_pixels`. Shape: ``(rows, cols)``.

    Raises:
        UnsupportedSeriesError: rescale values or HU outside their budgets.
    """
    rescale = rescale_of(header, where)
    pixels: npt.NDArray[Any] = stored if plan.signed else stored.view(np.uint16)
    if plan.unused_bits:  # as pydicom's decoder: clear or sign-extend the unused high bits
        np.left_shift(pixels, plan.unused_bits, out=pixels)
        np.right_shift(pixels, plan.unused_bits, out=pixels)
    slope, intercept = rescale
    if pixels.size and slope.is_integer() and intercept.is_integer():
        factor, offset = int(slope), int(intercept)
        ends = [int(pixels.min()) * factor, int(pixels.max()) * factor]
        low, high = min(ends) + offset, max(ends) + offset
        if (
            max(map(abs, ends)) < 2**31
            and HU_INT16_MIN <= low
            and high <= HU_INT16_MAX
            and HU_RANGE[0] <= low
            and high <= HU_RANGE[1]
        ):
            # The true HU fit int16, so arithmetic modulo 2**16 on the stored bytes is exact.
            if factor != 1:
                np.multiply(stored, _wrapped(factor), out=stored)
            if offset != 0:
                np.add(stored, _wrapped(offset), out=stored)
            return stored
    return hu_from_pixels(pixels.copy(), header, rescale, where)


def read_native_file(
    path: Path, limit_bytes: int
) -> tuple[NativeSlice, Dataset, npt.NDArray[np.int16]] | None:
    """Read one file's header and stored values by the native path (a decode worker's way:
    the header is read once). Turn them into HU with :func:`native_hu`.

    Args:
        path: the file.
        limit_bytes: the most bytes read of the file.

    Returns:
        The plan, the header and the stored values (``(rows, cols)``), or ``None`` when it is
        not the common uncompressed slice (decode it with pydicom).

    Raises:
        OSError: the file cannot be opened or read.
    """
    scanned = scan_bounded(path, limit_bytes=limit_bytes)
    if scanned is None:
        return None
    header, pixel, stamp = scanned
    plan = plan_native(header, pixel, stamp, str(path))
    if plan is None:
        return None
    stored = np.empty((plan.rows, plan.columns), dtype=np.int16)
    if not read_native(plan, stored, limit_bytes=limit_bytes):
        return None
    return plan, header, stored
