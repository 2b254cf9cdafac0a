"""Decode one CT slice and turn it into Hounsfield units, trusting nothing in the file.

The checks of :mod:`ggo_cli.dicom.budgets` on the pixel side: RescaleSlope and RescaleIntercept are
finite and plausible, the decoded frame has the announced Rows x Columns, a JPEG 2000
codestream agrees with the header (size, components, precision, sign; PS3.5 8.2.4), a
decoder's warning or logged complaint fails the slice, and the Hounsfield units fall within
:data:`~ggo_cli.dicom.budgets.HU_RANGE` (padding excepted). JPEG 2000 goes to pylibjpeg-openjpeg
only: python-gdcm aborts the whole process on some malformed codestreams.

Warnings are caught with :func:`warnings.catch_warnings`, which is process-wide: a warning
raised by another thread while a slice decodes in this one is counted against the slice (a
false failure of that series, never a silent pass).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import HTJ2K, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, JPEG2000Lossless

from ..domain import HuArray
from ..errors import UnsupportedSeriesError
from .budgets import HU_RANGE, rescale_of

log = logging.getLogger(__name__)

HU_INT16_MIN = int(np.iinfo(np.int16).min)
HU_INT16_MAX = int(np.iinfo(np.int16).max)

J2K_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})
"""Decoded by pylibjpeg-openjpeg only: python-gdcm aborts the process on some malformed
JPEG 2000 codestreams (a valid SOC/SIZ start followed by garbage)."""


class _DecoderComplaints(logging.Handler):
    """Collects what pydicom's pixel decoders log at WARNING and above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _decode_pixels(ds: Dataset, where: str) -> npt.NDArray[Any]:
    """Decode one frame; a decoder warning, logged complaint or error fails the series."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = getattr(syntax, "name", str(syntax))
    if syntax in J2K_SYNTAXES:
        _check_j2k_codestream(ds, where)
    complaints = _DecoderComplaints()
    pixel_logger = logging.getLogger("pydicom.pixels")
    pixel_logger.addHandler(complaints)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # pydicom.pixels re-exports without __all__, so mypy sees no explicit export.
            pixels = pydicom.pixels.pixel_array(  # type: ignore[attr-defined]
                ds, decoding_plugin="pylibjpeg" if syntax in J2K_SYNTAXES else ""
            )
    except (RuntimeError, NotImplementedError, ValueError, AttributeError, KeyError,
            TypeError, OverflowError, MemoryError) as exc:
        raise UnsupportedSeriesError(
            f"{where}: pixel data cannot be decoded (transfer syntax {name}): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    finally:
        pixel_logger.removeHandler(complaints)
    problems = [str(w.message) for w in caught] + complaints.messages
    if problems:
        raise UnsupportedSeriesError(
            f"{where}: the decoder reported damaged pixel data (transfer syntax {name}): "
            f"{problems[0].splitlines()[0] if problems[0] else 'a warning'}"
        )
    expected = (int(ds.Rows), int(ds.Columns))
    if pixels.shape != expected:
        raise UnsupportedSeriesError(
            f"{where}: pixel data decodes to {pixels.shape}, expected Rows x Columns "
            f"{expected}; one frame of the announced size is required"
        )
    return pixels


def _check_j2k_codestream(ds: Dataset, where: str) -> None:
    """Compare a JPEG 2000 codestream's size, components, precision and sign with the header.

    PS3.5 section 8.2.4 requires them to agree; a damaged SIZ marker otherwise decodes
    without any error (to zeros, for a precision of 12 instead of 16 bits).
    """
    from openjpeg.utils import get_parameters  # pylibjpeg-openjpeg, only where needed

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        found = get_parameters(frame)
        expected = {
            "rows": int(ds.Rows),
            "columns": int(ds.Columns),
            "samples_per_pixel": int(ds.SamplesPerPixel),
            "precision": int(ds.BitsStored),
            "is_signed": bool(ds.PixelRepresentation),
        }
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError, StopIteration) as exc:
        raise UnsupportedSeriesError(
            f"{where}: the JPEG 2000 codestream cannot be read ({type(exc).__name__})"
        ) from exc
    for key, value in expected.items():
        if found.get(key) != value:
            raise UnsupportedSeriesError(
                f"{where}: the JPEG 2000 codestream has {key} {found.get(key)}, the header "
                f"{value}; damaged pixel data or header (PS3.5 8.2.4 requires them to agree)"
            )


def hu_slice(ds: Dataset, where: str) -> HuArray:
    """Decode one slice and apply the modality transform (Rescale Slope/Intercept).

    Returns int16 when the Hounsfield units are exact integers in the int16 range (an integer
    slope and intercept, as CT scanners write: half the memory of float32), float32 otherwise
    (a fractional rescale or a Modality LUT). The result is checked against
    :data:`~ggo_cli.dicom.budgets.HU_RANGE`.
    """
    rescale = None if "ModalityLUTSequence" in ds else rescale_of(ds, where)
    return hu_from_pixels(_decode_pixels(ds, where), ds, rescale, where)


def hu_from_pixels(
    pixels: npt.NDArray[Any], ds: Dataset, rescale: tuple[float, float] | None, where: str
) -> HuArray:
    """The modality transform of :func:`hu_slice` on decoded stored values.

    Args:
        pixels: the stored values of one slice. Shape: ``(rows, cols)``.
        ds: the slice's header (Modality LUT, padding).
        rescale: ``(slope, intercept)`` from :func:`~ggo_cli.dicom.budgets.rescale_of`, or
            ``None`` to apply the header's Modality LUT.
        where: the series and instance, for messages.

    Returns:
        The slice in HU: int16 or float32 as :func:`hu_slice` says. Shape: ``(rows, cols)``.

    Raises:
        UnsupportedSeriesError: the Modality LUT cannot be applied, or HU outside
            :data:`~ggo_cli.dicom.budgets.HU_RANGE`.
    """
    if rescale is None:
        try:
            hu_lut = pydicom.pixels.apply_modality_lut(pixels, ds)  # type: ignore[attr-defined]
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            raise UnsupportedSeriesError(
                f"{where}: the Modality LUT cannot be applied ({type(exc).__name__})"
            ) from exc
        hu: HuArray = np.asarray(hu_lut, dtype=np.float32)
        _check_hu(hu, pixels, ds, where)
        return hu
    slope, intercept = rescale
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
            _check_hu(hu16, pixels, ds, where)
            return hu16
    hu = pixels.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    _check_hu(hu, pixels, ds, where)
    return hu


def _check_hu(hu: HuArray, pixels: npt.NDArray[Any], ds: Dataset, where: str) -> None:
    """Refuse HU outside :data:`~ggo_cli.dicom.budgets.HU_RANGE` (NaN too), padding excepted."""
    low, high = HU_RANGE
    if not hu.size:
        return
    with np.errstate(invalid="ignore", over="ignore"):
        lo, hi = float(hu.min()), float(hu.max())
        if low <= lo and hi <= high:
            return
        outside = ~((hu >= low) & (hu <= high))
        padding = ds.get("PixelPaddingValue")
        if isinstance(padding, int) and pixels.dtype.kind in "iu":
            limit = ds.get("PixelPaddingRangeLimit")
            top = limit if isinstance(limit, int) else padding
            outside &= ~((pixels >= min(padding, top)) & (pixels <= max(padding, top)))
        if not outside.any():
            return
        found = hu[outside]
    raise UnsupportedSeriesError(
        f"{where}: {found.size} pixels at {float(found.min()):g}..{float(found.max()):g} HU, "
        f"outside the plausible {low:g}..{high:g} HU (check RescaleSlope/RescaleIntercept "
        "or the pixel data)"
    )
