"""The segment pipeline: discover -> load -> preprocess + infer -> measure -> write.

``run_segment`` drives a whole run; ``process_series`` one series. A failing series is
recorded in its :class:`~ggo_cli.domain.SeriesOutcome` and never stops the others. Nothing
here prints or exits: progress goes to an optional :class:`ProgressSink`, errors are raised
as :class:`~ggo_cli.errors.GgoError` for ``cli.py`` to map to exit codes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from . import __version__
from .config import CSV_NAME, MANIFEST_NAME, OVERLAY_NAME, SEG_NAME, PngMode, RunConfig
from .discovery import Discovery, discover_series
from .domain import CtVolume, GgoMeasurement, SeriesInfo, SeriesOutcome, SeriesStatus
from .errors import InputError, OutputError, SeriesError
from .fsutil import TEMP_PREFIX, TEMP_SUFFIX, atomic_write_text, ensure_writable_dir
from .inference import OnnxSegmenter
from .manifest import build_manifest
from .measurements import measure_ggo
from .model_info import ModelInfo, load_model_info
from .runlock import RunLock
from .state import STATE_FOLDER, StateStore, StoredSeries, options_digest, series_fingerprint
from .volume import load_volume
from .writers.dicom_seg import check_source_headers, write_seg
from .writers.overlay_png import write_overlay, write_slice_pngs
from .writers.report_csv import outcome_row, write_rows

log = logging.getLogger(__name__)

_TEMP_PATTERN = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


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
        outcomes: one per CT series found, in discovery order (unchanged series from the state
            store included, marked ``reused``).
        discovery: what the walk found.
        model: the model used.
        device: ``cpu`` or ``cuda:N`` (``""`` when no series needed the model).
        providers: ONNX Runtime providers in use.
        batch_size: final batch size.
        csv_path: the CSV written.
        manifest_path: the manifest written.
        timings_s: named wall times in seconds.
        n_unchanged: series skipped because the state store showed them already done.
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
    n_unchanged: int = 0

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


def _remove_stale_temps(out_dir: Path) -> None:
    """Delete temporary files a killed run left (only ours: ``.<name>.<12 hex>.tmp``)."""
    removed = 0
    for path in out_dir.rglob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        if _TEMP_PATTERN.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)


def _output_options(cfg: RunConfig, model: ModelInfo) -> dict[str, Any]:
    """The options that change a series' outputs (a change reprocesses the series)."""
    return {
        "ggo_cli": __version__,
        "threshold": model.threshold if cfg.threshold is None else cfg.threshold,
        "png": cfg.png_mode.value,
        "seg_series_number": cfg.seg_series_number,
        "seg_series_description": cfg.seg_series_description,
        "spacing_tolerance": cfg.selection.spacing_tolerance,
    }


def _still_arriving(series: SeriesInfo, settle_minutes: float) -> bool:
    """Whether a file of the series was modified within the last ``settle_minutes``."""
    if settle_minutes <= 0:
        return False
    newest = 0.0
    for path in series.files:
        try:
            newest = max(newest, path.stat().st_mtime)
        except OSError:
            continue
    return time.time() - newest < settle_minutes * 60


def _outcome_from_row(series: SeriesInfo, stored: StoredSeries) -> SeriesOutcome:
    """A SeriesOutcome for a series reused from the state store (nothing recomputed)."""
    row = stored.row
    measurement = None
    if row.get("ggo_voxels"):
        measurement = GgoMeasurement(
            voxel_volume_ml=float(row["voxel_volume_ml"]),
            ggo_voxels=int(row["ggo_voxels"]),
            ggo_volume_ml=float(row["ggo_volume_ml"]),
            ggo_slice_count=int(row["ggo_slice_count"] or 0),
        )
    return SeriesOutcome(
        series=series,
        status=SeriesStatus(stored.status),
        message=row.get("message", ""),
        n_slices=int(row.get("n_slices") or 0),
        measurement=measurement,
        processed_at=row.get("processed_at", ""),
        reused=True,
    )


def _reusable(
    stored: StoredSeries, cfg: RunConfig, fingerprint: str, model: ModelInfo, options: str
) -> bool:
    """Whether an earlier run's result still stands (same files, model, options; SEG present)."""
    if cfg.force:
        return False
    if (stored.fingerprint, stored.model_sha256, stored.options_digest) != (
        fingerprint,
        model.file_sha256,
        options,
    ):
        return False
    if stored.status == SeriesStatus.OK.value:
        return (cfg.out_dir / stored.row.get("seg_path", "")).is_file()
    return stored.status == SeriesStatus.FAILED.value


