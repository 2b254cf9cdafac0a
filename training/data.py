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

:mod:`training.slice_readers` holds :class:`SourceSlice` and the folder readers; this module
dispatches between them and packed files, and puts slices on the model grid.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ggo_cli.analysis.preprocessing import (
    DEFAULT_WINDOW_CENTER_HU,
    DEFAULT_WINDOW_WIDTH_HU,
    to_model_grid,
)
from ggo_cli.errors import InputError

from .slice_readers import (
    IMAGE_SUFFIXES,
    LABEL_SUFFIXES,
    NIFTI_SUFFIXES,
    SEG_SOP_CLASS_UID,
    SourceSlice,
    _load_dicom_seg,
    _load_pair_folder,
    class_map,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "LABEL_SUFFIXES",
    "NIFTI_SUFFIXES",
    "PACK_FORMAT_VERSION",
    "SEG_SOP_CLASS_UID",
    "GridData",
    "SourceSlice",
    "apply_groups",
    "class_map",
    "data_classes",
    "load_grid",
    "load_slices",
    "pack",
    "packed_classes",
    "read_packed_slices",
    "to_grid",
]

log = logging.getLogger(__name__)

PACK_FORMAT_VERSION = 1


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
