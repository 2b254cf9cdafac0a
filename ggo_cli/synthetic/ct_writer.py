"""Write CT volumes as DICOM CT Image Storage series, natively or compressed.

:func:`write_ct_series` writes a volume (a :class:`~ggo_cli.synthetic.phantom.Phantom` or an HU
array) as
a CT series that ``dciodvfy`` accepts; :func:`transcode_file` changes the transfer syntax of any
CT file losslessly (pydicom's encoders, or python-gdcm where pydicom has none). Used by
``ggo-cli demo``, the tests and the benchmarks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from ..atomic_output import atomic_write_path
from ..errors import OutputError
from .phantom import Phantom

log = logging.getLogger(__name__)

NATIVE_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
PYDICOM_ENCODED_SYNTAXES = (RLELossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless)
"""Encoded by pydicom's own RLE encoder, pyjpegls (CharLS) and pylibjpeg-openjpeg."""
GDCM_ENCODED_SYNTAXES = (JPEGLossless, JPEGLosslessSV1, JPEG2000)
"""No pydicom encoder exists for these; python-gdcm transcodes a written file."""
SUPPORTED_TRANSFER_SYNTAXES = NATIVE_SYNTAXES + PYDICOM_ENCODED_SYNTAXES + GDCM_ENCODED_SYNTAXES
"""All lossless: JPEG-LS near-lossless is written with NEAR = 0, JPEG 2000 (.91) reversibly."""


@dataclass(frozen=True, slots=True)
class SeriesAttributes:
    """Fake but plausible patient, study, series and equipment attributes of a written series.

    Attributes:
        patient_name: PatientName.
        patient_id: PatientID.
        patient_birth_date: PatientBirthDate, ``YYYYMMDD``.
        patient_sex: PatientSex (``M``, ``F`` or ``O``).
        study_date: StudyDate (also series, acquisition and content date), ``YYYYMMDD``.
        study_time: StudyTime, ``HHMMSS``.
        study_id: StudyID.
        accession_number: AccessionNumber.
        study_description: StudyDescription.
        series_number: SeriesNumber.
        series_description: SeriesDescription.
        manufacturer: Manufacturer.
        institution_name: InstitutionName.
        kvp_kv: KVP in kV.
        convolution_kernel: ConvolutionKernel.
    """

    patient_name: str = "GGO^Phantom"
    patient_id: str = "PHANTOM-001"
    patient_birth_date: str = "19600101"
    patient_sex: str = "O"
    study_date: str = "20240102"
    study_time: str = "093000"
    study_id: str = "PH1"
    accession_number: str = "PHANTOM0001"
    study_description: str = "CT chest (synthetic phantom)"
    series_number: int = 2
    series_description: str = "Chest 1.0 B60f (synthetic)"
    manufacturer: str = "ggo-cli phantom"
    institution_name: str = "Synthetic Hospital"
    kvp_kv: float = 120.0
    convolution_kernel: str = "B60f"


def _uid(seed: int, *parts: object) -> UID:
    """A UID derived only from the seed and a role, so reruns write identical files."""
    return generate_uid(entropy_srcs=["ggo-cli phantom", str(seed), *map(str, parts)])


def _ds_values(values: Sequence[float]) -> list[str]:
    """Format numbers as DICOM decimal strings (at most 16 characters each)."""
    return [format_number_as_ds(float(v)) for v in values]


