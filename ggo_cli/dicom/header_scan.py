"""Read the common shape of a DICOM header in one pass over its bytes, as pydicom would.

Almost every CT file is a PS3.10 file (preamble and ``DICM``) in Explicit or Implicit VR Little
Endian (or an encapsulated syntax, whose dataset is Explicit VR Little Endian), with defined
lengths for every element before the pixel data. For such a header this module walks the
elements of the bytes already read and builds the same :class:`~pydicom.dataset.FileDataset`
that :func:`pydicom.dcmread` builds with ``stop_before_pixels=True``: the same raw elements
(tag, VR, length, value bytes, value offset), so pydicom converts every value exactly as it
would have, lazily, on access. It skips the generic reader's per-element machinery, and it
also tells where the pixel data element starts, so that :mod:`ggo_cli.dicom.native_pixels`
reads uncompressed pixels without parsing the file again.

Anything else (no preamble, a deflated or big-endian dataset, an undefined length, a VR
pydicom does not know, a VR encoding that differs from the transfer syntax, command elements,
an element cut short by the end of what was read) is answered ``None``: the caller then lets
pydicom read the file, so every unusual file behaves exactly as before.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import cast

import pydicom.uid
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import (
    DataElement,
    RawDataElement,
    convert_raw_data_element,
    empty_value_for_VR,
)
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
"""Pixel Data, Double Float and Float Pixel Data: a header read stops before any of them."""

PREAMBLE_BYTES = 132
"""The 128-byte preamble and the ``DICM`` prefix (PS3.10 section 7.1)."""

_SPECIFIC_CHARACTER_SET = 0x00080005
_GROUP_LENGTH = 0x00020000
_TRANSFER_SYNTAX = 0x00020010
_ITEM_DELIMITATION = 0xFFFEE00D
_UNDEFINED_LENGTH = 0xFFFFFFFF
_VR_NAMES = {vr.value.encode("ascii"): vr.value for vr in VR}
_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHL")
_LONG_LENGTH = struct.Struct("<L")


class Incomplete(Exception):
    """The bytes read end inside the header: read more of the file and scan again."""


@dataclass(frozen=True, slots=True)
class PixelElement:
    """Where a file's top-level pixel data element starts.

    Attributes:
        offset: byte offset of the element's tag in the file.
        header: the element's tag, VR and length bytes as written (8 or 12 bytes).
        tag: the element's tag (Pixel Data, Float or Double Float Pixel Data).
        vr: the VR written in the file (``None`` for Implicit VR).
        length: the value length in bytes (``0xFFFFFFFF`` when encapsulated).
    """

    offset: int
    header: bytes
    tag: int
    vr: str | None
    length: int

    @property
    def value_offset(self) -> int:
        """Byte offset of the element's value in the file."""
        return self.offset + len(self.header)


def _elements(
    data: bytes,
    pos: int,
    *,
    implicit: bool,
    complete: bool,
    wanted: frozenset[int] | None,
    meta: bool = False,
) -> tuple[dict[BaseTag, RawDataElement | DataElement], int, PixelElement | None] | None:
    """Walk elements from ``pos`` until a pixel data tag (returned as the pixel element), the
    first element outside group 0002 (``meta``), the end of ``data``, or anything unusual
    (``None``). Mirrors :func:`pydicom.filereader.data_element_generator` for defined
    lengths."""
    elements: dict[BaseTag, RawDataElement | DataElement] = {}
    end_of_data = len(data)
    explicit_unpack, implicit_unpack, long_unpack = (
        _EXPLICIT.unpack_from, _IMPLICIT.unpack_from, _LONG_LENGTH.unpack_from
    )
    new_element = tuple.__new__  # RawDataElement's own __new__ is a slow Python function
    while True:
        if pos + 8 > end_of_data:
            if not complete:
                raise Incomplete
            if pos != end_of_data:  # a few stray bytes: pydicom ignores them, we defer to it
                return None
            return elements, pos, None
        if meta and data[pos : pos + 2] != b"\x02\x00":
            return elements, pos, None
        vr: str | None
        if implicit:
            group, number, length = implicit_unpack(data, pos)
            vr, size = None, 8
        else:
            group, number, vr_bytes, length = explicit_unpack(data, pos)
            vr = _VR_NAMES.get(vr_bytes)
            if vr is None:
                return None
            size = 8
            if vr in EXPLICIT_VR_LENGTH_32:
                if pos + 12 > end_of_data:
                    if not complete:
                        raise Incomplete
                    return None
                (length,) = long_unpack(data, pos + 8)
                size = 12
        tag = group << 16 | number
        if tag == _ITEM_DELIMITATION:
            return None
        if tag in PIXEL_TAGS and not meta:
            return elements, pos, PixelElement(pos, data[pos : pos + size], tag, vr, length)
        if length == _UNDEFINED_LENGTH:
            return None
        start = pos + size
        pos = start + length
        if pos > end_of_data:
            if not complete:
                raise Incomplete
            return None
        if wanted is not None and tag not in wanted:
            continue
        value = data[start:pos] if length else cast(bytes | None, empty_value_for_VR(vr, raw=True))
        key = BaseTag(tag)
        elements[key] = new_element(
            RawDataElement, (key, vr, length, value, start, implicit, True, True, False)
        )


