"""highdicom's Segmentation as ggo-cli builds it: the same object, built with less time and
memory (slab-wise overlap check, frames packed in one pass; for a SEG only written, no
read-side lookup tables and its pixel frames kept in one buffer).

Each override replaces a private method of highdicom 0.28 with one that gives the same result
for ggo-cli's input (bool masks, BINARY) and hands anything else back to highdicom. Should a
later highdicom rename a method, its own code runs again: the same SEG, only slower; a test
(``tests/writers/test_seg_build.py``) holds the SEG equal to highdicom's own and fails when a
method it overrides is gone.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt

__all__ = ["OVERLAP_SLAB_SLICES", "SlabCheckedSegmentation", "WrittenSegmentation"]

OVERLAP_SLAB_SLICES = 64
"""Slices whose segments are counted at a time when checking whether segments overlap."""


class SlabCheckedSegmentation(hd.seg.Segmentation):
    """highdicom's Segmentation, with its pixel check on a bool segment stack done by slabs
    and its 1-bit frames packed without pydicom's per-frame re-check.

    For a ``(frames, rows, cols, segments)`` stack, highdicom (0.28) checks that pixels are
    0 or 1 (a bool array can hold nothing else) and tells whether segments overlap from
    ``pixel_array.sum(axis=-1)`` and ``sum > 1``: two whole-volume temporaries (int64 in
    numpy, 2.1 GB for 1000 x 512 x 512; 0.5 GB even in uint8), the peak of a long series'
    SEG. Counted here a slab at a time in uint8 (exact below 256 segments), the same answer
    takes one slab. Any other input is highdicom's to check.
    """

    @classmethod
    def _check_and_cast_pixel_array(
        cls,
        pixel_array: npt.NDArray[Any] | hd.Volume,
        segment_numbers: npt.NDArray[np.integer],
        segmentation_type: hd.seg.SegmentationTypeValues,
        dtype: type,
    ) -> tuple[npt.NDArray[Any] | hd.Volume, hd.seg.SegmentsOverlapValues]:
        if not (
            isinstance(pixel_array, np.ndarray)
            and type(pixel_array) is np.ndarray
            and pixel_array.dtype == np.bool_
            and pixel_array.ndim == 4
            and 1 < pixel_array.shape[-1] == len(segment_numbers) < 256
            and segmentation_type == hd.seg.SegmentationTypeValues.BINARY
        ):
            return super()._check_and_cast_pixel_array(
                pixel_array, segment_numbers, segmentation_type, dtype
            )
        overlap = any(
            int(
                np.add.reduce(
                    pixel_array[start : start + OVERLAP_SLAB_SLICES], axis=-1, dtype=np.uint8
                ).max()
            ) > 1
            for start in range(0, pixel_array.shape[0], OVERLAP_SLAB_SLICES)
        )
        return pixel_array, (
            hd.seg.SegmentsOverlapValues.YES if overlap else hd.seg.SegmentsOverlapValues.NO
        )


    def _encode_pixels_native(self, planes: npt.NDArray[Any]) -> bytes:
        """A frame's pixels as highdicom encodes them, the 1-bit case packed directly.

        highdicom (0.28) packs each BINARY frame with pydicom's ``pack_bits``, which first
        checks, in two whole-frame passes and a copy, that every value is 0 or 1; a frame
        highdicom cast from a bool mask is exactly that, so one pass checks it here and
        ``np.packbits`` packs it as ``pack_bits`` does (little-endian bit order, PS3.5
        section 8.1.1). Anything else is highdicom's to encode.
        """
        if (
            int(self.BitsAllocated) == 1
            and planes.dtype == np.uint8
            and planes.ndim == 1
            and planes.size % 8 == 0
            and (planes.size == 0 or int(planes.max()) <= 1)
        ):
            return np.packbits(planes, bitorder="little").tobytes()
        encoded: bytes = super()._encode_pixels_native(planes)
        return encoded


class WrittenSegmentation(SlabCheckedSegmentation):
    """A Segmentation built only to be written: without the lookup tables for reading, and
    with its pixel frames in one buffer (:attr:`frames`) instead of its Pixel Data element.

    - At the end of its constructor highdicom indexes the new object's frames for its reading
      methods (``get_pixels_by_source_instance`` and the like: ``_build_luts``, about a tenth
      of a 300-slice SEG's build); a SEG that is written, read back from the file and dropped
      never calls them, so the indexing is skipped.
    - highdicom keeps each encoded frame in a list and joins them into the Pixel Data: the
      pixel data twice at once (2 x 94 MiB for 1000 slices and 3 segments of 512 x 512),
      the peak of a long series' SEG. Here each frame is copied, as it is encoded, into one
      buffer allocated for the most frames the SEG can have (its pages committed only as
      they are written), highdicom's list holds empty frames, and the buffer is what the
      writer writes as the Pixel Data (:func:`~ggo_cli.writers.seg_file.write_seg_file`'s
      ``pixel_data``), padded as highdicom pads it. The object's own Pixel Data is empty.

    Should a later highdicom rename ``_encode_pixels_native``, its frames land in its Pixel
    Data again and :attr:`frames` is ``None``: the writer then writes the element as it is.

    Keyword Args:
        pixel_array: as highdicom's (read for the buffer's size).
        segment_descriptions: as highdicom's.
    """

    def __init__(self, **kwargs: Any) -> None:
        pixels = kwargs["pixel_array"]
        n_frames = pixels.shape[0] * len(kwargs["segment_descriptions"])
        n_bytes = -(-n_frames * pixels.shape[1] * pixels.shape[2] // 8)
        self._buffer = np.zeros(n_bytes + 1, dtype=np.uint8)  # + 1: a pad byte
        self._used = 0
        self._encoded = False
        super().__init__(**kwargs)
        if self._encoded and len(self.PixelData) == 0:
            if self._used % 2:  # highdicom pads odd pixel data with b"0" (sic)
                self._buffer[self._used] = ord("0")
                self._used += 1
        else:  # highdicom wrote the Pixel Data itself
            self._encoded = False

    @property
    def frames(self) -> memoryview | None:
        """The Pixel Data's value, when the frames were kept here (else ``None``)."""
        return self._buffer.data[: self._used] if self._encoded else None

    def _encode_pixels_native(self, planes: npt.NDArray[Any]) -> bytes:
        """Encode the frame (as the parent class does) into the buffer; an empty frame for
        highdicom's list."""
        encoded = super()._encode_pixels_native(planes)
        stop = self._used + len(encoded)
        if stop >= self._buffer.size:  # never for a SEG's frames; keep highdicom's way
            raise ValueError(f"SEG frames exceed the {self._buffer.size - 1} bytes expected")
        self._buffer[self._used : stop] = np.frombuffer(encoded, dtype=np.uint8)
        self._used = stop
        self._encoded = True
        return b""

    def _build_luts(self) -> None:
        """Skip the read-side lookup tables (this object is only written)."""
