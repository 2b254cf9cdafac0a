"""The chest anatomy of the synthetic CT: a coordinate grid, tissue densities and shapes.

:func:`paint_base_anatomy` paints air, the body wall, spine, ribs, sternum, aorta and heart;
:func:`in_lung` and :func:`in_heart` tell where the lungs and heart lie, and :func:`grow_tree`
and :func:`tube_distance` draw the branching vessels and airways. The shapes are laid out in
fractions of the field of view and of the scanned length (see :mod:`ggo_cli.synthetic.phantom`,
which assembles them into a :class:`~ggo_cli.synthetic.phantom.Phantom`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

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
VERTEBRA_HEIGHT_MM = 25.0
RIB_PITCH_MM = 22.0

LUNG_BASE, LUNG_APEX = 0.06, 0.95  # lung extent in fractions of the scanned length
HILUM_U, CARINA_U = 0.5, 0.64  # normalised lung height u: 0 = lung base, 1 = apex
_BRANCH_LENGTH, _BRANCH_RADIUS = 0.8, 0.72  # child / parent ratios (Murray's law: ~2^-1/3)
VESSEL_DEPTH, AIRWAY_DEPTH = 7, 2

FloatVolume = npt.NDArray[np.float32]
BoolVolume = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Grid:
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
        return np.asarray((t - LUNG_BASE) / (LUNG_APEX - LUNG_BASE), np.float32)

    def z_of_u(self, u: float) -> float:
        """The z in mm of a normalised lung height (inverse of :meth:`u_of_z`)."""
        return (u * (LUNG_APEX - LUNG_BASE) + LUNG_BASE - 0.5) * self.length_z

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


def make_grid(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> Grid:
    """Build the coordinate grid of a volume.

    Args:
        shape: ``(slices, rows, cols)``.
        spacing_mm: ``(slice, row, col)`` voxel spacing in mm.

    Returns:
        The grid; its axes are centred on the volume and broadcast to ``shape``.
    """
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s
            for n, s in zip(shape, spacing_mm, strict=True)]
    n, rows, cols = shape
    return Grid(
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


def in_heart(g: Grid, x: npt.ArrayLike, y: npt.ArrayLike, u: npt.ArrayLike) -> BoolVolume:
    """Whether points lie in the heart (a left-anterior ellipsoid on the diaphragm).

    Args:
        g: the coordinate grid.
        x: left-right coordinates in mm (+x is the patient's left).
        y: anterior-posterior coordinates in mm (+y is posterior).
        u: normalised lung heights (0 at the lung base, 1 at the apex).

    Returns:
        The mask. Shape: ``x``, ``y`` and ``u`` broadcast together.
    """
    hx, hy = g.half_x, g.half_y
    q = _ellipse(x, y, (0.1 * hx, -0.12 * hy), (0.33 * hx, 0.3 * hy))
    return np.asarray(q + ((np.asarray(u, np.float32) - 0.22) / 0.3) ** 2 < 1.0)


def in_lung(g: Grid, x: npt.ArrayLike, y: npt.ArrayLike, u: npt.ArrayLike, side: int) -> (
    BoolVolume
):
    """Whether points lie in one lung, heart not yet carved out; ``side`` -1 = right, 1 = left.

    Args:
        g: the coordinate grid.
        x: left-right coordinates in mm (+x is the patient's left).
        y: anterior-posterior coordinates in mm (+y is posterior).
        u: normalised lung heights (0 at the lung base, 1 at the apex).
        side: -1 for the patient's right lung, 1 for the left.

    Returns:
        The mask. Shape: ``x``, ``y`` and ``u`` broadcast together.
    """
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


def paint_base_anatomy(g: Grid) -> FloatVolume:
    """Paint air, body wall, mediastinum, spine, ribs, sternum, aorta and heart.

    Args:
        g: the coordinate grid.

    Returns:
        The volume in HU, lungs not yet drawn (soft tissue there). Shape: ``(slice, row, col)``.
    """
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
    np.copyto(hu, np.float32(BLOOD_HU), where=in_heart(g, g.x, g.y, g.u_of_z(g.z)))
    return hu


Segment = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float, float]


def grow_tree(g: Grid, rng: np.random.Generator, side: int, *, root_radius: float,
               depth: int, offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> (
    list[Segment]
):
    """Grow a branching tree of tapering tubes (z, y, x in mm) from one hilum into its lung.

    Eight trunks leave the hilum; every branch forks in two, each child turned 20-40 degrees
    about a random axis, until the radius falls below a third of a pixel or ``depth`` forks. A
    branch whose end would leave the lung is halved, then dropped. Grown one generation at a
    time, vectorised.

    Args:
        g: the coordinate grid.
        rng: the source of the random branching angles.
        side: -1 for the patient's right lung, 1 for the left.
        root_radius: radius of the trunks in mm.
        depth: the most forks along a branch.
        offset_mm: shift of the hilum ``(z, y, x)`` in mm.

    Returns:
        The tubes, each ``(start, end, start radius, end radius)`` in mm.
    """
    hx, hy, s = g.half_x, g.half_y, g.scale
    hilum = np.array([g.z_of_u(HILUM_U), 0.02 * hy, side * 0.2 * hx]) + np.array(offset_mm)
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
            in_lung(g, p[:, 2], p[:, 1], g.u_of_z(p[:, 0]), side)
            & ~in_heart(g, p[:, 2], p[:, 1], g.u_of_z(p[:, 0]))
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


def tube_distance(g: Grid, seg: Segment) -> tuple[tuple[slice, ...], FloatVolume,
                                                     FloatVolume] | None:
    """Distance to a tube's axis and the tube radius there, over the tube's bounding box.

    The distance along z is measured to the slice slab, not its centre, so thin vessels stay
    continuous across thick slices (partial volume).

    Args:
        g: the coordinate grid.
        seg: the tube, ``(start, end, start radius, end radius)`` in mm.

    Returns:
        ``(box, distance_mm, radius_mm)``, the arrays over the voxels of ``box``; ``None`` when
        the tube lies outside the volume.
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
