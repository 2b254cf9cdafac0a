"""GradCAM++ outputs of a series: ``gradcam.npz`` and one three-panel PNG per explained slice.

Each ``gradcam/slice_NNNN.png`` (NNNN: 1-based position along the sorted volume, as the
overlay PNGs) follows the paper's Figure 3: the CT in a lung window | the segmentation overlay
(predicted GGO in red, drawn by :func:`ggo_cli.writers.overlay_png.render_slice`) | the
GradCAM++ map in a jet colour map blended on the CT, with a 0..1 colour bar on the right and a
label bar on top ("slice k/n", the layer). Panels are the slice at its native size, drawn as
stored (no flips). Nothing identifying is drawn: no names, IDs, dates or UIDs. Pillow only; the
colour map is a numpy table (:mod:`ggo_cli.writers.cam_colours`).

For a model with a consolidation channel the middle panel shows both classes (GGO red,
consolidation blue, :func:`ggo_cli.writers.overlay_png.render_classes`) under a legend naming
them, and the label bar and the map's title name the explained class (``--target``); the
figures of ``--target consolidation`` go to ``gradcam_consolidation/`` and
``gradcam_consolidation.npz`` (:func:`ggo_cli.config.gradcam_names`).

``gradcam.npz`` holds ``cam`` float32 ``[k, rows, cols]`` in ``[0, 1]`` on the source grid,
``mask`` uint8 ``[k, rows, cols]`` (the predicted class used as the target), ``sop_instance_uids``
``[k]`` (unicode), ``slice_indices`` int64 ``[k]`` (0-based; the PNG number is index + 1),
``layer`` and ``target`` (0-d unicode: ``ggo`` or ``consolidation``), and for a two-class model
``labels`` uint8 ``[k, rows, cols]`` (1 GGO, 2 consolidation, 0 neither).

The same figures also become a DICOM Secondary Capture series
(:mod:`ggo_cli.writers.gradcam_sc`), written after the SEG it references. Between the two, a
series keeps only :class:`GradcamFigures`: each map as the colour table's uint8 index (exactly
what the figure draws) and the target mask as bits, about a quarter of the float maps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from ..analysis.explain_target import LABEL_CONSOLIDATION, LABEL_GGO, ExplainTarget
from ..analysis.explainer import Explanation
from ..analysis.preprocessing import window_hu
from ..atomic_output import atomic_write_path
from ..domain import CtVolume
from ..fsutil import OutputTree, ensure_folder
from .cam_colours import JET_LUT, blend, colourise, lut_index
from .overlay_legend import CONSOLIDATION_RGB, draw_legend
from .overlay_png import (
    BACKGROUND_RGB,
    GGO_RGB,
    LABEL_PX,
    PNG_COMPRESS_LEVEL,
    TEXT_RGB,
    render_classes,
    render_slice,
)
from .slice_png import slice_png_name

log = logging.getLogger(__name__)

GAP_PX = 4
"""Black gap between panels and before the colour bar."""
COLOURBAR_PX = 12
"""Width of the colour bar."""
COLOURBAR_LABEL_PX = 24
"""Room right of the colour bar for its tick labels."""
PANEL_TITLES = ("CT (lung window)", "predicted GGO", "GradCAM++")
CAPTION = "AI research output, not for diagnosis"

Rgb = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class GradcamFigures:
    """What the figures of an :class:`Explanation` need, kept compactly until they are drawn
    again (as DICOM, after the SEG).

    Attributes:
        slice_indices: the explained slices (0-based, increasing).
        cam_index: each map as :data:`JET_LUT` indices (:func:`lut_index`). Shape:
            ``(k, rows, cols)``, uint8.
        mask_bits: the target masks, ``np.packbits`` of each slice's flattened mask. Shape:
            ``(k, ceil(rows * cols / 8))``, uint8.
        layer: the explained layer.
        target: the explained class.
        other_bits: for a two-class model, the other class's masks packed alike (GGO when
            the target is consolidation and vice versa); ``None`` for a one-channel model.
    """

    slice_indices: tuple[int, ...]
    cam_index: npt.NDArray[np.uint8]
    mask_bits: npt.NDArray[np.uint8]
    layer: str
    target: str = ExplainTarget.GGO.value
    other_bits: npt.NDArray[np.uint8] | None = None

    @classmethod
    def from_explanation(cls, explanation: Explanation) -> GradcamFigures:
        """Keep what the figures of ``explanation`` draw (the float maps are not kept)."""
        k, rows, cols = explanation.cam.shape
        cam_index = np.empty((k, rows, cols), dtype=np.uint8)
        for position in range(k):  # slice by slice: no float temporaries of the whole maps
            cam_index[position] = lut_index(explanation.cam[position])
        other = _other_class(explanation)
        return cls(
            slice_indices=tuple(explanation.slice_indices),
            cam_index=cam_index,
            mask_bits=np.packbits(explanation.mask.reshape(k, rows * cols).astype(bool), axis=1),
            layer=explanation.layer,
            target=explanation.target,
            other_bits=None if other is None else np.packbits(other.reshape(k, -1), axis=1),
        )

    def _unpack(self, bits: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
        rows, cols = self.cam_index.shape[1:]
        result: npt.NDArray[np.bool_] = (
            np.unpackbits(bits, count=rows * cols).reshape(rows, cols).astype(bool)
        )
        return result

    def mask(self, position: int) -> npt.NDArray[np.bool_]:
        """The target mask of explained slice ``position``. Shape: ``(rows, cols)``."""
        return self._unpack(self.mask_bits[position])

    def other(self, position: int) -> npt.NDArray[np.bool_] | None:
        """The other class's mask of explained slice ``position`` (``None``: one class)."""
        return None if self.other_bits is None else self._unpack(self.other_bits[position])


