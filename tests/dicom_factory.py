"""Synthetic DICOM CT series for tests, with the traps and decoys real folders hold.

:func:`make_ct_series` writes a valid CT series (a chest phantom by default) under
``tmp_path`` and returns a :class:`FactorySeries` with the ground truth in loader order (that of
``ggo_cli.dicom.volume``): pixels as stored in the files, slices sorted by ascending position along
the slice normal ``row cosine x column cosine`` (feet to head for ``[1, 0, 0, 0, 1, 0]``).
``highdicom.get_volume_from_series`` stacks the same slices in the reverse order.

Flags add geometry traps (shuffled names, descending instance numbers, negative direction
cosines, uneven spacing, missing RescaleIntercept, compressed pixel data) and decoys (localizer,
a second series, junk files, a DICOMDIR file-set, a duplicate instance, an SR document).
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ggo_cli.synthetic.ct_writer import SeriesAttributes, write_ct_series
from ggo_cli.synthetic.phantom import Phantom, make_chest_phantom
from tests.phantoms import make_cube_phantom

UNEVEN_GAP_FACTOR = 1.5
"""With ``uneven_spacing`` the gap before the middle slice is this many slice spacings."""
BASIC_TEXT_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"
SERIES_FOLDER = "series1"


@dataclass(frozen=True, slots=True)
class FactorySeries:
    """A written CT series and its ground truth, in loader order.

    Attributes:
        root: the folder holding everything written (point discovery here).
        paths: the series' files, one per slice, in loader order.
        hu: Hounsfield units as a loader must return them. Shape: ``(slice, row, col)``.
        ggo_mask: the true GGO voxels. Shape: as ``hu``.
        lung_mask: the true lung voxels. Shape: as ``hu``.
        sop_instance_uids: SOPInstanceUID of each slice index.
        positions_mm: ImagePositionPatient of each slice index. Shape: ``(slice, 3)``.
        image_orientation: ImageOrientationPatient (row cosine, then column cosine).
        spacing_mm: ``(slice, row, col)`` spacing in mm (the regular one, before any gap).
        study_instance_uid: StudyInstanceUID (shared by every decoy series).
        series_instance_uid: SeriesInstanceUID of this series.
        frame_of_reference_uid: FrameOfReferenceUID.
        transfer_syntax_uid: the transfer syntax of the series' files.
        phantom: the phantom written, in patient order (``None`` for a raw array).
        second_series_instance_uid: the decoy second CT series, if written.
        second_series_paths: its files (same volume, other UIDs).
        localizer_paths: LOCALIZER images (an AP and a lateral projection).
        junk_paths: a text file, a zero-byte file and a ``.dcm`` file of random bytes.
        dicomdir_path: the DICOMDIR of the file-set holding this series, if asked.
        duplicate_paths: exact byte copies of series files (same SOPInstanceUID).
        sr_path: a Basic Text SR document in the same study, if asked.
    """

    root: Path
    paths: tuple[Path, ...]
    hu: npt.NDArray[np.float32]
    ggo_mask: npt.NDArray[np.bool_]
    lung_mask: npt.NDArray[np.bool_]
    sop_instance_uids: tuple[str, ...]
    positions_mm: npt.NDArray[np.float64]
    image_orientation: tuple[float, ...]
    spacing_mm: tuple[float, float, float]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    transfer_syntax_uid: str
    phantom: Phantom | None = None
    second_series_instance_uid: str | None = None
    second_series_paths: tuple[Path, ...] = ()
    localizer_paths: tuple[Path, ...] = ()
    junk_paths: tuple[Path, ...] = ()
    dicomdir_path: Path | None = None
    duplicate_paths: tuple[Path, ...] = ()
    sr_path: Path | None = None

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    @property
    def ggo_volume_ml(self) -> float:
        """True GGO volume in mL: mask voxels times the voxel volume."""
        return int(self.ggo_mask.sum()) * self.voxel_volume_ml

    def slice_index(self, sop_instance_uid: str) -> int:
        """The loader-order slice index of an instance."""
        return self.sop_instance_uids.index(sop_instance_uid)


def make_ct_series(
    tmp_path: Path,
    shape: tuple[int, int, int] = (12, 64, 64),
    spacing_mm: tuple[float, float, float] = (2.5, 0.7, 0.7),
    *,
    shuffle_names: bool = False,
    descending_z: bool = False,
    flip_columns: bool = False,
    flip_rows: bool = False,
    phantom: bool | Phantom | npt.NDArray[np.integer] | npt.NDArray[np.floating] = True,
    ggo_mask: npt.NDArray[np.bool_] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    missing_rescale_intercept: bool = False,
    uneven_spacing: bool = False,
    localizer: bool = False,
    second_series: bool = False,
    non_dicom_file: bool = False,
    dicomdir: bool = False,
    duplicate_instance: bool = False,
    sr_document: bool = False,
    folder: str = "dicom",
    seed: int = 0,
) -> FactorySeries:
    """Write a synthetic CT series (plus optional decoys) and return it with its truth.

    Args:
        tmp_path: pytest's ``tmp_path``; everything goes to ``tmp_path / folder``.
        shape: ``(slices, rows, cols)`` (ignored when ``phantom`` is a phantom or an array).
        spacing_mm: ``(slice, row, col)`` spacing in mm (ignored for a phantom).
        shuffle_names: file names in random order.
        descending_z: InstanceNumber 1 (and the first name) at the head end.
        flip_columns: negative column direction cosine, rows stored bottom-up.
        flip_rows: negative row direction cosine, columns stored right-to-left.
        phantom: ``True`` a chest phantom, ``False`` the noise-free cube phantom, or a
            :class:`Phantom`, or HU in patient order (see ``ggo_cli.synthetic.phantom``).
        ggo_mask: the true GGO of an HU array (all False when omitted).
        transfer_syntax: transfer syntax of the series' files.
        missing_rescale_intercept: delete RescaleIntercept from every file.
        uneven_spacing: make the gap before the middle slice ``UNEVEN_GAP_FACTOR`` times larger.
        localizer: add two LOCALIZER images of the same study (AP and lateral).
        second_series: add a second CT series of the same study and volume.
        non_dicom_file: add a text file, a zero-byte file and random bytes named ``.dcm``.
        dicomdir: store the series as a DICOM File-set with a DICOMDIR (``PT*/ST*/SE*/IM*``).
        duplicate_instance: add byte copies of the first two files under other names.
        sr_document: add a Basic Text SR document of the same study.
        folder: the folder name under ``tmp_path`` (lets a test write several studies).
        seed: seeds the phantom, the UIDs and the name shuffle.

    Returns:
        The series and its truth.
    """
    root = tmp_path / folder
    truth = _truth_phantom(phantom, ggo_mask, shape, spacing_mm, seed)
    spacing = truth.spacing_mm
    out_dir = tmp_path / f".{folder}-staging" if dicomdir else root / SERIES_FOLDER
    paths = write_ct_series(truth, out_dir, descending_z=descending_z, flip_columns=flip_columns,
                            flip_rows=flip_rows, shuffle_names=shuffle_names,
                            transfer_syntax=transfer_syntax, seed=seed)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    n = len(paths)
    positions = np.array([[float(v) for v in first.ImagePositionPatient]] * n)
    positions[:, 2] = positions[0, 2] + spacing[0] * np.arange(n)
    if uneven_spacing:
        positions[n // 2:, 2] += (UNEVEN_GAP_FACTOR - 1.0) * spacing[0]
    if uneven_spacing or missing_rescale_intercept:
        for path, position in zip(paths, positions, strict=True):
            _edit(path, position_mm=position if uneven_spacing else None,
                  drop_intercept=missing_rescale_intercept)
    sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    dicomdir_path = None
    if dicomdir:
        paths, dicomdir_path = _as_file_set(paths, sops, root)
        shutil.rmtree(out_dir)

    # Loader order: ascending along the normal, which is -z when exactly one cosine flips.
    order = np.arange(n)[::-1] if flip_columns != flip_rows else np.arange(n)
    stored = (slice(None), slice(None, None, -1 if flip_columns else 1),
              slice(None, None, -1 if flip_rows else 1))
    series = FactorySeries(
        root=root,
        paths=tuple(paths[k] for k in order),
        hu=np.asarray(truth.hu[stored][order], np.float32),
        ggo_mask=np.ascontiguousarray(truth.ggo_mask[stored][order]),
        lung_mask=np.ascontiguousarray(truth.lung_mask[stored][order]),
        sop_instance_uids=tuple(sops[k] for k in order),
        positions_mm=positions[order],
        image_orientation=tuple(float(v) for v in first.ImageOrientationPatient),
        spacing_mm=spacing,
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        transfer_syntax_uid=str(transfer_syntax),
        phantom=truth if not isinstance(phantom, np.ndarray) else None,
        dicomdir_path=dicomdir_path,
    )
    return _add_decoys(series, truth, first, seed=seed, localizer=localizer,
                       second_series=second_series, non_dicom_file=non_dicom_file,
                       duplicate_instance=duplicate_instance, sr_document=sr_document)


def _truth_phantom(
    phantom: bool | Phantom | npt.NDArray[np.integer] | npt.NDArray[np.floating],
    ggo_mask: npt.NDArray[np.bool_] | None,
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    seed: int,
) -> Phantom:
    """Resolve the ``phantom`` argument into a :class:`Phantom`."""
    if isinstance(phantom, Phantom):
        return phantom
    if isinstance(phantom, np.ndarray):
        hu = np.rint(phantom).astype(np.int16)
        mask = np.zeros(hu.shape, bool) if ggo_mask is None else np.asarray(ggo_mask, bool)
        none = np.zeros(hu.shape, bool)
        return Phantom(hu, mask, none, none, spacing_mm=spacing_mm)
    if phantom:
        return make_chest_phantom(shape, spacing_mm, seed=seed)
    return make_cube_phantom(shape, spacing_mm)


def _edit(path: Path, *, position_mm: npt.NDArray[np.float64] | None,
          drop_intercept: bool) -> None:
    """Rewrite one file with a new position and/or without RescaleIntercept."""
    ds = pydicom.dcmread(path)
    if position_mm is not None:
        ds.ImagePositionPatient = [pydicom.valuerep.format_number_as_ds(float(v))
                                   for v in position_mm]
        ds.SliceLocation = ds.ImagePositionPatient[2]
    if drop_intercept:
        del ds.RescaleIntercept
    ds.save_as(path, enforce_file_format=True)


def _as_file_set(paths: list[Path], sops: list[str], root: Path) -> tuple[list[Path], Path]:
    """Move written files into a DICOM File-set under ``root``; return new paths and DICOMDIR."""
    file_set = FileSet()
    for path in paths:
        file_set.add(path)
    file_set.write(root)
    where = {str(instance.SOPInstanceUID): Path(instance.path) for instance in file_set}
    return [where[sop] for sop in sops], root / "DICOMDIR"


def _add_decoys(series: FactorySeries, truth: Phantom, first: Dataset, *, seed: int,
                localizer: bool, second_series: bool, non_dicom_file: bool,
                duplicate_instance: bool, sr_document: bool) -> FactorySeries:
    """Write the requested decoys next to the series and record them."""
    root = series.root
    extra: dict[str, Any] = {}
    if second_series:
        uid = generate_uid(entropy_srcs=["factory", str(seed), "second series"])
        attrs = SeriesAttributes(series_number=3, series_description="Chest 3.0 Br40 (synthetic)")
        extra["second_series_paths"] = tuple(write_ct_series(
            truth, root / "series2", attributes=attrs, study_uid=series.study_instance_uid,
            series_uid=uid, frame_of_reference_uid=series.frame_of_reference_uid, seed=seed + 1))
        extra["second_series_instance_uid"] = uid
    if localizer:
        extra["localizer_paths"] = _write_localizers(truth, first, root / "scout", seed)
    if non_dicom_file:
        junk = root / "junk"
        junk.mkdir(parents=True, exist_ok=True)
        (junk / "README.txt").write_text("Exported by a synthetic PACS. Not DICOM.\n")
        (junk / "empty.dcm").write_bytes(b"")
        (junk / "random.dcm").write_bytes(np.random.default_rng(seed).bytes(2048))
        extra["junk_paths"] = tuple(sorted(junk.iterdir()))
    if duplicate_instance:
        copies = root / "copies"
        copies.mkdir(parents=True, exist_ok=True)
        extra["duplicate_paths"] = tuple(
            Path(shutil.copyfile(path, copies / f"copy_of_{i}.dcm"))
            for i, path in enumerate(series.paths[:2]))
    if sr_document:
        extra["sr_path"] = _write_sr(first, root / "reports" / "sr.dcm", seed)
    return replace(series, **extra)


def _write_localizers(truth: Phantom, first: Dataset, folder: Path, seed: int) -> (
    tuple[Path, ...]
):
    """Write an AP and a lateral LOCALIZER (projections of the volume, head at the top)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid(entropy_srcs=["factory", str(seed), "localizer"])
    n, rows, cols = truth.hu.shape
    dz, dy, dx = truth.spacing_mm
    x0, y0, z0 = (float(v) for v in first.ImagePositionPatient)
    # The first stored pixel sits at the far end of an axis whose direction cosine is negative.
    x0 -= (cols - 1) * dx if float(first.ImageOrientationPatient[0]) < 0 else 0.0
    y0 -= (rows - 1) * dy if float(first.ImageOrientationPatient[4]) < 0 else 0.0
    paths = []
    for number, (axis, orientation, spacing, position) in enumerate((
        (1, [1, 0, 0, 0, 0, -1], dx, [x0, 0.0, z0 + (n - 1) * dz]),  # AP: rows along -z
        (2, [0, 1, 0, 0, 0, -1], dy, [0.0, y0, z0 + (n - 1) * dz]),  # lateral
    ), start=1):
        projection = truth.hu.astype(np.float32).mean(axis=axis)[::-1]  # head first
        stored = np.rint(projection + 1024.0).clip(0, 4095).astype(np.uint16)
        ds = copy.deepcopy(first)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["factory", str(seed), "scout", str(axis)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber, ds.InstanceNumber = 1, number
        ds.SeriesDescription = "Topogram 0.6 T20f"
        ds.ImageOrientationPatient = orientation
        ds.ImagePositionPatient = [pydicom.valuerep.format_number_as_ds(v) for v in position]
        ds.PixelSpacing = [pydicom.valuerep.format_number_as_ds(dz),
                           pydicom.valuerep.format_number_as_ds(spacing)]
        ds.Rows, ds.Columns = stored.shape
        for keyword in ("SliceLocation", "SpacingBetweenSlices"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 0
        ds.RescaleIntercept = -1024
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        path = folder / f"SCOUT{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return tuple(paths)


def _write_sr(first: Dataset, path: Path, seed: int) -> Path:
    """Write a minimal Basic Text SR document (a non-image object) in the same study."""
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                    "ReferringPhysicianName", "SpecificCharacterSet"):
        setattr(ds, keyword, first.get(keyword, ""))
    ds.SOPClassUID = BASIC_TEXT_SR_STORAGE
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["factory", str(seed), "sr"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["factory", str(seed), "sr series"])
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SR", 99, 1
    ds.Manufacturer = "ggo-cli factory"
    ds.ContentDate, ds.ContentTime = ds.StudyDate, ds.StudyTime
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", (
        "Diagnostic imaging report")
    ds.ConceptNameCodeSequence = [title]
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    finding = Dataset()
    finding.CodeValue, finding.CodingSchemeDesignator, finding.CodeMeaning = "121071", "DCM", (
        "Finding")
    item.ConceptNameCodeSequence = [finding]
    item.TextValue = "Synthetic report: no finding."
    ds.ContentSequence = [item]
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
