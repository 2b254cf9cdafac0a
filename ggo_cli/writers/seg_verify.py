"""Read-back check of a written DICOM-SEG against its source series and masks.

A SEG only counts as done once highdicom reads it back and every frame lands on its source
instance with the predicted pixels (issue 2 part 7). Messages name the file and the failed
check, never patient data (values of patient attributes are compared, not shown).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from ..analysis.masks import seg_masks
from ..domain import CtVolume, Prediction
from ..errors import OutputError
from ..onnx.model_info import ModelInfo
from .seg_segments import (
    ALGORITHM_PURPOSE,
    LUNG_SEGMENTS,
    SEG_MANUFACTURER,
    algorithm_device_uid,
)

if TYPE_CHECKING:
    from ..analysis.lungs import LungMasks

log = logging.getLogger(__name__)

VERIFY_SLAB_SLICES = 64
"""Source slices read back and compared at a time."""

COPIED_PATIENT_KEYWORDS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")
# highdicom reports an unreadable file, or frames it cannot match to sources, with any of these
_READ_ERRORS = (
    OSError,
    InvalidDicomError,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    RuntimeError,
)


def _fail(shown: Path, what: str) -> OutputError:
    """The read-back failure of the SEG that is (or will be) at ``shown``."""
    return OutputError(f"DICOM-SEG {shown} failed its read-back check: {what}")


def _codes_match(item: Dataset, keyword: str, expected: Code) -> bool:
    """Whether the first item of a code sequence equals ``expected`` (value and scheme)."""
    seq = item.get(keyword)
    if not seq:
        return False
    got = seq[0]
    return bool(
        got.CodeValue == expected.value and got.CodingSchemeDesignator == expected.scheme_designator
    )


def _check_segments(
    seg: hd.seg.Segmentation,
    shown: Path,
    n_segments: int,
    model: ModelInfo | None,
    *,
    lungs: bool = False,
) -> None:
    """Check segment numbering, type and (when the model is given) labels and codes."""
    items = list(seg.SegmentSequence)
    numbers = [int(item.SegmentNumber) for item in items]
    if numbers != list(range(1, n_segments + 1)):
        raise _fail(shown, f"segment numbers {numbers}, expected 1..{n_segments}")
    for item in items:
        if (
            item.SegmentAlgorithmType != "AUTOMATIC"
            or "SegmentationAlgorithmIdentificationSequence" not in item
        ):
            raise _fail(
                shown, f"segment {item.SegmentNumber} lacks AUTOMATIC algorithm identification"
            )
    if lungs:
        for item, lung in zip(items[-len(LUNG_SEGMENTS) :], LUNG_SEGMENTS, strict=True):
            if (
                item.SegmentLabel != lung.label
                or not _codes_match(item, "SegmentedPropertyCategoryCodeSequence", lung.category)
                or not _codes_match(item, "SegmentedPropertyTypeCodeSequence", lung.property_type)
                or not _codes_match(
                    item, "SegmentedPropertyTypeModifierCodeSequence", lung.laterality
                )
            ):
                raise _fail(shown, f"segment {item.SegmentNumber} is not coded as {lung.label}")
    if model is None:
        return
    model_items = items[: len(items) - len(LUNG_SEGMENTS)] if lungs else items
    for item, spec in zip(model_items, model.segments, strict=True):
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        if (
            item.SegmentLabel != spec.label
            or not _codes_match(
                item, "SegmentedPropertyCategoryCodeSequence", spec.property_category
            )
            or not _codes_match(item, "SegmentedPropertyTypeCodeSequence", spec.property_type)
            or algorithm.AlgorithmName != model.name
            or algorithm.AlgorithmVersion != model.version
        ):
            raise _fail(shown, f"segment {item.SegmentNumber} label, codes or algorithm differ")


def _check_algorithm_item(seg: hd.seg.Segmentation, shown: Path, model: ModelInfo) -> None:
    """Check that one Contributing Equipment item is the algorithm's, with its Device UID."""
    device_uid = algorithm_device_uid(model)
    found = [
        item
        for item in seg.get("ContributingEquipmentSequence", [])
        if item.get("Manufacturer") == SEG_MANUFACTURER
        and _codes_match(item, "PurposeOfReferenceCodeSequence", ALGORITHM_PURPOSE)
    ]
    if len(found) != 1 or (
        found[0].get("ManufacturerModelName"),
        found[0].get("SoftwareVersions"),
        found[0].get("DeviceUID"),
    ) != (model.name, model.version, device_uid):
        raise _fail(
            shown, "no single Contributing Equipment item names the algorithm and its Device UID"
        )


