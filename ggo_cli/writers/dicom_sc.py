"""Secondary Capture (SC) output with highdicom: the overlay as an RGB series any PACS viewer
shows, built, written atomically, read back and checked.

What the SC series holds (issue 17, items 2 and 6):

- Instance 1 is the overlay montage of ``overlay.png``; with ``per_slice`` one instance per
  slice with GGO follows (:mod:`ggo_cli.writers.sc_render`). Every image carries a burned-in
  text band: the research-use warning, the volumes with the CSV's decimals and the model. No
  patient name, ID or birth date is drawn (the text is built without any source header).
- SC Image IOD (DICOM PS3.3 A.8.1) through ``hd.sc.SCImage``: RGB, 8 bits, PlanarConfiguration
  0, Explicit VR Little Endian, uncompressed (as the SEG: every viewer decodes it).
  BurnedInAnnotation ``YES`` (General Image, C.7.6.1); ConversionType ``WSD``, a workstation
  (SC Equipment, C.8.6.1), with ggo-cli and the model as the SC device.
- Patient and study modules are copied from the first source header by highdicom
  (``copy_patient_and_study_information``, as the SEG is built), nothing is invented: a source
  lacking a Type 2 attribute is refused (:func:`~ggo_cli.writers.seg_source.check_source_headers`).
- BodyPartExamined and Laterality are the source's; without either, Laterality is empty
  (unknown: Type 2C, required for a paired body part, PS3.3 C.7.3.1).
- PatientOrientation (Type 2C, required without a plane position) gives the patient directions
  closest to the source's row and column directions: tiles are drawn as stored. There is no
  PixelSpacing: the montage is scaled and partly text, so nothing should be measured on it.
- Equipment as the SEG's: Manufacturer ``ggo-cli``, Manufacturer's Model Name = model name,
  Software Versions = ggo-cli's, Device Serial Number = the model digest's first 16 hex digits.
  Contributing Equipment holds the source's acquisition equipment, the algorithm item the SEG
  and the SR carry too (IHE AI Results: :func:`~ggo_cli.writers.seg_segments.algorithm_equipment`,
  with its Device UID) and highdicom.
- References, so a viewer can link the SC to the CT and the SEG: each CT instance shown is in
  the Source Image Sequence (General Reference, C.12.4) with purpose 121329 "Source image for
  montage" (or 121322 "Source image for image processing operation" for a single slice); the
  SEG, when given, is in the Referenced Image Sequence; the Referenced Series Sequence (Common
  Instance Reference, C.12.2) lists the CT series and the SEG series with those instances.
  Derivation Code 113076 "Segmentation" (CID 7203) and a Derivation Description say what the
  image is.
- Deterministic UIDs: the series UID comes from the source series, the model digest, the
  threshold, the series number and description and the content options; each instance's UID
  from the series UID, its number, a SHA-256 of its pixels and the SEG it references. A rerun
  writes the same UIDs; any change of content gets new ones.

The GradCAM++ figures of ``segment --explain`` become a second SC series the same way
(:mod:`ggo_cli.writers.gradcam_sc`, through :func:`write_sc_series`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian

from .. import __version__
from ..analysis.measurements import consolidation_channel
from ..atomic_output import atomic_write_path
from ..domain import (
    ConsolidationMeasurement,
    CtVolume,
    GgoMeasurement,
    LungMeasurement,
    Prediction,
)
from ..errors import OutputError
from ..fsutil import OutputTree, ensure_folder
from ..onnx.model_info import ModelInfo
from .sc_header import (
    acquisition_equipment,
    add_references,
    copy_body_part,
    derive_sc_instance_uid,
    derive_sc_series_uid,
    patient_orientation,
)
from .sc_render import ScPanel, overlay_panels, sc_text_lines
from .seg_segments import SEG_MANUFACTURER, algorithm_equipment
from .seg_source import (
    check_series_options,
    check_source_headers,
    highdicom_build,
    source_character_set,
)

__all__ = ["build_sc", "derive_sc_series_uid", "verify_sc", "write_sc", "write_sc_series"]

log = logging.getLogger(__name__)

SC_SERIES_NUMBER = 9903
SC_SERIES_DESCRIPTION = "GGO AI overlay - research use only"
SC_TRANSFER_SYNTAX_UID = ExplicitVRLittleEndian
SC_CONVERSION_TYPE = "WSD"
"""Workstation (DICOM PS3.3 C.8.6.1.1): the image was made by software from other images."""
_CHECKED_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "InstanceNumber",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "BitsAllocated",
    "PlanarConfiguration",
    "BurnedInAnnotation",
)


def build_sc(
    volume: CtVolume,
    panel: ScPanel,
    model: ModelInfo,
    *,
    series_uid: str,
    instance_number: int,
    series_number: int = SC_SERIES_NUMBER,
    series_description: str = SC_SERIES_DESCRIPTION,
    software_version: str = __version__,
    seg: Dataset | None = None,
) -> hd.sc.SCImage:
    """Build one SC instance of a panel over its source CT series (in memory).

    Args:
        volume: the CT volume; ``volume.datasets`` are the sorted headers.
        panel: the image and the slices it shows.
        model: the model whose output the image shows.
        series_uid: the SC's SeriesInstanceUID (:func:`derive_sc_series_uid`).
        instance_number: InstanceNumber (1 for the montage).
        series_number: SeriesNumber of the SC.
        series_description: SeriesDescription of the SC.
        software_version: ggo-cli's version.
        seg: the SEG of the same prediction (its header), to reference; ``None`` for none.

    Returns:
        The SCImage.

    Raises:
        InputError: series number or description out of range.
        UnsupportedSeriesError: the source headers lack attributes the SC copies.
        OutputError: highdicom refused to build the SC (the message says why).
        ValueError: the SEG belongs to another study (a bug in the caller).
    """
    series_uid_ct = volume.series.series_instance_uid
    check_series_options("SC", series_number, series_description)
    check_source_headers(volume.datasets, series_uid_ct)
    source = volume.datasets[0]
    if seg is not None and seg.StudyInstanceUID != source.StudyInstanceUID:
        raise ValueError(f"series {series_uid_ct}: the SEG to reference is in another study")
    sop_uid = derive_sc_instance_uid(
        series_uid,
        instance_number=instance_number,
        pixels=panel.pixels,
        seg_uid=str(seg.SOPInstanceUID) if seg is not None else "",
    )
    # highdicom warns about source values and quotes them: record, redact, log at DEBUG.
    with highdicom_build("Secondary Capture", series_uid_ct, source):
        sc = hd.sc.SCImage(
            pixel_array=panel.pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            study_instance_uid=source.StudyInstanceUID,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=instance_number,
            manufacturer=SEG_MANUFACTURER,
            patient_orientation=patient_orientation(source),
            transfer_syntax_uid=SC_TRANSFER_SYNTAX_UID,
            contributing_equipment=[*acquisition_equipment(source), algorithm_equipment(model)],
            series_description=series_description,
            manufacturer_model_name=model.name,
            software_versions=software_version,
            device_serial_number=model.recorded_sha256[:16],
            specific_character_set=source_character_set(source),
        )
    # Copied, never invented: every patient and study attribute the source has (PS3.3 A.8.1).
    sc.copy_patient_and_study_information(source)
    copy_body_part(sc, source)
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = SC_CONVERSION_TYPE
    sc.SecondaryCaptureDeviceManufacturer = SEG_MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = model.name
    sc.SecondaryCaptureDeviceSoftwareVersions = software_version
    add_references(sc, volume, panel, seg)
    return sc


def verify_sc(
    path: Path, expected: Dataset, pixels: npt.NDArray[np.uint8], *, shown: Path | None = None
) -> None:
    """Read a written SC back and check its identity, pixel format and pixels.

    Args:
        path: the file to read.
        expected: the dataset that was written.
        pixels: the image it must hold. Shape: ``(rows, cols, 3)``.
        shown: the path to name in messages (the final path of a temporary file).

    Raises:
        OutputError: the file cannot be read, or differs (naming what differs).
    """
    name = shown or path
    try:
        written = dcmread(path)
        read_pixels = written.pixel_array
    except (OSError, InvalidDicomError, ValueError, AttributeError) as exc:
        raise OutputError(f"cannot read back the Secondary Capture {name}: {exc}") from exc
    differ = [kw for kw in _CHECKED_KEYWORDS if written.get(kw) != expected.get(kw)]
    if read_pixels.shape != pixels.shape:
        differ.append(f"pixel shape {read_pixels.shape} (expected {pixels.shape})")
    elif not np.array_equal(read_pixels, pixels):
        differ.append(f"{int(np.any(read_pixels != pixels, axis=-1).sum())} pixels")
    if differ:
        raise OutputError(f"Secondary Capture {name} read back differs: {', '.join(differ)}")


def write_sc_series(
    volume: CtVolume,
    panels: Iterable[ScPanel],
    model: ModelInfo,
    folder: Path,
    *,
    series_uid: str,
    series_number: int = SC_SERIES_NUMBER,
    series_description: str = SC_SERIES_DESCRIPTION,
    software_version: str = __version__,
    seg: Dataset | None = None,
    verify: bool = True,
    tree: OutputTree | None = None,
) -> list[Path]:
    """Write panels as one SC series, instance ``i + 1`` = panel ``i``, each file atomically.

    Each file is written to a hidden temporary name in ``folder``, read back and checked with
    :func:`verify_sc`, and only then renamed to ``folder / panel.file_name``.

    Args:
        volume: the source CT volume.
        panels: the images, in instance order (taken one at a time: a generator keeps only
            the image being written).
        model: the model whose output the images show.
        folder: the SC series folder (created if missing).
        series_uid: the SC's SeriesInstanceUID.
        series_number: SeriesNumber of the SC.
        series_description: SeriesDescription of the SC.
        software_version: ggo-cli's version.
        seg: the SEG's header to reference, or ``None``.
        verify: read each file back and check it before renaming it into place.
        tree: the output folder: no link is followed below it, files get its mode.

    Returns:
        The files written, in instance order.

    Raises:
        InputError: series number or description out of range.
        UnsupportedSeriesError: the source headers lack attributes the SC copies.
        OutputError: an instance cannot be built, written, or fails its read-back check.
    """
    ensure_folder(folder, tree=tree)
    written: list[Path] = []
    for number, panel in enumerate(panels, start=1):
        sc = build_sc(
            volume,
            panel,
            model,
            series_uid=series_uid,
            instance_number=number,
            series_number=series_number,
            series_description=series_description,
            software_version=software_version,
            seg=seg,
        )
        path = folder / panel.file_name
        with atomic_write_path(path, tree=tree) as temp:
            sc.save_as(temp, enforce_file_format=True)
            if verify:
                verify_sc(temp, sc, panel.pixels, shown=path)
        written.append(path)
    log.debug(
        "series %s: %d SC instances written to %s",
        volume.series.series_instance_uid,
        len(written),
        folder,
    )
    return written


def write_sc(
    volume: CtVolume,
    prediction: Prediction,
    model: ModelInfo,
    folder: Path,
    *,
    measurement: GgoMeasurement,
    lungs: LungMeasurement | None = None,
    seg: Dataset | None = None,
    per_slice: bool = False,
    series_number: int = SC_SERIES_NUMBER,
    series_description: str = SC_SERIES_DESCRIPTION,
    software_version: str = __version__,
    verify: bool = True,
    tree: OutputTree | None = None,
    consolidation: ConsolidationMeasurement | None = None,
) -> list[Path]:
    """Write the overlay of a series as an RGB Secondary Capture series.

    Instance 1 is the montage of ``overlay.png`` (``montage.dcm``); with ``per_slice``, one
    instance per slice with GGO follows (``slice_NNNN.dcm``, 1-based as the PNGs). Every image
    has the text of :func:`~ggo_cli.writers.sc_render.sc_text_lines` burned in.

    Args:
        volume: the source CT volume.
        prediction: the binary masks (channel 0, GGO, is drawn). Shape:
            ``(slices, rows, cols, channels)``.
        model: the model that made the prediction (its lung window renders the CT).
        folder: the SC series folder (created if missing).
        measurement: the series' GGO volumetry (the CSV's numbers).
        lungs: lung volumes and GGO per lung, when the lung mask was on.
        seg: the header of the series' SEG (e.g. what ``build_seg`` returned), to reference.
        per_slice: add one instance per slice with GGO.
        series_number: SeriesNumber of the SC.
        series_description: SeriesDescription of the SC.
        software_version: ggo-cli's version.
        verify: read each file back and check it before renaming it into place.
        tree: the output folder: no link is followed below it, files get its mode.
        consolidation: consolidation and lesion volumetry, for a model with a consolidation
            channel (burned in; that channel is drawn in blue with a legend).

    Returns:
        The files written, the montage first.

    Raises:
        InputError: series number or description out of range.
        UnsupportedSeriesError: the source headers lack attributes the SC copies.
        OutputError: an instance cannot be built, written, or fails its read-back check.
        ValueError: the masks do not match the volume, or the SEG is in another study.
    """
    check_series_options("SC", series_number, series_description)
    lines = sc_text_lines(
        measurement,
        lungs,
        model_name=model.name,
        model_version=model.version,
        software_version=software_version,
        consolidation=consolidation,
    )
    channel = consolidation_channel(model.segments)
    panels = overlay_panels(
        volume,
        prediction.ggo,
        lines,
        window_center_hu=model.window_center_hu,
        window_width_hu=model.window_width_hu,
        per_slice=per_slice,
        consolidation=None if channel is None else prediction.masks[..., channel],
    )
    series_uid = derive_sc_series_uid(
        volume.series.series_instance_uid,
        model.recorded_sha256,
        threshold=prediction.threshold,
        series_number=series_number,
        series_description=series_description,
        per_slice=per_slice,
        lungs=lungs is not None,
        seg_uid=str(seg.SOPInstanceUID) if seg is not None else "",
    )
    return write_sc_series(
        volume,
        panels,
        model,
        folder,
        series_uid=series_uid,
        series_number=series_number,
        series_description=series_description,
        software_version=software_version,
        seg=seg,
        verify=verify,
        tree=tree,
    )
