"""The segment pipeline: discover -> load -> preprocess + infer -> measure -> write.

``run_segment`` drives a whole run; ``process_series`` one series. A failing series is
recorded in its :class:`~ggo_cli.domain.SeriesOutcome` and never stops the others. Nothing
here prints or exits: progress goes to an optional :class:`ProgressSink`, errors are raised
as :class:`~ggo_cli.errors.GgoError` for ``cli.py`` to map to exit codes.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from . import __version__
from .config import CSV_NAME, MANIFEST_NAME, OVERLAY_NAME, SEG_NAME, PngMode, RunConfig
from .discovery import Discovery, discover_series
from .domain import CtVolume, SeriesInfo, SeriesOutcome, SeriesStatus
from .errors import InputError, OutputError, SeriesError
from .fsutil import atomic_write_text, ensure_writable_dir
from .inference import OnnxSegmenter
from .measurements import measure_ggo
from .model_info import ModelInfo, load_model_info
from .volume import load_volume
from .writers.dicom_seg import check_source_headers, write_seg
from .writers.overlay_png import write_overlay, write_slice_pngs
from .writers.report_csv import write_csv

log = logging.getLogger(__name__)

_VERSIONED_PACKAGES = ("numpy", "pydicom", "highdicom", "onnxruntime-gpu", "onnxruntime", "pillow")


class ProgressSink(Protocol):
    """Receives progress events (implemented by ``cli.py`` with rich)."""

    def discovered(self, n_series: int) -> None:
        """Discovery found ``n_series`` CT series (eligible or not)."""

    def series_started(self, series: SeriesInfo, n_slices: int) -> None:
        """A series starts; ``n_slices`` units of work follow."""

    def advance(self, n: int) -> None:
        """``n`` more units of the current series are done."""

    def series_finished(self, outcome: SeriesOutcome) -> None:
        """A series ended (ok, skipped or failed)."""


@dataclass(slots=True)
class RunResult:
    """Everything a run produced, for the summary, the manifest and the exit code.

    Attributes:
        outcomes: one per CT series found, in discovery order.
        discovery: what the walk found.
        model: the model used.
        device: ``cpu`` or ``cuda:N`` (``""`` when no series needed the model).
        providers: ONNX Runtime providers in use.
        batch_size: final batch size.
        csv_path: the CSV written.
        manifest_path: the manifest written.
        timings_s: named wall times in seconds.
    """

    outcomes: list[SeriesOutcome]
    discovery: Discovery
    model: ModelInfo
    device: str = ""
    providers: list[str] = field(default_factory=list)
    batch_size: int = 0
    csv_path: Path | None = None
    manifest_path: Path | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    def count(self, status: SeriesStatus) -> int:
        """Number of series with the given status."""
        return sum(o.status is status for o in self.outcomes)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def series_dir(out_dir: Path, series: SeriesInfo) -> Path:
    """Output folder of a series: ``<out>/<StudyInstanceUID>/<SeriesInstanceUID>``."""
    return out_dir / series.study_instance_uid / series.series_instance_uid


def _skipped(series: SeriesInfo) -> SeriesOutcome:
    return SeriesOutcome(
        series=series,
        status=SeriesStatus.SKIPPED,
        message=series.skip_reason or "",
        n_slices=len(series.files),
        processed_at=_now(),
    )


def _write_outputs(
    cfg: RunConfig, volume: CtVolume, segmenter: OnnxSegmenter, prediction: Any, folder: Path
) -> tuple[Path, tuple[Path, ...]]:
    """Write the SEG (read back and checked) and the PNGs of one series."""
    model = segmenter.model
    seg_path = write_seg(
        volume,
        prediction,
        model,
        folder / SEG_NAME,
        series_number=cfg.seg_series_number,
        series_description=cfg.seg_series_description,
        software_version=__version__,
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
            )
        )
    return seg_path, tuple(pngs)


def process_series(
    cfg: RunConfig,
    series: SeriesInfo,
    segmenter: OnnxSegmenter,
    *,
    progress: ProgressSink | None = None,
) -> SeriesOutcome:
    """Load, segment, measure and write one eligible series.

    Args:
        cfg: the run configuration.
        series: an eligible series.
        segmenter: the run's inference session.
        progress: optional progress sink (two units per slice: decode, then inference).

    Returns:
        The outcome; a series-level failure gives status ``failed`` with its reason.

    Raises:
        OutputError: when the output folder itself cannot be written (the run must stop).
    """
    start = time.perf_counter()
    if progress is not None:
        progress.series_started(series, 2 * len(series.files))
    advance = progress.advance if progress is not None else None
    volume: CtVolume | None = None
    try:
        volume = load_volume(series, cfg.selection, on_slice=advance)
        check_source_headers(volume.datasets, series.series_instance_uid)
        prediction = segmenter.predict(volume, on_slices=advance)
        measurement = measure_ggo(prediction.ggo, volume.voxel_volume_ml)
        seg_path, pngs = _write_outputs(
            cfg, volume, segmenter, prediction, series_dir(cfg.out_dir, series)
        )
    except (SeriesError, OutputError) as exc:
        if isinstance(exc, OutputError) and exc.fatal:
            raise
        log.error("series %s (%s) failed: %s", series.series_instance_uid, series.location, exc)
        return SeriesOutcome(
            series=series,
            status=SeriesStatus.FAILED,
            message=str(exc),
            n_slices=volume.hu.shape[0] if volume is not None else len(series.files),
            slice_spacing_mm=volume.slice_spacing_mm if volume is not None else None,
            pixel_spacing_mm=volume.pixel_spacing_mm if volume is not None else None,
            seconds=time.perf_counter() - start,
            processed_at=_now(),
        )
    except Exception as exc:  # noqa: BLE001 - a bug on one series must not stop the others
        log.error(
            "series %s (%s) failed with an unexpected %s (a bug; --debug shows the traceback)",
            series.series_instance_uid,
            series.location,
            type(exc).__name__,
        )
        log.debug("traceback", exc_info=True)
        return SeriesOutcome(
            series=series,
            status=SeriesStatus.FAILED,
            message=f"unexpected {type(exc).__name__}: {exc}",
            n_slices=len(series.files),
            seconds=time.perf_counter() - start,
            processed_at=_now(),
        )
    seconds = time.perf_counter() - start
    log.info(
        "series %s: %d slices, GGO %.2f mL on %d slices, %.1f s",
        series.series_instance_uid,
        volume.hu.shape[0],
        measurement.ggo_volume_ml,
        measurement.ggo_slice_count,
        seconds,
    )
    return SeriesOutcome(
        series=series,
        status=SeriesStatus.OK,
        n_slices=volume.hu.shape[0],
        slice_spacing_mm=volume.slice_spacing_mm,
        pixel_spacing_mm=volume.pixel_spacing_mm,
        measurement=measurement,
        seg_path=seg_path,
        png_paths=pngs,
        seconds=seconds,
        processed_at=_now(),
    )


def _check_output_location(cfg: RunConfig) -> None:
    out = cfg.out_dir.resolve()
    for source in cfg.inputs:
        if not source.exists():
            raise InputError(f"input not found: {source} (give an existing file or folder)")
        root = source.resolve()
        root = root if root.is_dir() else root.parent
        if out == root or root in out.parents:
            raise InputError(
                f"output folder {cfg.out_dir} is inside the input {source}; choose an output "
                "folder outside the input tree (the input is never modified)"
            )


def _versions() -> dict[str, str]:
    versions = {"ggo-cli": __version__, "python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _manifest(cfg: RunConfig, result: RunResult, started_at: str) -> dict[str, Any]:
    """The run manifest: versions, model, device, counts, timings; no patient data."""
    model = result.model
    return {
        "tool": "ggo-cli",
        "started_at": started_at,
        "finished_at": _now(),
        "versions": _versions(),
        "host": {"platform": platform.platform(), "machine": platform.machine()},
        "options": {
            "device": cfg.device,
            "batch_size": cfg.batch_size,
            "threshold": cfg.threshold,
            "png": cfg.png_mode.value,
            "min_slices": cfg.selection.min_slices,
            "axial_tolerance_deg": cfg.selection.axial_tolerance_deg,
            "spacing_tolerance": cfg.selection.spacing_tolerance,
            "include_patient_id": cfg.include_patient_id,
            "seg_series_number": cfg.seg_series_number,
        },
        "model": {
            "name": model.name,
            "version": model.version,
            "architecture": model.architecture,
            "path": str(model.path),
            "file_sha256": model.file_sha256,
            "graph_sha256": model.recorded_sha256,
            "threshold": model.threshold,
            "window_center_hu": model.window_center_hu,
            "window_width_hu": model.window_width_hu,
        },
        "device": {
            "requested": cfg.device,
            "used": result.device,
            "providers": result.providers,
            "batch_size": result.batch_size,
        },
        "counts": {
            "files": result.discovery.n_files,
            "ct_instances": result.discovery.n_dicom_images,
            "ignored_files": result.discovery.n_ignored,
            "duplicate_instances": result.discovery.n_duplicates,
            "series": len(result.outcomes),
            "ok": result.count(SeriesStatus.OK),
            "skipped": result.count(SeriesStatus.SKIPPED),
            "failed": result.count(SeriesStatus.FAILED),
            "slices_segmented": sum(
                o.n_slices for o in result.outcomes if o.status is SeriesStatus.OK
            ),
        },
        "timings_s": {k: round(v, 3) for k, v in result.timings_s.items()},
        "series": [
            {
                "study_instance_uid": o.series.study_instance_uid,
                "series_instance_uid": o.series.series_instance_uid,
                "status": o.status.value,
                "message": o.message,
                "n_slices": o.n_slices,
                "ggo_volume_ml": o.measurement.ggo_volume_ml if o.measurement else None,
                "seconds": round(o.seconds, 3),
            }
            for o in result.outcomes
        ],
    }


def run_segment(
    cfg: RunConfig,
    *,
    progress: ProgressSink | None = None,
    model: ModelInfo | None = None,
) -> RunResult:
    """Run ``segment`` over the configured inputs and write CSV and manifest.

    Args:
        cfg: the run configuration.
        progress: optional progress sink.
        model: an already validated model (otherwise loaded from ``cfg.model_path``).

    Returns:
        The :class:`RunResult` (the caller decides the exit code).

    Raises:
        InputError: bad inputs or output location.
        ModelError: model missing, corrupt or off contract; device unusable.
        OutputError: the output folder cannot be written.
    """
    started_at = _now()
    t0 = time.perf_counter()
    _check_output_location(cfg)
    model = model or load_model_info(cfg.model_path)
    ensure_writable_dir(cfg.out_dir)
    discovery = discover_series(cfg.inputs, cfg.selection)
    result = RunResult(outcomes=[], discovery=discovery, model=model)
    result.timings_s["discovery"] = time.perf_counter() - t0
    if progress is not None:
        progress.discovered(len(discovery.series))
    segmenter: OnnxSegmenter | None = None
    if discovery.eligible:
        t_model = time.perf_counter()
        segmenter = OnnxSegmenter(
            model, device=cfg.device, batch_size=cfg.batch_size, threshold=cfg.threshold
        )
        result.device, result.providers = segmenter.device_label, segmenter.providers
        result.timings_s["session"] = time.perf_counter() - t_model
    t_series = time.perf_counter()
    for series in discovery.series:
        if not series.eligible or segmenter is None:
            outcome = _skipped(series)
            if progress is not None:
                progress.series_finished(outcome)
            result.outcomes.append(outcome)
            continue
        outcome = process_series(cfg, series, segmenter, progress=progress)
        if progress is not None:
            progress.series_finished(outcome)
        result.outcomes.append(outcome)
    result.timings_s["series"] = time.perf_counter() - t_series
    if segmenter is not None:
        result.batch_size = segmenter.batch_size
    result.csv_path = write_csv(
        result.outcomes,
        cfg.out_dir / CSV_NAME,
        out_dir=cfg.out_dir,
        model_name=model.name,
        model_version=model.version,
        include_patient_id=cfg.include_patient_id,
    )
    result.timings_s["total"] = time.perf_counter() - t0
    manifest_path = cfg.out_dir / MANIFEST_NAME
    atomic_write_text(
        manifest_path, json.dumps(_manifest(cfg, result, started_at), indent=2) + "\n"
    )
    result.manifest_path = manifest_path
    return result


def summary_json(result: RunResult) -> dict[str, Any]:
    """The ``--json`` stdout summary (no patient data)."""
    return {
        "csv": str(result.csv_path) if result.csv_path else None,
        "manifest": str(result.manifest_path) if result.manifest_path else None,
        "device": result.device,
        "counts": {
            "series": len(result.outcomes),
            "ok": result.count(SeriesStatus.OK),
            "skipped": result.count(SeriesStatus.SKIPPED),
            "failed": result.count(SeriesStatus.FAILED),
        },
        "series": [
            {
                "study_instance_uid": o.series.study_instance_uid,
                "series_instance_uid": o.series.series_instance_uid,
                "status": o.status.value,
                "message": o.message,
                "ggo_volume_ml": o.measurement.ggo_volume_ml if o.measurement else None,
                "seg_path": str(o.seg_path) if o.seg_path else None,
            }
            for o in result.outcomes
        ],
    }
