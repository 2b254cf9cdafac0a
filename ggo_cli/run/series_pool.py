"""Whole series in worker processes (``--jobs N``), for hosts whose GPU outruns the CPU work.

On a GPU the model is the quick part: on the lent H200 host decoding, the lung mask and the
SEG build and read-back of a series took many times as long as its inference
(docs/benchmarks.md, "GPU end to end"). One process can therefore keep the GPU busy only a few
percent of the time; ``N`` worker processes each run whole series (decode, lungs, inference,
SEG, PNGs), each with its own ONNX Runtime session, and the main process records the outcomes
(state store, CSV) as they arrive. The CPU path keeps one process (``--jobs 1``, the staged
pipeline of :mod:`ggo_cli.run.runner`): there the model already uses every core.

Memory: at most ``N`` series are in flight, each in one worker; :func:`auto_jobs` sizes ``N``
from the usable cores, the available memory and the memory of each GPU used. Each worker holds
its own session (on a GPU: its own CUDA context and memory arena; an out-of-memory error halves
that worker's batch).

Several GPUs (``--device cuda:0,2``, ``cuda:all``): each worker's sessions run on one GPU,
given by :func:`ggo_cli.run.placement.worker_devices` from the worker's number (workers take
the GPUs in turn), and each outcome comes back naming its device for the manifest
(:class:`ggo_cli.run.manifest.PlacedOutcome`). One process (``--jobs 1``) uses the first GPU
only, with a warning when ``--jobs 1`` was asked for (:func:`auto_jobs`).

Failure handling:
    * A series-level failure is that series' ``failed`` row, as in one process.
    * A worker that dies (a decoder crash, the kernel's out-of-memory killer) breaks the pool:
      the series then in flight are tried again one at a time in a fresh pool, and a series
      whose worker dies while it runs alone fails with that reason.
    * A fatal output error or a session that cannot be created stops the run, as in one
      process; the other workers are stopped at once.
    * Workers ignore Ctrl-C (the main process stops them) and die with the process that
      started them, even when it is killed, so no worker writes into an output folder after
      its run. They are spawned (a fresh interpreter each), not forked.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Generator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import SimpleITK

from ..config import DeviceRequest, RunConfig
from ..domain import SeriesInfo, SeriesOutcome, SeriesStatus
from ..host import HostLimits, available_memory_bytes, usable_cores
from ..logs import configure_worker_logging, quiet_pydicom, relay_worker_logs
from ..onnx.explain_graph import ExplainInfo
from ..onnx.model_info import ModelInfo
from ..onnx.runtime import cuda_wanted
from ..onnx.sessions import Sessions
from .manifest import place
from .memory import series_bytes
from .outcomes import now_utc
from .pipeline import process_series
from .placement import device_label, gpu_job_capacity, worker_devices
from .result import SessionSummary

log = logging.getLogger(__name__)

MAX_JOBS = 8
"""Largest automatic ``--jobs`` (an explicit value may be higher)."""
CORES_PER_JOB = 2
"""Automatic ``--jobs`` leaves two cores per worker (the lung mask and decoding use threads)."""
WORKER_BASE_BYTES = 2 << 30
"""Resident memory assumed for a worker besides its series: Python, the libraries, a session
and, on a GPU, a CUDA context with its libraries (0.43 GiB measured on the CPU with the
stand-in model; the shipped model's session and a CUDA context are an allowance, not yet
measured on a GPU host)."""
PARENT_POLL_S = 0.5
"""How often a worker checks that its run is still alive (besides the kernel's signal)."""


def summarize(sessions: Sessions) -> SessionSummary | None:
    """The summary of the segmenter of ``sessions``, or ``None`` if it was never created."""
    segmenter = sessions.started
    if segmenter is None:
        return None
    return SessionSummary(
        segmenter.device_label,
        tuple(segmenter.providers),
        segmenter.batch_size,
        segmenter.precision.value,
        segmenter.int8_recipe,
        segmenter.variant_check.to_dict() if segmenter.variant_check is not None else None,
    )


def auto_jobs(cfg: RunConfig, todo: Sequence[SeriesInfo]) -> int:
    """Series processed at once for ``todo``: ``cfg.jobs`` when given (never more than the
    series), else :func:`jobs_for` the run's device(s) and its largest series.

    With several GPUs, ``--jobs 1`` runs one process on the first GPU only: it is what was
    asked for, so it is kept, with a warning naming the GPUs left idle.
    """
    if not todo:
        return 1
    if cfg.jobs is not None:
        if cfg.jobs == 1 and cfg.device.spread and len(cfg.device.gpus) > 1:
            log.warning(
                "--jobs 1 runs one process, on %s only of --device %s; leave --jobs out or "
                "give --jobs %d or more to use every GPU",
                cfg.device.devices[0],
                cfg.device,
                len(cfg.device.gpus),
            )
        return max(1, min(cfg.jobs, len(todo)))
    return jobs_for(
        cfg.device, largest_slices=max(len(s.files) for s in todo), n_series=len(todo)
    )


def jobs_for(device: DeviceRequest, *, largest_slices: int, n_series: int = MAX_JOBS) -> int:
    """The automatic ``--jobs``: 1 on the CPU; on GPUs one per :data:`CORES_PER_JOB`
    usable cores, at most :data:`MAX_JOBS` per GPU, within three quarters of the available
    memory for series of ``largest_slices`` and within what the GPUs hold together (each
    its own :func:`~ggo_cli.run.placement.gpu_job_capacity`); never more than ``n_series``.
    """
    if not cuda_wanted(device):
        return 1
    gpus = device.devices
    jobs = min(MAX_JOBS * len(gpus), usable_cores() // CORES_PER_JOB, n_series)
    memory = available_memory_bytes()
    if memory is not None:
        per_job = series_bytes(largest_slices) + WORKER_BASE_BYTES  # one series per worker
        jobs = min(jobs, int(0.75 * memory) // per_job)
    by_gpu = sum(gpu_job_capacity(gpu.index) for gpu in gpus)
    return max(1, min(jobs, by_gpu))


def _die_with_parent(parent: int) -> None:
    """End this worker when the run ``parent`` that started it ends, even by ``kill -9``.

    Linux: the kernel kills it (``PR_SET_PDEATHSIG``). Elsewhere, and as a second guard, a
    thread polls the parent process id, which changes when the parent dies (also when it
    died while this worker was starting).
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the thread guards
            pass
    if os.getppid() != parent:  # pragma: no cover - the parent died before the guard was set
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="ggo-parent-watch", daemon=True).start()


# The one worker state of a worker process (set by _init_worker): its sessions, with its
# device (Sessions.device) and its share of the cores (Sessions.limits).
_worker: Sessions | None = None


def _init_worker(
    parent: int,
    records: Any,
    level: int,
    share: HostLimits,
    cfg: RunConfig,
    model: ModelInfo,
    explain_info: ExplainInfo | None,
    devices: tuple[DeviceRequest, ...],
    numbers: Any,
) -> None:
    """Set up a worker process: signals, logging, privacy, its ``share`` of the cores (for
    SimpleITK, the lung mask and ONNX Runtime's CPU sessions) and its device: the next
    worker number from the shared counter ``numbers`` picks its entry of ``devices``
    (:func:`~ggo_cli.run.placement.worker_devices`)."""
    global _worker
    with numbers.get_lock():
        number = numbers.value
        numbers.value += 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops the workers
    _die_with_parent(parent)
    configure_worker_logging(records, level)
    quiet_pydicom()
    sitk: Any = SimpleITK  # no type hints in SimpleITK
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(share.cores)
    limits = HostLimits(min(usable_cores(), share.cores), shared=True)
    device = devices[number % len(devices)]
    _worker = Sessions(cfg, model, explain_info, limits=limits, device=device)
    log.debug("worker %d (pid %d) runs its sessions on %s", number, os.getpid(), device)


def _placed(
    task: Any, series: SeriesInfo
) -> tuple[SeriesOutcome, SessionSummary | None]:
    """Worker task: ``task(series)``, its outcome marked with the device it ran on (its
    session's; before any session exists, the worker's own)."""
    outcome, summary = task(series)
    assigned = device_label(_worker.device) if _worker is not None else ""
    return place(outcome, summary.device if summary is not None else assigned), summary


def run_series(
    sessions: Sessions, series: SeriesInfo, *, cfg: RunConfig | None = None
) -> SeriesOutcome:
    """One whole series in a worker (a ``--jobs`` process or a Ray actor) with its sessions:
    decoded in this process, segmented with its own session; ``cfg`` replaces the sessions'
    configuration (a Ray actor's scratch output folder with ``--ray-ship``)."""
    return process_series(
        cfg or sessions.cfg,
        series,
        sessions.segmenter(),
        explainer=sessions.explainer(),
        cores=sessions.limits.cores,
    )


def _process(series: SeriesInfo) -> tuple[SeriesOutcome, SessionSummary | None]:
    """Worker task: one whole series (decode in this process; its own session)."""
    sessions = _worker
    if sessions is None:  # pragma: no cover - only reached if the initializer did not run
        raise RuntimeError("series worker used without its initializer")
    return run_series(sessions, series), summarize(sessions)


def lost_series(series: SeriesInfo, message: str) -> SeriesOutcome:
    """The failed outcome of a series whose worker was lost (``message`` says how), logged."""
    log.error("%s failed: %s", series.label, message)
    log.debug("%s is %s", series.label, series.location)
    return SeriesOutcome(
        series=series,
        status=SeriesStatus.FAILED,
        message=message,
        n_slices=len(series.files),
        processed_at=now_utc(),
    )


def _lost(series: SeriesInfo) -> SeriesOutcome:
    """The outcome of a series whose worker process died while it ran alone."""
    return lost_series(
        series,
        "the worker process died while processing this series (a decoder crash, or memory "
        "exhausted: try fewer --jobs)",
    )


class SeriesPool:
    """Worker processes that each run whole series (a context manager).

    Args:
        cfg: the run configuration.
        model: the validated model.
        explain_info: the validated explain graph, or ``None``.
        jobs: number of worker processes (and of series in flight).
        limits: the cores of the run's process; each worker gets an equal share.
        task: the worker function (tests substitute their own; it runs in the worker).
    """

    def __init__(
        self,
        cfg: RunConfig,
        model: ModelInfo,
        explain_info: ExplainInfo | None,
        jobs: int,
        *,
        limits: HostLimits,
        task: Any = _process,
    ) -> None:
        # Spawned, not forked from the forkserver: a forkserver's children keep it alive, so
        # they would outlive a killed run; a spawned worker is the run's own child.
        self._context = multiprocessing.get_context("spawn")
        self._records = self._context.Queue()
        self._init_args = (
            os.getpid(),
            self._records,
            logging.getLogger("ggo_cli").getEffectiveLevel(),
            limits.share(jobs),
            cfg,
            model,
            explain_info,
        )
        self.jobs = jobs
        capacity = None
        if cfg.device.spread and cfg.jobs is None:
            capacity = [gpu_job_capacity(gpu.index) for gpu in cfg.device.devices]
        self.devices = worker_devices(cfg.device, jobs, capacity=capacity)
        if cfg.device.spread:
            log.info(
                "%d workers over --device %s: %s",
                jobs,
                cfg.device,
                ", ".join(f"{d} {self.devices.count(d)}" for d in dict.fromkeys(self.devices)),
            )
        self._task = task
        self._executor: ProcessPoolExecutor | None = None
        self.summary: SessionSummary | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.jobs,
                mp_context=self._context,
                initializer=_init_worker,
                # Worker numbers count from 0 again in each new pool (after a worker died).
                initargs=(*self._init_args, self.devices, self._context.Value("i", 0)),
            )
        return self._executor

    def run(self, todo: Sequence[SeriesInfo]) -> Generator[SeriesOutcome, None, None]:
        """Process ``todo``, at most ``jobs`` at once; yields outcomes as they complete.

        A worker's death fails every series then in flight; each of them is tried again on
        its own, and one that kills its worker alone fails (:func:`_lost`).

        Raises:
            OutputError: a fatal output error in a worker (the other workers are stopped).
            ModelError: a worker could not create its session.
        """
        queue: deque[SeriesInfo] = deque(todo)
        suspects: deque[SeriesInfo] = deque()  # run one at a time after a worker died
        in_flight: dict[Future[Any], SeriesInfo] = {}
        with relay_worker_logs(self._records):
            try:
                while queue or suspects or in_flight:
                    if suspects:
                        if not in_flight:
                            series = suspects.popleft()
                            in_flight[self._pool().submit(_placed, self._task, series)] = series
                    else:
                        while queue and len(in_flight) < self.jobs:
                            series = queue.popleft()
                            in_flight[self._pool().submit(_placed, self._task, series)] = series
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                    if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                        wait(in_flight)  # a broken pool fails every pending task at once
                        done = set(in_flight)
                    crashed: list[SeriesInfo] = []
                    for future in [f for f in in_flight if f in done]:  # in submission order
                        series = in_flight.pop(future)
                        if isinstance(future.exception(), BrokenProcessPool):
                            crashed.append(series)
                            continue
                        outcome, summary = future.result()  # re-raises a fatal error
                        self.summary = self.summary or summary
                        yield outcome
                    if crashed:
                        self.terminate()
                        if len(crashed) == 1:
                            yield _lost(crashed[0])
                        else:
                            log.warning(
                                "a worker process died; the %d series in flight are tried "
                                "again one at a time",
                                len(crashed),
                            )
                            suspects.extend(crashed)
            except BaseException:
                self.terminate()
                raise
            self.close()

    def terminate(self) -> None:
        """Stop the workers now (their unfinished outputs are only temporary files)."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # ProcessPoolExecutor (Python < 3.14) has no way to stop running tasks but its
        # processes; they are killed, then the executor is shut down.
        processes = list(getattr(executor, "_processes", {}).values())
        for process in processes:
            process.kill()
        for process in processes:
            process.join(timeout=10)
        executor.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Wait for the workers to exit (all work is done)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def __enter__(self) -> SeriesPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()
        self._records.close()
        self._records.join_thread()

