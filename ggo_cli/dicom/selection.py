"""The selection rules: which CT series are analysed, and why the others are skipped.

Rule 3 of :mod:`ggo_cli.dicom.discovery` (controlled by :class:`~ggo_cli.config.SelectionRules`)
and rule 5 (broken image files hold back the series of their folder) live here; every rule
returns a reason string or ``None`` and never raises on malformed header values.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset

from ..config import SelectionRules
from .budgets import HEADER_READ_BYTES, geometry_problem

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
CT_IMAGE_CLASSES = frozenset(
    {CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_ENHANCED_CT_STORAGE}
)
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
"""A DICOM UID (PS3.5 section 9.1); also makes UIDs safe as folder names."""
LOCALIZER_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM"})
_GEOMETRY_KEYWORDS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
_ORIENTATION_ATOL = 1e-3
_SPACING_RTOL = 1e-3


def header_text(ds: Dataset, keyword: str) -> str:
    """A header value as text; ``""`` when it is missing or empty."""
    value = ds.get(keyword, "")
    return "" if value is None else str(value)


def _float_list(ds: Dataset, keyword: str) -> list[float] | None:
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def skip_reason(
    headers: Sequence[Dataset], rules: SelectionRules, tags: Sequence[str] = ()
) -> str | None:
    """Return the first selection rule the series breaks, or ``None``.

    A header value that cannot be read as its type (text in a number, say) is itself a
    reason: selection never raises on malformed input.
    """
    try:
        return _first_broken_rule(headers, rules, tags)
    except (TypeError, ValueError, OverflowError, AttributeError, KeyError) as exc:
        log.debug("malformed header value: %s: %s", type(exc).__name__, exc)
        return f"malformed header value ({type(exc).__name__}); the headers cannot be trusted"


def _first_broken_rule(
    headers: Sequence[Dataset], rules: SelectionRules, tags: Sequence[str] = ()
) -> str | None:
    """The rules of :func:`skip_reason`, in order; ``tags`` name the headers' files."""

    def named(index: int) -> str:
        return f" (file {tags[index]})" if index < len(tags) else ""

    first = headers[0]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not UID_PATTERN.match(header_text(first, keyword)):
            return f"{keyword} is not a valid DICOM UID"
    sop_class = header_text(first, "SOPClassUID")
    if sop_class != CT_IMAGE_STORAGE or any(
        int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in headers
    ):
        return "multi-frame (enhanced) CT is not supported; export the series as single-frame CT"
    for ds in headers:
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        if not image_type or image_type[0] != "ORIGINAL":
            return f"ImageType {'/'.join(image_type) or 'missing'} is not ORIGINAL"
        hit = LOCALIZER_TYPES.intersection(image_type)
        if hit:
            return f"localizer image (ImageType contains {sorted(hit)[0]})"
    if len(headers) < rules.min_slices:
        return f"{len(headers)} slices; at least {rules.min_slices} required (see --min-slices)"
    geometry: list[dict[str, list[float] | None]] = []  # each value read once
    for index, ds in enumerate(headers):
        geometry.append({k: _float_list(ds, k) for k in _GEOMETRY_KEYWORDS})
        missing = [k for k in _GEOMETRY_KEYWORDS if geometry[-1][k] is None]
        if missing:
            return (
                f"instance without {missing[0]}{named(index)}; slice geometry is required "
                "(a truncated or damaged file?)"
            )
    frames = {header_text(ds, "FrameOfReferenceUID") for ds in headers}
    if len(frames) != 1 or "" in frames:
        return f"{len(frames - {''})} frames of reference; exactly one is required"
    sizes = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in headers}
    if len(sizes) != 1:
        return f"mixed image sizes {sorted(sizes)}; all slices must have the same rows and columns"
    spacings = [g["PixelSpacing"] or [] for g in geometry]
    if any(len(s) != 2 or min(s) <= 0 for s in spacings) or any(
        not math.isclose(a, b, rel_tol=_SPACING_RTOL)
        for s in spacings
        for a, b in zip(s, spacings[0], strict=True)
    ):
        return "pixel spacing differs between slices (or is invalid)"
    orientations = [g["ImageOrientationPatient"] or [] for g in geometry]
    if any(len(o) != 6 for o in orientations) or any(
        abs(a - b) > _ORIENTATION_ATOL
        for o in orientations
        for a, b in zip(o, orientations[0], strict=True)
    ):
        return "image orientation differs between slices (or is invalid)"
    budget = geometry_problem(
        rows=next(iter(sizes))[0],
        columns=next(iter(sizes))[1],
        pixel_spacing=spacings[0],
        orientation=orientations[0],
        positions=[g["ImagePositionPatient"] or [] for g in geometry],
    )
    if budget is not None:
        return budget
    tilt = _tilt_from_axial_deg(orientations[0])
    if tilt > rules.axial_tolerance_deg:
        return (
            f"not axial: slice normal is {tilt:.1f} degrees from the patient z axis "
            f"(tolerance {rules.axial_tolerance_deg:g}, see --axial-tolerance)"
        )
    return None


_SERIES_UID_ELEMENT = re.compile(
    rb"\x20\x00\x0e\x00(?:UI(?P<explicit>[\x00-\xff]{2})|(?P<implicit>[\x00-\xff]{4}))"
)


def salvage_series_uid(path: Path) -> str | None:
    """The SeriesInstanceUID of a broken file, found in its first bytes, if it is readable.

    A file truncated after its header, or whose header a parser rejects further on, usually
    still holds the Series Instance UID element (0020,000E) near its start. Only a valid UID
    counts; a deflated or unreadable file gives ``None``.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEADER_READ_BYTES)
    except OSError:
        return None
    for match in _SERIES_UID_ELEMENT.finditer(head):
        size_bytes = match.group("explicit") or match.group("implicit")
        size = int.from_bytes(size_bytes, "little")
        if not 0 < size <= 64:
            continue
        start = match.end()
        value = head[start : start + size].rstrip(b"\x00 ").decode("ascii", errors="replace")
        if UID_PATTERN.match(value):
            return value
    return None


def broken_files_reason(
    series_uid: str, files: Sequence[Path], broken: dict[Path, list[tuple[str, str | None]]]
) -> str | None:
    """A series sharing a folder with broken image files of its own (or of unknown series)
    would load with a gap: name them."""
    tags = sorted(
        {
            tag
            for folder in {p.parent for p in files}
            for tag, owner in broken.get(folder, [])
            if owner is None or owner == series_uid
        }
    )
    if not tags:
        return None
    shown = ", ".join(f"file {tag}" for tag in tags[:3]) + (", ..." if len(tags) > 3 else "")
    return (
        f"{len(tags)} unreadable, truncated or oversized DICOM file(s) in its folder ({shown}); "
        "the series would have a gap: repair or remove them (-v --log-file shows the paths at "
        "DEBUG)"
    )


def _tilt_from_axial_deg(orientation: Sequence[float]) -> float:
    """Angle between the slice normal (row x column cosines) and the patient z axis."""
    rx, ry, rz, cx, cy, cz = orientation
    nx, ny, nz = ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx
    norm = math.sqrt(nx * nx + ny * ny + nz * nz)
    if norm < 1e-6:
        return 90.0
    return math.degrees(math.acos(min(1.0, abs(nz) / norm)))
