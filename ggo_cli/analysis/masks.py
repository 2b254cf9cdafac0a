"""Masks on the source grid: model output binarised, the SEG's mask planes and the lung
restriction.

The SEG's pixel array is one set of bool planes, ``(channels + 2, slices, rows, cols)``: the
model's channels, then right and left lung. The segmenter and the lung segmentation write
straight into views of them, the masks are cleared outside the lungs in place, and the SEG
writer gets them back as one array without a copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..domain import Prediction

if TYPE_CHECKING:
    from .lungs import LungMasks

RESTRICT_SLAB_SLICES = 64
"""Slices cleared outside the lungs at a time (bounds the ``right | left`` temporary)."""


def threshold_probabilities(
    probabilities: npt.NDArray[np.float32], threshold: float
) -> npt.NDArray[np.bool_]:
    """Binarise probabilities: a pixel is positive when its probability exceeds the threshold.

    Args:
        probabilities: values in ``[0, 1]``, any shape.
        threshold: the model's (or the user's) probability threshold.

    Returns:
        Boolean mask. Shape: as ``probabilities``.
    """
    return np.greater(probabilities, np.float32(threshold))


def segment_planes(
    shape: tuple[int, int, int], n_channels: int
) -> tuple[npt.NDArray[np.bool_], LungMasks]:
    """Empty planes for the SEG's segments, and the lungs' views of them.

    The planes (``(channels + 2, slices, rows, cols)``: the model's channels, then right and
    left lung) are the SEG's pixel array: :func:`model_masks` gives the model's part as
    ``(slices, rows, cols, channels)`` for :meth:`OnnxSegmenter.predict` to fill, and
    :func:`seg_masks` hands them all to highdicom without a copy. Allocated with zeros, so
    pages are only committed as each plane is written.

    Returns:
        The planes, and the lung masks (contiguous views of planes ``channels`` and
        ``channels + 1``).
    """
    from .lungs import LungMasks  # runtime import: lungs imports SimpleITK

    planes = np.zeros((n_channels + 2, *shape), dtype=np.bool_)
    return planes, LungMasks(right=planes[n_channels], left=planes[n_channels + 1])


def model_masks(planes: npt.NDArray[np.bool_], n_channels: int) -> npt.NDArray[np.bool_]:
    """The model's channels of :func:`segment_planes` as ``(slices, rows, cols, channels)``."""
    return np.moveaxis(planes[:n_channels], 0, -1)


def _check_lung_shapes(masks: npt.NDArray[np.bool_], lungs: LungMasks) -> None:
    """Raise ``ValueError`` when masks and lungs do not cover the same slices (a bug)."""
    if masks.shape[:3] != lungs.right.shape or lungs.left.shape != lungs.right.shape:
        raise ValueError(f"masks {masks.shape} do not match lung shapes {lungs.right.shape} and "
                         f"{lungs.left.shape}")


def keep_inside_lungs(prediction: Prediction, lungs: LungMasks) -> Prediction:
    """Clear every channel of the masks outside ``right | left``, in place, slab by slab.

    Returns:
        ``prediction`` (its masks changed).

    Raises:
        ValueError: the shapes differ.
    """
    masks = prediction.masks
    _check_lung_shapes(masks, lungs)
    for start in range(0, masks.shape[0], RESTRICT_SLAB_SLICES):
        z = slice(start, start + RESTRICT_SLAB_SLICES)
        both = np.logical_or(lungs.right[z], lungs.left[z])
        masks[z] &= both[..., None]
    return prediction


def _offset(view: npt.NDArray[np.bool_], base: npt.NDArray[np.bool_]) -> int:
    """Byte offset of a view's first element in its base array."""
    return int(view.__array_interface__["data"][0]) - int(base.__array_interface__["data"][0])


def seg_masks(prediction: Prediction, lungs: LungMasks | None) -> npt.NDArray[np.bool_]:
    """The SEG's pixel array: the model's channels, then right and left lung when given.

    Masks and lungs that are views of one :func:`segment_planes` give the planes back as a
    view (no copy); others are stacked.

    Shape: ``(slices, rows, cols, segments)``.
    """
    if lungs is None:
        return prediction.masks
    masks = prediction.masks
    n_channels = masks.shape[-1]
    planes = masks.base
    if (
        isinstance(planes, np.ndarray)
        and planes.dtype == np.bool_
        and planes.flags.c_contiguous
        and planes.shape == (n_channels + 2, *masks.shape[:3])
        and lungs.right.base is planes
        and lungs.left.base is planes
    ):
        whole = np.moveaxis(planes, 0, -1)
        plane = planes[0].nbytes
        if (
            masks.strides == whole.strides
            and lungs.right.strides == planes.strides[1:]
            and lungs.left.strides == planes.strides[1:]
            and _offset(masks, planes) == 0
            and _offset(lungs.right, planes) == n_channels * plane
            and _offset(lungs.left, planes) == (n_channels + 1) * plane
        ):
            return whole
    return np.concatenate(
        [masks, lungs.right[..., None], lungs.left[..., None]], axis=-1
    )