def _other_class(explanation: Explanation) -> npt.NDArray[np.bool_] | None:
    """The class not explained (from the label map), ``None`` for a one-channel model."""
    if explanation.labels is None:
        return None
    other = LABEL_GGO if explanation.target == ExplainTarget.CONSOLIDATION else LABEL_CONSOLIDATION
    result: npt.NDArray[np.bool_] = explanation.labels == other
    return result


def _grey(hu: npt.NDArray[np.float32], center_hu: float, width_hu: float) -> Rgb:
    """The lung-window CT as RGB."""
    grey = np.rint(window_hu(hu, center_hu=center_hu, width_hu=width_hu) * 255.0)
    result: Rgb = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
    return result


def _colour_bar(height: int) -> Rgb:
    """A vertical colour bar, 1 at the top and 0 at the bottom. Shape: ``(height, px, 3)``."""
    ramp = np.linspace(1.0, 0.0, max(height, 1), dtype=np.float32)
    result: Rgb = np.repeat(colourise(ramp)[:, None, :], COLOURBAR_PX, axis=1)
    return result


def panel_origins(rows: int, cols: int) -> tuple[tuple[int, int], ...]:
    """Top-left ``(x, y)`` of the three panels and the colour bar in a slice PNG."""
    top = 2 * LABEL_PX
    xs = [GAP_PX + i * (cols + GAP_PX) for i in range(4)]
    return tuple((x, top) for x in xs)


def _check(volume: CtVolume, explanation: Explanation) -> None:
    """Raise ``ValueError`` when the explanation does not fit the volume."""
    n, rows, cols = volume.hu.shape
    k = len(explanation.slice_indices)
    if (
        explanation.cam.shape != (k, rows, cols)
        or explanation.mask.shape != (k, rows, cols)
        or (explanation.labels is not None and explanation.labels.shape != (k, rows, cols))
    ):
        raise ValueError(
            f"explanation arrays {explanation.cam.shape}, {explanation.mask.shape} do not match "
            f"{k} slices of {rows} x {cols}"
        )
    if any(not 0 <= i < n for i in explanation.slice_indices):
        raise ValueError(f"explanation slice indices fall outside the volume's {n} slices")


