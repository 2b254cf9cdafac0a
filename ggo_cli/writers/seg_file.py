"""The SEG's file: written as ``dcmwrite`` writes it, byte for byte, in a fraction of its time.

A SEG has one per-frame functional group item per frame (``slices x segments``), and pydicom's
writer encodes every element of every item anew: for 300 slices and 3 segments, 900 items and
about 18 000 elements, most of a SEG's writing time. Those items repeat the same few values (a
slice's source reference and position for each segment, the same codes in every frame), so
:class:`_SequenceEncoder` encodes each distinct value once with pydicom's own element writer and
lays the sequences out as pydicom does; everything else goes through ``dcmwrite``. A test holds
the result equal to ``dcmwrite``'s bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Hashable, Iterable
from pathlib import Path

from pydicom import dcmwrite
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO, DicomFileLike
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
from pydicom.multival import MultiValue
from pydicom.tag import ItemDelimiterTag, ItemTag, SequenceDelimiterTag, Tag
from pydicom.uid import ExplicitVRLittleEndian

__all__ = ["write_seg_file"]

PER_FRAME_GROUPS_TAG = Tag(0x52009230)
_CHARACTER_SET_TAG = Tag(0x00080005)
_PIXEL_DATA_TAG = Tag(0x7FE00010)
_UNDEFINED = b"\xff\xff\xff\xff"
_ZERO_LENGTH = b"\0\0\0\0"


_INTEGER_FORMATS = {"UL": "I", "US": "H", "SL": "i", "SS": "h"}
"""struct formats of the integer VRs with a 2-byte length (PS3.5 Table 6.2-1)."""


def _integers(elem: DataElement) -> bytes | None:
    """An integer element of a short VR encoded as pydicom's ``write_numbers`` encodes it
    (Little Endian, values packed one after the other), or ``None`` for anything else (left
    to pydicom). Each frame's Dimension Index Values differ, so caching cannot spare them."""
    value = elem.value
    values = value if isinstance(value, MultiValue | list) else [value]
    fmt = _INTEGER_FORMATS.get(elem.VR)
    if fmt is None or not values or any(type(v) is not int for v in values):
        return None
    data = struct.pack(f"<{len(values)}{fmt}", *values)
    if len(data) > 0xFFFF:
        return None
    return b"".join([_tag_bytes(elem.tag), elem.VR.encode(), struct.pack("<H", len(data)), data])


def _leaf_key(elem: DataElement) -> Hashable:
    """What decides a non-sequence element's encoding, as a hashable key.

    Text and numbers are written as ``str`` gives them (a DS keeps its original string), so
    two elements with equal keys encode to equal bytes in one character set.
    """
    value = elem.value
    if isinstance(value, bytes):
        return (elem.tag, elem.VR, value)
    if isinstance(value, MultiValue | list | tuple):
        return (elem.tag, elem.VR, tuple((type(v).__name__, str(v)) for v in value))
    return (elem.tag, elem.VR, type(value).__name__, str(value))


class _SequenceEncoder:
    """Encodes sequences as pydicom's writer does (Explicit VR Little Endian), each distinct
    non-sequence element once.

    A SEG's per-frame items repeat the same few values (a slice's source reference and
    position for each segment, the same codes in every frame); pydicom's writer spends most
    of a SEG's writing time encoding them again and again. Sequences and items are laid out
    as ``pydicom.filewriter`` lays them out (PS3.5 section 7.5): elements in tag order
    without group lengths, a sequence's and an item's length given unless it is marked
    undefined, then delimited. Integers of short VRs are packed as pydicom packs them
    (:func:`_integers`); every other element is written by pydicom's
    ``write_data_element``; an ambiguous VR (which ``dcmwrite`` settles from the pixel
    description) is refused there, never guessed.
    """

    def __init__(self) -> None:
        self._encoded: dict[Hashable, bytes] = {}
        # items by identity: highdicom hands the same item objects to many frames (a slice's
        # plane position and source reference to each segment's frame, the codes to all);
        # each entry keeps its item alive, so no other object can take its id meanwhile
        self._items: dict[tuple[int, str], tuple[Dataset, bytes]] = {}

    def element(self, elem: DataElement, encodings: str | list[str]) -> bytes:
        """One element, sequences recursively."""
        if elem.VR != "SQ":
            if elem.VR in _INTEGER_FORMATS and (integers := _integers(elem)) is not None:
                return integers
            key = (_leaf_key(elem), str(encodings))
            data = self._encoded.get(key)
            if data is None:
                buffer = DicomBytesIO()
                buffer.is_little_endian, buffer.is_implicit_VR = True, False
                write_data_element(buffer, elem, encodings)
                data = self._encoded[key] = buffer.getvalue()
            return data
        items = self.items(elem.value, encodings)
        if elem.is_undefined_length:
            return b"".join([_tag_bytes(elem.tag), b"SQ\0\0", _UNDEFINED, items,
                             _tag_bytes(SequenceDelimiterTag), _ZERO_LENGTH])
        return b"".join([_tag_bytes(elem.tag), b"SQ\0\0", struct.pack("<I", len(items)), items])

    def items(self, items: Iterable[Dataset], encodings: str | list[str]) -> bytes:
        """The items of a sequence, one after the other."""
        chunks: list[bytes] = []
        for item in items:
            key = (id(item), str(encodings))
            known = self._items.get(key)
            if known is None:
                known = self._items[key] = (item, self._item(item, encodings))
            chunks.append(known[1])
        return b"".join(chunks)

    def _item(self, item: Dataset, encodings: str | list[str]) -> bytes:
        """One item, its item tag and length (or delimiter) included."""
        item_encodings = (
            item[_CHARACTER_SET_TAG].value if _CHARACTER_SET_TAG in item else encodings
        )
        content = b"".join(
            self.element(elem, item_encodings)
            for elem in item  # in tag order
            if not (elem.tag.element == 0 and elem.tag.group > 6)  # retired group lengths
        )
        if getattr(item, "is_undefined_length_sequence_item", False):
            return b"".join([_tag_bytes(ItemTag), _UNDEFINED, content,
                             _tag_bytes(ItemDelimiterTag), _ZERO_LENGTH])
        return b"".join([_tag_bytes(ItemTag), struct.pack("<I", len(content)), content])


