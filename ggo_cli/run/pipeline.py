"""The segment pipeline: discover -> load -> preprocess + infer -> measure -> write.

``run_segment`` drives a whole run; ``process_series`` one series. A failing series is
recorded in its :class:`~ggo_cli.domain.SeriesOutcome` and never stops the others. Nothing
here prints or exits: progress goes to an optional :class:`ProgressSink`, errors are raised
as :class:`~ggo_cli.errors.GgoError` for ``cli.py`` to map to exit codes.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .. import __version__
from ..analysis.explainer import OnnxExplainer
from ..analysis.lungs import LungMasks, segment_lungs
from ..analysis.masks import keep_inside_lungs, model_masks, segment_planes
from ..analysis.measurements import lung_measurements, measure_ggo
from ..analysis.quality import assess_series, format_flags
from ..analysis.segmenter import OnnxSegmenter
from ..config import (
    GRADCAM_FOLDER,
    GRADCAM_NPZ_NAME,
    OVERLAY_NAME,
    SEG_NAME,
    PngMode,
    RunConfig,
)
from ..dicom.discovery import Discovery
from ..dicom.volume import DecodePool, load_volume
from ..domain import (
    CtVolume,
    GgoMeasurement,
    LungMeasurement,
    Prediction,
    SeriesInfo,
    SeriesOutcome,
    SeriesStatus,
)
from ..errors import InputError, OutputError, SeriesError, UnsupportedSeriesError
from ..host import release_freed_memory
from ..onnx.model_info import ModelInfo
from ..writers.dicom_seg import check_source_headers, write_seg
from ..writers.gradcam_png import write_gradcam_npz, write_gradcam_pngs
from ..writers.overlay_png import write_overlay, write_slice_pngs

log = logging.getLogger(__name__)

_TEMP_PATTERN = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")

RETRY_NOTE = " (retried by the next run)"
"""Ends the message of a failure that may pass on another try (a write error, a crash): the
state store does not keep such a result, so the next run retries the series without
``--force``. A :class:`~ggo_cli.errors.SeriesError` (bad geometry, missing attributes) is
deterministic and stays failed until the series' files change."""


class ProgressSink(Protocol):
    """Receives progress events (implemented by ``cli.py`` with rich)."""

    def discovered(self, n_series: int) -> None:
        """Discovery found ``n_series`` CT series (eligible or not)."""

    def series_started(self, series: SeriesInfo, n_slices: int) -> None:
        """A series starts; ``n_slices`` units of work follow."""

    def work_started(self, n_units: int, description: str) -> None:
        """Units of work not tied to one series follow (series in worker processes)."""

    def advance(self, n: int) -> None:
        """``n`` more units of the current series are done."""

    def series_finished(self, outcome: SeriesOutcome) -> None:
        """A series ended (ok, skipped or failed)."""


@dataclass(slots=True)
class RunResult:
    """Everything a run produced, for the summary, the manifest and the exit code.

    Attributes:
        outcomes: one per CT series found, in discovery order (unchanged series from the state
            store included, marked ``reused``).
        discovery: what the walk found.
        model: the model used.
        device: ``cpu`` or ``cuda:N`` (``""`` when no series needed the model).
        providers: ONNX Runtime providers in use.
        batch_size: final batch size.
        precision: the model variant that ran (``fp32``, ``fp16`` or ``int8``; ``""`` if none).
        int8_recipe: the int8 recipe that ran (``""`` unless int8).
        variant_check: the verdict of the variant's self-check against float32 on this
            machine (see :class:`ggo_cli.onnx.variant_check.VariantCheck`), when one was considered.
        csv_path: the CSV written.
        manifest_path: the manifest written.
        timings_s: named wall times in seconds.
        n_unchanged: series skipped because the state store showed them already done.
        jobs: series processed at once (worker processes when more than 1).
    """

    outcomes: list[SeriesOutcome]
    discovery: Discovery
    model: ModelInfo
    device: str = ""
    providers: list[str] = field(default_factory=list)
    batch_size: int = 0
    precision: str = ""
    int8_recipe: str = ""
    variant_check: dict[str, Any] | None = None
    csv_path: Path | None = None
    manifest_path: Path | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    n_unchanged: int = 0
    jobs: int = 1

    def count(self, status: SeriesStatus) -> int:
        """Number of series with the given status."""
        return sum(o.status is status for o in self.outcomes)


