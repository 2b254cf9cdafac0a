"""DICOM Segmentation (SEG) output with highdicom: build, write atomically, read back and check.

What the SEG holds (issue 2 part 7, STYLE.md section 8):

- ``BINARY`` segmentation, one segment per model channel, segment ``i + 1`` = channel ``i``;
  labels and coded property category/type come from the model's metadata. The GGO segment
  (channel 0) also carries the anatomic region Lung (39607008, SCT). Every segment is
  ``AUTOMATIC`` with an Algorithm Identification (model name and version, family
  Artificial Intelligence (123110, DCM), source ``ggo-cli``, the threshold as parameter).
- With a lung mask (the default), two more segments follow the model's: "Right lung" and
  "Left lung", category Anatomical Structure (91723000, SCT), type Lung (39607008, SCT) with
  the laterality Right (24028007, SCT) / Left (7771000, SCT) in the Segmented Property Type
  Modifier Code Sequence, algorithm ``ggo-cli lung mask`` (family Morphological Operations,
  threshold -320 HU) from :mod:`ggo_cli.analysis.lungs`.
- One frame per source slice and segment, empty frames included (``omit_empty_frames=False``),
  so a GGO-free series still yields a SEG that says "analysed, nothing found". With
  ``--seg-frames nonempty`` only the frames with a segmented pixel are kept (for viewers that
  refuse SEGs of many frames); a SEG with none keeps all (highdicom cannot omit every frame).
  Each frame references its source CT instance (Derivation Image Sequence); the Referenced Series
  Sequence lists every source instance. Geometry (positions, orientation, pixel spacing) is
  copied from the source headers; no pixel data of the source is needed.
- Patient, study and specimen attributes are copied from the first source header by
  highdicom; nothing is invented. A source lacking a Type 2 attribute highdicom copies is
  refused with :class:`UnsupportedSeriesError` rather than filled in.
- Equipment: Manufacturer ``ggo-cli``, Manufacturer's Model Name = model name, Software
  Versions = ggo-cli version, Device Serial Number = the first 16 hex digits of the model's
  graph digest (identifies the weights, not a machine or person). A Contributing Equipment
  item records the algorithm as IHE AI Results (AIR) asks, the same item the SR and the SC
  carry (purpose Processing Equipment, model name, version, serial number and Device UID:
  :func:`~ggo_cli.writers.seg_segments.algorithm_equipment`, where the choice of code is
  explained); highdicom adds the source's acquisition equipment and itself.
- Deterministic UIDs: SeriesInstanceUID and SOPInstanceUID are derived (``generate_uid`` with
  entropy sources) from the source SeriesInstanceUID, the model digest, the threshold and the
  SEG series number and description, so a rerun writes the same UIDs while any change in
  content or series identity gets new ones (:mod:`ggo_cli.writers.seg_source`).
- Transfer syntax Explicit VR Little Endian. BINARY pixels are always bit-packed (1 bit per
  pixel, about 32 KiB per 512 x 512 frame), so compression gains little; the only
  encapsulated syntax highdicom allows for BINARY is JPEG 2000, which many PACS and viewers
  do not decode for 1-bit data. Explicit VR (rather than the Implicit default) keeps value
  representations in the file, as dcmqi and DICOM PS3.5 recommend for new objects.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom.uid import ExplicitVRLittleEndian

from .. import __version__
from ..analysis.masks import seg_masks
from ..atomic_output import atomic_write_path
from ..config import SEG_SERIES_DESCRIPTION, SEG_SERIES_NUMBER
from ..domain import CtVolume, Prediction
from ..fsutil import OutputTree
from ..onnx.model_info import ModelInfo
from .seg_file import write_seg_file
from .seg_highdicom import SlabCheckedSegmentation, WrittenSegmentation
from .seg_segments import (
    SEG_MANUFACTURER,
    algorithm_equipment,
    lung_descriptions,
    segment_descriptions,
)
from .seg_source import (
    check_series_options,
    check_source_headers,
    derive_seg_uids,
    highdicom_build,
    seg_content_digest,
    source_character_set,
)
from .seg_verify import verify_seg

if TYPE_CHECKING:
    from ..analysis.lungs import LungMasks

__all__ = [
    "build_seg",
    "verify_seg",
    "write_seg",
]

log = logging.getLogger(__name__)

SEG_CONTENT_LABEL = "GGO"
SEG_CONTENT_DESCRIPTION = "AI ground-glass opacity segmentation - research use only"
SEG_TRANSFER_SYNTAX_UID = ExplicitVRLittleEndian
SEG_INSTANCE_NUMBER = 1


def _check_shapes(volume: CtVolume, prediction: Prediction, model: ModelInfo) -> None:
    """Raise ``ValueError`` (a pipeline bug, not a user error) when arrays do not line up."""
    masks = prediction.masks
    n_slices = len(volume.datasets)
    rows, cols = int(volume.datasets[0].Rows), int(volume.datasets[0].Columns)
    expected = (n_slices, rows, cols, model.n_channels)
    if masks.dtype != np.bool_ or masks.shape != expected:
        raise ValueError(
            f"prediction masks must be bool {expected} (slices, rows, cols, channels), got "
            f"{masks.dtype} {masks.shape}"
        )
    if volume.hu.shape != expected[:3]:
        raise ValueError(f"volume has {volume.hu.shape} voxels but {n_slices} headers")


def build_seg(
    volume: CtVolume,
    prediction: Prediction,
    model: ModelInfo,
    *,
    series_number: int = SEG_SERIES_NUMBER,
    series_description: str = SEG_SERIES_DESCRIPTION,
    software_version: str = __version__,
    lungs: LungMasks | None = None,
    nonempty_frames: bool = False,
) -> hd.seg.Segmentation:
    """Build the DICOM-SEG of a prediction over its source CT series (in memory).

    Args:
        volume: the CT volume; ``volume.datasets`` are the sorted headers (pixel data not
            needed) and slice ``i`` of the masks belongs to ``volume.datasets[i]``.
        prediction: the binary masks. Shape: ``(slices, rows, cols, channels)``, bool.
        model: the model that made the prediction (segments, name, version, digest).
        series_number: SeriesNumber of the SEG.
        series_description: SeriesDescription of the SEG (mark it as AI research output).
        software_version: ggo-cli's version (Software Versions).
        lungs: when given, right and left lung segments follow the model's.
        nonempty_frames: keep only the frames with a segmented pixel (``--seg-frames
            nonempty``; a SEG without any keeps all its frames).

    Returns:
        The Segmentation: BINARY, ``slices x segments`` frames (or the non-empty ones),
        deterministic UIDs; highdicom's reading methods work on it.

    Raises:
        InputError: series number or description out of range.
        UnsupportedSeriesError: the source headers lack attributes the SEG needs.
        OutputError: highdicom refused to build the SEG (the message says why).
        ValueError: masks and volume do not line up (a bug in the caller).
    """
    return _build(
        volume, prediction, model, series_number=series_number,
        series_description=series_description, software_version=software_version,
        lungs=lungs, nonempty_frames=nonempty_frames, segmentation=SlabCheckedSegmentation,
    )


def _build(
    volume: CtVolume,
    prediction: Prediction,
    model: ModelInfo,
    *,
    series_number: int,
    series_description: str,
    software_version: str,
    lungs: LungMasks | None,
    nonempty_frames: bool,
    segmentation: type[hd.seg.Segmentation],
) -> hd.seg.Segmentation:
    """:func:`build_seg` with the Segmentation class to build (``WrittenSegmentation`` for a
    SEG only written)."""
    series_uid = volume.series.series_instance_uid
    check_series_options("SEG", series_number, series_description)
    check_source_headers(volume.datasets, series_uid)
    _check_shapes(volume, prediction, model)
    planes = [prediction.masks[..., k] for k in range(prediction.masks.shape[-1])]
    if lungs is not None:
        planes += [lungs.right, lungs.left]
    seg_series_uid, seg_sop_uid = derive_seg_uids(
        series_uid,
        model.recorded_sha256,
        threshold=prediction.threshold,
        series_number=series_number,
        series_description=series_description,
        lung_segments=lungs is not None,
        nonempty_frames=nonempty_frames,
        content_digest=seg_content_digest(volume.sop_instance_uids, planes),
    )
    descriptions = segment_descriptions(model, prediction.threshold)
    if lungs is not None:
        if lungs.right.shape != prediction.ggo.shape:
            raise ValueError(f"lung masks {lungs.right.shape} differ from {prediction.ggo.shape}")
        descriptions += lung_descriptions(len(descriptions) + 1)
    # highdicom warns about source values (e.g. a PatientName without '^' components) and
    # quotes them; record the warnings so they never reach the console unredacted.
    with highdicom_build("DICOM-SEG", series_uid, volume.datasets[0]):
        seg = segmentation(
            source_images=list(volume.datasets),
            pixel_array=seg_masks(prediction, lungs),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=seg_series_uid,
            series_number=series_number,
            sop_instance_uid=seg_sop_uid,
            instance_number=SEG_INSTANCE_NUMBER,
            manufacturer=SEG_MANUFACTURER,
            manufacturer_model_name=model.name,
            software_versions=software_version,
            device_serial_number=model.recorded_sha256[:16],
            content_label=SEG_CONTENT_LABEL,
            content_description=SEG_CONTENT_DESCRIPTION,
            transfer_syntax_uid=SEG_TRANSFER_SYNTAX_UID,
            omit_empty_frames=nonempty_frames,
            contributing_equipment=[algorithm_equipment(model)],
            series_description=series_description,
            specific_character_set=source_character_set(volume.datasets[0]),
        )
    log.debug(
        "series %s: SEG %s built, %d frames, %d segments",
        series_uid,
        seg_sop_uid,
        int(seg.NumberOfFrames),
        len(descriptions),
    )
    return seg


def write_seg(
    volume: CtVolume,
    prediction: Prediction,
    model: ModelInfo,
    path: Path,
    *,
    series_number: int = SEG_SERIES_NUMBER,
    series_description: str = SEG_SERIES_DESCRIPTION,
    software_version: str = __version__,
    verify: bool = True,
    lungs: LungMasks | None = None,
    tree: OutputTree | None = None,
    nonempty_frames: bool = False,
) -> Path:
    """Build the SEG, write it atomically and (by default) verify it before it appears.

    The SEG is written to a hidden temporary file beside ``path``, read back and checked with
    :func:`verify_seg`, and only then renamed to ``path``; a SEG that fails its check is never
    left at ``path`` (an older file there stays as it was).

    Args:
        volume: the source CT volume.
        prediction: the binary masks. Shape: ``(slices, rows, cols, channels)``.
        model: the model that made the prediction.
        path: the destination file (parents are created).
        series_number: SeriesNumber of the SEG.
        series_description: SeriesDescription of the SEG.
        software_version: ggo-cli's version.
        verify: read the file back and check it before renaming it into place.
        lungs: when given, right and left lung segments follow the model's.
        tree: the output folder ``path`` lies in: no link is followed below it and the file
            gets its mode (``0600`` by default: the SEG holds patient data).
        nonempty_frames: keep only the frames with a segmented pixel (``--seg-frames``).

    Returns:
        ``path``.

    Raises:
        InputError: series number or description out of range.
        UnsupportedSeriesError: the source headers lack attributes the SEG needs.
        OutputError: the SEG cannot be built, written, or fails its read-back check.
    """
    seg = _build(
        volume,
        prediction,
        model,
        series_number=series_number,
        series_description=series_description,
        software_version=software_version,
        lungs=lungs,
        nonempty_frames=nonempty_frames,
        segmentation=WrittenSegmentation,
    )
    with atomic_write_path(path, tree=tree) as temp:
        write_seg_file(
            temp, seg, pixel_data=seg.frames if isinstance(seg, WrittenSegmentation) else None
        )
        del seg  # its pixel data and frame items, before the file is read back
        if verify:
            verify_seg(
                temp, volume, prediction, model=model, shown=path, lungs=lungs,
                nonempty_frames=nonempty_frames,
            )
    log.debug("series %s: SEG written to %s", volume.series.series_instance_uid, path)
    return path
