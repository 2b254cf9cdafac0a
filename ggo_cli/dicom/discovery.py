"""Find chest CT series below the inputs, reading headers only.

Rules (documented in the README, controlled by :class:`~ggo_cli.config.SelectionRules`):

1. Walk every input recursively (files or folders, any layout, any names); symlinked folders
   are followed once (no loops); zero-byte files, non-DICOM files and DICOMDIR are ignored.
2. Only image objects are kept; non-image objects (SR, PR, SEG, RT, KO, ...) are ignored, and so
   are images of other modalities. Images with Modality CT are grouped by SeriesInstanceUID;
   exact duplicate instances (same SOPInstanceUID) are dropped.
3. A CT series is analysed when: CT Image Storage (single-frame); ImageType ORIGINAL and not
   LOCALIZER/SCOUT/TOPOGRAM; every instance has position, orientation and pixel spacing; one
   FrameOfReferenceUID; the same rows, columns, pixel spacing and orientation throughout;
   axial (slice normal within the tolerance of the patient's z axis); at least ``min_slices``
   instances; the geometry budgets of :mod:`ggo_cli.dicom.budgets` hold (Rows and Columns
   16..2048, PixelSpacing 0.1..5 mm, finite positions within 100 m, orthonormal finite
   orientation, at most 2000 slices and 2**29 voxels). Otherwise it is reported as skipped
   with the first rule it broke; a malformed value is itself a reason, never an exception.
4. Each file costs a bounded read: at most ``HEADER_READ_BYTES`` of it, a deflated dataset is
   inflated to at most ``MAX_INFLATED_FILE_BYTES`` (a file that inflates further is broken),
   and a file without the DICOM preamble is parsed only when it starts like a dataset (so a
   64 MB zero-filled file is dismissed at once).
5. A file that looks like a CT image but cannot be read (no permission, a header cut short
   before its UIDs, a parse error after the preamble, a deflate bomb) would leave a gap in
   its series: every series with files in the same folder is skipped naming it by a digest
   of its path (``file #3f9a2c``; the path at DEBUG only).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ..config import SelectionRules
from ..domain import SeriesInfo
from ..errors import InputError
from .budgets import HEADER_READ_BYTES, file_tag, geometry_problem, read_bounded

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
"""A DICOM UID (PS3.5 section 9.1); also makes UIDs safe as folder names."""
LOCALIZER_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM"})
_GEOMETRY_KEYWORDS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
_ORIENTATION_ATOL = 1e-3
_SPACING_RTOL = 1e-3
_HEADER_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ImageType",
    "NumberOfFrames",
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "StudyDate",
    "SeriesDescription",
    "SeriesNumber",
    "PatientID",
)
CT_IMAGE_CLASSES = frozenset(
    {CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_ENHANCED_CT_STORAGE}
)


@dataclass(frozen=True, slots=True)
class Discovery:
    """What a walk over the inputs found.

    Attributes:
        series: every CT series, eligible or skipped, in a stable order (study, series UID).
        n_files: files examined.
        n_dicom_images: CT image instances read.
        n_ignored: files that were not CT images (non-DICOM, DICOMDIR, empty, non-image objects,
            other modalities).
        n_duplicates: duplicate instances dropped.
    """

    series: tuple[SeriesInfo, ...]
    n_files: int
    n_dicom_images: int
    n_ignored: int
    n_duplicates: int

    @property
    def eligible(self) -> tuple[SeriesInfo, ...]:
        """The series that passed every rule."""
        return tuple(s for s in self.series if s.eligible)


def iter_files(inputs: Sequence[Path]) -> Iterator[tuple[Path, Path]]:
    """Yield ``(file, input_root)`` for every regular file below the inputs, sorted.

    Symlinked folders are followed, but each real folder is visited once, so loops end.

    Args:
        inputs: files or folders.

    Raises:
        InputError: if an input does not exist.
    """
    for root in inputs:
        if not root.exists():
            raise InputError(f"input not found: {root} (give an existing file or folder)")
        if root.is_file():
            yield root, root.parent
            continue
        seen: set[tuple[int, int]] = set()
        for folder, dirnames, filenames in os.walk(root, followlinks=True):
            try:
                stat = os.stat(folder)
            except OSError as exc:
                log.warning(
                    "cannot read folder %s: %s", _relative(Path(folder), root), exc.strerror
                )
                dirnames[:] = []
                continue
            key = (stat.st_dev, stat.st_ino)
            if key in seen:
                log.debug("folder visited before (symlink loop): %s", _relative(Path(folder), root))
                dirnames[:] = []
                continue
            seen.add(key)
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(folder) / name
                if path.is_file():
                    yield path, root


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def read_header(path: Path) -> Dataset | None:
    """Read a file's DICOM header without pixel data, within :mod:`ggo_cli.dicom.budgets`.

    Args:
        path: the file.

    Returns:
        The header of a DICOM instance, or ``None`` for anything else (empty file, not DICOM,
        DICOMDIR, no SOP Instance or Series UID, unreadable).
    """
    return _read_header(path)[0]


def _read_header(path: Path) -> tuple[Dataset | None, bool]:
    """The header (or ``None``) and whether the file is a *broken* image: it cannot be opened,
    or it has a DICOM preamble and cannot be parsed, or its file meta names a CT image but
    its header ends before the SOP Instance and Series UIDs (a truncated file)."""
    try:
        if path.stat().st_size == 0:
            log.debug("ignored empty file %s", path.name)
            return None, False
        with open(path, "rb") as fh:
            has_preamble = fh.read(132)[128:] == b"DICM"
    except OSError as exc:
        log.debug("unreadable file %s (%s)", path, exc.strerror)
        return None, True
    try:
        ds = read_bounded(
            path,
            limit_bytes=HEADER_READ_BYTES,
            stop_before_pixels=True,
            specific_tags=_HEADER_TAGS,
        )
    except InvalidDicomError as exc:
        log.debug("ignored non-DICOM file %s (%s)", path.name, type(exc).__name__)
        return None, False
    except Exception as exc:  # noqa: BLE001 - unreadable or malformed: never stops discovery
        log.debug("unreadable file %s (%s: %s)", path, type(exc).__name__, exc)
        return None, has_preamble
    try:
        meta = getattr(ds, "file_meta", None)
        meta_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or "")
        sop_class = str(ds.get("SOPClassUID", "") or meta_class)
        if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
            log.debug("ignored DICOMDIR %s", path.name)
            return None, False
        if not ds.get("SOPInstanceUID") or not ds.get("SeriesInstanceUID"):
            log.debug("ignored %s: no SOP Instance or Series UID", path)
            return None, meta_class in CT_IMAGE_CLASSES
    except Exception as exc:  # noqa: BLE001 - malformed header values
        log.debug("ignored malformed header in %s (%s)", path.name, type(exc).__name__)
        return None, has_preamble
    return ds, False


def _text(ds: Dataset, keyword: str) -> str:
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


def _skip_reason(
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
    """The rules of :func:`_skip_reason`, in order; ``tags`` name the headers' files."""

    def named(index: int) -> str:
        return f" (file {tags[index]})" if index < len(tags) else ""

    first = headers[0]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not UID_PATTERN.match(_text(first, keyword)):
            return f"{keyword} is not a valid DICOM UID"
    sop_class = _text(first, "SOPClassUID")
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
    for index, ds in enumerate(headers):
        missing = [k for k in _GEOMETRY_KEYWORDS if _float_list(ds, k) is None]
        if missing:
            return (
                f"instance without {missing[0]}{named(index)}; slice geometry is required "
                "(a truncated or damaged file?)"
            )
    frames = {_text(ds, "FrameOfReferenceUID") for ds in headers}
    if len(frames) != 1 or "" in frames:
        return f"{len(frames - {''})} frames of reference; exactly one is required"
    sizes = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in headers}
    if len(sizes) != 1:
        return f"mixed image sizes {sorted(sizes)}; all slices must have the same rows and columns"
    spacings = [_float_list(ds, "PixelSpacing") or [] for ds in headers]
    if any(len(s) != 2 or min(s) <= 0 for s in spacings) or any(
        not math.isclose(a, b, rel_tol=_SPACING_RTOL)
        for s in spacings
        for a, b in zip(s, spacings[0], strict=True)
    ):
        return "pixel spacing differs between slices (or is invalid)"
    orientations = [_float_list(ds, "ImageOrientationPatient") or [] for ds in headers]
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
        positions=[_float_list(ds, "ImagePositionPatient") or [] for ds in headers],
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


