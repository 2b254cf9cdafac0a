"""Binary-volume tools of the lung mask, on SimpleITK: images and masks, connected components
labelled slab by slab, 3-D hole filling, distances in mm, bounding boxes and slice-by-slice
work on threads.

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
Labels = npt.NDArray[np.uint8] | npt.NDArray[np.uint16] | npt.NDArray[np.uint32]
"""Returns the mask of slices ``[start, stop)`` (a fresh or a read-only array)."""


class Components:
    """Face-connected components of a 3-D mask, found slab by slab, ranked by size.

    Each slab of :data:`SLAB_SLICES` slices is labelled by SimpleITK; components that touch
    across a slab boundary (the same row and column tissue in the last slice of one slab and
    the first of the next) are merged by union-find. The result is that of one 3-D labelling
    of the whole mask, without its uint32 label volume. :meth:`mask` labels the slabs again.

    Attributes:
        sizes: voxel count of each component, largest first (ties: first in raster order);
            empty when made with ``sized=False`` (for :meth:`touching` alone: no counting).
    """

    def __init__(self, source: MaskSource, n_slices: int, *, sized: bool = True) -> None:
        self._source = source
        self._n = n_slices
        self._sized = sized
        self._plane: tuple[int, ...] = (0, 0)
        # Each slab's labels kept as uint8 or uint16 where they fit (1 or 2 bytes a voxel, not
        # uint32's 4; a framed background slab of the 3-D hole filling has a few labels),
        # so that painting need not label the slab again; None: labelled again when painted.
        self._kept: list[Labels | None] = []
        self._n_labels: list[int] = []
        parent: list[int] = [0]  # global label -> parent (0: background)
        counts: list[int] = [0]
        previous_last: npt.NDArray[np.int64] | None = None
        for _, first, labels, slab_counts in self._slabs(with_counts=True):
            self._plane = labels.shape[1:]
            n_labels = len(slab_counts)
            self._n_labels.append(n_labels)
            kept: Labels | None = None
            if n_labels <= np.iinfo(np.uint8).max:
                kept = labels.astype(np.uint8)
            elif n_labels <= np.iinfo(np.uint16).max:
                kept = labels.astype(np.uint16)
            self._kept.append(kept)
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
    ) -> Iterator[tuple[int, int, Labels, list[int]]]:
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
            if with_counts and self._sized:  # SimpleITK's: no int64 copy as np.bincount's
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
            if with_counts and not self._sized:
                counts = [0] * int(labels.max(initial=0))
            yield start, first, labels, counts
            first += int(labels.max(initial=0))
            del labels, image

    def _paint(self, chosen: npt.NDArray[np.bool_]) -> BoolVolume:
        """The voxels of the components whose root is marked in ``chosen`` (by global label)."""
        out = np.zeros((self._n, *self._plane), dtype=np.bool_)
        for start, first, labels, _ in self._slabs():
            lut = chosen[self._roots[first : first + int(labels.max(initial=0)) + 1]]
            lut[0] = False  # background
            picked = np.flatnonzero(lut)
            if picked.size == 1:  # a comparison: an eighth of a table look-up's time
                np.equal(labels, labels.dtype.type(picked[0]),
                         out=out[start : start + labels.shape[0]])
            elif picked.size:  # a few slices at a time: np.take's index copies stay small
                for z in range(0, labels.shape[0], 4):
                    part = labels[z : z + 4]
                    np.take(lut, part, out=out[start + z : start + z + part.shape[0]])
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


def fill_holes(mask: BoolVolume) -> BoolVolume:
    """Fill the 3-D holes of a mask: background not face-connected to the array's faces (the
    voxels of SimpleITK's ``BinaryFillhole``, in half its time and a slab's labels of memory).

    The background is framed by a ring in every slice and a whole slice before and after, and
    labelled slab by slab (:class:`Components`); the components touching the frame are the
    outside, the rest holes.

    Args:
        mask: the voxels. Shape: ``(slice, row, col)``.

    Returns:
        The mask with its holes filled, a new array. Shape: as ``mask``.
    """
    n, rows, cols = mask.shape
    ring = np.ones((rows + 2, cols + 2), dtype=np.bool_)
    ring[1:-1, 1:-1] = False

    def background(z: slice) -> BoolVolume:
        framed = np.ones((z.stop - z.start, rows + 2, cols + 2), dtype=np.bool_)
        lo, hi = max(z.start, 1), min(z.stop, n + 1)
        if lo < hi:
            inner = framed[lo - z.start : hi - z.start, 1:-1, 1:-1]
            np.logical_not(mask[lo - 1 : hi - 1], out=inner)
        return framed

    frame = np.broadcast_to(ring, (n + 2, *ring.shape))
    outside = Components(background, n + 2, sized=False).touching(frame)
    return np.logical_not(outside[1:-1, 1:-1, 1:-1])


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
