"""Reading a written SEG's per-frame items and pixel frames without parsing the whole file.

The read-back check (:mod:`ggo_cli.writers.seg_verify`) needs, of each per-frame item, only the
segment number and the source instance UID it names, and of the pixel data a slab of frames
at a time. pydicom would parse every per-frame item into nested datasets (about 4 000 for 300
slices and 3 segments) and hold the whole pixel data in memory (about 100 MB for 1000 slices
and 3 segments). Here the items are split apart and those two values read from their bytes
(:func:`split_items`, :func:`sequence_values`: tags, VRs and lengths of Explicit VR Little
Endian as PS3.5 sections 7.1.2 and 7.5 lay them out, defined or undefined lengths), and the
pixel frames are read from the file a range at a time (:class:`PixelFrames`). Nothing here
shares code with the writer (highdicom builds the SEG, pydicom's element writer encodes it).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

__all__ = ["PixelFrames", "frame_references", "raw_value", "sequence_values", "split_items"]

PER_FRAME_GROUPS_TAG = 0x52009230
SEGMENT_IDENTIFICATION_TAG = 0x0062000A
DERIVATION_IMAGE_TAG = 0x00089124
REFERENCED_SEGMENT_NUMBER_TAG = 0x0062000B
SOURCE_IMAGE_TAG = 0x00082112
REFERENCED_SOP_TAG = 0x00081155
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
"""VRs whose length is 4 bytes after 2 reserved ones (PS3.5 Table 7.1-1)."""


def _tag_length(data: bytes | memoryview, pos: int) -> tuple[int, int, int]:
    """``(tag, value length, value start)`` of the item or delimiter tag at ``pos``."""
    group, element, length = struct.unpack_from("<HHI", data, pos)
    return (group << 16) | element, length, pos + 8


def _element(data: bytes | memoryview, pos: int) -> tuple[int, bytes, int, int, int]:
    """``(tag, VR, value length, value start, header length)`` of the element at ``pos``."""
    group, element = struct.unpack_from("<HH", data, pos)
    vr = bytes(data[pos + 4 : pos + 6])
    if vr in _LONG_VRS:
        (length,) = struct.unpack_from("<I", data, pos + 8)
        return (group << 16) | element, vr, length, pos + 12, 12
    (length,) = struct.unpack_from("<H", data, pos + 6)
    return (group << 16) | element, vr, length, pos + 8, 8


def _skip_undefined(data: bytes | memoryview, pos: int, end_tag: int) -> int:
    """The position after the delimiter ``end_tag`` of an undefined-length sequence or item
    whose content starts at ``pos``."""
    while True:
        group, element = struct.unpack_from("<HH", data, pos)
        tag = (group << 16) | element
        if tag == end_tag:
            return pos + 8
        if tag == _ITEM:
            _, length, start = _tag_length(data, pos)
            pos = _skip_undefined(data, start, _ITEM_END) if length == _UNDEFINED else (
                start + length
            )
            continue
        tag, vr, length, start, _ = _element(data, pos)
        if length == _UNDEFINED:
            pos = _skip_undefined(data, start, _SEQUENCE_END)
        else:
            pos = start + length


def split_items(data: bytes) -> Iterator[dict[int, bytes]]:
    """The items of a sequence's value (Explicit VR Little Endian), each as ``{tag: the
    element's bytes, header included}`` of its top-level elements; nested values stay bytes.

    Raises:
        ValueError: the bytes do not hold items.
    """
    pos = 0
    view = memoryview(data)
    while pos < len(data):
        tag, length, start = _tag_length(view, pos)
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM:
            raise ValueError(f"expected a sequence item at byte {pos}, found tag {tag:08X}")
        end = None if length == _UNDEFINED else start + length
        elements: dict[int, bytes] = {}
        pos = start
        while end is None or pos < end:
            group, element = struct.unpack_from("<HH", view, pos)
            if end is None and ((group << 16) | element) == _ITEM_END:
                pos += 8
                break
            tag, _, length, value_start, _ = _element(view, pos)
            stop = (
                _skip_undefined(view, value_start, _SEQUENCE_END)
                if length == _UNDEFINED
                else value_start + length
            )
            elements[tag] = bytes(view[pos:stop])
            pos = stop
        yield elements


def sequence_values(element: bytes, path: tuple[int, ...]) -> list[bytes]:
    """The values at ``path`` inside a sequence element (its bytes, header included): each
    item's element ``path[0]``, descending into nested sequences for the rest of ``path``.

    For example ``(SourceImageSequence, ReferencedSOPInstanceUID)`` inside a Derivation Image
    Sequence gives each referenced instance's UID, as stored (padding included).

    Raises:
        ValueError: ``element`` is not a sequence, or its items are not well formed.
    """
    _, vr, length, start, _ = _element(element, 0)
    if vr != b"SQ":
        raise ValueError(f"expected a sequence, found VR {vr!r}")
    content = element[start:] if length == _UNDEFINED else element[start : start + length]
    found: list[bytes] = []
    for item in split_items(content):
        value = item.get(path[0])
        if value is None:
            continue
        if len(path) > 1:
            found += sequence_values(value, path[1:])
        else:
            _, _, length, start, _ = _element(value, 0)
            found.append(value[start : start + length])
    return found


def raw_value(dataset: Dataset, tag: int, file: BinaryIO) -> bytes | None:
    """An element's value bytes as read, from the file when pydicom deferred them; ``None``
    when pydicom has already converted the value (the caller then uses the dataset)."""
    raw = dataset.get_item(tag, keep_deferred=True)
    if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED:
        return None
    if raw.value is not None:
        return bytes(raw.value)
    file.seek(raw.value_tell)
    return file.read(raw.length)


def frame_references(seg: Dataset, file: BinaryIO) -> Iterator[tuple[list[int], list[str]]]:
    """Each frame's segment numbers and source instance UIDs, from its Segment Identification
    and Derivation Image functional groups: its per-frame item's, else the shared one (PS3.3
    C.7.6.16).

    Args:
        seg: the SEG as pydicom read it (large elements possibly deferred).
        file: the SEG's file, open for binary reading.

    The per-frame items are read from their bytes (above), each
    distinct group once (the frames of one slice share their Derivation Image item, those of
    one segment their Segment Identification item); a group in the shared item, or a sequence
    pydicom has already parsed (an undefined length), is read through pydicom.
    """
    shared = seg.SharedFunctionalGroupsSequence[0]

    def numbers(group: Sequence) -> list[int]:
        return [int(item.ReferencedSegmentNumber) for item in group]

    def sources(group: Sequence) -> list[str]:
        return [str(s.ReferencedSOPInstanceUID) for d in group for s in d.SourceImageSequence]

    def in_shared(tag: int) -> Sequence:
        if tag not in shared:
            raise KeyError(f"frame has no {Tag(tag)} functional group")
        value: Sequence = shared[tag].value
        return value

    data = raw_value(seg, PER_FRAME_GROUPS_TAG, file)
    if data is None:
        for item in seg.PerFrameFunctionalGroupsSequence:
            identification, derivation = (
                item[tag].value if tag in item else in_shared(tag)
                for tag in (SEGMENT_IDENTIFICATION_TAG, DERIVATION_IMAGE_TAG)
            )
            yield numbers(identification), sources(derivation)
        return
    read_numbers: dict[bytes, list[int]] = {}
    read_sources: dict[bytes, list[str]] = {}
    for elements in split_items(data):
        element = elements.get(SEGMENT_IDENTIFICATION_TAG)
        if element is None:
            segment_numbers = numbers(in_shared(SEGMENT_IDENTIFICATION_TAG))
        else:
            if element not in read_numbers:
                read_numbers[element] = [
                    int.from_bytes(value, "little") if len(value) == 2 else -1
                    for value in sequence_values(element, (REFERENCED_SEGMENT_NUMBER_TAG,))
                ]
            segment_numbers = read_numbers[element]
        element = elements.get(DERIVATION_IMAGE_TAG)
        if element is None:
            source_uids = sources(in_shared(DERIVATION_IMAGE_TAG))
        else:
            if element not in read_sources:
                read_sources[element] = [
                    value.decode("ascii").rstrip("\0 ")
                    for value in sequence_values(element, (SOURCE_IMAGE_TAG, REFERENCED_SOP_TAG))
                ]
            source_uids = read_sources[element]
        yield segment_numbers, source_uids


class PixelFrames:
    """Bit-packed BINARY frames of a SEG file, read from the file a range at a time."""

    def __init__(self, file: BinaryIO, offset: int, length: int, n_pixels: int) -> None:
        """Args:
        file: the SEG, open for binary reading.
        offset: where the pixel data's value starts in the file.
        length: the pixel data's length in bytes.
        n_pixels: pixels per frame (rows x columns).
        """
        self._file, self._offset, self._length, self._n_pixels = file, offset, length, n_pixels

    @classmethod
    def of(cls, pixel_data: bytes, n_pixels: int) -> PixelFrames:
        """Frames held in memory (pixel data pydicom has read)."""
        from io import BytesIO

        return cls(BytesIO(pixel_data), 0, len(pixel_data), n_pixels)

    def bits(self, frames: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
        """The frames, each packed again from its first pixel; a frame index of -1 (a frame
        the SEG omits) reads as zeros. Frames follow one another without padding (PS3.5
        section 8.1.1), so with a pixel count not a multiple of 8 a frame starts inside a
        byte. Only the bytes from the first to the last frame asked for are read.

        Shape: ``(len(frames), ceil(n_pixels / 8))``.
        """
        n_pixels = self._n_pixels
        n_bytes = -(-n_pixels // 8)
        out = np.zeros((len(frames), n_bytes), dtype=np.uint8)
        present = frames >= 0
        if not present.any():
            return out
        first_bit = int(frames[present].min()) * n_pixels
        stop_bit = (int(frames[present].max()) + 1) * n_pixels
        first_byte = first_bit // 8
        stop_byte = min(-(-stop_bit // 8), self._length)
        self._file.seek(self._offset + first_byte)
        data = np.frombuffer(self._file.read(stop_byte - first_byte), dtype=np.uint8)
        if data.size != stop_byte - first_byte:
            raise ValueError("the file ends before its pixel frames")
        if n_pixels % 8 == 0:
            whole = data[: data.size // n_bytes * n_bytes].reshape(-1, n_bytes)
            out[present] = whole[frames[present] - first_byte // n_bytes]
            return out
        for row, frame in enumerate(frames.tolist()):
            if frame >= 0:
                first = frame * n_pixels - first_byte * 8
                chunk = data[first // 8 : -(-(first + n_pixels) // 8)]
                bits = np.unpackbits(chunk, bitorder="little")[first % 8 : first % 8 + n_pixels]
                out[row] = np.packbits(bits, bitorder="little")
        return out
