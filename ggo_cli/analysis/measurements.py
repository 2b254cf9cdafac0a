"""Volumetry: voxel counts to millilitres, for the GGO and per lung."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..domain import GgoMeasurement, LungMeasurement

if TYPE_CHECKING:
    from .lungs import LungMasks


def measure_ggo(ggo: npt.NDArray[np.bool_], voxel_ml: float) -> GgoMeasurement:
    """Measure a GGO mask.

    Args:
        ggo: the GGO mask. Shape: ``(slices, rows, cols)``.
        voxel_ml: volume of one voxel in mL.

    Returns:
        Voxel count, volume (voxels x voxel volume) and the number of slices with GGO.
    """
    per_slice = ggo.reshape(ggo.shape[0], -1).sum(axis=1)
    voxels = int(per_slice.sum())
    return GgoMeasurement(
        voxel_volume_ml=voxel_ml,
        ggo_voxels=voxels,
        ggo_volume_ml=voxels * voxel_ml,
        ggo_slice_count=int(np.count_nonzero(per_slice)),
    )


def lung_measurements(lungs: LungMasks, ggo: npt.NDArray[np.bool_], voxel_volume_ml: float) -> (
    LungMeasurement
):
    """Measure lung volumes and the GGO inside each lung.

    Args:
        lungs: the lung masks.
        ggo: the GGO mask; voxels outside both lungs are not counted. Shape: as the lungs.
        voxel_volume_ml: volume of one voxel in mL.

    Returns:
        Volumes in mL and percentages (``nan`` for a lung of volume 0).

    Raises:
        ValueError: the shapes differ or ``voxel_volume_ml`` is not positive.
    """
    if ggo.shape != lungs.right.shape or lungs.left.shape != lungs.right.shape:
        raise ValueError(f"GGO shape {ggo.shape} differs from lung shapes {lungs.right.shape} "
                         f"and {lungs.left.shape}")
    if not voxel_volume_ml > 0:
        raise ValueError(f"voxel_volume_ml {voxel_volume_ml} must be positive")
    right_ml = int(np.count_nonzero(lungs.right)) * voxel_volume_ml
    left_ml = int(np.count_nonzero(lungs.left)) * voxel_volume_ml
    right_ggo_ml = int(np.count_nonzero(ggo & lungs.right)) * voxel_volume_ml
    left_ggo_ml = int(np.count_nonzero(ggo & lungs.left)) * voxel_volume_ml
    return LungMeasurement(
        lung_volume_ml=left_ml + right_ml,
        left_lung_volume_ml=left_ml,
        right_lung_volume_ml=right_ml,
        ggo_percent_of_lung=_percent(left_ggo_ml + right_ggo_ml, left_ml + right_ml),
        left_ggo_volume_ml=left_ggo_ml,
        right_ggo_volume_ml=right_ggo_ml,
        left_ggo_percent=_percent(left_ggo_ml, left_ml),
        right_ggo_percent=_percent(right_ggo_ml, right_ml),
    )


def _percent(part_ml: float, whole_ml: float) -> float:
    """``100 * part / whole``, or ``nan`` when the whole is empty."""
    return 100.0 * part_ml / whole_ml if whole_ml > 0 else math.nan
