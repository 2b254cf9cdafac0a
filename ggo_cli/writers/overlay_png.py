"""Overlay PNGs: lung-window CT with GGO in red, for a quick visual check of a series.

A model with a consolidation channel adds consolidation in blue, drawn the same way, with a
legend (a swatch and a name per class, :mod:`ggo_cli.writers.overlay_legend`) in the caption and
in each label; slices are then chosen by GGO plus consolidation. Without that channel every
image is drawn as before.

``overlay.png`` is a montage of up to ``max_tiles`` slices with the most GGO voxels (shown in
slice order), or, when the series has no GGO, evenly spaced slices under a "no GGO found"
caption. Each tile shows the slice in a lung window, GGO blended in semi-transparent red with
an opaque red outline, and a label bar "slice k/n" (1-based along the sorted volume, i.e. the
slice normal) with the slice's GGO volume. ``--png all`` adds one full-resolution PNG per
slice with GGO (:mod:`ggo_cli.writers.slice_png`).

Images are drawn as stored (row 0 at the top, column 0 at the left), i.e. in DICOM patient
space without flips. Nothing identifying is drawn: no names, IDs, dates or UIDs. Pillow's
default font is used so no font file is needed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from ..analysis.preprocessing import window_hu
from ..atomic_output import atomic_write_path
from ..domain import CtVolume
from ..fsutil import OutputTree
from .overlay_legend import CONSOLIDATION_RGB, draw_legend, slice_legend

log = logging.getLogger(__name__)

MAX_TILES = 9
TILE_PX = 256
"""Longest side of a montage tile; slices are downscaled (never upscaled) to fit."""
LABEL_PX = 16
"""Height of the label bar above each tile (and above each per-slice PNG)."""
CAPTION_PX = 20
"""Height of the caption strip at the top of the montage."""
GAP_PX = 4
"""Black gap between tiles and around the montage."""
GGO_RGB = (255, 0, 0)
GGO_ALPHA = 0.45
"""Opacity of the red fill over GGO (and the blue over consolidation); the outline is opaque."""
TEXT_RGB = (255, 255, 255)
BACKGROUND_RGB = (0, 0, 0)
CAPTION_GGO = "GGO in red - AI research output, not for diagnosis"
CAPTION_NO_GGO = "no GGO found - AI research output, not for diagnosis"
CAPTION_NO_LESION = "no GGO or consolidation found - AI research output, not for diagnosis"
CAPTION_TAIL = "- AI research output, not for diagnosis"
PNG_COMPRESS_LEVEL = 3
"""zlib level of every PNG ggo-cli writes: on the 2-core CPU the 784 x 848 montage took 0.056
CPU s at 3 against 0.135 at Pillow's default 6, and came out 5 % smaller (docs/benchmarks.md)."""

BoolMask = npt.NDArray[np.bool_]
Rgb = npt.NDArray[np.uint8]


def select_overlay_slices(
    ggo: BoolMask, *, max_tiles: int = MAX_TILES, consolidation: BoolMask | None = None
) -> tuple[int, ...]:
    """Choose the slices a montage shows.

    Args:
        ggo: the GGO mask. Shape: ``(slices, rows, cols)``.
        max_tiles: most slices to show (at least 1).
        consolidation: the consolidation mask, counted with GGO. Shape: as ``ggo``.

    Returns:
        0-based slice indices in increasing order: the (up to) ``max_tiles`` slices with the
        most GGO voxels (ties go to the lower index); when there is no GGO at all, up to
        ``max_tiles`` evenly spaced slices including the first and the last.

    Raises:
        ValueError: ``max_tiles`` < 1 or the mask is not 3-D.
    """
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be at least 1, got {max_tiles}")
    if ggo.ndim != 3:
        raise ValueError(f"GGO mask must be (slices, rows, cols), got shape {ggo.shape}")
    # Per slice: the mask is usually a strided plane of the SEG's stack, which a reshape
    # would copy whole before an int64 sum.
    counts = np.fromiter((np.count_nonzero(plane) for plane in ggo), np.int64, ggo.shape[0])
    if consolidation is not None:
        counts += np.fromiter(
            (np.count_nonzero(plane) for plane in consolidation), np.int64, ggo.shape[0]
        )
    positive = np.flatnonzero(counts)
    if positive.size:
        order = sorted(positive.tolist(), key=lambda i: (-int(counts[i]), i))
        return tuple(sorted(order[:max_tiles]))
    n_slices = ggo.shape[0]
    count = min(max_tiles, n_slices)
    return tuple(sorted({round(x) for x in np.linspace(0, n_slices - 1, count).tolist()}))


