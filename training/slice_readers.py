"""Slices at their own resolution (:class:`SourceSlice`) and the folder readers that make them.

The readers behind :func:`training.data.load_slices`: ``images/`` + ``labels/`` pairs of 2-D
pictures (Pillow) or NIfTI HU volumes (SimpleITK), and DICOM CT instances with the DICOM-SEG
objects that reference them (pydicom, highdicom). Those packages are imported inside the readers
that need them, so importing this module needs only numpy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ggo_cli.analysis.preprocessing import window_hu
from ggo_cli.errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
LABEL_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".gif")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
_U8_MAX = 255.0
_U16_MAX = 65535.0


@dataclass(frozen=True, slots=True)
class SourceSlice:
    """One labelled slice at its own resolution.

    Attributes:
        id: identifier (file stem, ``case:z`` for NIfTI, SOPInstanceUID for DICOM).
        image: uint8 display pixels (meaning ``value / 255``) or float32 windowed values in
            ``[0, 1]``. Shape: ``(rows, cols)``.
        mask: binary GGO mask (bool), or for several classes a uint8 class map (0 background,
            ``k + 1`` for class ``k``, channel order). Shape: ``(rows, cols)``.
        group: patient or study group (slices of one group stay in one split), or None.
    """

    id: str
    image: npt.NDArray[Any]
    mask: npt.NDArray[Any]
    group: str | None = None

    def image_float(self) -> npt.NDArray[np.float32]:
        """Return the image as float32 in ``[0, 1]``. Shape: ``(rows, cols)``."""
        if self.image.dtype == np.uint8:
            return self.image.astype(np.float32) / np.float32(_U8_MAX)
        return self.image.astype(np.float32, copy=False)


def _natural_key(text: str) -> list[Any]:
    """Sort key with numbers compared numerically ("2" before "10")."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", text)]


def _strip_suffix(path: Path) -> tuple[str, str]:
    """Split ``name.nii.gz`` into ``("name", ".nii.gz")`` and ``a.png`` into ``("a", ".png")``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], suffix
    return path.stem, path.suffix.lower()


# ----------------------------------------------------------------------------- folders


def _load_pair_folder(
    root: Path, *, label: int | Sequence[int], window: tuple[float, float], workers: int
) -> list[SourceSlice]:
    """Load ``images/`` + ``labels/`` pairs (2-D pictures or NIfTI volumes)."""
    labels: dict[str, Path] = {}
    for p in sorted((root / "labels").iterdir()):
        stem, suffix = _strip_suffix(p)
        if suffix in LABEL_SUFFIXES or suffix in NIFTI_SUFFIXES:
            labels[stem] = p
    pairs: list[tuple[str, Path, Path]] = []
    unmatched: list[str] = []
    for p in (root / "images").iterdir():
        stem, suffix = _strip_suffix(p)
        if suffix not in IMAGE_SUFFIXES and suffix not in NIFTI_SUFFIXES:
            continue
        if stem not in labels:
            unmatched.append(p.name)
            continue
        pairs.append((stem, p, labels[stem]))
    if unmatched:
        raise InputError(
            f"{len(unmatched)} images in {root / 'images'} have no mask in {root / 'labels'} "
            f"(e.g. {sorted(unmatched)[:3]}); add labels/<id>.png or remove the images"
        )
    pairs.sort(key=lambda t: _natural_key(t[0]))
    nifti = [t for t in pairs if _strip_suffix(t[1])[1] in NIFTI_SUFFIXES]
    pictures = [t for t in pairs if t not in nifti]
    slices: list[SourceSlice] = []
    if pictures:

        def load_one(t: tuple[str, Path, Path]) -> SourceSlice:
            return _load_picture_pair(t[0], t[1], t[2], label=label)

        slices += _map(load_one, pictures, workers)
    for stem, img, lab in nifti:
        slices += _load_nifti_pair(stem, img, lab, label=label, window=window)
    return slices


def _map(
    fn: Callable[[tuple[str, Path, Path]], SourceSlice],
    items: list[tuple[str, Path, Path]],
    workers: int,
) -> list[SourceSlice]:
    """Apply ``fn`` serially or in a thread pool (PIL decoding releases the GIL)."""
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def class_map(values: npt.NDArray[Any], label: int | Sequence[int]) -> npt.NDArray[Any]:
    """``values == label`` (bool), or for several labels a uint8 class map (``k + 1``).

    Args:
        values: the mask picture's values. Shape: any.
        label: one value, or one value per class (channel order).

    Returns:
        bool for one label (as before), uint8 for several. Shape: as ``values``.
    """
    if isinstance(label, int) or len(label) == 1:
        value = label if isinstance(label, int) else label[0]
        return np.asarray(values == value)
    out = np.zeros(values.shape, dtype=np.uint8)
    for k, value in enumerate(label):
        out[values == value] = k + 1
    return out


def _load_picture_pair(
    stem: str, image_path: Path, label_path: Path, *, label: int | Sequence[int]
) -> SourceSlice:
    """Read one 2-D image and its label picture with Pillow."""
    from PIL import Image  # deferred: not installed on every training machine

    try:
        with Image.open(image_path) as im:
            image = _picture_to_array(im, image_path)
        with Image.open(label_path) as lab:
            values = np.asarray(lab.convert("L") if lab.mode in ("1", "RGB", "RGBA", "LA") else lab)
    except OSError as exc:
        raise InputError(f"cannot read {image_path.name} or {label_path.name}: {exc}") from exc
    if values.shape != image.shape:
        raise InputError(
            f"mask {label_path.name} is {values.shape[1]}x{values.shape[0]} but image "
            f"{image_path.name} is {image.shape[1]}x{image.shape[0]}; masks must match their image"
        )
    return SourceSlice(id=stem, image=image, mask=class_map(values, label))


def _picture_to_array(im: Any, path: Path) -> npt.NDArray[Any]:
    """Grey pixels of a PIL image: uint8 for 8-bit, float32 in [0, 1] for 16-bit."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(im, dtype=np.float32) / np.float32(_U16_MAX)
    if im.mode != "L":
        im = im.convert("L")
    array = np.asarray(im, dtype=np.uint8)
    if array.ndim != 2:
        raise InputError(f"image {path.name} is not a single grey plane (mode {im.mode})")
    return array


