"""A whole ``segment`` (or ``explain``) run: locked, resumable, one CSV row per series.

:func:`run_segment` holds the output folder's lock, consults the state store per series
(:mod:`ggo_cli.run.state`), runs the pipeline's stages where work is due (decode ahead in worker
processes, segment, write behind in a thread: :class:`_Stages`; or, with ``--jobs N``, whole
series in N worker processes: :mod:`ggo_cli.run.series_pool`), and rebuilds the CSV and
manifests. With ``cfg.explain_only`` it writes GradCAM++ maps only and
leaves the SEG, CSV and state of the folder alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..analysis.quality import parse_flags
from ..config import CSV_NAME, MANIFEST_NAME, ExplainMode, RunConfig
from ..dicom.discovery import discover_series
from ..dicom.volume import DecodePool, default_decode_workers
from ..domain import (
    GgoMeasurement,
    LungMeasurement,
    SeriesInfo,
    SeriesOutcome,
    SeriesStatus,
)
from ..fsutil import (
    GROUP_FILE_MODE,
    TEMP_PREFIX,
    TEMP_SUFFIX,
    atomic_write_text,
    ensure_writable_dir,
    set_file_mode,
)
from ..onnx.explain_graph import default_explain_path, load_explain_info
from ..onnx.model_info import ModelInfo, load_model_info
from ..onnx.sessions import Sessions
from ..writers.report_csv import (
    PSEUDONYM_COLUMN,
    PSEUDONYM_SALT_TAG_KEY,
    outcome_row,
    pseudonymize_row,
    salt_tag,
    write_rows,
)
from .lock import RunLock
from .manifest import build_manifest
from .pipeline import (
    RETRY_NOTE,
    PreparedSeries,
    ProgressSink,
    RunResult,
    VolumeSource,
    check_output_location,
    compute_series,
    now_utc,
    prepare_series,
    skipped_outcome,
    write_series,
)
from .series_pool import SeriesPool, SessionSummary, auto_jobs, summarize
from .state import (
    PATIENT_ID_KEY,
    STATE_FOLDER,
    StateStore,
    StoredSeries,
    options_digest,
    series_fingerprint,
    settle_digest,
)

log = logging.getLogger(__name__)

_TEMP_PATTERN = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


_WORKER_DIED = "the worker process died"
"""How :mod:`ggo_cli.run.series_pool` starts the message of a series whose worker died."""


def _remove_stale_temps(out_dir: Path) -> None:
    """Delete temporary files a killed run left (only ours: ``.<name>.<12 hex>.tmp``).

    The walk never follows a link (a link planted in the output folder cannot lead it into
    other files), and only regular files are removed.
    """
    removed = 0
    for folder, _, names in os.walk(out_dir, followlinks=False):
        for name in names:
            if not (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)):
                continue
            path = Path(folder) / name
            if _TEMP_PATTERN.match(name) and stat.S_ISREG(os.lstat(path).st_mode):
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
        "explain": (
            None if cfg.explain is ExplainMode.OFF else [cfg.explain_layer, cfg.explain_slices]
        ),
        "lung_mask": cfg.lung_mask,
        "precision": cfg.precision.value,
    }


def _still_arriving(
    series: SeriesInfo, settle_minutes: float, *, seen_before: str, seen_now: str
) -> bool:
    """Whether a file of the series was modified within the last ``settle_minutes``.

    A modification time in the future (a modality's clock ahead, ``cp -p`` from such a
    machine) says nothing about when the file arrived: such a series is settled once a
    previous run saw it exactly as now (same files, sizes and modification times,
    :func:`~ggo_cli.run.state.settle_digest`), i.e. one run later, not on that future date.
    """
    if settle_minutes <= 0:
        return False
    newest = 0.0
    for path in series.files:
        try:
            newest = max(newest, path.stat().st_mtime)
        except OSError:
            continue
    now = time.time()
    if newest > now:
        return seen_before != seen_now
    return now - newest < settle_minutes * 60


def _retryable(stored: StoredSeries) -> bool:
    """Whether a stored failure may pass on another try (write error, crash, dead worker)."""
    message = stored.row.get("message", "")
    return message.endswith(RETRY_NOTE) or message.startswith(_WORKER_DIED)


def _stale_patient_keys(patient_column: str | None) -> tuple[str, ...]:
    """The patient keys stored rows must lose for this run's CSV (a PatientID unless asked)."""
    if patient_column == PATIENT_ID_KEY:
        return (PSEUDONYM_COLUMN, PSEUDONYM_SALT_TAG_KEY)
    if patient_column == PSEUDONYM_COLUMN:
        return (PATIENT_ID_KEY,)
    return (PATIENT_ID_KEY, PSEUDONYM_COLUMN, PSEUDONYM_SALT_TAG_KEY)


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
    lungs = None
    if row.get("lung_volume_ml"):
        lungs = LungMeasurement(
            **{name: float(row.get(name) or "nan") for name in LungMeasurement.__dataclass_fields__}
        )
    return SeriesOutcome(
        series=series,
        status=SeriesStatus(stored.status),
        message=row.get("message", ""),
        n_slices=int(row.get("n_slices") or 0),
        measurement=measurement,
        lungs=lungs,
        processed_at=row.get("processed_at", ""),
        reused=True,
        qc_flags=parse_flags(row.get("qc_flags", "")),  # a store older than the column: none
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
    # A deterministic failure stands until the files change; a transient one is retried.
    return stored.status == SeriesStatus.FAILED.value and not _retryable(stored)


class _Run:
    """One locked run over an output folder: decides per series, records, rebuilds the CSV."""

    def __init__(self, cfg: RunConfig, model: ModelInfo, store: StateStore) -> None:
        self.cfg = cfg
        self.model = model
        self.store = store
        self.options = options_digest(_output_options(cfg, model))
        # Fingerprint of each series as planned (before any work), recorded with its outcome,
        # and how its files looked (names, sizes, mtimes) for settling.
        self.fingerprints: dict[str, str] = {}
        self.seen: dict[str, str] = {}
        # PatientID is kept in the store only with --include-patient-id; --pseudonymize keeps
        # the pseudonym alone (no PHI at rest otherwise).
        self.patient_column = cfg.patient_column
        if not cfg.explain_only:
            scrubbed = store.scrub_patient_keys(_stale_patient_keys(cfg.patient_column))
            if scrubbed:
                log.info("erased the patient IDs of %d series from the state store", scrubbed)
        # Validate the explain graph before any work (a missing explain.onnx fails at once).
        explain_info = (
            None
            if cfg.explain is ExplainMode.OFF
            else load_explain_info(default_explain_path(model.path), model)
        )
        self.sessions = Sessions(cfg, model, explain_info)

    def record(self, outcome: SeriesOutcome, fingerprint: str) -> None:
        """Store a series' outcome and rebuild the CSV.

        A ``pending`` series that has a result (``ok``, ``failed`` or ``skipped``) keeps it:
        its row, volumes included, stays in the CSV until the new result replaces it; only
        how its files looked is remembered (and the log says it is pending).
        """
        uid = outcome.series.series_instance_uid
        seen = self.seen.get(uid, "")
        if outcome.status is SeriesStatus.PENDING:
            stored = self.store.get(uid)
            if stored is not None and stored.status != SeriesStatus.PENDING.value:
                self.store.mark_seen(uid, seen)
                return
        row = self._row(outcome)
        self.store.put(
            outcome.series,
            fingerprint=fingerprint,
            model_sha256=self.model.file_sha256,
            options=self.options,
            row=row,
            updated_at=now_utc(),
            seen=seen,
        )
        self.write_csv()

    def _row(self, outcome: SeriesOutcome) -> dict[str, str]:
        """The row to store: the CSV cells plus the patient column asked for (ID or pseudonym)."""
        row = outcome_row(
            outcome,
            self.cfg.out_dir,
            model_name=self.model.name,
            model_version=self.model.version,
            include_patient_id=self.patient_column is not None,
        )
        if self.cfg.pseudonym_salt is not None:
            row = pseudonymize_row(row, self.cfg.pseudonym_salt)
        return row

    def _add_patient_column(self, series: SeriesInfo, stored: StoredSeries) -> None:
        """Give a reused row the patient column the CSV now asks for, from the series' header.

        A row stored without it, or with a pseudonym made with another salt, gets it anew;
        nothing else in the row changes.
        """
        if self.patient_column == PATIENT_ID_KEY:
            if PATIENT_ID_KEY in stored.row:
                return
        elif self.cfg.pseudonym_salt is not None:
            if stored.row.get(PSEUDONYM_SALT_TAG_KEY) == salt_tag(self.cfg.pseudonym_salt):
                return
        else:
            return
        fresh = self._row(replace(_outcome_from_row(series, stored), reused=False))
        row = dict(stored.row)
        for key in (PATIENT_ID_KEY, PSEUDONYM_COLUMN, PSEUDONYM_SALT_TAG_KEY):
            row.pop(key, None)
            if key in fresh:
                row[key] = fresh[key]
        self.store.put(
            series,
            fingerprint=stored.fingerprint,
            model_sha256=stored.model_sha256,
            options=stored.options_digest,
            row=row,
            updated_at=now_utc(),
            seen=self.seen.get(series.series_instance_uid, stored.seen),
        )

    def write_csv(self) -> Path:
        path = write_rows(
            self.store.rows(),
            self.cfg.out_dir / CSV_NAME,
            patient_column=self.cfg.patient_column,
        )
        if self.cfg.group_readable:  # written owner-only like every output, then widened
            set_file_mode(path, GROUP_FILE_MODE)
        return path

    def plan(self, series: SeriesInfo) -> SeriesOutcome | None:
        """The outcome of a series that needs no work (skipped, pending, unchanged), else None."""
        fingerprint = series_fingerprint(series)
        uid = series.series_instance_uid
        self.fingerprints[uid] = fingerprint
        self.seen[uid] = settle_digest(series)
        if not series.eligible:
            return skipped_outcome(series)
        stored = self.store.get(uid)
        if _still_arriving(
            series,
            self.cfg.settle_minutes,
            seen_before=stored.seen if stored is not None else "",
            seen_now=self.seen[uid],
        ):
            outcome = SeriesOutcome(
                series=series,
                status=SeriesStatus.PENDING,
                message=f"files modified within the last {self.cfg.settle_minutes:g} minutes "
                "(still arriving?); left for a later run (see --settle)",
                n_slices=len(series.files),
                processed_at=now_utc(),
            )
            log.info("%s pending: %s", series.label, outcome.message)
            log.debug("%s is in %s", series.label, series.location)
            return outcome
        if self.cfg.explain_only:
            stored = None
        if stored is not None and _reusable(
            stored, self.cfg, fingerprint, self.model, self.options
        ):
            log.debug(
                "series %s unchanged since %s",
                series.series_instance_uid,
                stored.row.get("processed_at", "?"),
            )
            self._add_patient_column(series, stored)
            return _outcome_from_row(series, stored)
        return None

    def finish(self, outcome: SeriesOutcome) -> SeriesOutcome:
        """Record a series' outcome (not for unchanged ones, nor in explain-only runs)."""
        if not self.cfg.explain_only and not outcome.reused:
            self.record(outcome, self.fingerprints[outcome.series.series_instance_uid])
        return outcome


class _Stages:
    """Prepare ahead, segment here, write behind: at most about two series in memory.

    The next series to segment is decoded by the :class:`DecodePool` and its lungs segmented
    (in one prefetch thread) while the current one is segmented; a segmented series' SEG and
    PNGs are written by one writer thread while the next is segmented. A decode is only
    started once the write before it has finished, so one series is written while one is
    segmented (and its successor decodes), never more. Outcomes are recorded in discovery order.
    """

    def __init__(self, run: _Run, todo: list[SeriesInfo], pool: DecodePool) -> None:
        self.run = run
        self.todo = todo
        self.pool = pool
        self.prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ggo-decode")
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ggo-write")
        self.decodes: dict[str, Future[PreparedSeries]] = {}
        self.writing: Future[SeriesOutcome] | None = None
        self.next_index = 0
        self._lock = threading.Lock()

    def _decode_next(self) -> None:
        """Start decoding the next series of ``todo`` (thread-safe, once per series)."""
        with self._lock:
            if self.next_index >= len(self.todo):
                return
            series = self.todo[self.next_index]
            self.next_index += 1
            self.decodes[series.series_instance_uid] = self.prefetch.submit(
                prepare_series,
                self.run.cfg,
                series,
                n_channels=self.run.model.n_channels,
                pool=self.pool,
            )

    def source(self, series: SeriesInfo) -> VolumeSource:
        """The volume of ``series``: its prefetched decode (started now if not yet)."""
        with self._lock:
            future = self.decodes.pop(series.series_instance_uid, None)
        if future is None:
            self._decode_next()
            with self._lock:
                future = self.decodes.pop(series.series_instance_uid)
        held = [future]

        def take() -> PreparedSeries:
            # Hand the result over and drop the future: nothing here keeps the series' arrays
            # alive once the segmenting stage lets go of them.
            return held.pop().result()

        return take

    def schedule_next(self) -> None:
        """Decode the next series now, or once the pending write is done."""
        if self.writing is None:
            self._decode_next()
        else:
            self.writing.add_done_callback(lambda _: self._decode_next())

    def drain(self) -> SeriesOutcome | None:
        """Wait for the pending write; its outcome (re-raises a fatal output error)."""
        if self.writing is None:
            return None
        outcome = self.writing.result()
        self.writing = None
        return outcome

    def close(self) -> None:
        self.writer.shutdown(wait=True)
        self.prefetch.shutdown(wait=True, cancel_futures=True)


def _run_series(
    run: _Run,
    series_list: tuple[SeriesInfo, ...],
    progress: ProgressSink | None,
    result: RunResult,
) -> SessionSummary | None:
    """Process every series: in this process (``--jobs 1``) or in worker processes.

    Returns:
        Where inference ran, or ``None`` when no series needed the model.
    """
    plans = {s.series_instance_uid: run.plan(s) for s in series_list}
    todo = [s for s in series_list if plans[s.series_instance_uid] is None]
    result.jobs = auto_jobs(run.cfg, todo)
    if result.jobs > 1:
        summary = _run_in_workers(run, series_list, plans, todo, progress, result)
    else:
        _run_staged(run, series_list, plans, todo, progress, result)
        summary = summarize(run.sessions)
    order = {s.series_instance_uid: k for k, s in enumerate(series_list)}
    result.outcomes.sort(key=lambda o: order[o.series.series_instance_uid])
    return summary


def _run_in_workers(
    run: _Run,
    series_list: tuple[SeriesInfo, ...],
    plans: dict[str, SeriesOutcome | None],
    todo: list[SeriesInfo],
    progress: ProgressSink | None,
    result: RunResult,
) -> SessionSummary | None:
    """Whole series in ``result.jobs`` worker processes; outcomes recorded as they arrive."""
    for series in series_list:
        planned = plans[series.series_instance_uid]
        if planned is not None:
            _finish(run, planned, progress, result)
    log.info("%d series to process, %d at a time in worker processes", len(todo), result.jobs)
    if progress is not None:  # slices of finished series (workers report no finer progress)
        progress.work_started(sum(len(s.files) for s in todo), f"slices, {result.jobs} workers")
    try:
        with (
            SeriesPool(run.cfg, run.model, run.sessions.explain_info, result.jobs) as pool,
            closing(pool.run(todo)) as outcomes,  # stopped at once if recording fails
        ):
            for outcome in outcomes:
                if progress is not None:
                    progress.advance(len(outcome.series.files))
                _finish(run, outcome, progress, result)
            return pool.summary
    except BaseException:
        _remove_stale_temps(run.cfg.out_dir)  # of workers stopped in the middle of a write
        raise


def _run_staged(
    run: _Run,
    series_list: tuple[SeriesInfo, ...],
    plans: dict[str, SeriesOutcome | None],
    todo: list[SeriesInfo],
    progress: ProgressSink | None,
    result: RunResult,
) -> None:
    """Every series in this process, in discovery order, through the decode / segment /
    write stages (:class:`_Stages`)."""
    workers = run.cfg.decode_workers
    with DecodePool(default_decode_workers() if workers is None else workers) as pool:
        stages = _Stages(run, todo, pool)
        try:
            if todo:
                stages._decode_next()
            for series in series_list:
                planned = plans[series.series_instance_uid]
                if planned is not None:
                    outcomes = [planned]
                else:
                    volume_source = stages.source(series)
                    stages.schedule_next()  # decodes while this series is segmented
                    done = compute_series(
                        run.cfg,
                        series,
                        run.sessions.segmenter(),
                        explainer=run.sessions.explainer(),
                        progress=progress,
                        volume_source=volume_source,
                    )
                    outcomes = []
                    previous = stages.drain()
                    if previous is not None:
                        outcomes.append(previous)
                    if isinstance(done, SeriesOutcome):
                        outcomes.append(done)
                    else:
                        stages.writing = stages.writer.submit(
                            write_series, run.cfg, done, run.sessions.segmenter()
                        )
                for outcome in outcomes:
                    _finish(run, outcome, progress, result)
            last = stages.drain()
            if last is not None:
                _finish(run, last, progress, result)
        finally:
            stages.close()


def _finish(
    run: _Run, outcome: SeriesOutcome, progress: ProgressSink | None, result: RunResult
) -> None:
    run.finish(outcome)
    result.n_unchanged += outcome.reused
    if progress is not None:
        progress.series_finished(outcome)
    result.outcomes.append(outcome)


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
    started_at = now_utc()
    t0 = time.perf_counter()
    check_output_location(cfg)
    model = model or load_model_info(cfg.model_path)
    ensure_writable_dir(cfg.out_dir, group_readable=cfg.group_readable)
    with (
        RunLock(cfg.out_dir, group_readable=cfg.group_readable),
        StateStore(cfg.out_dir, group_readable=cfg.group_readable) as store,
    ):
        _remove_stale_temps(cfg.out_dir)
        discovery = discover_series(cfg.inputs, cfg.selection)
        result = RunResult(outcomes=[], discovery=discovery, model=model)
        result.timings_s["discovery"] = time.perf_counter() - t0
        if progress is not None:
            progress.discovered(len(discovery.series))
        run = _Run(cfg, model, store)
        t_series = time.perf_counter()
        summary = _run_series(run, discovery.series, progress, result)
        result.timings_s["series"] = time.perf_counter() - t_series
        if summary is not None:
            result.device, result.providers = summary.device, list(summary.providers)
            result.batch_size, result.precision = summary.batch_size, summary.precision
            result.int8_recipe, result.variant_check = summary.int8_recipe, summary.variant_check
        if not cfg.explain_only:
            result.csv_path = run.write_csv()
        result.timings_s["total"] = time.perf_counter() - t0
        manifest = json.dumps(build_manifest(cfg, result, started_at), indent=2) + "\n"
        stamp = started_at.replace(":", "").replace("+0000", "Z")
        runs = cfg.out_dir / STATE_FOLDER / "runs"
        atomic_write_text(
            runs / f"{stamp}-{os.getpid()}-{time.time_ns() % 10**9:09d}.json",
            manifest,
            tree=cfg.tree,
        )
        if not cfg.explain_only:
            result.manifest_path = atomic_write_text(
                cfg.out_dir / MANIFEST_NAME, manifest, tree=cfg.tree
            )
    return result
