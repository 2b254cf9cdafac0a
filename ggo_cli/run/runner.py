"""A whole ``segment`` (or ``explain``) run: locked, resumable, one CSV row per series.

:func:`run_segment` holds the output folder's lock, consults the state store per series
(:class:`~ggo_cli.run.plan.RunPlan`), runs the pipeline's stages where work is due (decode
ahead in worker processes, segment, write behind in a thread: :mod:`ggo_cli.run.stages`; or,
with ``--jobs N``, whole series in N worker processes: :mod:`ggo_cli.run.series_pool`; or,
with ``--ray``, whole series on the actors of a Ray cluster: :mod:`ggo_cli.run.ray_executor`), and
sends the results to the configured destinations (what earlier runs left pending first,
:mod:`ggo_cli.run.deliveries`) and rebuilds the CSV (with each series' follow-up against the
patient's prior study: :mod:`ggo_cli.run.followup`), the patients' trend pictures and the
manifests. With ``cfg.explain_only`` it writes GradCAM++ maps only and leaves the SEG, CSV,
state and queue of the folder alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from ..atomic_output import atomic_write_text
from ..config import MANIFEST_NAME, RunConfig
from ..dicom.discovery import discover_series
from ..domain import SeriesInfo, SeriesOutcome
from ..fsutil import TEMP_PREFIX, TEMP_SUFFIX, ensure_writable_dir
from ..host import HostLimits
from ..onnx.model_info import ModelInfo, load_model_info
from .deliveries import deliver_pass, merge_reports
from .followup_sr import update_followup_srs
from .lock import RunLock
from .manifest import build_manifest
from .outcomes import now_utc
from .plan import RunPlan, check_output_location
from .ray_executor import ClusterReport, run_on_ray
from .result import NO_SESSION, ProgressSink, RunResult, SessionSummary
from .series_pool import SeriesPool, auto_jobs, summarize
from .stages import run_staged
from .state import STATE_FOLDER, StateStore

log = logging.getLogger(__name__)

_TEMP_PATTERN = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


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


def _run_series(
    run: RunPlan,
    series_list: tuple[SeriesInfo, ...],
    progress: ProgressSink | None,
) -> tuple[tuple[SeriesOutcome, ...], int, SessionSummary | None, ClusterReport | None]:
    """Process every series: in this process (``--jobs 1``), in worker processes, or on a
    Ray cluster (``--ray``, when any series is to do).

    Returns:
        The outcomes in discovery order, the series processed at once (actors on Ray), where
        inference ran (``None`` when no series needed the model), and what the Ray cluster
        did (``None`` without Ray).
    """
    plans = {s.series_instance_uid: run.plan(s) for s in series_list}
    todo = [s for s in series_list if plans[s.series_instance_uid] is None]
    on_ray = run.cfg.ray_address is not None and bool(todo)
    jobs = 1 if on_ray else auto_jobs(run.cfg, todo)
    outcomes: list[SeriesOutcome] = []
    cluster: ClusterReport | None = None

    def finish(outcome: SeriesOutcome) -> None:
        run.finish(outcome)
        if progress is not None:
            progress.series_finished(outcome)
        outcomes.append(outcome)

    if on_ray or jobs > 1:
        for series in series_list:
            planned = plans[series.series_instance_uid]
            if planned is not None:
                finish(planned)
    if on_ray:
        try:
            summary, cluster = run_on_ray(run, todo, finish, progress)
        finally:  # an actor lost in a write, or the run stopped: only hidden temporary files
            _remove_stale_temps(run.cfg.out_dir)
        jobs = cluster.actors
    elif jobs > 1:
        summary = _run_in_workers(run, todo, jobs, finish, progress)
    else:
        run_staged(run, series_list, plans, todo, finish, progress)
        summary = summarize(run.sessions)
    order = {s.series_instance_uid: k for k, s in enumerate(series_list)}
    outcomes.sort(key=lambda o: order[o.series.series_instance_uid])
    return tuple(outcomes), jobs, summary, cluster


def _run_in_workers(
    run: RunPlan,
    todo: list[SeriesInfo],
    jobs: int,
    finish: Callable[[SeriesOutcome], None],
    progress: ProgressSink | None,
) -> SessionSummary | None:
    """Whole series in ``jobs`` worker processes; outcomes recorded as they arrive."""
    log.info("%d series to process, %d at a time in worker processes", len(todo), jobs)
    if progress is not None:  # slices of finished series (workers report no finer progress)
        progress.work_started(sum(len(s.files) for s in todo), f"slices, {jobs} workers")
    try:
        with (
            SeriesPool(
                run.cfg, run.model, run.sessions.explain_info, jobs, limits=run.limits
            ) as pool,
            closing(pool.run(todo)) as outcomes,  # stopped at once if recording fails
        ):
            for outcome in outcomes:
                if progress is not None:
                    progress.advance(len(outcome.series.files))
                finish(outcome)
            return pool.summary
    except BaseException:
        _remove_stale_temps(run.cfg.out_dir)  # of workers stopped in the middle of a write
        raise


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
    check_output_location(cfg.inputs, cfg.out_dir)
    model = model or load_model_info(cfg.model_path)
    ensure_writable_dir(cfg.out_dir, group_readable=cfg.group_readable)
    with (
        RunLock(cfg.out_dir, group_readable=cfg.group_readable),
        StateStore(cfg.out_dir, group_readable=cfg.group_readable) as store,
    ):
        _remove_stale_temps(cfg.out_dir)
        discovery = discover_series(cfg.inputs, cfg.selection)
        timings = {"discovery": time.perf_counter() - t0}
        if progress is not None:
            progress.discovered(len(discovery.series))
        run = RunPlan(cfg, model, store, limits=HostLimits.of_this_process())
        targets = () if cfg.explain_only else cfg.targets
        # What earlier runs left pending goes first, before any series is segmented.
        t_send = time.perf_counter()
        retried = deliver_pass(store.queue, targets, cfg.out_dir, at=now_utc(), enqueue=False)
        timings["delivery"] = time.perf_counter() - t_send
        t_series = time.perf_counter()
        outcomes, jobs, summary, cluster = _run_series(run, discovery.series, progress)
        timings["series"] = time.perf_counter() - t_series
        if not cfg.explain_only and cfg.sr:
            # Each SR reports its change since the prior study (known only now that every
            # series is done) before the second pass sends what this run wrote.
            update_followup_srs(store, cfg.out_dir, model, tree=cfg.tree)
        t_send = time.perf_counter()
        sent = deliver_pass(store.queue, targets, cfg.out_dir, at=now_utc(), enqueue=True)
        timings["delivery"] += time.perf_counter() - t_send
        deliveries = merge_reports(retried, sent)
        # The CSV with each series' follow-up, and the patients' trend pictures, from the store.
        csv_path = None if cfg.explain_only else run.write_csv(trends=True)
        timings["total"] = time.perf_counter() - t0
        result = RunResult(
            outcomes=outcomes,
            discovery=discovery,
            model=model,
            session=summary or NO_SESSION,
            csv_path=csv_path,
            manifest_path=None if cfg.explain_only else cfg.out_dir / MANIFEST_NAME,
            timings_s=timings,
            jobs=jobs,
            deliveries=deliveries,
        )
        document = build_manifest(cfg, result, started_at)
        if cluster is not None:
            document["cluster"] = cluster.to_dict()
        manifest = json.dumps(document, indent=2) + "\n"
        stamp = started_at.replace(":", "").replace("+0000", "Z")
        runs = cfg.out_dir / STATE_FOLDER / "runs"
        atomic_write_text(
            runs / f"{stamp}-{os.getpid()}-{time.time_ns() % 10**9:09d}.json",
            manifest,
            tree=cfg.tree,
        )
        if result.manifest_path is not None:
            atomic_write_text(result.manifest_path, manifest, tree=cfg.tree)
    return result
