"""The files of one series: its SEG, SR, SC and PNGs, and its GradCAM++ maps.

The SEG is written first (read back and checked); the SR measurement report and the Secondary
Capture of the overlay reference it, so they follow, built from the SEG's header as read back.
With ``--explain`` (and an SC mode other than ``none``) the GradCAM++ figures follow as a
second SC series in ``sc_gradcam/``: the maps are computed before the SEG exists, so
:func:`explain_series` keeps them compactly (:class:`~ggo_cli.writers.gradcam_png.GradcamFigures`)
until :func:`write_outputs` draws them again. A DICOM object that this run's options no longer
ask for (``--no-sr``, ``--sc none``, fewer SC slices, no ``--explain``) is removed from the
series folder: what the folder holds is what the run delivers to a PACS
(:mod:`ggo_cli.run.deliveries`).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from .. import __version__
from ..analysis.explainer import OnnxExplainer
from ..analysis.lungs import LungMasks
from ..analysis.measurements import consolidation_channel
from ..analysis.segmenter import OnnxSegmenter
from ..config import (
    OVERLAY_NAME,
    SC_FOLDER,
    SC_GRADCAM_FOLDER,
    SEG_NAME,
    SR_NAME,
    PngMode,
    RunConfig,
    ScMode,
    SegFrames,
    gradcam_names,
)
from ..domain import (
    ConsolidationMeasurement,
    CtVolume,
    GgoMeasurement,
    LungMeasurement,
    Prediction,
)
from ..errors import OutputError
from ..fsutil import OutputTree
from ..writers.dicom_sc import write_sc
from ..writers.dicom_seg import write_seg
from ..writers.dicom_sr import write_sr
from ..writers.gradcam_png import GradcamFigures, write_gradcam_npz, write_gradcam_pngs
from ..writers.gradcam_sc import write_gradcam_sc
from ..writers.overlay_png import write_overlay
from ..writers.result_links import check_result_links
from ..writers.slice_png import write_slice_pngs

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SeriesFiles:
    """What :func:`write_outputs` wrote for one series.

    Attributes:
        seg: the SEG.
        sr: the SR measurement report, or ``None`` with ``--no-sr``.
        sc: the Secondary Capture files (montage first), empty with ``--sc none``.
        pngs: the PNGs.
        sc_gradcam: the GradCAM++ Secondary Capture files, empty without ``--explain``.
    """

    seg: Path
    sr: Path | None
    sc: tuple[Path, ...]
    pngs: tuple[Path, ...]
    sc_gradcam: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True)
class ExplainedSeries:
    """What :func:`explain_series` wrote and kept for one series.

    Attributes:
        paths: ``gradcam.npz`` and the figures' PNGs.
        figures: the maps kept for the GradCAM++ SC series, ``None`` when not asked for.
    """

    paths: tuple[Path, ...]
    figures: GradcamFigures | None


def _read_header(path: Path) -> Dataset:
    """The header of a file just written and checked (no pixel data)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, EOFError, ValueError) as exc:
        raise OutputError(f"cannot read back {path.name} just written: {exc}") from exc


def _remove_stale(paths: Sequence[Path], keep: Sequence[Path] = ()) -> int:
    """Remove regular files among ``paths`` not in ``keep`` (a link is not followed); returns
    how many."""
    kept = set(keep)
    removed = 0
    for path in paths:
        if path in kept:
            continue
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot remove the outdated {path.name}: {exc}") from exc
    return removed


def _sc_files(folder: Path, name: str = SC_FOLDER) -> list[Path]:
    """The DICOM files in a series' SC folder ``name`` (none when it is missing)."""
    sc_dir = folder / name
    if not sc_dir.is_dir() or sc_dir.is_symlink():
        return []
    return sorted(path for path in sc_dir.iterdir() if path.suffix == ".dcm")


def remove_outdated(folder: Path, written: Sequence[Path]) -> int:
    """Remove the DICOM objects of a series folder that a complete write of the series did not
    write (``written``): the SR, the SC images and the GradCAM++ SC images, as
    :func:`write_outputs` removes them; returns how many. For outputs written elsewhere and
    copied in (``--ray-ship``)."""
    return (_remove_stale([folder / SR_NAME], keep=written)
            + _remove_stale(_sc_files(folder), keep=written)
            + _remove_stale(_sc_files(folder, SC_GRADCAM_FOLDER), keep=written))