def _check_references(seg: hd.seg.Segmentation, shown: Path, volume: CtVolume) -> None:
    """Check study, frame of reference, copied patient attributes and referenced instances."""
    source = volume.datasets[0]
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
        if seg.get(keyword) != source.get(keyword):
            raise _fail(shown, f"{keyword} {seg.get(keyword)} differs from the source's")
    for keyword in COPIED_PATIENT_KEYWORDS:
        if seg.get(keyword) != source.get(keyword):
            raise _fail(shown, f"{keyword} was not copied from the source")  # value never shown
    series_items = list(seg.get("ReferencedSeriesSequence", []))
    if [str(item.SeriesInstanceUID) for item in series_items] != [
        volume.series.series_instance_uid
    ]:
        raise _fail(shown, "Referenced Series Sequence does not name exactly the source series")
    referenced = {
        str(ref.ReferencedSOPInstanceUID)
        for ref in series_items[0].get("ReferencedInstanceSequence", [])
    }
    source_uids = set(volume.sop_instance_uids)
    if referenced != source_uids:
        raise _fail(
            shown,
            f"{len(source_uids - referenced)} source instances not referenced, "
            f"{len(referenced - source_uids)} unknown ones referenced",
        )


def verify_seg(
    path: Path,
    volume: CtVolume,
    prediction: Prediction,
    *,
    model: ModelInfo | None = None,
    shown: Path | None = None,
    lungs: LungMasks | None = None,
    nonempty_frames: bool = False,
) -> None:
    """Read a written SEG back with highdicom and check it against its source and masks.

    Checks: SOP class and BINARY type; StudyInstanceUID, FrameOfReferenceUID and the patient
    attributes equal the source's; the Referenced Series Sequence lists exactly the source
    instances; the number of frames is ``slices x segments``; the pixels retrieved per source
    instance (``get_pixels_by_source_instance``) equal the masks; segment numbering and
    algorithm type, plus labels, codes, algorithm name and version and the algorithm's
    Contributing Equipment item (with its Device UID) when ``model`` is given.

    Args:
        path: the SEG file.
        volume: the source volume.
        prediction: the masks written. Shape: ``(slices, rows, cols, channels)``.
        model: when given, also check the segment labels, codes and algorithm identification.
        shown: the path to name in messages (the final path when ``path`` is a temp file);
            defaults to ``path``.
        lungs: the lung masks written after the model's segments, if any.
        nonempty_frames: the SEG holds only its non-empty frames (all when every frame is
            empty); the pixels are checked the same way, missing frames reading as zeros.

    Raises:
        OutputError: the file cannot be read as a SEG or a check fails; the message names the
            file and the failed check, never patient data.
    """
    shown = path if shown is None else shown
    expected = seg_masks(prediction, lungs)
    n_slices, _, _, n_segments = expected.shape
    try:
        seg = hd.seg.segread(path)
    except _READ_ERRORS as exc:
        raise _fail(shown, f"highdicom cannot read it ({type(exc).__name__}: {exc})") from exc
    if seg.SOPClassUID != SegmentationStorage or seg.SegmentationType != "BINARY":
        raise _fail(shown, f"SOP class {seg.SOPClassUID}, type {seg.SegmentationType}")
    _check_references(seg, shown, volume)
    n_frames = n_slices * n_segments
    if nonempty_frames:
        n_nonempty = int(np.count_nonzero(expected.any(axis=(1, 2))))
        n_frames = n_nonempty or n_frames
        wanted = f"{n_frames} non-empty frames"
    else:
        wanted = f"{n_slices} slices x {n_segments} segments"
    if int(seg.NumberOfFrames) != n_frames:
        raise _fail(shown, f"{seg.NumberOfFrames} frames, expected {wanted}")
    _check_segments(seg, shown, n_segments, model, lungs=lungs is not None)
    if model is not None:
        _check_algorithm_item(seg, shown, model)
    # Slab by slab: the whole stack read back at once is another uint8 copy of every frame
    # (786 MB for 1000 slices and 3 segments), and its comparison a third.
    uids = volume.sop_instance_uids
    differing = 0
    for start in range(0, n_slices, VERIFY_SLAB_SLICES):
        stop = min(start + VERIFY_SLAB_SLICES, n_slices)
        try:
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=list(uids[start:stop]),
                segment_numbers=list(range(1, n_segments + 1)),
            )
        except _READ_ERRORS as exc:
            raise _fail(shown, f"frames cannot be matched to source instances: {exc}") from exc
        if pixels.shape != (stop - start, *expected.shape[1:]):
            raise _fail(
                shown,
                f"pixel array {pixels.shape} for slices {start + 1}-{stop}, expected "
                f"{(stop - start, *expected.shape[1:])}",
            )
        differing += int(np.count_nonzero(pixels != expected[start:stop]))
    if differing:
        raise _fail(shown, f"{differing} pixels differ from the predicted masks")
    log.debug("SEG %s verified: %d frames", shown, int(seg.NumberOfFrames))
