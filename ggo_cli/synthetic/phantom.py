"""A synthetic chest CT in Hounsfield units, with ground-glass opacity of known volume.

``ggo-cli demo`` and the tests need a chest CT with ground-glass opacity (GGO) of known volume,
built offline and free of patient data. :func:`make_chest_phantom` draws one: air, an elliptical
body with a subcutaneous fat layer, ribs, spine and sternum, mediastinum, aorta and heart, two
lungs that narrow to the apex and are carved by the diaphragm domes at the base, branching
vessels and airways, and GGO patches (a hazy rise in lung density that leaves vessels visible) of
exactly known voxel volume. :func:`ggo_cli.synthetic.ct_writer.write_ct_series` writes it as a
DICOM CT
series.

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

log = logging.getLogger(__name__)

AIR_HU = -1000.0
FAT_HU = -100.0
MUSCLE_HU = 50.0
SOFT_TISSUE_HU = 40.0
BLOOD_HU = 40.0
CSF_HU = 15.0
CORTICAL_BONE_HU = 700.0
TRABECULAR_BONE_HU = 250.0
DISC_HU = 80.0
VESSEL_HU = 40.0
AIRWAY_WALL_HU = 30.0
LUNG_HU = -850.0
"""Mean lung parenchyma, supine, at mid depth."""
LUNG_GRADIENT_HU = 50.0
"""Posterior minus anterior parenchyma density: the gravitational gradient of a supine scan."""
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
VERTEBRA_HEIGHT_MM = 25.0
RIB_PITCH_MM = 22.0
HU_MIN = -1024
HU_MAX = 3071
DEFAULT_SHAPE = (60, 512, 512)
DEFAULT_SPACING_MM = (5.0, 0.7, 0.7)
DEFAULT_GGO_LESIONS = 3

_LUNG_BASE, _LUNG_APEX = 0.06, 0.95  # lung extent in fractions of the scanned length
_HILUM_U, _CARINA_U = 0.5, 0.64  # normalised lung height u: 0 = lung base, 1 = apex
_BRANCH_LENGTH, _BRANCH_RADIUS = 0.8, 0.72  # child / parent ratios (Murray's law: ~2^-1/3)
_VESSEL_DEPTH, _AIRWAY_DEPTH = 7, 2

FloatVolume = npt.NDArray[np.float32]
BoolVolume = npt.NDArray[np.bool_]


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


@dataclass(frozen=True, slots=True)
class _Grid:
    """Voxel-centre coordinates in mm about the volume centre, broadcastable to the volume."""

    z: FloatVolume  # (n, 1, 1)
    y: FloatVolume  # (1, rows, 1); +y is posterior
    x: FloatVolume  # (1, 1, cols); +x is the patient's left
    spacing_mm: tuple[float, float, float]
    half_x: float
    half_y: float
    length_z: float

    @property
    def scale(self) -> float:
        """In-plane size unit: half the smaller field-of-view side, in mm."""
        return min(self.half_x, self.half_y)

    def u_of_z(self, z: npt.ArrayLike) -> FloatVolume:
        """Normalised lung height (0 at the lung base, 1 at the apex) of z in mm."""
        t = np.asarray(z, np.float32) / np.float32(self.length_z) + np.float32(0.5)
        return np.asarray((t - _LUNG_BASE) / (_LUNG_APEX - _LUNG_BASE), np.float32)

    def z_of_u(self, u: float) -> float:
        """The z in mm of a normalised lung height (inverse of :meth:`u_of_z`)."""
        return (u * (_LUNG_APEX - _LUNG_BASE) + _LUNG_BASE - 0.5) * self.length_z

    def box(self, lo_mm: npt.NDArray[np.float64], hi_mm: npt.NDArray[np.float64]) -> (
        tuple[slice, slice, slice] | None
    ):
        """Index slices of the voxels whose centres lie in ``[lo_mm, hi_mm]`` (z, y, x)."""
        shape = (self.z.shape[0], self.y.shape[1], self.x.shape[2])
        spacing = np.array(self.spacing_mm)
        centre = (np.array(shape) - 1) / 2.0
        lo = np.maximum(np.ceil(lo_mm / spacing + centre), 0).astype(int)
        hi = np.minimum(np.floor(hi_mm / spacing + centre) + 1, shape).astype(int)
        if np.any(hi <= lo):
            return None
        return slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])


def _make_grid(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> _Grid:
    """Build the coordinate grid of a volume."""
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s
            for n, s in zip(shape, spacing_mm, strict=True)]
    n, rows, cols = shape
    return _Grid(
        z=axes[0].reshape(n, 1, 1),
        y=axes[1].reshape(1, rows, 1),
        x=axes[2].reshape(1, 1, cols),
        spacing_mm=spacing_mm,
        half_x=cols * spacing_mm[2] / 2.0,
        half_y=rows * spacing_mm[1] / 2.0,
        length_z=n * spacing_mm[0],
    )


def _ellipse(x: npt.ArrayLike, y: npt.ArrayLike, centre: tuple[float, float],
             axes: tuple[float, float]) -> FloatVolume:
    """Squared normalised radius about an axis-aligned ellipse (< 1 inside); broadcasts."""
    dx = (np.asarray(x, np.float32) - np.float32(centre[0])) / np.float32(axes[0])
    dy = (np.asarray(y, np.float32) - np.float32(centre[1])) / np.float32(axes[1])
    return np.asarray(dx * dx + dy * dy)


def _heart(g: _Grid, x: npt.ArrayLike, y: npt.ArrayLike, u: npt.ArrayLike) -> BoolVolume:
    """Whether points lie in the heart (a left-anterior ellipsoid on the diaphragm)."""
    hx, hy = g.half_x, g.half_y
    q = _ellipse(x, y, (0.1 * hx, -0.12 * hy), (0.33 * hx, 0.3 * hy))
    return np.asarray(q + ((np.asarray(u, np.float32) - 0.22) / 0.3) ** 2 < 1.0)


def _lung(g: _Grid, x: npt.ArrayLike, y: npt.ArrayLike, u: npt.ArrayLike, side: int) -> (
    BoolVolume
):
    """Whether points lie in one lung, heart not yet carved out; ``side`` -1 = right, 1 = left."""
    hx, hy = g.half_x, g.half_y
    axes = (0.31 * hx, 0.43 * hy) if side < 0 else (0.28 * hx, 0.41 * hy)
    q = _ellipse(x, y, (side * 0.39 * hx, 0.0), axes)
    u = np.asarray(u, np.float32)
    # Cross-section: full below 35 % of the height, rounding off towards the apex.
    profile_sq = np.clip(1.0 - np.clip((u - 0.35) / 0.67, 0.0, None) ** 2, 0.0, 1.0)
    # Diaphragm dome: highest under the lung's centre, lowest in the posterior recesses.
    dome = 0.28 * np.clip(1.0 - q, 0.0, 1.0) - 0.06 * np.asarray(y, np.float32) / hy
    allowed = (
        (_ellipse(x, y, (0.0, 0.0), (0.72 * hx, 0.5 * hy)) < 1.0)  # thoracic cavity
        & (np.asarray(x) * side > 0.07 * hx)  # mediastinum
        & (_ellipse(x, y, (0.0, 0.38 * hy), (0.2 * hx, 0.22 * hy)) >= 1.0)  # spine
    )
    return np.asarray((q < profile_sq) & (u > dome) & (u < 1.0) & allowed)


def _paint(hu: FloatVolume, on_slices: npt.NDArray[np.bool_], mask: BoolVolume,
           value: float | npt.NDArray[np.float32]) -> None:
    """Set ``value`` (scalar or one per selected slice) inside a 2-D mask on some slices."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return
    r, c = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    values = np.broadcast_to(np.asarray(value, np.float32), (int(on_slices.sum()),))
    for k, v in zip(np.flatnonzero(on_slices), values, strict=True):
        hu[k, r, c][mask[r, c]] = v


