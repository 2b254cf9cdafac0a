"""Volumetry: voxel counts to millilitres."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..domain import GgoMeasurement


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