def render_gradcam_png(
    volume: CtVolume,
    explanation: Explanation,
    position: int,
    *,
    window_center_hu: float,
    window_width_hu: float,
) -> Image.Image:
    """Draw the three-panel figure of one explained slice.

    Layout: a label bar ("slice k/n", layer, caption), a bar of panel titles, then the panels
    side by side (``GAP_PX`` apart) and the colour bar with its 0 and 1 ticks.

    Args:
        volume: the CT volume.
        explanation: the maps.
        position: which explained slice (index into ``explanation.slice_indices``).
        window_center_hu: display window centre in HU.
        window_width_hu: display window width in HU.

    Returns:
        The RGB image, ``3 * cols + 4 * GAP_PX + COLOURBAR_PX + COLOURBAR_LABEL_PX`` wide and
        ``2 * LABEL_PX + rows + GAP_PX`` high.
    """
    other = _other_class(explanation)
    return _draw_figure(
        volume,
        explanation.slice_indices[position],
        explanation.mask[position].astype(bool),
        colourise(explanation.cam[position]),
        explanation.layer,
        target=explanation.target,
        other=None if other is None else other[position],
        window_center_hu=window_center_hu,
        window_width_hu=window_width_hu,
    )


def render_gradcam_figure(
    volume: CtVolume,
    figures: GradcamFigures,
    position: int,
    *,
    window_center_hu: float,
    window_width_hu: float,
) -> Image.Image:
    """Draw the figure of one explained slice from :class:`GradcamFigures`: pixel for pixel
    what :func:`render_gradcam_png` draws from the explanation they were kept from.

    Args:
        volume: the CT volume.
        figures: the kept maps.
        position: which explained slice (index into ``figures.slice_indices``).
        window_center_hu: display window centre in HU.
        window_width_hu: display window width in HU.

    Returns:
        The RGB image (size as :func:`render_gradcam_png`).
    """
    return _draw_figure(
        volume,
        figures.slice_indices[position],
        figures.mask(position),
        JET_LUT[figures.cam_index[position]],
        figures.layer,
        target=figures.target,
        other=figures.other(position),
        window_center_hu=window_center_hu,
        window_width_hu=window_width_hu,
    )


