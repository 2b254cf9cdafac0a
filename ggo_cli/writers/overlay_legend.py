"""The second class of the overlay pictures: consolidation's colour and the legend that names
the classes (GGO / consolidation), drawn only for a model with a consolidation channel.

Kept apart from :mod:`ggo_cli.writers.overlay_png`, which draws the pictures; a one-channel
model's pictures never reach this module's drawing.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import ImageDraw, ImageFont

CONSOLIDATION_RGB = (0, 160, 255)
"""Consolidation in blue: the SEG's recommended colour of channel 1
(``SEGMENT_COLORS_RGB[1]`` of :mod:`ggo_cli.writers.seg_segments`), so a viewer and the
pictures agree."""
SWATCH_PX = 8
"""Side of a legend swatch (the class's colour) before its name."""
SWATCH_GAP_PX = 3
"""Space between a swatch and its text."""
ITEM_GAP_PX = 6
"""Space between two legend items."""

Rgb = tuple[int, int, int]
LegendItem = tuple[str, Rgb | None]
"""A piece of legend text and the swatch colour drawn before it (``None``: no swatch)."""


def draw_legend(
    draw: ImageDraw.ImageDraw,
    xy: tuple[int, int],
    items: Sequence[LegendItem],
    *,
    fill: Rgb,
) -> int:
    """Draw text pieces left to right from ``xy``, each after its class's colour swatch.

    Args:
        draw: where to draw.
        xy: the top left corner of the first piece, in pixels.
        items: the pieces in order.
        fill: the text colour.

    Returns:
        The x coordinate just past the last piece.
    """
    font = ImageFont.load_default()
    x, y = xy
    for text, swatch in items:
        if swatch is not None:
            draw.rectangle((x, y + 1, x + SWATCH_PX - 1, y + SWATCH_PX), fill=swatch)
            x += SWATCH_PX + SWATCH_GAP_PX
        draw.text((x, y), text, fill=fill, font=font)
        x += int(draw.textlength(text, font=font)) + ITEM_GAP_PX
    return x


def slice_legend(
    index: int, n_slices: int, *, ggo_ml: float, consolidation_ml: float, ggo_rgb: Rgb
) -> list[LegendItem]:
    """A slice's label with both classes: ``slice k/n``, then each class's volume on it.

    Args:
        index: the slice (0-based).
        n_slices: slices in the volume.
        ggo_ml: GGO on the slice, mL.
        consolidation_ml: consolidation on the slice, mL.
        ggo_rgb: GGO's colour.

    Returns:
        The items for :func:`draw_legend`.
    """
    return [
        (f"slice {index + 1}/{n_slices}", None),
        (f"GGO {ggo_ml:.2f} mL", ggo_rgb),
        (f"cons. {consolidation_ml:.2f} mL", CONSOLIDATION_RGB),
    ]
