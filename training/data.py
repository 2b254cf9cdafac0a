"""Training and evaluation data: folders, DICOM + DICOM-SEG, NIfTI, and packed ``.npz`` files.

Every source becomes a list of :class:`SourceSlice` (one axial slice at its own resolution, its
binary GGO mask and an optional patient/study group), and from there a :class:`GridData` on the
model grid via :func:`ggo_cli.analysis.preprocessing.to_model_grid` (images bilinear, masks
bilinear then
``> 0.5``): the same letterbox and resize that inference uses.

Layouts accepted by :func:`load_slices`:

- ``DIR/images/<id>.jpg|jpeg|png|bmp|tif`` with ``DIR/labels/<id>.png|bmp|tif``: 8-bit display
  images map as ``pixel / 255`` (16-bit as ``/ 65535``); the mask is ``label == --label`` (1 = GGO
  in the shared palette PNGs, 255 for the paper's 0/255 BMPs).
- ``DIR/images/<id>.nii[.gz]`` with ``DIR/labels/<id>.nii[.gz]``: HU volumes (SimpleITK), every
  axial slice in DICOM display orientation (LPS), windowed by ``window_hu``; group = ``<id>``.
- any other folder: DICOM CT instances and DICOM-SEG objects that reference them (pydicom,
  highdicom); ``--label`` is the SEG segment number; group = a hash of PatientID (never stored
  in clear).
- ``FILE.npz`` written by ``python -m training pack``.

PIL, pydicom, highdicom and SimpleITK are imported inside the loaders that need them, so the
packed path needs only numpy (GPU machines without those packages train from an ``.npz``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ggo_cli.analysis.preprocessing import (
    DEFAULT_WINDOW_CENTER_HU,
    DEFAULT_WINDOW_WIDTH_HU,
    to_model_grid,
    window_hu,
)
from ggo_cli.errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
LABEL_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".gif")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
PACK_FORMAT_VERSION = 1
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


@dataclass(frozen=True, slots=True)
class GridData:
    """Slices on the model grid, ready to become tensors.

    Attributes:
        images: float32 in ``[0, 1]``. Shape: ``(n, size, size)``.
        masks: uint8 class map (0/1 for one class; ``k + 1`` = class ``k``). Shape: ``(n, S, S)``.
        ids: one id per slice.
        groups: one group (or None) per slice.
        size: the grid side S.
    """

    images: npt.NDArray[np.float32]
    masks: npt.NDArray[np.uint8]
    ids: tuple[str, ...]
    groups: tuple[str | None, ...]
    size: int


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


def to_grid(slices: Sequence[SourceSlice], size: int) -> GridData:
    """Letterbox and resize slices to ``size x size`` exactly as inference does.

    Args:
        slices: the source slices.
        size: model input size S.

    Returns:
        The slices on the model grid (mask: each class resized bilinearly, then ``> 0.5``; a
        pixel claimed by two classes after resizing takes the later one).
    """
    images = np.empty((len(slices), size, size), dtype=np.float32)
    masks = np.empty((len(slices), size, size), dtype=np.uint8)
    for i, s in enumerate(slices):
        images[i] = to_model_grid(s.image_float(), size)
        masks[i] = 0
        for value in range(1, max(int(s.mask.max(initial=0)), 1) + 1):
            masks[i][to_model_grid((s.mask == value).astype(np.float32), size) > 0.5] = value
    return GridData(
        images=images,
        masks=masks,
        ids=tuple(s.id for s in slices),
        groups=tuple(s.group for s in slices),
        size=size,
    )


# ----------------------------------------------------------------------------- dispatch


def load_slices(
    path: Path,
    *,
    label: int = 1,
    window_center: float = DEFAULT_WINDOW_CENTER_HU,
    window_width: float = DEFAULT_WINDOW_WIDTH_HU,
    workers: int = 0,
    groups_file: Path | None = None,
    labels: Sequence[int] | None = None,
) -> list[SourceSlice]:
    """Load every labelled slice under ``path`` at its own resolution.

    Args:
        path: a folder (images/ + labels/, or DICOM + DICOM-SEG) or a packed ``.npz``.
        label: the mask value (or SEG segment number) that marks GGO. Ignored for ``.npz``.
        window_center: lung window centre in HU (DICOM and NIfTI).
        window_width: lung window width in HU.
        workers: decoding threads for image folders (0: serial).
        groups_file: optional CSV ``id,group`` overriding the groups.
        labels: several mask values, one per class (e.g. ``(1, 2)`` for GGO and
            consolidation): masks become class maps (``k + 1`` where the value is
            ``labels[k]``). Pictures and NIfTI only; a packed file keeps what it holds.

    Returns:
        The slices, sorted by id within each source.

    Raises:
        InputError: missing path, unknown layout, unmatched or mis-sized masks.
    """
    if not path.exists():
        raise InputError(f"data path not found: {path}")
    several = labels is not None and len(labels) > 1
    if path.is_file() and path.suffix == ".npz":
        slices = read_packed_slices(path)
        if not several:  # a caller of one class gets GGO masks from a multi-class file too
            slices = [replace(s, mask=np.asarray(s.mask == 1)) for s in slices]
    elif path.is_dir() and (path / "images").is_dir() and (path / "labels").is_dir():
        slices = _load_pair_folder(
            path, label=labels or label, window=(window_center, window_width), workers=workers
        )
    elif path.is_dir():
        if labels is not None and len(labels) > 1:
            raise InputError("several classes need images/ + labels/ or a packed .npz, not SEG")
        slices = _load_dicom_seg(path, label=label, window=(window_center, window_width))
    else:
        raise InputError(
            f"data path {path} is neither a folder nor a packed .npz; expected DIR/images + "
            "DIR/labels, a folder of DICOM CT + DICOM-SEG files, or a file from `training pack`"
        )
    if not slices:
        raise InputError(f"no labelled slices found in {path}")
    if groups_file is not None:
        slices = apply_groups(slices, groups_file)
    positives = sum(int(s.mask.any()) for s in slices)
    log.info("loaded %d slices (%d with GGO) from %s", len(slices), positives, path)
    if positives == 0:
        log.warning("no slice of %s contains label %d: is --label right?", path, label)
    return slices


def apply_groups(slices: Sequence[SourceSlice], groups_file: Path) -> list[SourceSlice]:
    """Set each slice's group from a CSV of ``id,group`` lines (header optional).

    Raises:
        InputError: unreadable file or ids without a group.
    """
    try:
        lines = groups_file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read groups file {groups_file}: {exc}") from exc
    mapping: dict[str, str] = {}
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0] and parts[0] != "id":
            mapping[parts[0]] = parts[1]
    missing = [s.id for s in slices if s.id not in mapping]
    if missing:
        raise InputError(
            f"groups file {groups_file} has no group for {len(missing)} ids, e.g. {missing[:3]}; "
            "add one 'id,group' line per slice"
        )
    return [replace(s, group=mapping[s.id]) for s in slices]


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


# ----------------------------------------------------------------------------- packing


def pack(
    slices: Sequence[SourceSlice],
    out: Path,
    *,
    size: int,
    label: int,
    grid_dtype: Literal["float16", "float32"] = "float16",
    classes: Sequence[str] = ("ggo",),
) -> GridData:
    """Write slices to one compressed ``.npz`` (model grid plus source resolution).

    Keys: ``images`` float16 (default; at most 2.5e-4 off, a sixteenth of an 8-bit step, and
    less than half the size) or float32 ``(n, S, S)``, ``masks`` uint8 ``(n, S, S)``, ``ids``,
    ``groups`` (``""`` = none), ``size``, ``label``, ``source_shapes`` ``(n, 2)``,
    ``source_images`` (flat, uint8 for display images or float32), ``source_masks`` (flat
    uint8), ``format_version``.
    The source arrays let ``evaluate`` and ``compare`` resize back exactly as inference does.

    Args:
        slices: the slices.
        out: the ``.npz`` path (written atomically).
        size: model grid size S.
        label: the label the masks were taken from (recorded).
        grid_dtype: storage type of the grid images (read back as float32).
        classes: the classes of the masks (recorded as ``classes``; masks are class maps when
            there are several).

    Returns:
        The grid data that was written.
    """
    grid = to_grid(slices, size)
    all_u8 = all(s.image.dtype == np.uint8 for s in slices)
    src_images = np.concatenate([(s.image if all_u8 else s.image_float()).ravel() for s in slices])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        images=grid.images.astype(grid_dtype),
        masks=grid.masks,
        ids=np.array(grid.ids, dtype=np.str_),
        groups=np.array([g or "" for g in grid.groups], dtype=np.str_),
        size=np.int64(size),
        label=np.int64(label),
        source_shapes=np.array([s.image.shape for s in slices], dtype=np.int64),
        source_images=src_images,
        source_masks=np.concatenate([s.mask.ravel() for s in slices]).astype(np.uint8),
        format_version=np.int64(PACK_FORMAT_VERSION),
        classes=np.array(list(classes), dtype=np.str_),
    )
    os.replace(tmp, out)
    return grid


def _open_packed(path: Path) -> Any:
    """Open a packed file and check its version."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read packed data {path}: {exc}; re-run `training pack`") from exc
    if int(npz.get("format_version", -1)) != PACK_FORMAT_VERSION:
        raise InputError(f"{path} is not a packed data file of version {PACK_FORMAT_VERSION}")
    return npz


