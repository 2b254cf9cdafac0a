"""The files of one series: its SEG and PNGs, and its GradCAM++ maps."""

from __future__ import annotations

import logging
from pathlib import Path

from .. import __version__
from ..analysis.explainer import OnnxExplainer
from ..analysis.lungs import LungMasks
from ..analysis.segmenter import OnnxSegmenter
from ..config import (
    GRADCAM_FOLDER,
    GRADCAM_NPZ_NAME,
    OVERLAY_NAME,
    SEG_NAME,
    PngMode,
    RunConfig,
    SegFrames,
)
from ..domain import CtVolume, Prediction
from ..fsutil import OutputTree
from ..writers.dicom_seg import write_seg
from ..writers.gradcam_png import write_gradcam_npz, write_gradcam_pngs
from ..writers.overlay_png import write_overlay, write_slice_pngs

log = logging.getLogger(__name__)


def write_outputs(
    cfg: RunConfig,
    volume: CtVolume,
    segmenter: OnnxSegmenter,
    prediction: Prediction,
    lungs: LungMasks | None,
    folder: Path,
) -> tuple[Path, tuple[Path, ...]]:
    """Write the SEG (read back and checked) and the PNGs of one series.

    Returns:
        The SEG's path and the PNGs' paths.

    Raises:
        OutputError: a file cannot be written; SeriesError: the SEG cannot be built.
    """
    model = segmenter.model
    seg_path = write_seg(
        volume,
        prediction,
        model,
        folder / SEG_NAME,
        lungs=lungs,
        series_number=cfg.seg_series_number,
        nonempty_frames=cfg.seg_frames is SegFrames.NONEMPTY,
        series_description=cfg.seg_series_description,
        software_version=__version__,
        tree=cfg.tree,
    )
    pngs: list[Path] = []
    if cfg.png_mode is not PngMode.NONE:
        pngs.append(
            write_overlay(
                volume,
                prediction.ggo,
                folder / OVERLAY_NAME,
                window_center_hu=model.window_center_hu,
                window_width_hu=model.window_width_hu,
                tree=cfg.tree,
            )
        )
    if cfg.png_mode is PngMode.ALL:
        pngs.extend(
            write_slice_pngs(
                volume,
                prediction.ggo,
                folder / "slices",
                window_center_hu=model.window_center_hu,
                window_width_hu=model.window_width_hu,
                tree=cfg.tree,
            )
        )
    return seg_path, tuple(pngs)


def write_explanation(
    volume: CtVolume,
    prediction: Prediction,
    explainer: OnnxExplainer,
    folder: Path,
    *,
    slices: str,
    tree: OutputTree,
) -> tuple[Path, ...]:
    """Write ``gradcam.npz`` and ``gradcam/slice_NNNN.png`` of one series.

    Returns:
        The paths written (the npz first).
    """
    explanation = explainer.explain(volume, prediction, slices=slices)
    npz = write_gradcam_npz(folder / GRADCAM_NPZ_NAME, explanation, tree=tree)
    pngs = write_gradcam_pngs(
        volume,
        explanation,
        folder / GRADCAM_FOLDER,
        window_center_hu=explainer.model.window_center_hu,
        window_width_hu=explainer.model.window_width_hu,
        tree=tree,
    )
    log.info(
        "series %s: GradCAM++ (%s) on %d slices",
        volume.series.series_instance_uid,
        explanation.layer,
        len(explanation.slice_indices),
    )
    return (npz, *pngs)