class _Run:
    """One locked run over an output folder: decides per series, records, rebuilds the CSV."""

    def __init__(self, cfg: RunConfig, model: ModelInfo, store: StateStore) -> None:
        self.cfg = cfg
        self.model = model
        self.store = store
        self.options = options_digest(_output_options(cfg, model))
        self.segmenter: OnnxSegmenter | None = None

    def record(self, outcome: SeriesOutcome, fingerprint: str) -> None:
        row = outcome_row(
            outcome,
            self.cfg.out_dir,
            model_name=self.model.name,
            model_version=self.model.version,
            include_patient_id=True,
        )
        self.store.put(
            outcome.series,
            fingerprint=fingerprint,
            model_sha256=self.model.file_sha256,
            options=self.options,
            row=row,
            updated_at=_now(),
        )
        self.write_csv()

    def write_csv(self) -> Path:
        return write_rows(
            self.store.rows(),
            self.cfg.out_dir / CSV_NAME,
            patient_column=self.cfg.patient_column,
            pseudonym_salt=self.cfg.pseudonym_salt,
        )

    def session(self) -> OnnxSegmenter:
        if self.segmenter is None:
            self.segmenter = OnnxSegmenter(
                self.model,
                device=self.cfg.device,
                batch_size=self.cfg.batch_size,
                threshold=self.cfg.threshold,
            )
        return self.segmenter

    def one(self, series: SeriesInfo, progress: ProgressSink | None) -> SeriesOutcome:
        fingerprint = series_fingerprint(series)
        if not series.eligible:
            outcome = _skipped(series)
        elif _still_arriving(series, self.cfg.settle_minutes):
            outcome = SeriesOutcome(
                series=series,
                status=SeriesStatus.PENDING,
                message=f"files modified within the last {self.cfg.settle_minutes:g} minutes "
                "(still arriving?); left for a later run (see --settle)",
                n_slices=len(series.files),
                processed_at=_now(),
            )
            log.info(
                "series %s (%s) pending: %s",
                series.series_instance_uid,
                series.location,
                outcome.message,
            )
        else:
            stored = self.store.get(series.series_instance_uid)
            if stored is not None and _reusable(
                stored, self.cfg, fingerprint, self.model, self.options
            ):
                log.debug(
                    "series %s unchanged since %s",
                    series.series_instance_uid,
                    stored.row.get("processed_at", "?"),
                )
                return _outcome_from_row(series, stored)
            outcome = process_series(self.cfg, series, self.session(), progress=progress)
        self.record(outcome, fingerprint)
        return outcome


def run_segment(
    cfg: RunConfig,
    *,
    progress: ProgressSink | None = None,
    model: ModelInfo | None = None,
) -> RunResult:
    """Run ``segment`` over the configured inputs: locked, resumable, one CSV row per series.

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
        RunLockedError: another run holds the output folder.
    """
    started_at = _now()
    t0 = time.perf_counter()
    _check_output_location(cfg)
    model = model or load_model_info(cfg.model_path)
    ensure_writable_dir(cfg.out_dir)
    with RunLock(cfg.out_dir), StateStore(cfg.out_dir) as store:
        _remove_stale_temps(cfg.out_dir)
        discovery = discover_series(cfg.inputs, cfg.selection)
        result = RunResult(outcomes=[], discovery=discovery, model=model)
        result.timings_s["discovery"] = time.perf_counter() - t0
        if progress is not None:
            progress.discovered(len(discovery.series))
        run = _Run(cfg, model, store)
        t_series = time.perf_counter()
        for series in discovery.series:
            outcome = run.one(series, progress)
            result.n_unchanged += outcome.reused
            if progress is not None:
                progress.series_finished(outcome)
            result.outcomes.append(outcome)
        result.timings_s["series"] = time.perf_counter() - t_series
        if run.segmenter is not None:
            result.device, result.providers = run.segmenter.device_label, run.segmenter.providers
            result.batch_size = run.segmenter.batch_size
        result.csv_path = run.write_csv()
        result.timings_s["total"] = time.perf_counter() - t0
        manifest = json.dumps(build_manifest(cfg, result, started_at), indent=2) + "\n"
        stamp = started_at.replace(":", "").replace("+0000", "Z")
        runs = cfg.out_dir / STATE_FOLDER / "runs"
        atomic_write_text(
            runs / f"{stamp}-{os.getpid()}-{time.time_ns() % 10**9:09d}.json", manifest
        )
        result.manifest_path = atomic_write_text(cfg.out_dir / MANIFEST_NAME, manifest)
    return result