def _outline(mask: BoolMask) -> BoolMask:
    """Mask pixels with at least one 4-neighbour outside the mask (the inner boundary)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    result: BoolMask = mask & ~interior
    return result


def render_slice(
    hu: npt.NDArray[np.float32],
    ggo: BoolMask,
    *,
    window_center_hu: float,
    window_width_hu: float,
) -> Rgb:
    """Render one slice: lung-window grey, GGO in semi-transparent red with a red outline.

    Args:
        hu: Hounsfield units. Shape: ``(rows, cols)``.
        ggo: GGO mask. Shape: ``(rows, cols)``.
        window_center_hu: window centre in HU.
        window_width_hu: window width in HU.

    Returns:
        uint8 RGB image. Shape: ``(rows, cols, 3)``.
    """
    return render_classes(
        hu, ggo, None, window_center_hu=window_center_hu, window_width_hu=window_width_hu
    )


def render_classes(
    hu: npt.NDArray[np.float32],
    ggo: BoolMask,
    consolidation: BoolMask | None,
    *,
    window_center_hu: float,
    window_width_hu: float,
) -> Rgb:
    """:func:`render_slice` with consolidation drawn alike in blue (when given).

    Shape: every array ``(rows, cols)``; returns ``(rows, cols, 3)`` uint8.
    """
    grey = window_hu(hu, center_hu=window_center_hu, width_hu=window_width_hu) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for mask, class_rgb in ((ggo, GGO_RGB), (consolidation, CONSOLIDATION_RGB)):
        if mask is None:
            continue
        colour = np.asarray(class_rgb, dtype=np.float32)
        rgb[mask] = (1.0 - GGO_ALPHA) * rgb[mask] + GGO_ALPHA * colour
        rgb[_outline(mask)] = colour
    result: Rgb = np.rint(rgb).astype(np.uint8)
    return result


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in default font (no font file needed)."""
    return ImageFont.load_default()


def _slice_label(index: int, n_slices: int, voxels: int, voxel_volume_ml: float) -> str:
    """Label text of a slice: 1-based position and its GGO volume."""
    return f"slice {index + 1}/{n_slices}  GGO {voxels * voxel_volume_ml:.2f} mL"


def draw_label(image: Image.Image, xy: tuple[int, int], width: int, volume: CtVolume, index: int,
           ggo: BoolMask, consolidation: BoolMask | None) -> None:
    """Draw a slice's label: its position and GGO volume (with consolidation: a legend, cut
    at ``width`` pixels so that it never runs into the next tile's)."""
    ml, n_slices, voxels = volume.voxel_volume_ml, ggo.shape[0], int(ggo[index].sum())
    if consolidation is None:
        label = _slice_label(index, n_slices, voxels, ml)
        ImageDraw.Draw(image).text(xy, label, fill=TEXT_RGB, font=_font())
        return
    strip = Image.new("RGB", (max(width, 1), LABEL_PX - 2), BACKGROUND_RGB)  # bar below y
    draw_legend(ImageDraw.Draw(strip), (0, 0), slice_legend(
        index, n_slices, ggo_ml=voxels * ml, ggo_rgb=GGO_RGB,
        consolidation_ml=int(consolidation[index].sum()) * ml), fill=TEXT_RGB)
    image.paste(strip, xy)


def _tile_size(rows: int, cols: int, tile_px: int) -> tuple[int, int]:
    """(width, height) of a tile: the slice scaled so its longer side is at most ``tile_px``."""
    scale = min(1.0, tile_px / max(rows, cols))
    return max(1, round(cols * scale)), max(1, round(rows * scale))


def check_inputs(volume: CtVolume, ggo: BoolMask, consolidation: BoolMask | None = None) -> None:
    """Raise ``ValueError`` when a mask does not match the volume."""
    for name, mask in (("GGO", ggo), ("consolidation", consolidation)):
        if mask is not None and (mask.dtype != np.bool_ or mask.shape != volume.hu.shape):
            raise ValueError(f"{name} mask must be bool with the volume's shape "
                             f"{volume.hu.shape}, got {mask.dtype} {mask.shape}")