def read_packed_slices(path: Path) -> list[SourceSlice]:
    """Rebuild the source-resolution slices stored in a packed file."""
    npz = _open_packed(path)
    shapes = npz["source_shapes"]
    images, masks = npz["source_images"], npz["source_masks"]
    several = len(packed_classes(npz)) > 1
    slices, start = [], 0
    for sid, group, (rows, cols) in zip(npz["ids"], npz["groups"], shapes, strict=True):
        stop = start + int(rows) * int(cols)
        slices.append(
            SourceSlice(
                id=str(sid),
                image=images[start:stop].reshape(rows, cols),
                mask=masks[start:stop].reshape(rows, cols).astype(np.uint8 if several else bool),
                group=str(group) or None,
            )
        )
        start = stop
    return slices


def packed_classes(npz: Any) -> tuple[str, ...]:
    """The classes a packed file's masks hold (files packed before classes: GGO only)."""
    return tuple(str(c) for c in npz["classes"]) if "classes" in npz else ("ggo",)


def data_classes(path: Path) -> tuple[str, ...] | None:
    """The classes recorded in a packed file; None for folders (they take ``labels``)."""
    if path.is_file() and path.suffix == ".npz":
        return packed_classes(_open_packed(path))
    return None


def load_grid(path: Path, *, size: int, **load_kwargs: Any) -> GridData:
    """Load data on the model grid; a packed file of the same size is read without resizing.

    Args:
        path: as for :func:`load_slices`.
        size: model input size S.
        **load_kwargs: passed to :func:`load_slices`.

    Returns:
        The grid data.
    """
    if path.is_file() and path.suffix == ".npz" and load_kwargs.get("groups_file") is None:
        npz = _open_packed(path)
        label = load_kwargs.get("label")
        if label is not None and int(npz["label"]) != label:
            log.warning(
                "%s was packed with label %d; --label %d does not apply to packed data",
                path,
                int(npz["label"]),
                label,
            )
        if int(npz["size"]) == size:
            labels = load_kwargs.get("labels")
            masks = npz["masks"].astype(np.uint8, copy=False)
            if labels is None or len(labels) < 2:  # one class asked for: GGO alone
                masks = (masks == 1).astype(np.uint8)
            return GridData(
                images=npz["images"].astype(np.float32, copy=False),
                masks=masks,
                ids=tuple(str(i) for i in npz["ids"]),
                groups=tuple(str(g) or None for g in npz["groups"]),
                size=size,
            )
        log.info(
            "packed size %d differs from --size %d: resizing from source", int(npz["size"]), size
        )
    return to_grid(load_slices(path, **load_kwargs), size)
