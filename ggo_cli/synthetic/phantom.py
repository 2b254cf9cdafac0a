"""A synthetic chest CT in Hounsfield units, with ground-glass opacity of known volume.

``ggo-cli demo`` and the tests need a chest CT with ground-glass opacity (GGO) of known volume,
built offline and free of patient data. :func:`make_chest_phantom` draws one: air, an elliptical
body with a subcutaneous fat layer, ribs, spine and sternum, mediastinum, aorta and heart, two
lungs that narrow to the apex and are carved by the diaphragm domes at the base, branching
vessels and airways, and GGO patches (a hazy rise in lung density that leaves vessels visible) of
exactly known voxel volume. :func:`ggo_cli.synthetic.ct_writer.write_ct_series` writes it as a
DICOM CT
series. The anatomy (grid, tissue densities, shapes, vessel and airway trees) is drawn by
:mod:`ggo_cli.synthetic.anatomy`; this module adds the GGO, the noise and the ground truth.

Anatomy is laid out in fractions of the field of view (in-plane) and of the scanned length (along
z), so any shape and spacing give a whole chest; the demo default, ``(60, 512, 512)`` voxels of
``(5.0, 0.7, 0.7)`` mm, gives adult sizes (body about 32 x 23 cm, GGO patches 2.5-5 cm).

Volumes are ``(slice, row, col)`` in patient order: slice ``k`` lies at ``z0 + k * slice_mm``
(feet to head), rows run to posterior (+y) and columns to the patient's left (+x), i.e.
``ImageOrientationPatient = [1, 0, 0, 0, 1, 0]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .anatomy import (
    AIR_HU,
    AIRWAY_DEPTH,
    AIRWAY_WALL_HU,
    CARINA_U,
    HILUM_U,
    LUNG_GRADIENT_HU,
    LUNG_HU,
    VESSEL_DEPTH,
    VESSEL_HU,
    BoolVolume,
    FloatVolume,
    Grid,
    Segment,
    grow_tree,
    in_heart,
    in_lung,
    make_grid,
    paint_base_anatomy,
    tube_distance,
)

log = logging.getLogger(__name__)

GGO_HU_RANGE = (-600.0, -420.0)
"""Plateau density of random GGO patches: hazy, far below vessels (Fleischner glossary, 2008)."""
GGO_MIN_HU = LUNG_HU + LUNG_GRADIENT_HU
"""An explicit patch must be denser than this, or it would not raise the parenchyma."""
GGO_EDGE_FRACTION = 0.35
"""Outer share of a patch's radius over which its density tapers: a soft, ill-defined margin."""
GGO_EDGE_WEIGHT = 0.5
"""Share of the plateau rise left at the boundary: the mask is the half-amplitude surface."""
GGO_LOBULATION = 0.12
"""Relative radius modulation that makes patches irregular instead of perfect ellipsoids."""
NOISE_SD_HU = 18.0
HU_MIN = -1024
HU_MAX = 3071
DEFAULT_SHAPE = (60, 512, 512)
DEFAULT_SPACING_MM = (5.0, 0.7, 0.7)
DEFAULT_GGO_LESIONS = 3





@dataclass(frozen=True, slots=True)
class GgoLesion:
    """One GGO patch: a lobulated ellipsoid clipped to the lungs, minus vessel and airway cores.

    Attributes:
        center_index: centre as fractional voxel indices ``(slice, row, col)``.
        radii_mm: semi-axes along ``(slice, row, col)`` in mm.
        hu: plateau density in HU (the rise tapers to half at the boundary).
        lobe_phase_rad: orientation of the three-lobed outline, in radians.
    """

    center_index: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    hu: float = -500.0
    lobe_phase_rad: float = 0.0


@dataclass(frozen=True, slots=True)
class Phantom:
    """A synthetic CT volume with its ground truth; the arrays are read-only.

    Attributes:
        hu: Hounsfield units, int16. Shape: ``(slice, row, col)``, patient order.
        ggo_mask: exactly the voxels whose density the GGO raised. Shape: as ``hu``.
        lung_right_mask: the patient's right lung (low column indices). Shape: as ``hu``.
        lung_left_mask: the patient's left lung. Shape: as ``hu``.
        spacing_mm: ``(slice, row, col)`` voxel spacing in mm.
        lesions: the GGO patches drawn.
    """

    hu: npt.NDArray[np.int16]
    ggo_mask: BoolVolume
    lung_right_mask: BoolVolume
    lung_left_mask: BoolVolume
    spacing_mm: tuple[float, float, float]
    lesions: tuple[GgoLesion, ...] = ()

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (1 mL = 1000 mm^3)."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    @property
    def ggo_volume_ml(self) -> float:
        """True GGO volume in mL: mask voxels times the voxel volume."""
        return int(np.count_nonzero(self.ggo_mask)) * self.voxel_volume_ml

    @property
    def lung_mask(self) -> BoolVolume:
        """Both lungs. Shape: ``(slice, row, col)``."""
        return self.lung_right_mask | self.lung_left_mask

    @property
    def lung_right_volume_ml(self) -> float:
        """Right lung volume in mL."""
        return int(np.count_nonzero(self.lung_right_mask)) * self.voxel_volume_ml

    @property
    def lung_left_volume_ml(self) -> float:
        """Left lung volume in mL."""
        return int(np.count_nonzero(self.lung_left_mask)) * self.voxel_volume_ml


