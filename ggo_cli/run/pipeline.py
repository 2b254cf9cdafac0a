"""One series through the pipeline: load -> preprocess + infer -> measure -> write.

:func:`ggo_cli.run.runner.run_segment` drives a whole run; ``process_series`` here one series
(``prepare_series``, ``compute_series`` and ``write_series`` are its stages). A failing series is
recorded in its :class:`~ggo_cli.domain.SeriesOutcome` and never stops the others. Nothing
here prints or exits: progress goes to an optional :class:`ProgressSink`, errors are raised
as :class:`~ggo_cli.errors.GgoError` for ``cli/`` to map to exit codes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..analysis.explainer import OnnxExplainer
from ..analysis.lungs import LungMasks, segment_lungs
from ..analysis.masks import keep_inside_lungs, model_masks, segment_planes
from ..analysis.measurements import (
    consolidation_channel,
    lung_measurements,
    measure_consolidation,
    measure_ggo,
    resolve_overlap,
)
from ..analysis.quality import assess_series, format_flags
from ..analysis.segmenter import OnnxSegmenter
from ..config import RunConfig, ScMode, SelectionRules
from ..dicom.decode_pool import DecodePool
from ..dicom.volume import load_volume
from ..domain import (
    ConsolidationMeasurement,
    CtVolume,
    GgoMeasurement,
    LungMeasurement,
    Prediction,
    SeriesInfo,
    SeriesOutcome,
    SeriesStatus,
)
from ..errors import UnsupportedSeriesError
from ..host import release_freed_memory
from ..writers.gradcam_png import GradcamFigures
from ..writers.seg_source import check_source_headers
from .outcomes import failed_outcome, now_utc
from .outputs import explain_series, write_outputs
from .result import ProgressSink

log = logging.getLogger(__name__)

def series_dir(out_dir: Path, series: SeriesInfo) -> Path:
    """Output folder of a series: ``<out>/<StudyInstanceUID>/<SeriesInstanceUID>``."""
    return out_dir / series.study_instance_uid / series.series_instance_uid


@dataclass
class ComputedSeries:
    """A series after inference, before its SEG and PNGs are written (see :func:`compute_series`).

    Attributes:
        series: the series.
        volume: its CT volume.
        prediction: the masks (kept inside the lungs unless ``--no-lung-mask``).
        lungs: the lung masks, when the lung mask is on.
        lung_measurement: lung volumes and GGO per lung, when the lung mask is on.
        measurement: GGO volumetry.
        folder: the series' output folder.
        png_paths: files already written (GradCAM++ maps).
        started: ``time.perf_counter()`` when the series started.
        qc_flags: the quality flags raised (:mod:`ggo_cli.analysis.quality`).
        gradcam: the GradCAM++ maps kept for their SC series (``--explain``), else ``None``.
        consolidation: consolidation and lesion volumetry, when the model has that channel.
    """

    series: SeriesInfo
    volume: CtVolume
    prediction: Prediction
    lungs: LungMasks | None
    lung_measurement: LungMeasurement | None
    measurement: GgoMeasurement
    folder: Path
    png_paths: tuple[Path, ...]
    started: float
    qc_flags: tuple[str, ...] = ()
    gradcam: GradcamFigures | None = None
    consolidation: ConsolidationMeasurement | None = None


@dataclass(frozen=True)
class PreparedSeries:
    """A decoded series and, with the lung mask on, its lungs (what runs ahead of inference).

    Attributes:
        volume: the CT volume.
        lungs: the lung masks, or ``None`` with ``--no-lung-mask``.
        planes: with the lung mask, the SEG's segment planes (see
            :func:`~ggo_cli.analysis.masks.segment_planes`) that ``lungs`` are views of and
            the model's masks will be written into; ``None`` otherwise.
    """

    volume: CtVolume
    lungs: LungMasks | None
    planes: npt.NDArray[np.bool_] | None = None


VolumeSource = Callable[[], PreparedSeries]
"""Returns a prepared series (e.g. the result of work started earlier); may raise."""


def prepare_series(
    series: SeriesInfo,
    selection: SelectionRules,
    *,
    lung_mask: bool = True,
    n_channels: int = 1,
    pool: DecodePool | None = None,
    on_slice: Callable[[int], None] | None = None,
    cores: int,
) -> PreparedSeries:
    """Decode a series and segment its lungs (the CPU work that needs no model).

    With the lung mask on, the lungs are written straight into the SEG's segment planes
    (``n_channels`` model channels, then the two lungs), which inference then fills: the
    masks of a series exist once.

    Args:
        series: an eligible series.
        selection: the selection rules (their spacing tolerance checks the geometry).
        lung_mask: segment the lungs too (``--lung-mask``).
        n_channels: the model's output channels (planes before the lungs').
        pool: decodes compressed pixel data in worker processes.
        on_slice: told the number of slices just decoded.
        cores: cores of this process for the lung mask (:attr:`ggo_cli.host.HostLimits.cores`).

    Raises:
        SeriesError: the series cannot be loaded or its lungs not segmented.
    """
    volume = load_volume(series, selection, on_slice=on_slice, pool=pool)
    if not lung_mask:
        return PreparedSeries(volume, None)
    planes, lungs = segment_planes(volume.hu.shape, n_channels)
    segment_lungs(volume, out=lungs, cores=cores)
    release_freed_memory()  # the lung mask's temporaries, kept by glibc's thread arenas
    return PreparedSeries(volume, lungs, planes)


def compute_series(
    cfg: RunConfig,
    series: SeriesInfo,
    segmenter: OnnxSegmenter,
    *,
    explainer: OnnxExplainer | None = None,
    progress: ProgressSink | None = None,
    volume_source: VolumeSource | None = None,
    cores: int,
) -> ComputedSeries | SeriesOutcome:
    """Load (or receive), segment and measure one series; write its GradCAM++ maps if asked.

    Args:
        cfg: the run configuration.
        series: an eligible series.
        segmenter: the run's inference session.
        explainer: when given, GradCAM++ maps are written here.
        progress: optional progress sink (two units per slice: decode, then inference).
        volume_source: supplies the volume and lungs (prepared ahead of time, see
            :func:`prepare_series`); ``None`` prepares them here.
        cores: cores of this process, for preparing here (:attr:`ggo_cli.host.HostLimits.cores`).

    Returns:
        The :class:`ComputedSeries`, or the ``failed`` outcome of a series-level failure.

    Raises:
        OutputError: when the output folder itself cannot be written (the run must stop).
    """
    started = time.perf_counter()
    n_slices = len(series.files)
    if progress is not None:
        progress.series_started(series, 2 * n_slices)
    advance = progress.advance if progress is not None else None
    volume: CtVolume | None = None
    try:
        n_channels = segmenter.model.n_channels
        if volume_source is None:
            prepared = prepare_series(
                series,
                cfg.selection,
                lung_mask=cfg.lung_mask,
                n_channels=n_channels,
                on_slice=advance,
                cores=cores,
            )
        else:
            prepared = volume_source()
            if advance is not None:
                advance(n_slices)
        volume, lungs, planes = prepared.volume, prepared.lungs, prepared.planes
        del prepared
        check_source_headers(volume.datasets, series.series_instance_uid)
        lung_measurement: LungMeasurement | None = None
        if lungs is not None and not lungs.right.any() and not lungs.left.any():
            raise UnsupportedSeriesError(
                "no lung found (no aerated region below -320 HU inside the body); "
                "--no-lung-mask measures GGO without a lung mask"
            )
        out = None
        if planes is not None and planes.shape[0] == n_channels + 2:
            out = model_masks(planes, n_channels)  # straight into the SEG's planes
        prediction = segmenter.predict(volume, on_slices=advance, out=out)
        channel = consolidation_channel(segmenter.model.segments)
        if channel is not None:  # a voxel called both is consolidation (measurements.py)
            prediction = resolve_overlap(prediction, channel)
        if lungs is not None:
            # GGO kept inside the lungs, in place; masks not in the planes are stacked (a
            # copy) when the SEG is built.
            prediction = keep_inside_lungs(prediction, lungs)
            lung_measurement = lung_measurements(lungs, prediction.ggo, volume.voxel_volume_ml)
        measurement = measure_ggo(prediction.ggo, volume.voxel_volume_ml)
        consolidation = None if channel is None else measure_consolidation(
            prediction.ggo, prediction.masks[..., channel], volume.voxel_volume_ml, lungs=lungs
        )
        qc_flags = assess_series(
            volume,
            prediction,
            measurement,
            lungs=lungs,
            lung_measurement=lung_measurement,
            variant_checked=segmenter.variant_checked,
        )
        release_freed_memory()  # inference's per-batch temporaries, before the SEG is built
        folder = series_dir(cfg.out_dir, series)
        pngs: tuple[Path, ...] = ()
        gradcam: GradcamFigures | None = None
        if explainer is not None:
            keep = not cfg.explain_only and cfg.sc_mode is not ScMode.NONE  # for the SC series
            explained = explain_series(
                volume, prediction, explainer, folder, slices=cfg.explain_slices,
                tree=cfg.tree, keep_figures=keep,
            )
            pngs, gradcam = explained.paths, explained.figures
    except Exception as exc:  # noqa: BLE001 - one series' failure never stops the run
        return failed_outcome(series, exc, started, volume)
    return ComputedSeries(
        series=series,
        volume=volume,
        prediction=prediction,
        lungs=lungs,
        lung_measurement=lung_measurement,
        measurement=measurement,
        folder=folder,
        png_paths=pngs,
        started=started,
        qc_flags=qc_flags,
        gradcam=gradcam,
        consolidation=consolidation,
    )


def write_series(cfg: RunConfig, done: ComputedSeries, segmenter: OnnxSegmenter) -> SeriesOutcome:
    """Write the SEG, SR and SC (verified) and PNGs of a computed series; return its outcome.

    Safe to run in a background thread while the next series is segmented: it reads only
    ``done`` and the segmenter's model description.

    Raises:
        OutputError: when the output folder itself cannot be written (the run must stop).
    """
    series, volume = done.series, done.volume
    seg_path: Path | None = None
    pngs = done.png_paths
    try:
        if not cfg.explain_only:
            files = write_outputs(
                cfg,
                volume,
                segmenter,
                done.prediction,
                done.folder,
                lungs=done.lungs,
                measurement=done.measurement,
                lung_measurement=done.lung_measurement,
                qc_flags=done.qc_flags,
                gradcam=done.gradcam,
                consolidation=done.consolidation,
            )
            seg_path = files.seg
            pngs = files.pngs + pngs
    except Exception as exc:  # noqa: BLE001 - one series' failure never stops the run
        return failed_outcome(series, exc, done.started, volume)
    finally:
        release_freed_memory()  # the SEG build's and read-back's temporaries
    seconds = time.perf_counter() - done.started
    lung_text = ""
    lung_measurement = done.lung_measurement
    if lung_measurement is not None:
        lung_text = (
            f", lungs {lung_measurement.right_lung_volume_ml:.0f} mL right + "
            f"{lung_measurement.left_lung_volume_ml:.0f} mL left, GGO "
            f"{lung_measurement.ggo_percent_of_lung:.2f} % of lung"
        )
    qc_text = f", QC: {format_flags(done.qc_flags)}" if done.qc_flags else ""
    consolidation = done.consolidation
    if consolidation is not None:
        lung_text = f", consolidation {consolidation.consolidation_volume_ml:.2f} mL{lung_text}"
    log.info(
        "series %s: %d slices, GGO %.2f mL on %d slices%s, %.1f s%s",
        series.series_instance_uid,
        volume.hu.shape[0],
        done.measurement.ggo_volume_ml,
        done.measurement.ggo_slice_count,
        lung_text,
        seconds,
        qc_text,
    )
    return SeriesOutcome(
        series=series,
        status=SeriesStatus.OK,
        n_slices=volume.hu.shape[0],
        slice_spacing_mm=volume.slice_spacing_mm,
        pixel_spacing_mm=volume.pixel_spacing_mm,
        measurement=done.measurement,
        lungs=lung_measurement,
        seg_path=seg_path,
        png_paths=pngs,
        seconds=seconds,
        processed_at=now_utc(),
        qc_flags=done.qc_flags,
        consolidation=consolidation,
    )


def process_series(
    cfg: RunConfig,
    series: SeriesInfo,
    segmenter: OnnxSegmenter,
    *,
    explainer: OnnxExplainer | None = None,
    progress: ProgressSink | None = None,
    volume_source: VolumeSource | None = None,
    cores: int,
) -> SeriesOutcome:
    """Load, segment, measure and write one eligible series (both stages, in this thread).

    Args:
        cfg: the run configuration.
        series: an eligible series.
        segmenter: the run's inference session.
        explainer: when given, GradCAM++ maps are written too (``cfg.explain_only``: only them).
        progress: optional progress sink (two units per slice: decode, then inference).
        volume_source: supplies the volume (decoded ahead of time); ``None`` decodes here.
        cores: cores of this process (:attr:`ggo_cli.host.HostLimits.cores`).

    Returns:
        The outcome; a series-level failure gives status ``failed`` with its reason.

    Raises:
        OutputError: when the output folder itself cannot be written (the run must stop).
    """
    done = compute_series(
        cfg,
        series,
        segmenter,
        explainer=explainer,
        progress=progress,
        volume_source=volume_source,
        cores=cores,
    )
    if isinstance(done, SeriesOutcome):
        return done
    return write_series(cfg, done, segmenter)
