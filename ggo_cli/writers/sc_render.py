"""What a ggo-cli Secondary Capture shows: the overlay images with the results burned in.

Each SC image is an overlay image of :mod:`ggo_cli.writers.overlay_png` (the montage of
``overlay.png``, or one slice as ``--png all`` draws it) under a text band that carries the
research-use warning, the volumes (with the CSV's decimals) and the model. A viewer that shows
only pixels, as many PACS viewers do for Secondary Capture, therefore still shows what the image
is and what was measured.

The text is built from the measurements and the model only: no function here receives a
source header, so no patient name, ID or birth date can be drawn. Pillow's default font is
used, so no font file is needed.

The GradCAM++ figures of ``segment --explain`` (:mod:`ggo_cli.writers.gradcam_png`: CT |
segmentation | GradCAM++) become SC images the same way, under the same text band
(:func:`gradcam_panels`); the DICOM side (:mod:`ggo_cli.writers.dicom_sc`) takes any panel.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from ..domain import ConsolidationMeasurement, CtVolume, GgoMeasurement, LungMeasurement
from .gradcam_png import GradcamFigures, render_gradcam_figure
from .overlay_png import (
    BACKGROUND_RGB,
    TEXT_RGB,
    render_overlay,
    select_overlay_slices,
)
from .report_csv import PERCENT_DECIMALS, VOLUME_DECIMALS
from .slice_png import slice_overlays, slice_png_name

RESEARCH_USE_TEXT = "RESEARCH USE ONLY - not for diagnosis"
WARNING_RGB = (255, 255, 0)
"""The research-use line is drawn in yellow, the other lines as the overlay's labels."""
LINE_PX = 14
"""Height of one text line of Pillow's default font (10 px glyphs)."""
BAND_PAD_PX = 4
"""Margin around the text band's lines."""
NOT_AVAILABLE = "n/a"
"""Drawn for a value the CSV leaves empty (undefined, e.g. the GGO share of an empty lung)."""
MONTAGE_NAME = "montage.dcm"
"""File name of instance 1 (the montage) in the SC series folder."""
SC_SUFFIX = ".dcm"
GRADCAM_SC_PATTERN = "gradcam_{index:0{width}d}.dcm"
"""File name of a GradCAM++ SC instance: the slice's 1-based number, as ``slice_NNNN.png``."""

Rgb = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class ScPanel:
    """One image of the SC series, ready for DICOM.

    Attributes:
        pixels: the RGB image. Shape: ``(rows, cols, 3)``, uint8.
        source_indices: the slices (0-based, volume order) the image shows.
        file_name: file name in the SC series folder.
        description: what the image is (the DICOM Derivation Description); no patient data.
        montage: several slices in one image (Source Image purpose "Source image for
            montage") rather than one slice.
    """

    pixels: Rgb
    source_indices: tuple[int, ...]
    file_name: str
    description: str
    montage: bool


def _clean(text: str) -> str:
    """One line of printable text: control characters become spaces."""
    return "".join(ch if ch.isprintable() else " " for ch in text).strip()


def _volume(value: float) -> str:
    """A volume in mL as the CSV prints it (:data:`VOLUME_DECIMALS`), ``n/a`` if undefined."""
    return format(value, f".{VOLUME_DECIMALS}f") if math.isfinite(value) else NOT_AVAILABLE


def _percent(value: float) -> str:
    """A percentage as the CSV prints it (:data:`PERCENT_DECIMALS`), ``n/a`` if undefined."""
    return format(value, f".{PERCENT_DECIMALS}f") if math.isfinite(value) else NOT_AVAILABLE