def _broken_files_reason(
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


def _series_number(value: object) -> int | None:
    """SeriesNumber as an int, or ``None`` when missing or malformed."""
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return None


def discover_series(inputs: Sequence[Path], rules: SelectionRules | None = None) -> Discovery:
    """Walk the inputs and return every CT series with its eligibility.

    Args:
        inputs: files or folders to search.
        rules: selection rules; defaults apply when ``None``.

    Returns:
        The :class:`Discovery`; series are sorted by StudyInstanceUID then SeriesInstanceUID.

    Raises:
        InputError: if an input does not exist.
    """
    rules = rules or SelectionRules()
    groups: dict[str, dict[str, tuple[Path, Dataset]]] = defaultdict(dict)
    roots: dict[str, Path] = {}
    # Broken image files per folder, with their series when it can be salvaged (else None:
    # they hold back every series of their folder).
    broken: dict[Path, list[tuple[str, str | None]]] = defaultdict(list)
    n_files = n_images = n_ignored = n_duplicates = 0
    for path, root in iter_files(inputs):
        n_files += 1
        ds, is_broken = _read_header(path)
        if ds is None:
            n_ignored += 1
            if is_broken:
                tag = file_tag(_relative(path, root))
                broken[path.parent].append((tag, salvage_series_uid(path)))
                log.debug("broken image file %s is %s", path, tag)
            continue
        if (
            _text(ds, "Modality").upper() != "CT"
            or _text(ds, "SOPClassUID") not in CT_IMAGE_CLASSES
        ):
            # SR, PR, SEG, RT, KO and images of other modalities are not CT series to analyse.
            log.debug(
                "ignored %s: modality %s, SOP class %s",
                path.name,
                _text(ds, "Modality") or "missing",
                _text(ds, "SOPClassUID") or "missing",
            )
            n_ignored += 1
            continue
        n_images += 1
        series_uid = _text(ds, "SeriesInstanceUID")
        sop_uid = _text(ds, "SOPInstanceUID")
        if sop_uid in groups[series_uid]:
            n_duplicates += 1
            log.debug("dropped duplicate instance %s", path.name)
            continue
        groups[series_uid][sop_uid] = (path, ds)
        roots.setdefault(series_uid, root)
    series: list[SeriesInfo] = []
    for series_uid, instances in groups.items():
        ordered = sorted(instances.values(), key=lambda item: str(item[0]))
        headers = [ds for _, ds in ordered]
        files = tuple(path for path, _ in ordered)
        reason = _broken_files_reason(series_uid, files, broken) or _skip_reason(
            headers, rules, [file_tag(_relative(p, roots[series_uid])) for p in files]
        )
        if reason is None and rules.series_uids and series_uid not in rules.series_uids:
            reason = "not selected (--series)"
        first = headers[0]
        number = first.get("SeriesNumber")
        info = SeriesInfo(
            study_instance_uid=_text(first, "StudyInstanceUID"),
            series_instance_uid=series_uid,
            files=files,
            location=_relative(
                Path(os.path.commonpath([str(p.parent) for p in files])), roots[series_uid]
            ),
            modality="CT",
            study_date=_text(first, "StudyDate"),
            series_description=_text(first, "SeriesDescription"),
            series_number=_series_number(number),
            skip_reason=reason,
            patient_id=_text(first, "PatientID"),
        )
        if reason is not None:
            log.info("skipped %s: %s", info.label, info.redact(reason))
            log.debug("%s is %s", info.label, info.location)
        series.append(info)
    series.sort(key=lambda s: (s.study_instance_uid, s.series_instance_uid))
    log.info(
        "found %d CT series (%d eligible) in %d files (%d ignored, %d duplicates)",
        len(series),
        sum(s.eligible for s in series),
        n_files,
        n_ignored,
        n_duplicates,
    )
    return Discovery(tuple(series), n_files, n_images, n_ignored, n_duplicates)