def render_overlay(
    volume: CtVolume,
    ggo: BoolMask,
    *,
    window_center_hu: float,
    window_width_hu: float,
    max_tiles: int = MAX_TILES,
    tile_px: int = TILE_PX,
    consolidation: BoolMask | None = None,
) -> Image.Image:
    """Render the montage of a series (what ``overlay.png`` holds) in memory.

    Layout: a caption strip of ``CAPTION_PX``, then a grid of ``ceil(sqrt(k))`` columns; each
    cell is a ``LABEL_PX`` label bar over the tile, cells separated by ``GAP_PX``.

    Args:
        volume: the CT volume.
        ggo: the GGO mask. Shape: ``(slices, rows, cols)``.
        window_center_hu: display window centre in HU (the model's lung window).
        window_width_hu: display window width in HU.
        max_tiles: most slices shown.
        tile_px: longest side of a tile in pixels.
        consolidation: the consolidation mask (drawn in blue, with a legend). Shape: as ``ggo``.

    Returns:
        The RGB montage.

    Raises:
        ValueError: the mask does not match the volume, or ``max_tiles`` < 1.
    """
    check_inputs(volume, ggo, consolidation)
    indices = select_overlay_slices(ggo, max_tiles=max_tiles, consolidation=consolidation)
    has_ggo = bool(ggo.any())
    n_slices, rows, cols = ggo.shape
    tile_w, tile_h = _tile_size(rows, cols, tile_px)
    grid_cols = math.ceil(math.sqrt(len(indices)))
    grid_rows = math.ceil(len(indices) / grid_cols)
    cell_w, cell_h = tile_w, LABEL_PX + tile_h
    width = GAP_PX + grid_cols * (cell_w + GAP_PX)
    height = CAPTION_PX + grid_rows * (cell_h + GAP_PX)
    montage = Image.new("RGB", (width, height), BACKGROUND_RGB)
    draw = ImageDraw.Draw(montage)
    font = _font()
    if consolidation is not None and (has_ggo or consolidation.any()):
        legend = [("GGO", GGO_RGB), ("consolidation", CONSOLIDATION_RGB), (CAPTION_TAIL, None)]
        draw_legend(draw, (GAP_PX, 4), legend, fill=TEXT_RGB)
    else:
        caption = CAPTION_GGO if has_ggo else CAPTION_NO_GGO
        caption = CAPTION_NO_LESION if consolidation is not None else caption
        draw.text((GAP_PX, 4), caption, fill=TEXT_RGB, font=font)
    for position, index in enumerate(indices):
        left = GAP_PX + (position % grid_cols) * (cell_w + GAP_PX)
        top = CAPTION_PX + (position // grid_cols) * (cell_h + GAP_PX)
        tile = Image.fromarray(
            render_classes(
                volume.hu[index],
                ggo[index],
                None if consolidation is None else consolidation[index],
                window_center_hu=window_center_hu,
                window_width_hu=window_width_hu,
            ),
            mode="RGB",
        )
        if tile.size != (tile_w, tile_h):
            tile = tile.resize((tile_w, tile_h), Image.Resampling.BOX)
        montage.paste(tile, (left, top + LABEL_PX))
        draw_label(montage, (left + 2, top + 2), cell_w - 2, volume, index, ggo, consolidation)
    log.debug("overlay montage of %d tiles rendered", len(indices))
    return montage


def write_overlay(
    volume: CtVolume,
    ggo: BoolMask,
    path: Path,
    *,
    window_center_hu: float,
    window_width_hu: float,
    max_tiles: int = MAX_TILES,
    tile_px: int = TILE_PX,
    tree: OutputTree | None = None,
    consolidation: BoolMask | None = None,
) -> Path:
    """Write the montage PNG of a series (:func:`render_overlay`) atomically.

    Args:
        volume: the CT volume.
        ggo: the GGO mask. Shape: ``(slices, rows, cols)``.
        path: the PNG file.
        window_center_hu: display window centre in HU (the model's lung window).
        window_width_hu: display window width in HU.
        max_tiles: most slices shown.
        tile_px: longest side of a tile in pixels.
        tree: the output folder: no link is followed below it, files get its mode.
        consolidation: the consolidation mask (drawn in blue, with a legend). Shape: as ``ggo``.

    Returns:
        ``path``.

    Raises:
        OutputError: the file cannot be written.
        ValueError: the mask does not match the volume, or ``max_tiles`` < 1.
    """
    montage = render_overlay(
        volume,
        ggo,
        window_center_hu=window_center_hu,
        window_width_hu=window_width_hu,
        max_tiles=max_tiles,
        tile_px=tile_px,
        consolidation=consolidation,
    )
    with atomic_write_path(path, tree=tree) as temp:
        montage.save(temp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    log.debug("overlay written to %s", path)
    return path
