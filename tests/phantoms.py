"""Block phantoms with GGO (and consolidation) cubes of exact size: golden volume checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

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


@dataclass(frozen=True, slots=True)
class LesionPhantom:
    """A block phantom with GGO and consolidation cubes in both lungs (exact ground truth).

    Attributes:
        phantom: the CT and its GGO and lung masks (``phantom.ggo_mask`` is the GGO cubes).
        consolidation_mask: the consolidation cubes. Shape: as ``phantom.hu``.
    """

    phantom: Phantom
    consolidation_mask: npt.NDArray[np.bool_]

    def volume_ml(self, mask: npt.NDArray[np.bool_]) -> float:
        """A mask's true volume in mL."""
        return int(np.count_nonzero(mask)) * self.phantom.voxel_volume_ml


LESION_PHANTOM_SHAPE = (20, 128, 128)
LESION_PHANTOM_SPACING_MM = (5.0, 1.4, 1.4)
"""The cube phantom's grid whose lungs ggo-cli finds exactly (tests/analysis/test_lungs.py)."""
CONSOLIDATION_HU = 30.0
"""Consolidation cubes: soft-tissue density inside aerated lung."""


def make_lesion_phantom() -> LesionPhantom:
    """The cube phantom (:func:`make_cube_phantom` at :data:`LESION_PHANTOM_SHAPE`) with a GGO
    cube (-500 HU) and a consolidation cube (:data:`CONSOLIDATION_HU`) of different sizes in
    each lung, each well inside its lung (so the lung mask's 3-D hole filling keeps the dense
    cubes in their lung).

    Returns:
        The phantom: GGO 320 voxels right + 192 left, consolidation 240 right + 600 left.
    """
    base = make_cube_phantom(LESION_PHANTOM_SHAPE, LESION_PHANTOM_SPACING_MM)
    boxes = {
        "ggo_right": (slice(8, 12), slice(40, 50), slice(38, 46)),
        "ggo_left": (slice(6, 10), slice(44, 52), slice(70, 76)),
        "consolidation_right": (slice(8, 12), slice(70, 76), slice(40, 50)),
        "consolidation_left": (slice(10, 15), slice(60, 72), slice(78, 88)),
    }
    masks = {}
    for name, box in boxes.items():
        mask = np.zeros(LESION_PHANTOM_SHAPE, bool)
        mask[box] = True
        masks[name] = mask
    ggo = masks["ggo_right"] | masks["ggo_left"]
    consolidation = masks["consolidation_right"] | masks["consolidation_left"]
    hu = np.array(base.hu)
    hu[base.ggo_mask] = round(LUNG_HU)  # the base phantom's own cube: lung again
    hu[ggo] = -500
    hu[consolidation] = round(CONSOLIDATION_HU)
    arrays = (hu, ggo, consolidation)
    for array in arrays:
        array.flags.writeable = False
    phantom = Phantom(hu, ggo, base.lung_right_mask, base.lung_left_mask,
                      spacing_mm=base.spacing_mm)
    if np.any((ggo | consolidation) & ~phantom.lung_mask) or np.any(ggo & consolidation):
        raise ValueError("a lesion cube leaves its lung or overlaps another")  # a bug here
    return LesionPhantom(phantom, consolidation)
