"""Binary-volume tools of the lung mask, on SimpleITK: images and masks, connected components
labelled slab by slab, distances in mm, bounding boxes, slice-by-slice work on threads, and
the convex-hull envelopes of a section's outline.

Arrays are ``(slice, row, col)``; SimpleITK spacing is ``(col, row, slice)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK

# SimpleITK ships without type hints: calls go through an Any alias, so that mypy --strict
# still checks everything around them.
sitk: Any = SimpleITK

BoolVolume = npt.NDArray[np.bool_]


def to_image(array: npt.NDArray[Any], spacing: tuple[float, ...] | None = None) -> Any:
    """A SimpleITK image of an array (bool as 0/1 bytes, without a copy of the values).

    Args:
        array: the voxels. Shape: ``(slice, row, col)`` or ``(row, col)``.
        spacing: voxel size in mm in the array's axis order (``(slice, row, col)``); SimpleITK
            gets it reversed. ``None``: unit spacing.

    Returns:
        The ``SimpleITK.Image``.
    """
    image = sitk.GetImageFromArray(array.view(np.uint8) if array.dtype == np.bool_ else array)
    if spacing is not None:
        image.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    return image


MAX_SLICE_THREADS = 8
"""Most threads for slice-by-slice work."""
SERIAL_MAX_PIXELS = 1 << 20
"""Images up to this size (a slice) run single-threaded: SimpleITK's thread start-up costs
more than the work (a 512 x 512 connected-component pass: 0.6 ms on one thread, 2.7 ms on
two)."""


def each_slice(work: Callable[[int], None], n: int, *, cores: int) -> None:
    """Run ``work(k)`` for slices ``k = 0 .. n - 1`` on up to :data:`MAX_SLICE_THREADS`
    threads within ``cores`` (SimpleITK and numpy release the GIL).

    Args:
        work: the per-slice step; it must write only its own slice.
        n: number of slices.
        cores: the cores this process may use (:attr:`ggo_cli.host.HostLimits.cores`).
    """
    threads = min(MAX_SLICE_THREADS, cores, n)
    if threads <= 1:
        for k in range(n):
            work(k)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ggo-lungs") as pool:
        for _ in pool.map(work, range(n), chunksize=max(1, n // (4 * threads))):
            pass


FILL_SLICES = 16
"""Slices whose holes :func:`fill_holes_per_slice` fills in one labelling (16 x 512 x 512
uint32 labels: 17 MB a thread)."""


def fill_holes_per_slice(mask: BoolVolume, *, cores: int) -> None:
    """Fill the holes of each slice in place: background not face-connected, in its slice, to
    the slice's edge (a 2-D binary fill per slice).

    One labelling covers :data:`FILL_SLICES` slices: their complements, cut to the mask's
    bounding rows and columns and each framed by a ring of background, are the rows of one
    tall 2-D image, so that no region crosses from one slice to the next and every region
    reaching a slice's edge joins the frames (the first label). Outside the box all is
    background joined to the edge, as before it. The same voxels as a fill per slice, in a
    twentieth of the calls.

    Args:
        mask: the voxels, filled in place. Shape: ``(slice, row, col)``.
        cores: the cores this process may use (:attr:`ggo_cli.host.HostLimits.cores`).
    """
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    if not rows.size:
        return
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    box = np.s_[int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1]
    height, width = int(rows[-1] - rows[0]) + 3, int(cols[-1] - cols[0]) + 3

    def fill(index: int) -> None:
        block = mask[index * FILL_SLICES : (index + 1) * FILL_SLICES]
        framed = np.ones((block.shape[0], height, width), dtype=np.uint8)
        np.logical_not(block[(slice(None), *box)], out=framed[:, 1:-1, 1:-1].view(np.bool_))
        connected = sitk.ConnectedComponentImageFilter()
        connected.SetFullyConnected(False)
        connected.SetNumberOfThreads(1)  # one thread a block; blocks run on threads
        image = connected.Execute(to_image(framed.reshape(-1, width)))
        del framed
        labels = np.asarray(sitk.GetArrayViewFromImage(image)).reshape(-1, height, width)
        block[(slice(None), *box)] = labels[:, 1:-1, 1:-1] != labels[0, 0, 0]
        del labels, image

    each_slice(fill, -(-mask.shape[0] // FILL_SLICES), cores=cores)


def _serial(image: Any) -> bool:
    """Whether a filter on ``image`` should run on one thread."""
    return bool(image.GetNumberOfPixels() <= SERIAL_MAX_PIXELS)


def to_mask(image: Any) -> BoolVolume:
    """A SimpleITK binary image (0 and 1, or 0 and any value) as a boolean array.

    Returns:
        True where the image is not 0 (0/1 bytes are viewed, not copied). Shape: the image's
        in ``(slice, row, col)`` order.
    """
    array = sitk.GetArrayFromImage(image)
    if array.dtype == np.uint8 and (array.size == 0 or int(array.max()) <= 1):
        return np.asarray(array.view(np.bool_))  # 0/1 bytes are booleans: no second copy
    return np.asarray(array != 0)


def component_labels(mask: BoolVolume) -> npt.NDArray[np.uint32]:
    """Label the face-connected components of a mask.

    Args:
        mask: the voxels. Shape: ``(slice, row, col)`` or ``(row, col)``.

    Returns:
        Labels 1, 2, ... in raster order of each component's first voxel, 0 for background;
        uint32 as SimpleITK returns them (no int64 copy: 4 bytes a voxel, not 12, on long
        series). Shape: as ``mask``.
    """
    image = to_image(mask)
    connected = sitk.ConnectedComponentImageFilter()
    connected.SetFullyConnected(False)
    if _serial(image):
        connected.SetNumberOfThreads(1)
    return np.asarray(sitk.GetArrayFromImage(connected.Execute(image)), dtype=np.uint32)


def distance_mm(mask: BoolVolume, spacing: tuple[float, ...]) -> npt.NDArray[np.float32]:
    """Euclidean distance from each voxel to the nearest ``mask`` voxel (Maurer's exact
    transform).

    Args:
        mask: the voxels to measure from. Shape: ``(slice, row, col)``.
        spacing: voxel size in mm, ``(slice, row, col)``.

    Returns:
        Distances in mm, 0 inside ``mask``. Shape: as ``mask``.
    """
    distance = sitk.SignedMaurerDistanceMap(to_image(mask, spacing), insideIsPositive=False,
                                            squaredDistance=False, useImageSpacing=True)
    values = np.asarray(sitk.GetArrayFromImage(distance), dtype=np.float32)
    del distance
    return np.maximum(values, np.float32(0.0), out=values)  # in place: no second volume


def pool_all(mask: BoolVolume, factors: list[int]) -> BoolVolume:
    """A coarse mask whose cell is True where all of its ``factors`` voxels per axis are.

    Args:
        mask: the voxels; cells past its end count them as False. Shape: ``(slice, row, col)``.
        factors: voxels per cell along each axis.

    Returns:
        The cells. Shape: ``ceil(mask.shape / factors)``.
    """
    pad = [(0, -n % f) for n, f in zip(mask.shape, factors, strict=True)]
    cells = np.pad(mask, pad) if any(after for _, after in pad) else mask
    for axis, f in enumerate(factors):
        if f > 1:  # AND of strided views: no float copy, as a reshaped mean would make
            parts = [cells[(slice(None),) * axis + (slice(j, None, f),)] for j in range(f)]
            pooled = np.logical_and(parts[0], parts[1])
            for part in parts[2:]:
                pooled &= part
            cells = pooled
    return np.ascontiguousarray(cells)


def expand(cells: BoolVolume, factors: list[int], shape: tuple[int, ...]) -> BoolVolume:
    """Paint coarse cells back onto the source grid (each cell on all its voxels).

    Args:
        cells: the coarse mask. Shape: ``ceil(shape / factors)``.
        factors: voxels per cell along each axis.
        shape: the source grid's ``(slice, row, col)`` shape.

    Returns:
        The voxels. Shape: ``shape``.
    """
    c = cells.shape
    out = np.empty((c[0], factors[0], c[1], factors[1], c[2], factors[2]), dtype=np.bool_)
    out[...] = cells[:, None, :, None, :, None]
    full = out.reshape(c[0] * factors[0], c[1] * factors[1], c[2] * factors[2])
    return np.ascontiguousarray(full[: shape[0], : shape[1], : shape[2]])


def padded_box(mask: BoolVolume, margins: list[int]) -> (
    tuple[tuple[slice, ...], list[tuple[int, int]]]
):
    """The bounding box of a non-empty mask grown by some voxels on every side.

    Args:
        mask: the voxels. Shape: ``(slice, row, col)``.
        margins: voxels added before and after the box, per axis.

    Returns:
        The box's part inside the array (slices per axis) and the padding, ``(before,
        after)`` per axis, that its part outside the array needs (see :func:`uncrop`).
    """
    axes = [np.flatnonzero(mask.any(axis=tuple(j for j in range(3) if j != i))) for i in range(3)]
    lo = [int(a[0]) - m for a, m in zip(axes, margins, strict=True)]
    hi = [int(a[-1]) + m + 1 for a, m in zip(axes, margins, strict=True)]
    box = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, mask.shape, strict=True))
    return box, [(max(-a, 0), max(b - n, 0)) for a, b, n in zip(lo, hi, mask.shape,
                                                                strict=True)]


def bounding_box(mask: BoolVolume, margins: list[int]) -> tuple[slice, slice, slice]:
    """The bounding box of a non-empty mask grown by ``margins`` voxels per axis, clipped to
    the array: slices per axis of ``(slice, row, col)``."""
    box, _ = padded_box(mask, margins)
    return box[0], box[1], box[2]


def uncrop(crop: BoolVolume, box: tuple[slice, ...], pad: list[tuple[int, int]],
            shape: tuple[int, ...]) -> BoolVolume:
    """Put a padded crop back into a full-size mask.

    Args:
        crop: the crop, padded as :func:`padded_box` said.
        box: the box's part inside the array.
        pad: the padding per axis, ``(before, after)``.
        shape: the full array's shape ``(slice, row, col)``.

    Returns:
        The crop's voxels in place, False elsewhere. Shape: ``shape``.
    """
    out = np.zeros(shape, dtype=np.bool_)
    out[box] = crop[tuple(slice(a, a + b.stop - b.start) for (a, _), b in zip(pad, box,
                                                                             strict=True))]
    return out


SLAB_SLICES = 64
"""Slices labelled at a time by :class:`Components` (a 64 x 512 x 512 uint32 label slab is
67 MB; the whole 1000-slice volume's would be 1 GB)."""

MaskSource = Callable[[slice], BoolVolume]
"""Returns the mask of slices ``[start, stop)`` (a fresh or a read-only array)."""


class Components:
    """Face-connected components of a 3-D mask, found slab by slab, ranked by size.

    Each slab of :data:`SLAB_SLICES` slices is labelled by SimpleITK; components that touch
    across a slab boundary (the same row and column tissue in the last slice of one slab and
    the first of the next) are merged by union-find. The result is that of one 3-D labelling
    of the whole mask, without its uint32 label volume. :meth:`mask` labels the slabs again.

    Attributes:
        sizes: voxel count of each component, largest first (ties: first in raster order).
    """

    def __init__(self, source: MaskSource, n_slices: int) -> None:
        self._source = source
        self._n = n_slices
        self._plane: tuple[int, ...] = (0, 0)
        # Each slab's labels kept as uint16 where they fit (2 bytes a voxel, half of uint32),
        # so that painting need not label the slab again; None: labelled again when painted.
        self._kept: list[npt.NDArray[np.uint16] | None] = []
        self._n_labels: list[int] = []
        parent: list[int] = [0]  # global label -> parent (0: background)
        counts: list[int] = [0]
        previous_last: npt.NDArray[np.int64] | None = None
        for _, first, labels, slab_counts in self._slabs(with_counts=True):
            self._plane = labels.shape[1:]
            n_labels = len(slab_counts)
            self._n_labels.append(n_labels)
            fits = n_labels <= np.iinfo(np.uint16).max
            self._kept.append(labels.astype(np.uint16) if fits else None)
            parent.extend(range(first + 1, first + 1 + len(slab_counts)))
            counts.extend(slab_counts)
            head = labels[0].astype(np.int64)
            if previous_last is not None:
                touching = (previous_last > 0) & (head > 0)
                # one int64 key per (label above, label below) pair: a 1-D unique is fast
                stride = int(head.max()) + first + 1
                keys = np.unique(previous_last[touching] * stride + head[touching] + first)
                for a, b in zip((keys // stride).tolist(), (keys % stride).tolist(), strict=True):
                    root_a, root_b = _find(parent, a), _find(parent, b)
                    if root_a != root_b:
                        parent[max(root_a, root_b)] = min(root_a, root_b)
            tail = labels[-1].astype(np.int64)
            previous_last = np.where(tail > 0, tail + first, 0)
        # Every link points to a smaller label, so pointer jumping reaches the roots.
        roots = np.asarray(parent, dtype=np.int64)
        while True:
            jumped = roots[roots]
            if np.array_equal(jumped, roots):
                break
            roots = jumped
        totals = np.bincount(roots, weights=np.asarray(counts, dtype=np.float64))
        # A root is its component's smallest global label: first in raster order.
        members = np.flatnonzero(totals[1:] > 0) + 1
        order = sorted(members.tolist(), key=lambda r: (-int(totals[r]), r))
        self._roots = roots
        self._ranked = tuple(order)
        self.sizes: tuple[int, ...] = tuple(int(totals[r]) for r in order)

    def _slabs(
        self, *, with_counts: bool = False
    ) -> Iterator[tuple[int, int, npt.NDArray[np.uint32] | npt.NDArray[np.uint16], list[int]]]:
        """``(first slice, first global label - 1, slab labels, voxels per label)`` for each
        slab, in order; the counts (of labels 1, 2, ...) only ``with_counts``. Slabs kept
        from the first pass are not labelled again. The labels are a read-only view, valid
        until the next slab is asked for."""
        first = 0
        for index, start in enumerate(range(0, self._n, SLAB_SLICES)):
            kept = self._kept[index] if index < len(self._kept) and not with_counts else None
            if kept is not None:
                yield start, first, kept, []
                first += self._n_labels[index]
                continue
            block = self._source(slice(start, min(start + SLAB_SLICES, self._n)))
            image = sitk.ConnectedComponent(to_image(block), False)
            del block
            counts: list[int] = []
            if with_counts:  # from SimpleITK: no int64 copy of the slab as np.bincount makes
                stats = sitk.LabelShapeStatisticsImageFilter()
                stats.SetComputePerimeter(False)
                stats.Execute(image)
                present = [int(label) for label in stats.GetLabels()]
                counts = [0] * max(present, default=0)
                for label in present:
                    counts[label - 1] = int(stats.GetNumberOfPixels(label))
            # A view of the image's buffer, not a copy (a fresh 64 MB array per slab cost
            # more than the labelling); the image outlives every use of it.
            labels = np.asarray(sitk.GetArrayViewFromImage(image), dtype=np.uint32)
            yield start, first, labels, counts
            first += int(labels.max(initial=0))
            del labels, image

    def _paint(self, chosen: npt.NDArray[np.bool_]) -> BoolVolume:
        """The voxels of the components whose root is marked in ``chosen`` (by global label)."""
        out = np.zeros((self._n, *self._plane), dtype=np.bool_)
        for start, first, labels, _ in self._slabs():
            lut = chosen[self._roots[first : first + int(labels.max(initial=0)) + 1]]
            lut[0] = False  # background
            out[start : start + labels.shape[0]] = lut[labels]
        return out

    def mask(self, rank: int) -> BoolVolume:
        """The ``rank``-th largest component as a boolean array."""
        chosen = np.zeros(self._roots.size, dtype=np.bool_)
        chosen[self._ranked[rank]] = True
        return self._paint(chosen)

    def touching(self, seeds: BoolVolume) -> BoolVolume:
        """The components that hold at least one voxel of ``seeds``, as a boolean array."""
        chosen = np.zeros(self._roots.size, dtype=np.bool_)
        for start, first, labels, _ in self._slabs():
            hit = labels[seeds[start : start + labels.shape[0]]]
            chosen[self._roots[first + hit[hit > 0].astype(np.int64)]] = True
        return self._paint(chosen)


def _find(parent: list[int], label: int) -> int:
    """Union-find root of ``label``, with path halving."""
    while parent[label] != label:
        parent[label] = parent[parent[label]]
        label = parent[label]
    return label


def ranked_components(mask: BoolVolume) -> Components:
    """Face-connected components of a mask, ranked by size (largest first).

    Args:
        mask: the voxels. Shape: ``(slice, row, col)``.

    Returns:
        Its :class:`Components` (labelled slab by slab).
    """
    return Components(lambda z: mask[z], mask.shape[0])


def hull_envelope(x: npt.NDArray[np.int64], y: npt.NDArray[np.int64], *, lower: bool) -> (
    tuple[list[float], list[float]]
):
    """Vertices of the lower (convex minorant) or upper (concave majorant) hull of points
    sorted by ``x`` (Andrew's monotone chain)."""
    sign = 1 if lower else -1
    # A point on or beyond the chord of its two neighbours is no vertex: drop such points in
    # whole-array passes first, so that the loop below sees few (the same vertices result).
    x, y = np.asarray(x, dtype=np.int64), np.asarray(y, dtype=np.int64)
    while x.size > 2:
        turn = (x[1:-1] - x[:-2]) * (y[2:] - y[:-2]) - (y[1:-1] - y[:-2]) * (x[2:] - x[:-2])
        inner = sign * turn <= 0
        if not inner.any():
            break
        keep = np.ones(x.size, dtype=np.bool_)
        keep[1:-1] = ~inner
        x, y = x[keep], y[keep]
    hx: list[float] = []
    hy: list[float] = []
    for xi, yi in zip(x.tolist(), y.tolist(), strict=True):
        while len(hx) >= 2 and sign * ((hx[-1] - hx[-2]) * (yi - hy[-2])
                                       - (hy[-1] - hy[-2]) * (xi - hx[-2])) <= 0:
            hx.pop()
            hy.pop()
        hx.append(float(xi))
        hy.append(float(yi))
    return hx, hy