def write_outputs(
    cfg: RunConfig,
    volume: CtVolume,
    segmenter: OnnxSegmenter,
    prediction: Prediction,
    folder: Path,
    *,
    lungs: LungMasks | None,
    measurement: GgoMeasurement,
    lung_measurement: LungMeasurement | None,
    qc_flags: Sequence[str],
    gradcam: GradcamFigures | None = None,
    consolidation: ConsolidationMeasurement | None = None,
) -> SeriesFiles:
    """Write the SEG, SR and SC (each read back and checked, and their links checked) and the
    PNGs of one series.

    Args:
        cfg: the run configuration.
        volume: the CT volume.
        segmenter: the run's inference session (its model describes the outputs).
        prediction: the masks.
        folder: the series' output folder.
        lungs: the lung masks, when the lung mask is on.
        measurement: the GGO volumetry (the CSV's numbers, reported in the SR and SC).
        lung_measurement: the lung volumetry, when the lung mask is on.
        qc_flags: the quality flags raised (reported in the SR).
        gradcam: the GradCAM++ maps of ``--explain``, written as a second SC series (unless
            ``--sc none``); ``None`` removes an earlier run's.
        consolidation: consolidation and lesion volumetry (burned into the SC), when the
            model has a consolidation channel; the PNGs and the SC then draw that channel.

    Returns:
        The files written.

    Raises:
        OutputError: a file cannot be written; SeriesError: an object cannot be built.
    """
    model = segmenter.model
    channel = consolidation_channel(model.segments)
    consolidation_mask = None if channel is None else prediction.masks[..., channel]
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
    seg = _read_header(seg_path)
    sr_path: Path | None = None
    if cfg.sr:
        sr_path = write_sr(
            volume,
            seg,
            measurement=measurement,
            model=model,
            path=folder / SR_NAME,
            lungs=lung_measurement,
            qc_flags=qc_flags,
            software_version=__version__,
            tree=cfg.tree,
            consolidation=consolidation,
        )
    else:
        _remove_stale([folder / SR_NAME])
    sc_paths: list[Path] = []
    if cfg.sc_mode is not ScMode.NONE:
        sc_paths = write_sc(
            volume,
            prediction,
            model,
            folder / SC_FOLDER,
            measurement=measurement,
            lungs=lung_measurement,
            seg=seg,
            per_slice=cfg.sc_mode is ScMode.SLICES,
            software_version=__version__,
            tree=cfg.tree,
            consolidation=consolidation,
        )
    _remove_stale(_sc_files(folder), keep=sc_paths)
    gradcam_paths: list[Path] = []
    if cfg.sc_mode is not ScMode.NONE and gradcam is not None:
        gradcam_paths = write_gradcam_sc(
            volume,
            gradcam,
            model,
            folder / SC_GRADCAM_FOLDER,
            threshold=prediction.threshold,
            measurement=measurement,
            lungs=lung_measurement,
            seg=seg,
            software_version=__version__,
            tree=cfg.tree,
        )
    _remove_stale(_sc_files(folder, SC_GRADCAM_FOLDER), keep=gradcam_paths)
    check_result_links(
        seg,
        _read_header(sr_path) if sr_path is not None else None,
        [_read_header(path) for path in sc_paths],
        source_series_uid=volume.series.series_instance_uid,
        gradcam_sc=[_read_header(path) for path in gradcam_paths],
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
                consolidation=consolidation_mask,
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
                consolidation=consolidation_mask,
            )
        )
    return SeriesFiles(seg_path, sr_path, tuple(sc_paths), tuple(pngs), tuple(gradcam_paths))


def explain_series(
    volume: CtVolume,
    prediction: Prediction,
    explainer: OnnxExplainer,
    folder: Path,
    *,
    slices: str,
    tree: OutputTree,
    keep_figures: bool = False,
) -> ExplainedSeries:
    """Compute the GradCAM++ maps of one series and write ``gradcam.npz`` and
    ``gradcam/slice_NNNN.png``; keep the maps for the GradCAM++ SC series if asked.

    Args:
        volume: the CT volume.
        prediction: the masks whose GGO is explained.
        explainer: the run's explain session.
        folder: the series' output folder.
        slices: the slice selection (``ggo``, ``all``).
        tree: the output folder.
        keep_figures: keep the maps compactly (:class:`GradcamFigures`, a quarter of the
            float maps) for :func:`write_outputs`.

    Returns:
        The paths written (the npz first) and the kept maps.

    Raises:
        InputError: bad slice selection; ModelError: the explain graph failed;
        OutputError: a file cannot be written.
    """
    explanation = explainer.explain(volume, prediction, slices=slices)
    npz_name, figures_name = gradcam_names(explanation.target)
    npz = write_gradcam_npz(folder / npz_name, explanation, tree=tree)
    figures_folder = folder / figures_name
    pngs = write_gradcam_pngs(
        volume,
        explanation,
        figures_folder,
        window_center_hu=explainer.model.window_center_hu,
        window_width_hu=explainer.model.window_width_hu,
        tree=tree,
    )
    # Figures of slices this run did not explain (an earlier run's other selection) would
    # mix with this run's maps.
    if figures_folder.is_dir() and not figures_folder.is_symlink():
        _remove_stale(sorted(figures_folder.glob("slice_*.png")), keep=pngs)
    log.info(
        "series %s: GradCAM++ of %s (%s) on %d slices",
        volume.series.series_instance_uid,
        explanation.target,
        explanation.layer,
        len(explanation.slice_indices),
    )
    figures = GradcamFigures.from_explanation(explanation) if keep_figures else None
    return ExplainedSeries((npz, *pngs), figures)