def _draw_figure(
    volume: CtVolume,
    index: int,
    mask: npt.NDArray[np.bool_],
    jet: Rgb,
    layer: str,
    *,
    target: str,
    other: npt.NDArray[np.bool_] | None,
    window_center_hu: float,
    window_width_hu: float,
) -> Image.Image:
    """The three-panel figure of slice ``index`` with its target mask (and, for a two-class
    model, the other class's) and its coloured map."""
    n_slices, rows, cols = volume.hu.shape
    hu = volume.hu[index]
    window = {"window_center_hu": window_center_hu, "window_width_hu": window_width_hu}
    if other is None:
        segmentation = render_slice(hu, mask, **window)
        titles: tuple[str, ...] = (*PANEL_TITLES, "")
        label = f"slice {index + 1}/{n_slices}  layer {layer}  {CAPTION}"
    else:
        explains_ggo = target != ExplainTarget.CONSOLIDATION
        ggo, consolidation = (mask, other) if explains_ggo else (other, mask)
        segmentation = render_classes(hu, ggo, consolidation, **window)
        titles = (PANEL_TITLES[0], "", f"GradCAM++ of {target}", "")
        label = f"slice {index + 1}/{n_slices}  target {target}  layer {layer}  {CAPTION}"
    panels = (
        _grey(hu, window_center_hu, window_width_hu),
        segmentation,
        blend(hu, jet, window_center_hu, window_width_hu),
        _colour_bar(rows),
    )
    width = 4 * GAP_PX + 3 * cols + COLOURBAR_PX + COLOURBAR_LABEL_PX
    image = Image.new("RGB", (width, 2 * LABEL_PX + rows + GAP_PX), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((GAP_PX, 2), label, fill=TEXT_RGB, font=font)
    origins = panel_origins(rows, cols)
    for (x, y), panel, title in zip(origins, panels, titles, strict=True):
        image.paste(Image.fromarray(panel, mode="RGB"), (x, y))
        draw.text((x + 2, LABEL_PX + 2), title, fill=TEXT_RGB, font=font)
    if other is not None:  # the middle panel's title: the two classes and their colours
        legend = [("GGO", GGO_RGB), ("consolidation", CONSOLIDATION_RGB)]
        draw_legend(draw, (origins[1][0] + 2, LABEL_PX + 2), legend, fill=TEXT_RGB)
    bar_x = panel_origins(rows, cols)[3][0] + COLOURBAR_PX + 2
    draw.text((bar_x, 2 * LABEL_PX), "1", fill=TEXT_RGB, font=font)
    draw.text((bar_x, 2 * LABEL_PX + rows - 12), "0", fill=TEXT_RGB, font=font)
    return image


def write_gradcam_pngs(
    volume: CtVolume,
    explanation: Explanation,
    folder: Path,
    *,
    window_center_hu: float,
    window_width_hu: float,
    tree: OutputTree | None = None,
) -> list[Path]:
    """Write one three-panel PNG per explained slice (``slice_NNNN.png``), each atomically.

    Args:
        volume: the CT volume.
        explanation: the maps (:meth:`ggo_cli.analysis.explainer.OnnxExplainer.explain`).
        folder: where to write (created if needed; nothing is created for no slices).
        window_center_hu: display window centre in HU (the model's lung window).
        window_width_hu: display window width in HU.
        tree: the output folder: no link is followed below it, files get its mode.

    Returns:
        The PNGs written, in slice order.

    Raises:
        OutputError: a file or the folder cannot be written.
        ValueError: the explanation does not match the volume.
    """
    _check(volume, explanation)
    n_slices = volume.hu.shape[0]
    written: list[Path] = []
    if explanation.slice_indices:
        ensure_folder(folder, tree=tree)
    for position, index in enumerate(explanation.slice_indices):
        image = render_gradcam_png(
            volume,
            explanation,
            position,
            window_center_hu=window_center_hu,
            window_width_hu=window_width_hu,
        )
        path = folder / slice_png_name(index, n_slices)
        with atomic_write_path(path, tree=tree) as temp:
            image.save(temp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        written.append(path)
    log.debug("%d GradCAM++ PNGs written to %s", len(written), folder)
    return written


def write_gradcam_npz(
    path: Path, explanation: Explanation, *, tree: OutputTree | None = None
) -> Path:
    """Write the maps as a compressed ``.npz`` atomically (keys in the module docstring).

    Args:
        path: the file, e.g. ``<series folder>/gradcam.npz``.
        explanation: the maps.
        tree: the output folder: no link is followed below it, files get its mode.

    Returns:
        ``path``.

    Raises:
        OutputError: the file cannot be written.
    """
    arrays = {
        "cam": np.asarray(explanation.cam, dtype=np.float32),
        "mask": np.asarray(explanation.mask, dtype=np.uint8),
        "sop_instance_uids": np.array(explanation.sop_instance_uids, dtype=np.str_),
        "slice_indices": np.array(explanation.slice_indices, dtype=np.int64),
        "layer": np.array(explanation.layer, dtype=np.str_),
        "target": np.array(explanation.target, dtype=np.str_),
    }
    if explanation.labels is not None:
        arrays["labels"] = np.asarray(explanation.labels, dtype=np.uint8)
    # A file object, not a name: numpy would append ".npz" to the temporary file's name.
    with atomic_write_path(path, tree=tree) as temp, temp.open("wb") as fh:
        np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
    log.debug("GradCAM++ maps of %d slices written to %s", len(explanation.slice_indices), path)
    return path