def _series_header(attrs: SeriesAttributes, uids: dict[str, str], spacing_mm: tuple[float, ...],
                   shape: tuple[int, ...], orientation: list[int], image_type: Sequence[str]) -> (
    Dataset
):
    """The attributes shared by every slice of the series (CT Image IOD, PS3.3 A.3)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = CTImageStorage
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
                    "InstanceCreationDate"):
        setattr(ds, keyword, attrs.study_date)
    for keyword in ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime",
                    "InstanceCreationTime"):
        setattr(ds, keyword, attrs.study_time)
    ds.AccessionNumber = attrs.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = attrs.manufacturer
    ds.InstitutionName = attrs.institution_name
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = attrs.study_description
    ds.SeriesDescription = attrs.series_description
    ds.ManufacturerModelName = "synthetic chest phantom"
    ds.PatientName = attrs.patient_name
    ds.PatientID = attrs.patient_id
    ds.PatientBirthDate = attrs.patient_birth_date
    ds.PatientSex = attrs.patient_sex
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds_values([spacing_mm[0]])[0]
    ds.KVP = _ds_values([attrs.kvp_kv])[0]
    ds.SpacingBetweenSlices = _ds_values([spacing_mm[0]])[0]
    ds.SoftwareVersions = "ggo-cli phantom"
    ds.ReconstructionDiameter = _ds_values([shape[2] * spacing_mm[2]])[0]
    ds.ConvolutionKernel = attrs.convolution_kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.StudyID = attrs.study_id
    ds.SeriesNumber = attrs.series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = orientation
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = shape[1], shape[2]
    ds.PixelSpacing = _ds_values(spacing_mm[1:])
    ds.BurnedInAnnotation = "NO"
    ds.WindowCenter, ds.WindowWidth = [-600, 40], [1500, 400]
    ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    ds.LossyImageCompression = "00"
    return ds


def write_ct_series(
    volume: Phantom | npt.NDArray[np.integer] | npt.NDArray[np.floating],
    out_dir: Path,
    *,
    spacing_mm: tuple[float, float, float] | None = None,
    attributes: SeriesAttributes = SeriesAttributes(),
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    first_position_mm: tuple[float, float, float] | None = None,
    descending_z: bool = False,
    flip_columns: bool = False,
    flip_rows: bool = False,
    shuffle_names: bool = False,
    file_name_pattern: str = "CT{index:04d}.dcm",
    transfer_syntax: str = ExplicitVRLittleEndian,
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    bits_stored: int = 16,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    seed: int = 0,
) -> list[Path]:
    """Write a HU volume as a CT Image Storage series, one file per slice.

    The volume stays where it is in patient space whatever the options: ``flip_columns`` stores
    each image upside down with column direction cosine ``(0, -1, 0)`` (the slice normal then
    points to the feet), ``flip_rows`` stores it mirrored with row direction cosine
    ``(-1, 0, 0)``, and ImagePositionPatient follows, so a reader that honours the geometry
    sees the same anatomy at the same coordinates.

    Args:
        volume: a phantom, or Hounsfield units in patient order (see the module docstring).
            Shape: ``(slice, row, col)``.
        out_dir: the folder to write into (created if missing).
        spacing_mm: ``(slice, row, col)`` spacing in mm; required for an array, taken from a
            phantom otherwise.
        attributes: patient, study, series and equipment attributes (fake by default).
        study_uid: StudyInstanceUID; derived from ``seed`` when ``None``.
        series_uid: SeriesInstanceUID; derived from ``seed`` when ``None``.
        frame_of_reference_uid: FrameOfReferenceUID; derived from ``seed`` when ``None``.
        first_position_mm: patient ``(x, y, z)`` in mm of the centre of voxel ``(0, 0, 0)``;
            ``None`` centres the volume on the origin.
        descending_z: number instances (and name files) from head to feet.
        flip_columns: store rows bottom-up with a negative column direction cosine.
        flip_rows: store columns right-to-left with a negative row direction cosine.
        shuffle_names: give files a random order of names (``{index}`` permuted).
        file_name_pattern: ``str.format`` pattern with ``{index}`` (1-based file number),
            ``{instance}`` (InstanceNumber) and ``{sop}`` (SOPInstanceUID).
        transfer_syntax: one of :data:`SUPPORTED_TRANSFER_SYNTAXES` (all lossless).
        rescale_intercept: RescaleIntercept; stored value = (HU - intercept) / slope, rounded.
        rescale_slope: RescaleSlope.
        bits_stored: BitsStored, 12 or 16 (BitsAllocated is 16).
        image_type: ImageType values.
        seed: seeds the UIDs and the name shuffle.

    Returns:
        The written files; element ``k`` holds slice ``k`` of ``volume``.

    Raises:
        ValueError: an unsupported transfer syntax or bit depth, a missing spacing, or HU
            that do not fit the stored bits.
        OutputError: a file cannot be written or encoded.
    """
    if isinstance(volume, Phantom):
        hu = np.asarray(volume.hu)
        spacing_mm = spacing_mm or volume.spacing_mm
    else:
        hu = np.asarray(volume)
    if spacing_mm is None or hu.ndim != 3:
        raise ValueError(f"need a 3-D volume (got {hu.ndim}-D) and spacing_mm (got {spacing_mm})")
    if UID(transfer_syntax) not in SUPPORTED_TRANSFER_SYNTAXES or bits_stored not in (12, 16):
        raise ValueError(
            f"transfer syntax {transfer_syntax} / BitsStored {bits_stored} not supported; use one"
            f" of {', '.join(SUPPORTED_TRANSFER_SYNTAXES)} and 12 or 16 bits"
        )
    stored = np.rint((hu.astype(np.float64) - rescale_intercept) / rescale_slope)
    signed = bool(stored.min() < 0)
    low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (
        0, 2**bits_stored - 1)
    if stored.min() < low or stored.max() > high:
        raise ValueError(
            f"HU {hu.min()}..{hu.max()} do not fit {bits_stored} stored bits with intercept"
            f" {rescale_intercept} and slope {rescale_slope}; use 16 bits or another intercept"
        )
    pixels = stored.astype(np.int16 if signed else np.uint16)
    n, rows, cols = hu.shape
    dz, dy, dx = (float(v) for v in spacing_mm)
    x0, y0, z0 = first_position_mm or (-(cols - 1) * dx / 2, -(rows - 1) * dy / 2,
                                       -(n - 1) * dz / 2)
    uids = {"study": study_uid or _uid(seed, "study"),
            "frame": frame_of_reference_uid or _uid(seed, "frame")}
    uids["series"] = series_uid or _uid(seed, uids["study"], "series")
    orientation = [-1 if flip_rows else 1, 0, 0, 0, -1 if flip_columns else 1, 0]
    header = _series_header(attributes, uids, (dz, dy, dx), hu.shape, orientation, image_type)
    header.BitsAllocated, header.BitsStored, header.HighBit = 16, bits_stored, bits_stored - 1
    header.PixelRepresentation = int(signed)
    header.RescaleIntercept = _ds_values([rescale_intercept])[0]
    header.RescaleSlope = _ds_values([rescale_slope])[0]
    header.RescaleType = "HU"
    instance_numbers = np.arange(n, 0, -1) if descending_z else np.arange(1, n + 1)
    # File number of each InstanceNumber: the same number unless names are shuffled.
    file_numbers = np.arange(1, n + 1)
    if shuffle_names:
        file_numbers = np.random.default_rng(seed).permutation(n) + 1
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        ds = Dataset()
        ds.update(header)
        ds.SOPInstanceUID = _uid(seed, uids["series"], "instance", k)
        ds.InstanceNumber = int(instance_numbers[k])
        z = z0 + k * dz
        ds.ImagePositionPatient = _ds_values([x0 + (cols - 1) * dx if flip_rows else x0,
                                              y0 + (rows - 1) * dy if flip_columns else y0, z])
        ds.SliceLocation = _ds_values([z])[0]
        image = pixels[k, ::-1 if flip_columns else 1, ::-1 if flip_rows else 1]
        ds.PixelData = np.ascontiguousarray(image).tobytes()
        ds["PixelData"].VR = "OW"
        file_number = int(file_numbers[instance_numbers[k] - 1])
        path = out_dir / file_name_pattern.format(
            index=file_number, instance=ds.InstanceNumber, sop=ds.SOPInstanceUID)
        _save(ds, path, UID(transfer_syntax), image)
        paths.append(path)
    log.debug("wrote %d CT slices (%s) to %s", n, UID(transfer_syntax).name, out_dir)
    return paths


def _file_meta(ds: Dataset, transfer_syntax: UID) -> FileMetaDataset:
    """Group 0002 for a dataset (PS3.10 section 7.1)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    return meta