def _lesion_region(g: Grid, lesion: GgoLesion) -> (
    tuple[tuple[slice, ...], FloatVolume] | None
):
    """A lesion's bounding box and its weight (1 in the core, tapering to the edge, 0 out)."""
    spacing = np.array(g.spacing_mm)
    shape = np.array([g.z.shape[0], g.y.shape[1], g.x.shape[2]])
    centre = (np.array(lesion.center_index) - (shape - 1) / 2.0) * spacing
    reach = np.array(lesion.radii_mm) * (1.0 + GGO_LOBULATION)
    box = g.box(centre - reach, centre + reach)
    if box is None:
        return None
    dz, dy, dx = g.z[box[0]] - centre[0], g.y[:, box[1]] - centre[1], g.x[:, :, box[2]] - centre[2]
    rz, ry, rx = lesion.radii_mm
    lobes = 1.0 + GGO_LOBULATION * np.cos(3.0 * np.arctan2(dy, dx) + lesion.lobe_phase_rad)
    rho = np.sqrt((dz / rz) ** 2 + ((dy / ry) ** 2 + (dx / rx) ** 2) / lobes**2)
    taper = GGO_EDGE_WEIGHT + (1.0 - GGO_EDGE_WEIGHT) * 0.5 * (
        1.0 + np.cos(np.pi * np.clip((rho - 1.0 + GGO_EDGE_FRACTION) / GGO_EDGE_FRACTION, 0, 1))
    )
    return box, np.asarray(np.where(rho < 1.0, taper, 0.0), np.float32)


def _random_lesions(g: Grid, rng: np.random.Generator, allowed: BoolVolume, count: int) -> (
    list[GgoLesion]
):
    """Draw patches centred on random lung voxels, preferring the outer half of each lung.

    GGO favours the subpleural periphery (COVID-19 pneumonia, Fleischner 2020 statement).
    Rejection sampling of random voxels is far cheaper than listing the lung's voxels.
    """
    n, rows, cols = allowed.shape
    lesions: list[GgoLesion] = []
    for _ in range(count):
        for attempt in range(128):
            k, r = rng.integers(n, size=256), rng.integers(rows, size=256)
            c = rng.integers(cols, size=256)
            ok = allowed[k, r, c]
            if attempt < 64:
                ok &= np.abs(c - (cols - 1) / 2.0) > 0.2 * cols
            if ok.any():
                i = int(np.argmax(ok))
                break
        else:
            raise ValueError(f"no lung voxels to place GGO in at shape {allowed.shape}; use a "
                             "larger shape or ggo_lesions=0")
        a = g.scale * rng.uniform(0.07, 0.13)
        radii = np.maximum([a * rng.uniform(0.8, 1.3), a * rng.uniform(0.75, 1.25),
                            a * rng.uniform(0.75, 1.25)], g.spacing_mm)  # covers its centre
        lesions.append(GgoLesion((float(k[i]), float(r[i]), float(c[i])),
                                 (float(radii[0]), float(radii[1]), float(radii[2])),
                                 float(rng.uniform(*GGO_HU_RANGE)),
                                 float(rng.uniform(0.0, 2 * np.pi))))
    return lesions


