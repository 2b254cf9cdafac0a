"""A block phantom with a GGO cube of exact size: golden volume checks in the tests."""

from __future__ import annotations

import numpy as np

from ggo_cli.synthetic.anatomy import AIR_HU, LUNG_HU, SOFT_TISSUE_HU
from ggo_cli.synthetic.phantom import Phantom


def make_cube_phantom(
    shape: tuple[int, int, int] = (12, 64, 64),
    spacing_mm: tuple[float, float, float] = (2.5, 0.7, 0.7),
    *,
    cube_voxels: tuple[int, int, int] = (4, 8, 8),
    cube_hu: float = -500.0,
) -> Phantom:
    """A noise-free block phantom with a GGO cube of exact size, for golden volume checks.

    Air, a soft-tissue box, and inside it a lung-density block split into right and left
    halves; the cube sits in the right half, centred on the middle slice.

    Args:
        shape: ``(slices, rows, cols)``.
        spacing_mm: ``(slice, row, col)`` voxel spacing in mm.
        cube_voxels: the cube's size in voxels along ``(slice, row, col)``.
        cube_hu: the cube's density in HU.

    Returns:
        The phantom; ``ggo_mask`` is exactly the cube, ``prod(cube_voxels)`` voxels.
        Shape: every array ``shape``.

    Raises:
        ValueError: the cube does not fit inside the right lung block.
    """
    n, rows, cols = shape
    hu = np.full(shape, AIR_HU, np.float32)
    hu[:, rows // 8: rows - rows // 8, cols // 8: cols - cols // 8] = SOFT_TISSUE_HU
    lung = np.zeros(shape, bool)
    lung[:, rows // 4: rows - rows // 4, cols // 4: cols - cols // 4] = True
    right = lung.copy()
    right[:, :, cols // 2:] = False
    start = (n // 2 - cube_voxels[0] // 2, rows // 2 - cube_voxels[1] // 2,
             (cols // 4 + cols // 2) // 2 - cube_voxels[2] // 2)
    box = tuple(slice(a, a + size) for a, size in zip(start, cube_voxels, strict=True))
    ggo = np.zeros(shape, bool)
    ggo[box] = True
    if min(start) < 0 or int(ggo.sum()) != int(np.prod(cube_voxels)) or np.any(ggo & ~right):
        raise ValueError(f"a {cube_voxels} cube does not fit the right lung of a {shape} volume")
    hu[lung] = LUNG_HU
    hu[ggo] = cube_hu
    arrays = (np.rint(hu).astype(np.int16), ggo, right, lung & ~right)
    for array in arrays:
        array.flags.writeable = False
    spacing = (float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2]))
    return Phantom(*arrays, spacing_mm=spacing)