def _tag_bytes(tag: int) -> bytes:
    """A tag in Little Endian (group, then element)."""
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF)


def write_seg_file(path: Path, seg: Dataset, *, pixel_data: memoryview | None = None) -> None:
    """Write a SEG as ``dcmwrite(path, seg, enforce_file_format=True)`` does, byte for byte,
    in a fraction of its time.

    The elements before the Per-frame Functional Groups Sequence go through ``dcmwrite``; the
    sequence is encoded by :class:`_SequenceEncoder` (each distinct value once); the
    elements after it (the pixel data) are written by pydicom's ``write_data_element``. A
    SEG in another transfer syntax, or without per-frame items, is written by ``dcmwrite``.

    Args:
        path: the file to write.
        seg: the SEG (Explicit VR Little Endian).
        pixel_data: the Pixel Data's value, written in place of the dataset's (a
            :class:`~ggo_cli.writers.seg_highdicom.WrittenSegmentation` keeps its frames
            apart: :attr:`~ggo_cli.writers.seg_highdicom.WrittenSegmentation.frames`).

    Raises:
        ValueError: ``pixel_data`` given for a SEG that ``dcmwrite`` would have to write.
    """
    tail = sorted(tag for tag in seg.keys() if tag >= PER_FRAME_GROUPS_TAG)
    if tail[:1] != [PER_FRAME_GROUPS_TAG] or seg.file_meta.TransferSyntaxUID != (
        ExplicitVRLittleEndian
    ):
        if pixel_data is not None:
            raise ValueError("separate pixel data needs an Explicit VR Little Endian SEG")
        dcmwrite(path, seg, enforce_file_format=True)
        return
    head = Dataset()
    head.file_meta = seg.file_meta
    head.preamble = seg.preamble
    for tag in seg.keys():
        if tag < PER_FRAME_GROUPS_TAG:
            head.add(seg[tag])
    dcmwrite(path, head, enforce_file_format=True)
    encodings = seg.get("SpecificCharacterSet", default_encoding)
    per_frame = _SequenceEncoder().element(seg[PER_FRAME_GROUPS_TAG], encodings)
    with path.open("r+b") as file:
        file.seek(0, 2)
        fp = DicomFileLike(file)
        fp.is_little_endian, fp.is_implicit_VR = True, False
        fp.write(per_frame)
        for tag in tail[1:]:  # the pixel data's VR ("OB or OW") as dcmwrite settles it
            elem = correct_ambiguous_vr_element(seg[tag], seg, True)
            value = pixel_data if tag == _PIXEL_DATA_TAG and pixel_data is not None else (
                elem.value
            )
            if (
                isinstance(elem, DataElement)
                and elem.VR in ("OB", "OW")
                and isinstance(value, bytes | memoryview)
                and not elem.is_undefined_length
                and len(value) % 2 == 0
            ):
                # as write_data_element writes it, without its two copies of the value
                # (100 MB for 1000 slices and 3 segments)
                fp.write_tag(tag)
                fp.write(elem.VR.encode() + b"\0\0")
                fp.write_UL(len(value))
                fp.write(value)
            elif value is not elem.value:
                raise ValueError("separate pixel data must be OB or OW of even length")
            else:
                write_data_element(fp, elem, encodings)