def make_chest_phantom(
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
    *,
    seed: int = 0,
    ggo_lesions: int | Sequence[GgoLesion] = DEFAULT_GGO_LESIONS,
    noise_sd_hu: float = NOISE_SD_HU,
) -> Phantom:
    """Draw a synthetic chest CT with GGO patches of exactly known volume.

    Deterministic for a given ``seed``. A 60 x 512 x 512 phantom takes under a second on one
    core.

    Args:
        shape: ``(slices, rows, cols)``; the chest fills the field of view at any shape.
        spacing_mm: ``(slice, row, col)`` voxel spacing in mm.
        seed: seed of every random choice (vessel branching, GGO placement, noise).
        ggo_lesions: how many random GGO patches to draw, or the patches themselves (centres
            in voxel indices); ``0`` gives a GGO-free chest.
        noise_sd_hu: standard deviation of the Gaussian image noise in HU (0 for none).

    Returns:
        The phantom. Its ``ggo_mask`` holds exactly the voxels whose density the GGO raised:
        inside a patch, inside a lung, outside vessel and airway cores. The rise tapers from the
        plateau to half of it at the boundary, so a threshold halfway between parenchyma and
        plateau recovers the mask up to noise.
        Shape: every array ``shape``; ``hu`` int16 in ``[-1024, 3071]``.

    Raises:
        ValueError: a shape or spacing that is not positive, no lung to place GGO in, or a
            patch not denser than parenchyma.
    """
    if len(shape) != 3 or min(shape) < 1 or len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise ValueError(f"shape {shape} and spacing_mm {spacing_mm} must be 3 positive values")
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    spacing_mm = (float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2]))
    rng = np.random.default_rng(seed)
    g = make_grid(shape, spacing_mm)
    hu = paint_base_anatomy(g)
    u = g.u_of_z(g.z)
    heart = in_heart(g, g.x, g.y, u)
    right = in_lung(g, g.x, g.y, u, -1) & ~heart
    left = in_lung(g, g.x, g.y, u, 1) & ~heart
    lung = right | left
    parenchyma = np.float32(LUNG_HU) + np.float32(LUNG_GRADIENT_HU / g.half_y) * g.y
    np.copyto(hu, np.broadcast_to(parenchyma, hu.shape), where=lung)

    vessel = np.zeros(shape, np.float32)  # partial-volume fraction of vessel per voxel
    airway = np.zeros(shape, np.int8)  # 1 = wall, 2 = lumen
    pixel_mm = min(spacing_mm[1:])
    for side in (-1, 1):
        for seg in grow_tree(g, rng, side, root_radius=0.03 * g.scale, depth=VESSEL_DEPTH):
            found = tube_distance(g, seg)
            if found:
                box, dist, radius = found
                np.maximum(vessel[box], np.clip((radius - dist) / pixel_mm + 0.5, 0, 1),
                           out=vessel[box])
    hy, s = g.half_y, g.scale
    carina = np.array([g.z_of_u(CARINA_U), 0.1 * hy, 0.0])
    airways: list[Segment] = [(np.array([g.length_z, 0.1 * hy, 0.0]), carina, 0.05 * s, 0.05 * s)]
    for side in (-1, 1):
        hilum = np.array([g.z_of_u(HILUM_U), 0.02 * hy, side * 0.2 * g.half_x])
        airways.append((carina, hilum, 0.035 * s, 0.03 * s))
        airways += grow_tree(g, rng, side, root_radius=0.022 * s, depth=AIRWAY_DEPTH,
                             offset_mm=(0.0, -0.07 * s, 0.0))
    for seg in airways:
        found = tube_distance(g, seg)
        if found:
            box, dist, radius = found
            wall = np.maximum(0.3 * radius, pixel_mm)
            label = np.where(dist < radius, 2, np.where(dist < radius + wall, 1, 0))
            np.maximum(airway[box], label.astype(np.int8), out=airway[box])

    lesions = (_random_lesions(g, rng, lung & (vessel < 0.5) & (airway == 0), ggo_lesions)
               if isinstance(ggo_lesions, int) else list(ggo_lesions))
    if any(lesion.hu <= GGO_MIN_HU for lesion in lesions):
        raise ValueError(f"GGO lesion densities {[lesion.hu for lesion in lesions]} HU must "
                         f"exceed {GGO_MIN_HU} HU, the densest parenchyma")
    ggo = np.zeros(shape, bool)
    for lesion in lesions:
        found_lesion = _lesion_region(g, lesion)
        if found_lesion is None:
            continue
        box, weight = found_lesion
        region = (weight > 0) & lung[box] & (vessel[box] < 0.5) & (airway[box] == 0)
        raised = parenchyma[:, box[1]] + weight * (np.float32(lesion.hu) - parenchyma[:, box[1]])
        np.copyto(hu[box], np.maximum(hu[box], raised), where=region)
        ggo[box] |= region

    vessel *= lung  # vessels only show inside the lungs; keeps the mediastinum as painted
    hu += vessel * (np.float32(VESSEL_HU) - hu)
    np.copyto(hu, np.float32(AIRWAY_WALL_HU), where=airway == 1)
    np.copyto(hu, np.float32(AIR_HU), where=airway == 2)
    if noise_sd_hu > 0:
        noise = np.empty(shape[1:], np.float32)
        for k in range(shape[0]):
            rng.standard_normal(out=noise, dtype=np.float32)
            noise *= np.float32(noise_sd_hu)
            hu[k] += noise
    np.rint(hu, out=hu)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    arrays = (hu.astype(np.int16), ggo, right, left)
    for array in arrays:
        array.flags.writeable = False
    log.debug("phantom %s at %s mm: %d GGO patches, %d GGO voxels", shape, spacing_mm,
              len(lesions), int(ggo.sum()))
    return Phantom(*arrays, spacing_mm=spacing_mm, lesions=tuple(lesions))