def _base_anatomy(g: _Grid) -> FloatVolume:
    """Paint air, body wall, mediastinum, spine, ribs, sternum, aorta and heart."""
    hx, hy, s = g.half_x, g.half_y, g.scale
    x, y = g.x[0], g.y[0]
    plane = np.full((y.shape[0], x.shape[1]), AIR_HU, np.float32)
    for centre, axes, value in (
        ((0.0, 0.02 * hy), (0.88 * hx, 0.64 * hy), FAT_HU),  # subcutaneous fat
        ((0.0, 0.02 * hy), (0.81 * hx, 0.57 * hy), MUSCLE_HU),  # chest wall
        ((0.0, 0.0), (0.72 * hx, 0.5 * hy), SOFT_TISSUE_HU),  # cavity (liver below the domes)
        ((0.0, -0.08 * hy), (0.17 * hx, 0.3 * hy), FAT_HU),  # mediastinal fat
        ((0.0, 0.56 * hy), (0.045 * s, 0.045 * s), CSF_HU),  # spinal canal
    ):
        plane[_ellipse(x, y, centre, axes) < 1.0] = value
    hu = np.repeat(plane[None], g.z.shape[0], axis=0)
    z = g.z[:, 0, 0]
    u = g.u_of_z(z)
    every = np.ones_like(u, dtype=bool)
    disc = np.mod(z, VERTEBRA_HEIGHT_MM) < 0.2 * VERTEBRA_HEIGHT_MM
    vertebra = _ellipse(x, y, (0.0, 0.38 * hy), (0.1 * s, 0.09 * s))
    _paint(hu, every, vertebra < 1.0, np.where(disc, DISC_HU, CORTICAL_BONE_HU))
    _paint(hu, every, vertebra < 0.7, np.where(disc, DISC_HU, TRABECULAR_BONE_HU))
    canal = _ellipse(x, y, (0.0, 0.56 * hy), (0.045 * s, 0.045 * s)) < 1.0
    arch = (_ellipse(x, y, (0.0, 0.6 * hy), (0.1 * s, 0.05 * s)) < 1.0) & ~canal
    _paint(hu, every, arch, CORTICAL_BONE_HU)
    # Ribs run obliquely, so each crosses an axial plane only on some slices.
    for j, angle in enumerate(np.deg2rad(np.linspace(-150.0, 150.0, 12))):
        centre = (0.76 * hx * np.sin(angle), -0.535 * hy * np.cos(angle))
        shown = np.cos(2 * np.pi * z / RIB_PITCH_MM + 0.9 * j) > 0.3
        _paint(hu, shown & (u < 1.05), _ellipse(x, y, centre, (0.035 * s, 0.035 * s)) < 1.0,
               CORTICAL_BONE_HU)
    sternum = _ellipse(x, y, (0.0, -0.53 * hy), (0.07 * s, 0.025 * s)) < 1.0
    _paint(hu, (u > 0.3) & (u < 0.9), sternum, CORTICAL_BONE_HU)
    descending = _ellipse(x, y, (0.12 * hx, 0.24 * hy), (0.055 * s, 0.055 * s)) < 1.0
    _paint(hu, (u > -0.1) & (u < 0.85), descending, BLOOD_HU)
    ascending = _ellipse(x, y, (0.02 * hx, -0.17 * hy), (0.065 * s, 0.065 * s)) < 1.0
    _paint(hu, (u > 0.45) & (u < 0.85), ascending, BLOOD_HU)
    arch_aorta = _ellipse(x, y, (0.07 * hx, 0.03 * hy), (0.07 * s, 0.24 * hy)) < 1.0
    _paint(hu, (u >= 0.8) & (u < 0.87), arch_aorta, BLOOD_HU)
    np.copyto(hu, np.float32(BLOOD_HU), where=_heart(g, g.x, g.y, g.u_of_z(g.z)))
    return hu