def _load_nifti_pair(
    stem: str,
    image_path: Path,
    label_path: Path,
    *,
    label: int | Sequence[int],
    window: tuple[float, float],
) -> list[SourceSlice]:
    """Read a NIfTI HU volume and its label volume, one slice per axial plane."""
    import SimpleITK as sitk  # noqa: N813 (the package's own spelling); deferred import

    try:
        orient: Callable[[Any, str], Any] = sitk.DICOMOrient
        image = orient(sitk.ReadImage(str(image_path)), "LPS")
        labels = orient(sitk.ReadImage(str(label_path)), "LPS")
    except RuntimeError as exc:
        raise InputError(
            f"cannot read NIfTI pair {image_path.name}/{label_path.name}: {exc}"
        ) from exc
    if image.GetSize() != labels.GetSize():
        raise InputError(
            f"NIfTI mask {label_path.name} has size {labels.GetSize()} but image "
            f"{image_path.name} has {image.GetSize()}; they must share one grid"
        )
    hu = sitk.GetArrayFromImage(image)  # (z, y, x) = (slice, row, col) in LPS display order
    lab = sitk.GetArrayFromImage(labels)
    if hu.ndim == 2:
        hu, lab = hu[None], lab[None]
    windowed = window_hu(hu, center_hu=window[0], width_hu=window[1])
    return [
        SourceSlice(
            id=f"{stem}:{z:04d}", image=windowed[z], mask=class_map(lab[z], label), group=stem
        )
        for z in range(hu.shape[0])
    ]


# ----------------------------------------------------------------------------- DICOM


def _load_dicom_seg(root: Path, *, label: int, window: tuple[float, float]) -> list[SourceSlice]:
    """Read every DICOM-SEG under ``root`` and the CT instances it references."""
    import highdicom as hd
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut  # type: ignore[attr-defined]

    segs: list[Path] = []
    instances: dict[str, Path] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in sorted(filenames):
            p = Path(dirpath) / name
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError):
                log.debug("skipping non-DICOM file %s", p)
                continue
            if ds.get("SOPClassUID") == SEG_SOP_CLASS_UID:
                segs.append(p)
            elif "SOPInstanceUID" in ds:
                instances[str(ds.SOPInstanceUID)] = p
    if not segs:
        raise InputError(
            f"{root} has neither images/ + labels/ folders nor DICOM-SEG files; see "
            "docs/training.md for the accepted layouts"
        )
    slices: list[SourceSlice] = []
    for seg_path in segs:
        seg = hd.seg.segread(seg_path)
        if label not in seg.get_segment_numbers():
            raise InputError(
                f"SEG {seg_path.name} has segments {seg.get_segment_numbers()}, not {label}; "
                "pass the GGO segment number with --label"
            )
        uids = [sop for _, _, sop in seg.get_source_image_uids() if sop in instances]
        if not uids:
            raise InputError(
                f"SEG {seg_path.name} references no CT instance found under {root}; put the "
                "referenced series next to it"
            )
        try:
            masks = seg.get_pixels_by_source_instance(uids, segment_numbers=[label])
        except RuntimeError:
            # Writers such as dcmqi omit SpatialLocationsPreserved; frames still map one to one
            # onto the referenced instances, which is all a slice-wise mask needs.
            log.warning(
                "SEG %s does not state preserved spatial locations; assuming so", seg_path.name
            )
            masks = seg.get_pixels_by_source_instance(
                uids, segment_numbers=[label], ignore_spatial_locations=True
            )
        for uid, mask in zip(uids, masks[..., 0], strict=True):
            ds = pydicom.dcmread(instances[uid])
            hu = apply_modality_lut(ds.pixel_array, ds)
            if hu.shape != mask.shape:
                raise InputError(f"SEG {seg_path.name}: frame size {mask.shape} != CT {hu.shape}")
            slices.append(
                SourceSlice(
                    id=uid,
                    image=window_hu(hu, center_hu=window[0], width_hu=window[1]),
                    mask=mask > 0,
                    group=_pseudonym(str(ds.get("PatientID", "")) or str(ds.StudyInstanceUID)),
                )
            )
    return slices


def _pseudonym(value: str) -> str:
    """A short one-way hash, so patient identifiers never reach split files or logs."""
    return "g" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:12]