def now_utc() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def series_dir(out_dir: Path, series: SeriesInfo) -> Path:
    """Output folder of a series: ``<out>/<StudyInstanceUID>/<SeriesInstanceUID>``."""
    return out_dir / series.study_instance_uid / series.series_instance_uid


def skipped_outcome(series: SeriesInfo) -> SeriesOutcome:
    """The outcome of a series that broke a selection rule."""
    return SeriesOutcome(
        series=series,
        status=SeriesStatus.SKIPPED,
        message=series.skip_reason or "",
        n_slices=len(series.files),
        processed_at=now_utc(),
    )


def _write_outputs(
    cfg: RunConfig,
    volume: CtVolume,
    segmenter: OnnxSegmenter,
    prediction: Prediction,
    lungs: LungMasks | None,
    folder: Path,
) -> tuple[Path, tuple[Path, ...]]:
    """Write the SEG (read back and checked) and the PNGs of one series."""
    model = segmenter.model
    seg_path = write_seg(
        volume,
        prediction,
        model,
        folder / SEG_NAME,
        lungs=lungs,
        series_number=cfg.seg_series_number,
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


def _write_explanation(
    cfg: RunConfig,
    volume: CtVolume,
    prediction: Prediction,
    explainer: OnnxExplainer,
    folder: Path,
) -> tuple[Path, ...]:
    """Write ``gradcam.npz`` and ``gradcam/slice_NNNN.png`` of one series."""
    explanation = explainer.explain(volume, prediction, slices=cfg.explain_slices)
    npz = write_gradcam_npz(folder / GRADCAM_NPZ_NAME, explanation, tree=cfg.tree)
    pngs = write_gradcam_pngs(
        volume,
        explanation,
        folder / GRADCAM_FOLDER,
        window_center_hu=explainer.model.window_center_hu,
        window_width_hu=explainer.model.window_width_hu,
        tree=cfg.tree,
    )
    log.info(
        "series %s: GradCAM++ (%s) on %d slices",
        volume.series.series_instance_uid,
        explanation.layer,
        len(explanation.slice_indices),
    )
    return (npz, *pngs)


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
    cfg: RunConfig,
    series: SeriesInfo,
    *,
    n_channels: int = 1,
    pool: DecodePool | None = None,
    on_slice: Callable[[int], None] | None = None,
) -> PreparedSeries:
    """Decode a series and segment its lungs (the CPU work that needs no model).

    With the lung mask on, the lungs are written straight into the SEG's segment planes
    (``n_channels`` model channels, then the two lungs), which inference then fills: the
    masks of a series exist once.

    Raises:
        SeriesError: the series cannot be loaded or its lungs not segmented.
    """
    volume = load_volume(series, cfg.selection, on_slice=on_slice, pool=pool)
    if not cfg.lung_mask:
        return PreparedSeries(volume, None)
    planes, lungs = segment_planes(volume.hu.shape, n_channels)
    segment_lungs(volume, out=lungs)
    release_freed_memory()  # the lung mask's temporaries, kept by glibc's thread arenas
    return PreparedSeries(volume, lungs, planes)


def _failed(
    series: SeriesInfo, exc: Exception, started: float, volume: CtVolume | None
) -> SeriesOutcome:
    """The outcome of a series that failed with ``exc`` (fatal output errors re-raised)."""
    if isinstance(exc, OutputError) and exc.fatal:
        raise exc
    if isinstance(exc, SeriesError | OutputError):
        log.error("%s failed: %s", series.label, series.redact(str(exc)))
        log.debug("%s is in %s", series.label, series.location)
        return SeriesOutcome(
            series=series,
            status=SeriesStatus.FAILED,
            message=str(exc) + ("" if isinstance(exc, SeriesError) else RETRY_NOTE),
            n_slices=volume.hu.shape[0] if volume is not None else len(series.files),
            slice_spacing_mm=volume.slice_spacing_mm if volume is not None else None,
            pixel_spacing_mm=volume.pixel_spacing_mm if volume is not None else None,
            seconds=time.perf_counter() - started,
            processed_at=now_utc(),
        )
    log.error(
        "%s failed with an unexpected %s (a bug; --debug shows the traceback)",
        series.label,
        type(exc).__name__,
    )
    log.debug("%s is in %s", series.label, series.location)
    log.debug("traceback", exc_info=exc)
    return SeriesOutcome(
        series=series,
        status=SeriesStatus.FAILED,
        message=f"unexpected {type(exc).__name__}: {exc}{RETRY_NOTE}",
        n_slices=len(series.files),
        seconds=time.perf_counter() - started,
        processed_at=now_utc(),
    )