def _save(ds: Dataset, path: Path, transfer_syntax: UID, image: npt.NDArray[np.integer]) -> None:
    """Encode (when asked) and write one dataset as a DICOM file."""
    target = transfer_syntax if transfer_syntax not in GDCM_ENCODED_SYNTAXES else (
        ExplicitVRLittleEndian)
    ds.file_meta = _file_meta(ds, ExplicitVRLittleEndian)
    try:
        if target in PYDICOM_ENCODED_SYNTAXES:
            # NEAR = 0 makes the JPEG-LS near-lossless syntax exact (ISO 14495-1 A.2).
            jls_error = 0 if target == JPEGLSNearLossless else None
            ds.compress(target, np.ascontiguousarray(image), generate_instance_uid=False,
                        jls_error=jls_error)
        else:
            ds.file_meta.TransferSyntaxUID = target
        ds.save_as(path, enforce_file_format=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise OutputError(f"cannot write {path.name} as {target.name}: {exc}") from exc
    if target != transfer_syntax:
        transcode_file(path, path, transfer_syntax)


def transcode_file(src: Path, dst: Path, transfer_syntax_uid: str, *, verify: bool = True) -> (
    Path
):
    """Rewrite a DICOM image file in another, lossless, transfer syntax.

    Native and pydicom-encodable syntaxes go through pydicom (decoding a compressed source
    first); JPEG Lossless (.57, .70) and JPEG 2000 (.91, written reversibly) go through
    python-gdcm, which pydicom cannot encode. The SOPInstanceUID is kept: lossless transcoding
    does not make a new instance (PS3.5 section 8.2). ``dst`` may be ``src``; it is written
    atomically (``atomic_output.atomic_write_path``).

    Args:
        src: the file to read.
        dst: the file to write.
        transfer_syntax_uid: one of :data:`SUPPORTED_TRANSFER_SYNTAXES`.
        verify: decode both files with pydicom and require identical pixels.

    Returns:
        ``dst``.

    Raises:
        ValueError: an unsupported transfer syntax.
        OutputError: the file cannot be read, encoded or written, or its pixels changed.
    """
    target = UID(transfer_syntax_uid)
    if target not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(f"transfer syntax {target} not supported; use one of "
                         f"{', '.join(SUPPORTED_TRANSFER_SYNTAXES)}")
    try:
        before = pydicom.dcmread(src).pixel_array if verify else None
        with atomic_write_path(dst) as tmp:
            if target in GDCM_ENCODED_SYNTAXES:
                _gdcm_transcode(src, tmp, target)
            else:
                ds = pydicom.dcmread(src)
                if ds.file_meta.TransferSyntaxUID.is_compressed:
                    ds.decompress(generate_instance_uid=False)
                if target in PYDICOM_ENCODED_SYNTAXES:
                    ds.compress(target, generate_instance_uid=False,
                                jls_error=0 if target == JPEGLSNearLossless else None)
                else:
                    ds.file_meta.TransferSyntaxUID = target
                ds.save_as(tmp, enforce_file_format=True)
            if before is not None and not np.array_equal(pydicom.dcmread(tmp).pixel_array, before):
                raise OutputError(f"transcoding {src.name} to {target.name} changed its pixels")
    except (OSError, ValueError, RuntimeError, AttributeError, InvalidDicomError) as exc:
        raise OutputError(f"cannot transcode {src.name} to {target.name}: {exc}") from exc
    return dst


def _gdcm_transcode(src: Path, dst: Path, target: UID) -> None:
    """Transcode one file with python-gdcm, keeping every attribute but the pixel encoding.

    gdcm's ImageWriter rewrites some attributes (it adds RescaleType ``US``, which the CT IOD
    forbids for original images), so only its encoded Pixel Data is kept and pydicom writes it
    into a copy of the source dataset.
    """
    import gdcm  # deferred: only these syntaxes need it

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        raise OutputError(f"gdcm cannot read {src.name}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(target))))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise OutputError(f"gdcm cannot encode {src.name} as {target.name}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise OutputError(f"gdcm cannot write {dst.name}")
    ds = pydicom.dcmread(src)
    ds["PixelData"] = pydicom.dcmread(dst)["PixelData"]
    ds.file_meta = _file_meta(ds, target)
    ds.save_as(dst, enforce_file_format=True)