def sc_text_lines(
    measurement: GgoMeasurement,
    lungs: LungMeasurement | None,
    *,
    model_name: str,
    model_version: str,
    software_version: str,
    consolidation: ConsolidationMeasurement | None = None,
) -> tuple[str, ...]:
    """The lines burned into every SC image, from measurements and the model only.

    Numbers have the CSV's decimals (``ggo_volumes.csv`` prints the same digits).

    Args:
        measurement: the series' GGO volumetry.
        lungs: lung volumes and GGO per lung, when the lung mask was on.
        model_name: the model's name.
        model_version: the model's version.
        software_version: ggo-cli's version.
        consolidation: consolidation and lesion volumetry, for a model with that channel
            (two more lines: volumes, and with the lung mask percentages of lung).

    Returns:
        The lines, top to bottom; the first is :data:`RESEARCH_USE_TEXT`.
    """
    lines = [RESEARCH_USE_TEXT, f"GGO {_volume(measurement.ggo_volume_ml)} mL"]
    if lungs is not None:
        lines += [
            f"lungs {_volume(lungs.lung_volume_ml)} mL, "
            f"GGO {_percent(lungs.ggo_percent_of_lung)} % of lungs",
            f"right lung {_volume(lungs.right_lung_volume_ml)} mL, "
            f"GGO {_volume(lungs.right_ggo_volume_ml)} mL = {_percent(lungs.right_ggo_percent)} %",
            f"left lung {_volume(lungs.left_lung_volume_ml)} mL, "
            f"GGO {_volume(lungs.left_ggo_volume_ml)} mL = {_percent(lungs.left_ggo_percent)} %",
        ]
    if consolidation is not None:
        lines += _consolidation_lines(consolidation)
    lines.append(
        f"model {_clean(model_name)} {_clean(model_version)}, ggo-cli {_clean(software_version)}"
    )
    return tuple(lines)


def _known(value: float | None) -> float:
    """A value, ``nan`` (drawn ``n/a``) when missing."""
    return math.nan if value is None else value


def _consolidation_lines(consolidation: ConsolidationMeasurement) -> list[str]:
    """The SC lines of consolidation and lesion (GGO + consolidation), the CSV's digits."""
    c = consolidation
    lines = [
        f"consolidation {_volume(c.consolidation_volume_ml)} mL, "
        f"lesion (GGO + consolidation) {_volume(c.lesion_volume_ml)} mL"
    ]
    if c.lesion_percent_of_lung is not None and c.consolidation_percent_of_lung is not None:
        lines.append(
            f"consolidation {_percent(c.consolidation_percent_of_lung)} % of lungs, lesion "
            f"{_percent(c.lesion_percent_of_lung)} % (right "
            f"{_percent(_known(c.right_lesion_percent))} %, left "
            f"{_percent(_known(c.left_lesion_percent))} %)"
        )
    return lines


def text_band_px(lines: Sequence[str]) -> int:
    """Height of the text band above the image for ``lines`` (0 without lines)."""
    return len(lines) * LINE_PX + 2 * BAND_PAD_PX if lines else 0


def burn_in_text(image: Image.Image, lines: Sequence[str]) -> Rgb:
    """Put a text band with ``lines`` above ``image``.

    The image keeps its pixels and sits at the band's lower left; the canvas widens (black on
    the right) when a line is wider than the image.

    Args:
        image: an RGB image.
        lines: the text, top to bottom; the first line is drawn in :data:`WARNING_RGB`.

    Returns:
        The RGB image. Shape: ``(text_band_px(lines) + height, max(width, text width), 3)``.
    """
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((int(measure.textlength(line, font=font)) for line in lines), default=0)
    band_h = text_band_px(lines)
    width = max(image.width, text_w + 2 * BAND_PAD_PX)
    canvas = Image.new("RGB", (width, band_h + image.height), BACKGROUND_RGB)
    canvas.paste(image.convert("RGB"), (0, band_h))
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(lines):
        colour = WARNING_RGB if number == 0 else TEXT_RGB
        draw.text((BAND_PAD_PX, BAND_PAD_PX + number * LINE_PX), line, fill=colour, font=font)
    pixels: Rgb = np.asarray(canvas, dtype=np.uint8).copy()
    return pixels


