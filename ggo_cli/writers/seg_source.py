"""What a ggo-cli SEG takes from its options and source series, checked before it is built.

The SeriesNumber and SeriesDescription options and the source headers are checked first; the
SEG's UIDs are derived deterministically from the source series, the model and the options; the
source's Specific Character Set is carried over in a form highdicom accepts; and any patient
value that highdicom quotes in a message is redacted before it is raised or logged.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from .. import __version__
from ..config import SERIES_DESCRIPTION_MAX_CHARS, SERIES_NUMBER_MAX
from ..errors import InputError, OutputError, UnsupportedSeriesError

log = logging.getLogger(__name__)

REQUIRED_SOURCE_KEYWORDS: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    # Type 2 attributes highdicom copies by attribute access (present, possibly empty):
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
"""Attributes every source header must have for a SEG to be built (values may be empty for
the Type 2 ones; they are copied, never filled in)."""

_UID_NAMESPACE = "ggo-cli/seg/v1"
_MIN_REDACT_CHARS = 2
_PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "OtherPatientNames",
    "ReferringPhysicianName",
    "AccessionNumber",
    "InstitutionName",
)


def check_series_options(kind: str, series_number: int, series_description: str) -> None:
    """Check the SeriesNumber and SeriesDescription of a series ggo-cli writes, before any work.

    Args:
        kind: the object, for messages (``SEG``, ``SR``, ``SC``).
        series_number: SeriesNumber (IS): 1 to 2**31 - 1.
        series_description: SeriesDescription (LO): up to 64 characters, no backslash or
            control characters.

    Raises:
        InputError: naming the bad value and the limits.
    """
    if isinstance(series_number, bool) or not 1 <= series_number <= SERIES_NUMBER_MAX:
        raise InputError(
            f"{kind} series number must be an integer from 1 to {SERIES_NUMBER_MAX}, "
            f"got {series_number}"
        )
    if (
        len(series_description) > SERIES_DESCRIPTION_MAX_CHARS
        or "\\" in series_description
        or any(ord(ch) < 32 for ch in series_description)
    ):
        raise InputError(
            f"{kind} series description {series_description!r} must be at most "
            f"{SERIES_DESCRIPTION_MAX_CHARS} characters without backslash or control characters"
        )


def check_source_headers(datasets: Sequence[Dataset], series_uid: str) -> None:
    """Check that source headers carry every attribute a SEG needs (values not inspected).

    Discovery or loading may call this early, so a series fails before inference.

    Args:
        datasets: the series' headers.
        series_uid: SeriesInstanceUID, for the message.

    Raises:
        UnsupportedSeriesError: naming the missing keywords (never their values).
    """
    if not datasets:
        raise UnsupportedSeriesError(f"series {series_uid}: no source headers to reference")
    required = {tag_for_keyword(keyword): keyword for keyword in REQUIRED_SOURCE_KEYWORDS}
    wanted = frozenset(required)  # tags: one set difference a header, no keyword look-ups
    missing = sorted({required[tag] for ds in datasets for tag in wanted.difference(ds.keys())})
    if missing:
        raise UnsupportedSeriesError(
            f"series {series_uid}: source headers lack {', '.join(missing)}, required to write a "
            "DICOM-SEG (Type 2 attributes may be empty but must be present); ggo-cli does not "
            "fill in missing attributes"
        )


def derive_seg_uids(
    source_series_uid: str,
    model_sha256: str,
    *,
    threshold: float,
    series_number: int,
    series_description: str,
    lung_segments: bool = False,
    nonempty_frames: bool = False,
    content_digest: str = "",
) -> tuple[str, str]:
    """Derive the SEG's SeriesInstanceUID and SOPInstanceUID deterministically.

    Each UID is ``pydicom.uid.generate_uid`` (pydicom's root) over a SHA-512 of its entropy
    sources: the source series, the model digest, everything else that changes the SEG's
    series identity, and the digest of its content (:func:`seg_content_digest`: the source
    instances and the masks). Reruns therefore reproduce the UIDs, and a PACS never receives
    two different objects under one UID: a series that gained a slice, or whose masks differ
    on another machine, gets new UIDs (the delivery queue sends an object whose UID it has
    sent before only when forced).

    Args:
        source_series_uid: SeriesInstanceUID of the CT.
        model_sha256: the model's recorded graph digest.
        threshold: probability threshold applied.
        series_number: the SEG's SeriesNumber.
        series_description: the SEG's SeriesDescription.
        lung_segments: whether the SEG carries the lung segments (and GGO kept inside them).
        nonempty_frames: whether the SEG holds only its non-empty frames (``--seg-frames``).
        content_digest: :func:`seg_content_digest` of the SEG's source instances and masks
            (``""``: none, for callers that only need the identity part).

    Returns:
        ``(series_instance_uid, sop_instance_uid)``.
    """
    common = [
        _UID_NAMESPACE,
        source_series_uid,
        model_sha256,
        repr(float(threshold)),
        str(series_number),
        series_description,
    ]
    if lung_segments:
        common.append(f"lungs {__version__}")
    if nonempty_frames:  # absent for all frames: those SEGs keep their UIDs
        common.append("frames nonempty")
    if content_digest:
        common.append(f"content {content_digest}")
    series_uid = generate_uid(entropy_srcs=[*common, "SeriesInstanceUID"])
    sop_uid = generate_uid(entropy_srcs=[*common, "SOPInstanceUID"])
    return str(series_uid), str(sop_uid)

def seg_content_digest(
    source_instance_uids: Sequence[str], masks: Sequence[npt.NDArray[np.bool_]]
) -> str:
    """SHA-256 of what a SEG shows: its source instances, in order, and its masks' bits.

    Args:
        source_instance_uids: the SOPInstanceUIDs of the source slices, in volume order.
        masks: the segments' masks, in segment order (each ``(slices, rows, cols)``).

    Returns:
        The digest in hex.
    """
    digest = hashlib.sha256()
    for uid in source_instance_uids:
        digest.update(uid.encode() + b"\0")
    for mask in masks:
        digest.update(f"{mask.shape}".encode())
        digest.update(np.packbits(mask, axis=None).tobytes())
    return digest.hexdigest()


def redact_source_values(text: str, source: Dataset) -> str:
    """Replace any patient-identifying source value quoted in ``text`` by ``***``.

    Args:
        text: a message, e.g. highdicom's, that may quote source values.
        source: the source header whose patient values are looked for.

    Returns:
        ``text`` with every such value (and each component of a person name) replaced.
    """
    for keyword in _PHI_KEYWORDS:
        value = source.get(keyword)
        if value is None:
            continue
        values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
        for item in values:
            whole = str(item).strip()
            # a person name may also be quoted by component (family, given, ...)
            parts = [whole, *re.split(r"[\^=]", whole)] if "^" in whole else [whole]
            for part in sorted(parts, key=len, reverse=True):
                if len(part.strip()) >= _MIN_REDACT_CHARS:
                    text = text.replace(part.strip(), "***")
    return text


def source_character_set(source: Dataset) -> str | list[str] | None:
    """The source's Specific Character Set in a form highdicom accepts, meaning unchanged.

    An empty value is the default repertoire, the same as no value at all; an empty first value
    of several is ``ISO 2022 IR 6`` (DICOM PS3.3 C.12.1.1.2). highdicom rejects both empty
    forms, which some scanners write.

    Args:
        source: a source header.

    Returns:
        The value to pass to highdicom, or ``None`` for the default repertoire.
    """
    value = source.get("SpecificCharacterSet")
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    values = [str(item).strip() for item in value]
    if values and not values[0]:
        values[0] = "ISO 2022 IR 6"
    return values


@contextmanager
def highdicom_build(
    what: str,
    series_uid: str,
    source: Dataset,
    errors: tuple[type[Exception], ...] = (ValueError, TypeError),
) -> Iterator[None]:
    """Build a highdicom object in this block: its refusal becomes an :class:`OutputError`,
    its warnings DEBUG lines, both redacted of the source's patient values (highdicom quotes
    source values, e.g. a PatientName without ``^`` components).

    Args:
        what: the object, for the message (``DICOM-SEG``, ``DICOM SR``, ...).
        series_uid: the source series, for messages.
        source: the source header whose patient values are redacted.
        errors: the exceptions with which highdicom refuses its inputs.

    Raises:
        OutputError: highdicom refused to build the object (the message says why).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except errors as exc:
            raise OutputError(
                f"series {series_uid}: cannot build the {what}: "
                f"{redact_source_values(str(exc), source)}"
            ) from exc
    for warning in caught:
        log.debug(
            "series %s: highdicom %s: %s",
            series_uid,
            warning.category.__name__,
            redact_source_values(str(warning.message), source),
        )
