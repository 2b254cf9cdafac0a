"""Per-slice overlay images: one full-resolution picture per slice with GGO (or consolidation).

``--png all`` writes them as ``slices/slice_NNNN.png`` (1-based along the sorted volume, as the
montage's "slice k/n"); ``--sc slices`` draws the same images as Secondary Capture, and the
GradCAM++ panels use the same names. Each is a ``LABEL_PX`` label bar over the slice at its
native size, drawn as :mod:`ggo_cli.writers.overlay_png` draws the montage's tiles.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic_output import atomic_write_path
from ..domain import CtVolume
from ..fsutil import OutputTree, ensure_folder
from .overlay_png import (
    BACKGROUND_RGB,
    LABEL_PX,
    PNG_COMPRESS_LEVEL,
    BoolMask,
    check_inputs,
    draw_label,
    render_classes,
)

log = logging.getLogger(__name__)

SLICE_PNG_PATTERN = "slice_{index:0{width}d}.png"


def slice_png_name(index: int, n_slices: int) -> str:
    """File name of slice ``index`` (0-based) for ``--png all``: ``slice_NNNN.png``, 1-based."""
    return SLICE_PNG_PATTERN.format(index=index + 1, width=max(4, len(str(n_slices))))


def render_slice_overlay(
    volume: CtVolume,
    ggo: BoolMask,
    index: int,
    *,
    window_center_hu: float,
    window_width_hu: float,
    consolidation: BoolMask | None = None,
) -> Image.Image:
    """Render one slice as a per-slice PNG holds it: a ``LABEL_PX`` label bar ("slice k/n",
    GGO volume) over the slice at its native size.

    Args:
        volume: the CT volume.
        ggo: the GGO mask. Shape: ``(slices, rows, cols)``.
        index: the slice (0-based).
        window_center_hu: display window centre in HU.
        window_width_hu: display window width in HU.
        consolidation: the consolidation mask (drawn in blue). Shape: as ``ggo``.

    Returns:
        The RGB image. Shape: ``(LABEL_PX + rows, cols)`` pixels.

    Raises:
        ValueError: the mask does not match the volume.
    """
    check_inputs(volume, ggo, consolidation)
    rows, cols = ggo.shape[1:]
    image = Image.new("RGB", (cols, LABEL_PX + rows), BACKGROUND_RGB)
    image.paste(
        Image.fromarray(
            render_classes(
                volume.hu[index],
                ggo[index],
                None if consolidation is None else consolidation[index],
                window_center_hu=window_center_hu,
                window_width_hu=window_width_hu,
            ),
            mode="RGB",
        ),
        (0, LABEL_PX),
    )
    draw_label(image, (2, 2), cols - 2, volume, index, ggo, consolidation)
    return image


def slice_overlays(
    volume: CtVolume, ggo: BoolMask, *, window_center_hu: float, window_width_hu: float,
    consolidation: BoolMask | None = None,
) -> Iterator[tuple[int, Image.Image]]:
    """Each slice with GGO (or consolidation) and its :func:`render_slice_overlay`, in volume
    order, drawn when it is reached (the per-slice PNGs and the per-slice SC images).

    Args:
        volume: the CT volume.
        ggo: the GGO mask. Shape: ``(slices, rows, cols)``.
        window_center_hu: display window centre in HU.
        window_width_hu: display window width in HU.
        consolidation: the consolidation mask (drawn in blue). Shape: as ``ggo``.

    Yields:
        ``(0-based slice index, image)``.
    """
    shown = ggo.any(axis=(1, 2))
    if consolidation is not None:
        shown |= consolidation.any(axis=(1, 2))
    for index in np.flatnonzero(shown).tolist():
        yield index, render_slice_overlay(
            volume,
            ggo,
            index,
            window_center_hu=window_center_hu,
            window_width_hu=window_width_hu,
            consolidation=consolidation,
        )


def write_slice_pngs(
    volume: CtVolume,
    ggo: BoolMask,
    folder: Path,
    *,
    window_center_hu: float,
    window_width_hu: float,
    tree: OutputTree | None = None,
    consolidation: BoolMask | None = None,
) -> list[Path]:
    """Write one full-resolution PNG per slice with GGO (``--png all``), each atomically.

    Each PNG is :func:`render_slice_overlay` of its slice. Slices without GGO (or
    consolidation) get no file.

    Args:
        volume: the CT volume.
        ggo: the GGO mask. Shape: ``(slices, rows, cols)``.
        folder: where to write (created if missing).
        window_center_hu: display window centre in HU.
        window_width_hu: display window width in HU.
        tree: the output folder: no link is followed below it, files get its mode.
        consolidation: the consolidation mask (drawn in blue). Shape: as ``ggo``.

    Returns:
        The PNGs written, in slice order (empty when there is no GGO).

    Raises:
        OutputError: a file or the folder cannot be written.
        ValueError: the mask does not match the volume.
    """
    check_inputs(volume, ggo, consolidation)
    n_slices = ggo.shape[0]
    written: list[Path] = []
    for index, image in slice_overlays(
        volume, ggo, window_center_hu=window_center_hu, window_width_hu=window_width_hu,
        consolidation=consolidation,
    ):
        if not written:
            ensure_folder(folder, tree=tree)
        path = folder / slice_png_name(index, n_slices)
        with atomic_write_path(path, tree=tree) as temp:
            image.save(temp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        written.append(path)
    log.debug("%d slice PNGs written to %s", len(written), folder)
    return written