def overlay_panels(
    volume: CtVolume,
    ggo: npt.NDArray[np.bool_],
    lines: Sequence[str],
    *,
    window_center_hu: float,
    window_width_hu: float,
    per_slice: bool = False,
    consolidation: npt.NDArray[np.bool_] | None = None,
) -> list[ScPanel]:
    """The overlay images of a series as SC panels: the montage, then (optionally) each slice
    with GGO (or consolidation).

    Args:
        volume: the CT volume.
        ggo: the GGO mask. Shape: ``(slices, rows, cols)``.
        lines: the text to burn in (:func:`sc_text_lines`).
        window_center_hu: display window centre in HU (the model's lung window).
        window_width_hu: display window width in HU.
        per_slice: add one panel per slice with GGO, at the slice's native size.
        consolidation: the consolidation mask, drawn in blue with a legend (a model with that
            channel). Shape: as ``ggo``.

    Returns:
        The montage first, then the slices in volume order.

    Raises:
        ValueError: the mask does not match the volume.
    """
    montage = render_overlay(
        volume, ggo, window_center_hu=window_center_hu, window_width_hu=window_width_hu,
        consolidation=consolidation,
    )
    shown = select_overlay_slices(ggo, consolidation=consolidation)  # what render_overlay shows
    what = "AI GGO segmentation in red" if consolidation is None else (
        "AI segmentation of GGO in red and consolidation in blue"
    )
    panels = [
        ScPanel(
            pixels=burn_in_text(montage, lines),
            source_indices=shown,
            file_name=MONTAGE_NAME,
            description=(
                f"Montage of {len(shown)} lung-window CT slices, {what}; research use only"
            ),
            montage=True,
        )
    ]
    if per_slice:
        n_slices = ggo.shape[0]
        for index, image in slice_overlays(
            volume, ggo, window_center_hu=window_center_hu, window_width_hu=window_width_hu,
            consolidation=consolidation,
        ):
            panels.append(
                ScPanel(
                    pixels=burn_in_text(image, lines),
                    source_indices=(index,),
                    file_name=Path(slice_png_name(index, n_slices)).stem + SC_SUFFIX,
                    description=(
                        f"Lung-window CT slice {index + 1}/{n_slices}, {what}; "
                        "research use only"
                    ),
                    montage=False,
                )
            )
    return panels


def gradcam_sc_name(index: int, n_slices: int) -> str:
    """File name of the GradCAM++ SC image of slice ``index`` (0-based): ``gradcam_NNNN.dcm``,
    numbered as the figure's ``gradcam/slice_NNNN.png``."""
    return GRADCAM_SC_PATTERN.format(index=index + 1, width=max(4, len(str(n_slices))))


def gradcam_panels(
    volume: CtVolume,
    figures: GradcamFigures,
    lines: Sequence[str],
    *,
    window_center_hu: float,
    window_width_hu: float,
) -> Iterator[ScPanel]:
    """The GradCAM++ figures of a series as SC panels, one per explained slice, drawn one at
    a time (a series explained on every slice never holds all its images).

    Each image is the figure of ``gradcam/slice_NNNN.png``
    (:func:`~ggo_cli.writers.gradcam_png.render_gradcam_figure`) under the text band of
    ``lines``.

    Args:
        volume: the CT volume.
        figures: the kept GradCAM++ maps.
        lines: the text to burn in (:func:`sc_text_lines`).
        window_center_hu: display window centre in HU (the model's lung window).
        window_width_hu: display window width in HU.

    Returns:
        The panels in slice order, each drawn when it is reached.

    Raises:
        ValueError: the maps do not match the volume (raised at once, before any panel).
    """
    n_slices, rows, cols = volume.hu.shape
    k = len(figures.slice_indices)
    if figures.cam_index.shape != (k, rows, cols) or len(figures.mask_bits) != k:
        raise ValueError(
            f"GradCAM++ maps {figures.cam_index.shape} do not match {k} slices of "
            f"{rows} x {cols}"
        )
    if any(not 0 <= i < n_slices for i in figures.slice_indices):
        raise ValueError(f"GradCAM++ slice indices fall outside the volume's {n_slices} slices")
    return _gradcam_panels(
        volume, figures, lines, window_center_hu=window_center_hu, window_width_hu=window_width_hu
    )


def _gradcam_panels(
    volume: CtVolume,
    figures: GradcamFigures,
    lines: Sequence[str],
    *,
    window_center_hu: float,
    window_width_hu: float,
) -> Iterator[ScPanel]:
    """Draw the panels of :func:`gradcam_panels` one at a time."""
    n_slices = volume.hu.shape[0]
    for position, index in enumerate(figures.slice_indices):
        image = render_gradcam_figure(
            volume,
            figures,
            position,
            window_center_hu=window_center_hu,
            window_width_hu=window_width_hu,
        )
        yield ScPanel(
            pixels=burn_in_text(image, lines),
            source_indices=(index,),
            file_name=gradcam_sc_name(index, n_slices),
            description=(
                f"Lung-window CT slice {index + 1}/{n_slices} | AI GGO segmentation | "
                f"GradCAM++ map of layer {_clean(figures.layer)}; research use only"
            ),
            montage=False,
        )