def _meta(data: bytes, *, complete: bool) -> tuple[FileMetaDataset, int] | None:
    """The file meta group (always Explicit VR Little Endian) and where the dataset starts,
    as :func:`pydicom.filereader._read_file_meta_info` reads it."""
    found = _elements(
        data, PREAMBLE_BYTES, implicit=False, complete=complete, wanted=None, meta=True
    )
    if found is None or not found[0]:
        return None
    raw, pos, _ = found
    first = next(iter(raw.values()))
    # The group length first, as written by every PS3.10 writer; anything else (no group
    # length, a wrong one that pydicom logs) is left to pydicom's reader. Its values stay raw
    # (pydicom converts them on access, as it would have on reading).
    if (
        not isinstance(first, RawDataElement)
        or first.tag != _GROUP_LENGTH
        or first.VR != "UL"
        or first.length != 4
        or int.from_bytes(cast(bytes, first.value), "little") != pos - (PREAMBLE_BYTES + 12)
    ):
        return None
    file_meta = FileMetaDataset(raw)  # pydicom's intermediate Dataset shares this dict
    file_meta.set_original_encoding(
        is_implicit_vr=False, is_little_endian=True, character_encoding=default_encoding
    )
    return file_meta, pos


def transfer_syntax(file_meta: Dataset) -> str | None:
    """The TransferSyntaxUID of a file meta group as pydicom reads it, from its raw bytes
    while it is still raw; ``None`` when it is missing, empty or multi-valued."""
    element = file_meta._dict.get(BaseTag(_TRANSFER_SYNTAX))
    if element is None:
        return None
    if not isinstance(element, RawDataElement):
        value = element.value
        return value if isinstance(value, str) and value else None
    if element.VR not in ("UI", None) or not isinstance(element.value, bytes):
        return None
    # as pydicom's convert_UI and UID: ISO 8859-1, padding off, one value, whitespace off
    text = element.value.decode("latin-1").rstrip("\0 ")
    if "\\" in text or not text.strip():
        return None
    return text.strip()


def _is_implicit(syntax: object) -> bool | None:
    """Whether the dataset is Implicit VR (``None``: not little endian or deflated, or no
    syntax at all: pydicom's own reader decides)."""
    if syntax == pydicom.uid.ImplicitVRLittleEndian:
        return True
    if syntax == pydicom.uid.ExplicitVRLittleEndian:
        return False
    if syntax is None or syntax in (
        pydicom.uid.ExplicitVRBigEndian,
        pydicom.uid.DeflatedExplicitVRLittleEndian,
        *pydicom.uid.PrivateTransferSyntaxes,
    ):
        return None
    return False  # encapsulated syntaxes: Explicit VR Little Endian (PS3.5 A.4)


def scan_header(
    data: bytes,
    name: str,
    *,
    complete: bool,
    specific_tags: frozenset[int] | None = None,
) -> tuple[FileDataset, PixelElement | None] | None:
    """Build a file's header from its first bytes, as ``dcmread(stop_before_pixels=True)`` would.

    Args:
        data: the file's first bytes.
        name: the file's name for :attr:`FileDataset.filename`.
        complete: ``data`` holds everything a reader may see (the file's end or the read
            limit); otherwise running off its end raises :class:`Incomplete`.
        specific_tags: keep only these tags (plus Specific Character Set), as pydicom's
            ``specific_tags``.

    Returns:
        The header and its pixel data element (``None`` when the header ends without one),
        or ``None`` when the file is not of the common shape (read it with pydicom).

    Raises:
        Incomplete: ``data`` ends inside the header and is not ``complete``.
    """
    if len(data) < PREAMBLE_BYTES or data[128:PREAMBLE_BYTES] != b"DICM":
        return None
    meta = _meta(data, complete=complete)
    if meta is None:
        return None
    file_meta, pos = meta
    if pos + 6 > len(data):
        if not complete:
            raise Incomplete
        return None
    if data[pos : pos + 2] == b"\x00\x00":  # a command set: pydicom's reader handles it
        return None
    implicit = _is_implicit(transfer_syntax(file_meta))
    first_vr = data[pos + 4 : pos + 6]
    if implicit is None or implicit == (0x40 < first_vr[0] < 0x5B and 0x40 < first_vr[1] < 0x5B):
        return None  # the dataset's VR encoding differs from its transfer syntax
    wanted = None
    if specific_tags is not None:
        wanted = specific_tags | {_SPECIFIC_CHARACTER_SET}
    found = _elements(data, pos, implicit=implicit, complete=complete, wanted=wanted)
    if found is None:
        return None
    raw, _, pixel = found
    dataset = Dataset(raw, parent_encoding=default_encoding)
    encoding: str | list[str] = default_encoding
    if _SPECIFIC_CHARACTER_SET in raw:
        element = raw[BaseTag(_SPECIFIC_CHARACTER_SET)]
        try:
            char_set = convert_raw_data_element(cast(RawDataElement, element)).value
            encoding = convert_encodings(char_set)
        except Exception:  # noqa: BLE001 - pydicom's own reader then meets (and reports) it
            return None
    dataset.set_original_encoding(implicit, True, encoding)
    header = FileDataset(name, dataset, data[:128], file_meta, implicit, True)
    header.set_original_encoding(implicit, True, dataset._character_set)
    return header, pixel