def compute_series(
    cfg: RunConfig,
    series: SeriesInfo,
    segmenter: OnnxSegmenter,
    *,
    explainer: OnnxExplainer | None = None,
    progress: ProgressSink | None = None,
    volume_source: VolumeSource | None = None,
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
            prepared = prepare_series(cfg, series, n_channels=n_channels, on_slice=advance)
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
        if lungs is not None:
            # GGO kept inside the lungs, in place; masks not in the planes are stacked (a
            # copy) when the SEG is built.
            prediction = keep_inside_lungs(prediction, lungs)
            lung_measurement = lung_measurements(lungs, prediction.ggo, volume.voxel_volume_ml)
        measurement = measure_ggo(prediction.ggo, volume.voxel_volume_ml)
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
        if explainer is not None:
            pngs = _write_explanation(cfg, volume, prediction, explainer, folder)
    except Exception as exc:  # noqa: BLE001 - one series' failure never stops the run
        return _failed(series, exc, started, volume)
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
    )


def write_series(cfg: RunConfig, done: ComputedSeries, segmenter: OnnxSegmenter) -> SeriesOutcome:
    """Write the SEG (verified) and PNGs of a computed series and return its outcome.

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
            seg_path, written = _write_outputs(
                cfg, volume, segmenter, done.prediction, done.lungs, done.folder
            )
            pngs = written + pngs
    except Exception as exc:  # noqa: BLE001 - one series' failure never stops the run
        return _failed(series, exc, done.started, volume)
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
    )


def process_series(
    cfg: RunConfig,
    series: SeriesInfo,
    segmenter: OnnxSegmenter,
    *,
    explainer: OnnxExplainer | None = None,
    progress: ProgressSink | None = None,
    volume_source: VolumeSource | None = None,
) -> SeriesOutcome:
    """Load, segment, measure and write one eligible series (both stages, in this thread).

    Args:
        cfg: the run configuration.
        series: an eligible series.
        segmenter: the run's inference session.
        explainer: when given, GradCAM++ maps are written too (``cfg.explain_only``: only them).
        progress: optional progress sink (two units per slice: decode, then inference).
        volume_source: supplies the volume (decoded ahead of time); ``None`` decodes here.

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
    )
    if isinstance(done, SeriesOutcome):
        return done
    return write_series(cfg, done, segmenter)


def check_output_location(cfg: RunConfig) -> None:
    """Refuse missing inputs and input and output folders nested either way.

    An output folder inside an input would be walked as input; an input inside the output
    folder could be touched by the run (the sweep of stale temporary files, replaced outputs).
    Both are compared after resolving links, so a link cannot hide the nesting.

    Raises:
        InputError: an input is missing, or an input and the output folder nest.
    """
    out = cfg.out_dir.resolve()
    for source in cfg.inputs:
        if not source.exists():
            raise InputError(f"input not found: {source} (give an existing file or folder)")
        resolved = source.resolve()
        root = resolved if resolved.is_dir() else resolved.parent
        if out == root or root in out.parents:
            raise InputError(
                f"output folder {cfg.out_dir} is inside the input {source}; choose an output "
                "folder outside the input tree (the input is never modified)"
            )
        if out in resolved.parents:
            raise InputError(
                f"input {source} is inside the output folder {cfg.out_dir}; move the input "
                "or choose an output folder outside it (ggo-cli cleans its output folder)"
            )


