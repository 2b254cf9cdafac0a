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

Rules 3 and 5 are checked by :mod:`ggo_cli.dicom.selection`.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

from ..config import SelectionRules
from ..domain import SeriesInfo
from ..errors import InputError
from .budgets import HEADER_READ_BYTES, file_tag, read_bounded, scan_bounded
from .selection import (
    CT_IMAGE_CLASSES,
    broken_files_reason,
    header_text,
    salvage_series_uid,
    skip_reason,
)

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
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
_HEADER_TAG_SET = frozenset(int(Tag(keyword)) for keyword in _HEADER_TAGS)


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
        scanned = scan_bounded(path, limit_bytes=HEADER_READ_BYTES, specific_tags=_HEADER_TAG_SET)
    except OSError:
        scanned = None  # reported below
    if scanned is not None:  # a PS3.10 file of the common shape (header_scan)
        return _checked_header(path, scanned[0], has_preamble=True)
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
    return _checked_header(path, ds, has_preamble=has_preamble)


def _checked_header(
    path: Path, ds: Dataset, *, has_preamble: bool
) -> tuple[Dataset | None, bool]:
    """:func:`_read_header`'s verdict on a header read: DICOMDIR and files without the SOP
    Instance or Series UID are ignored (broken when their file meta names a CT image)."""
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



def _series_number(ds: Dataset) -> int | None:
    """SeriesNumber as an int, or ``None`` when missing or malformed (pydicom converts the IS
    value when it is read, so reading it may raise too: ``inf`` overflows)."""
    try:
        value = ds.get("SeriesNumber")
        return int(value) if value not in (None, "") else None
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
            header_text(ds, "Modality").upper() != "CT"
            or header_text(ds, "SOPClassUID") not in CT_IMAGE_CLASSES
        ):
            # SR, PR, SEG, RT, KO and images of other modalities are not CT series to analyse.
            log.debug(
                "ignored %s: modality %s, SOP class %s",
                path.name,
                header_text(ds, "Modality") or "missing",
                header_text(ds, "SOPClassUID") or "missing",
            )
            n_ignored += 1
            continue
        n_images += 1
        series_uid = header_text(ds, "SeriesInstanceUID")
        sop_uid = header_text(ds, "SOPInstanceUID")
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
        reason = broken_files_reason(series_uid, files, broken) or skip_reason(
            headers, rules, [file_tag(_relative(p, roots[series_uid])) for p in files]
        )
        if reason is None and rules.series_uids and series_uid not in rules.series_uids:
            reason = "not selected (--series)"
        first = headers[0]
        info = SeriesInfo(
            study_instance_uid=header_text(first, "StudyInstanceUID"),
            series_instance_uid=series_uid,
            files=files,
            location=_relative(
                Path(os.path.commonpath([str(p.parent) for p in files])), roots[series_uid]
            ),
            modality="CT",
            study_date=header_text(first, "StudyDate"),
            series_description=header_text(first, "SeriesDescription"),
            series_number=_series_number(first),
            skip_reason=reason,
            patient_id=header_text(first, "PatientID"),
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