Segment = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float, float]


def _grow_tree(g: _Grid, rng: np.random.Generator, side: int, *, root_radius: float,
               depth: int, offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> (
    list[Segment]
):
    """Grow a branching tree of tapering tubes (z, y, x in mm) from one hilum into its lung.

    Eight trunks leave the hilum; every branch forks in two, each child turned 20-40 degrees
    about a random axis, until the radius falls below a third of a pixel or ``depth`` forks. A
    branch whose end would leave the lung is halved, then dropped. Grown one generation at a
    time, vectorised.
    """
    hx, hy, s = g.half_x, g.half_y, g.scale
    hilum = np.array([g.z_of_u(_HILUM_U), 0.02 * hy, side * 0.2 * hx]) + np.array(offset_mm)
    directions = np.array([[dz, dy, side * 0.7] for dz in (1.5, 0.5, -0.5, -1.5)
                           for dy in (-0.6, 0.6)])
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    starts = np.repeat(hilum[None], len(directions), axis=0)
    length, radius = 0.16 * s, root_radius
    min_radius = 0.3 * min(g.spacing_mm[1:])
    segments: list[Segment] = []
    for level in range(depth + 1):
        ends = starts + directions * length
        halves = starts + directions * (length / 2)
        inside_end, inside_half = (
            _lung(g, p[:, 2], p[:, 1], g.u_of_z(p[:, 0]), side)
            & ~_heart(g, p[:, 2], p[:, 1], g.u_of_z(p[:, 0]))
            for p in (ends, halves)
        )
        ends = np.where(inside_end[:, None], ends, halves)
        keep = inside_end | inside_half
        starts, ends, directions = starts[keep], ends[keep], directions[keep]
        tip = radius * _BRANCH_RADIUS**0.5
        segments += [(a, b, radius, tip) for a, b in zip(starts, ends, strict=True)]
        if level == depth or radius * _BRANCH_RADIUS < min_radius or not keep.any():
            break
        # Rodrigues' rotation of each parent direction about a random perpendicular axis.
        axes = np.cross(directions, rng.normal(size=directions.shape))
        axes /= np.linalg.norm(axes, axis=1, keepdims=True)
        angle = np.deg2rad(rng.uniform(20.0, 40.0, size=(len(directions), 1)))
        turned = np.cross(axes, directions)
        directions = np.concatenate([directions * np.cos(angle) + turned * np.sin(angle),
                                     directions * np.cos(angle) - turned * np.sin(angle)])
        starts = np.concatenate([ends, ends])
        length, radius = length * _BRANCH_LENGTH, radius * _BRANCH_RADIUS
    return segments


def _tube_distance(g: _Grid, seg: Segment) -> tuple[tuple[slice, ...], FloatVolume,
                                                     FloatVolume] | None:
    """Distance to a tube's axis and the tube radius there, over the tube's bounding box.

    The distance along z is measured to the slice slab, not its centre, so thin vessels stay
    continuous across thick slices (partial volume).
    """
    p0, p1, r0, r1 = seg
    pad = max(r0, r1) + np.array(g.spacing_mm)
    box = g.box(np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
    if box is None:
        return None
    zz, yy, xx = g.z[box[0]], g.y[:, box[1]], g.x[:, :, box[2]]
    d = (p1 - p0).astype(np.float32)
    t = ((zz - p0[0]) * d[0] + (yy - p0[1]) * d[1] + (xx - p0[2]) * d[2]) / max(d @ d, 1e-6)
    t = np.clip(t, 0.0, 1.0)
    ez = np.maximum(np.abs(zz - p0[0] - t * d[0]) - g.spacing_mm[0] / 2.0, 0.0)
    dist = np.sqrt(ez**2 + (yy - p0[1] - t * d[1]) ** 2 + (xx - p0[2] - t * d[2]) ** 2)
    return box, np.asarray(dist, np.float32), np.asarray(r0 + t * (r1 - r0), np.float32)


def _lesion_region(g: _Grid, lesion: GgoLesion) -> (
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


def _random_lesions(g: _Grid, rng: np.random.Generator, allowed: BoolVolume, count: int) -> (
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
    g = _make_grid(shape, spacing_mm)
    hu = _base_anatomy(g)
    u = g.u_of_z(g.z)
    heart = _heart(g, g.x, g.y, u)
    right = _lung(g, g.x, g.y, u, -1) & ~heart
    left = _lung(g, g.x, g.y, u, 1) & ~heart
    lung = right | left
    parenchyma = np.float32(LUNG_HU) + np.float32(LUNG_GRADIENT_HU / g.half_y) * g.y
    np.copyto(hu, np.broadcast_to(parenchyma, hu.shape), where=lung)

    vessel = np.zeros(shape, np.float32)  # partial-volume fraction of vessel per voxel
    airway = np.zeros(shape, np.int8)  # 1 = wall, 2 = lumen
    pixel_mm = min(spacing_mm[1:])
    for side in (-1, 1):
        for seg in _grow_tree(g, rng, side, root_radius=0.03 * g.scale, depth=_VESSEL_DEPTH):
            found = _tube_distance(g, seg)
            if found:
                box, dist, radius = found
                np.maximum(vessel[box], np.clip((radius - dist) / pixel_mm + 0.5, 0, 1),
                           out=vessel[box])
    hy, s = g.half_y, g.scale
    carina = np.array([g.z_of_u(_CARINA_U), 0.1 * hy, 0.0])
    airways: list[Segment] = [(np.array([g.length_z, 0.1 * hy, 0.0]), carina, 0.05 * s, 0.05 * s)]
    for side in (-1, 1):
        hilum = np.array([g.z_of_u(_HILUM_U), 0.02 * hy, side * 0.2 * g.half_x])
        airways.append((carina, hilum, 0.035 * s, 0.03 * s))
        airways += _grow_tree(g, rng, side, root_radius=0.022 * s, depth=_AIRWAY_DEPTH,
                              offset_mm=(0.0, -0.07 * s, 0.0))
    for seg in airways:
        found = _tube_distance(g, seg)
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

