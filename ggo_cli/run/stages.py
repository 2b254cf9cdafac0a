"""The staged pipeline of ``--jobs 1``: decode ahead, segment here, write behind.

One series is decoded (and its lungs segmented) in a prefetch thread while the one before it
is segmented, and a segmented series is written by a writer thread while the next is
segmented (:class:`Stages`). When the memory available cannot hold the next series beside the
current one (:func:`ggo_cli.run.memory.room_to_prefetch`), the next is decoded only once the
current one is written: one series in memory instead of two.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

from ..dicom.decode_pool import DecodePool
from ..domain import SeriesInfo, SeriesOutcome
from .memory import room_to_prefetch
from .pipeline import PreparedSeries, VolumeSource, compute_series, prepare_series, write_series
from .plan import RunPlan
from .result import ProgressSink


class Stages:
    """Prepare ahead, segment here, write behind: at most about two series in memory.

    The next series to segment is decoded by the :class:`DecodePool` and its lungs segmented
    (in one prefetch thread) while the current one is segmented; a segmented series' SEG and
    PNGs are written by one writer thread while the next is segmented. A decode is only
    started once the write before it has finished, so one series is written while one is
    segmented (and its successor decodes), never more. Outcomes are recorded in discovery order.

    Args:
        run: the run's plan (its configuration, model and sessions).
        todo: the series to segment, in order.
        pool: decodes compressed pixel data in worker processes.
    """

    def __init__(self, run: RunPlan, todo: list[SeriesInfo], pool: DecodePool) -> None:
        self.run = run
        self.todo = todo
        self.pool = pool
        self.prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ggo-decode")
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ggo-write")
        self.decodes: dict[str, Future[PreparedSeries]] = {}
        self.writing: Future[SeriesOutcome] | None = None
        self.next_index = 0
        self._lock = threading.Lock()

    def decode_next(self) -> None:
        """Start decoding the next series of ``todo`` (thread-safe, once per series)."""
        with self._lock:
            if self.next_index >= len(self.todo):
                return
            series = self.todo[self.next_index]
            self.next_index += 1
            self.decodes[series.series_instance_uid] = self.prefetch.submit(
                prepare_series,
                series,
                self.run.cfg.selection,
                lung_mask=self.run.cfg.lung_mask,
                n_channels=self.run.model.n_channels,
                pool=self.pool,
                cores=self.run.limits.cores,
            )

    def source(self, series: SeriesInfo) -> VolumeSource:
        """The volume of ``series``: its prefetched decode, or one started now, once the write
        in progress has finished (its series' arrays gone before these are decoded)."""
        with self._lock:
            future = self.decodes.pop(series.series_instance_uid, None)
        if future is None:
            if self.writing is not None:
                wait([self.writing])
            self.decode_next()
            with self._lock:
                future = self.decodes.pop(series.series_instance_uid)
        held = [future]

        def take() -> PreparedSeries:
            # Hand the result over and drop the future: nothing here keeps the series' arrays
            # alive once the segmenting stage lets go of them.
            return held.pop().result()

        return take

    def schedule_next(self) -> None:
        """Decode the next series now, or once the pending write is done; not ahead at all
        when the memory available cannot hold it beside the current one (:meth:`source`
        decodes it once the current one is written)."""
        with self._lock:
            upcoming = self.todo[self.next_index] if self.next_index < len(self.todo) else None
        if upcoming is None or not room_to_prefetch(len(upcoming.files)):
            return
        if self.writing is None:
            self.decode_next()
        else:
            self.writing.add_done_callback(lambda _: self.decode_next())

    def drain(self) -> SeriesOutcome | None:
        """Wait for the pending write; its outcome (re-raises a fatal output error)."""
        if self.writing is None:
            return None
        outcome = self.writing.result()
        self.writing = None
        return outcome

    def close(self) -> None:
        """Wait for the pending write; stop decoding ahead."""
        self.writer.shutdown(wait=True)
        self.prefetch.shutdown(wait=True, cancel_futures=True)


def run_staged(
    run: RunPlan,
    series_list: Sequence[SeriesInfo],
    plans: Mapping[str, SeriesOutcome | None],
    todo: list[SeriesInfo],
    finish: Callable[[SeriesOutcome], None],
    progress: ProgressSink | None,
) -> None:
    """Every series in this process, in discovery order, through the decode / segment /
    write stages (:class:`Stages`).

    Args:
        run: the run's plan.
        series_list: every series found, in discovery order.
        plans: per SeriesInstanceUID, the outcome of a series that needs no work, else ``None``.
        todo: the series that need work, in order.
        finish: records an outcome (called in discovery order).
        progress: optional progress sink.
    """
    workers = run.cfg.decode_workers
    with DecodePool(run.limits.decode_workers if workers is None else workers) as pool:
        stages = Stages(run, todo, pool)
        try:
            if todo:
                stages.decode_next()
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
                        cores=run.limits.cores,
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
                    del done  # the writer holds the series' arrays until they are written
                for outcome in outcomes:
                    finish(outcome)
            last = stages.drain()
            if last is not None:
                finish(last)
        finally:
            stages.close()
