"""Series on a Ray cluster (``segment --ray ADDRESS``): one series per unit of work on actors.

The driver (the ``ggo-cli`` process) keeps everything that must have one owner: discovery,
the plan, the lock, the state store, the CSV and the manifest (:mod:`ggo_cli.run.runner`).
Only the to-do series go to the cluster, each whole to one :class:`~ggo_cli.run.ray_actor.
SeriesActor`, which holds an ONNX Runtime session on its node's GPU or CPUs. The actors are
placed, replaced when lost and added when nodes join by :class:`~ggo_cli.run.ray_pool.
ActorPool`. The driver records each outcome as it arrives, as with ``--jobs``.

Paths: every node reads the inputs and the model, and writes the output folder, at the
driver's paths (a shared filesystem; the driver makes them absolute), and the actor writes
the series' outputs atomically into the output folder. With ``--ray-ship`` the files travel
through Ray's object store instead and the driver writes the outputs
(:mod:`ggo_cli.run.ray_ship`). An actor checks that its model file has the driver's SHA-256
before its first series. No destination (``--send``) or credential goes to the cluster: the
driver alone sends.

Retries (decided here, not by Ray): actors are never restarted by Ray and their tasks never
retried by Ray (``max_restarts=0``, ``max_task_retries=0``). When an actor is lost (its node
died, or its process crashed), the driver sends the series it held to another actor, at most
:data:`MAX_ATTEMPTS` times in all; a series that loses that many actors fails with a reason
that the next run retries. Deciding in the driver keeps a series that crashes every actor it
touches (a decoder crash, memory exhausted) from going round forever, and counts the tries
in the manifest. The lost actor's outputs are only hidden temporary files (written atomically);
they are removed when the run ends.

Telemetry: ``--ray local`` starts a cluster for the run with Ray's usage statistics off
(``RAY_USAGE_STATS_ENABLED=0`` while it starts); clusters users start are theirs to start so
(docs/scaling.md). Ray is imported only here, and only when a run asks for it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..config import DeviceKind
from ..domain import SeriesInfo, SeriesOutcome
from ..errors import DeviceError, GgoError, InputError
from .manifest import place
from .outcomes import RETRY_NOTE
from .plan import RunPlan
from .ray_actor import ActorResult
from .ray_pool import REPLAN_S, ActorPool
from .ray_report import ClusterReport as ClusterReport  # the runner takes it from here
from .ray_report import Tally
from .ray_ship import pack_series, write_returned
from .result import ProgressSink, SessionSummary
from .series_pool import lost_series

log = logging.getLogger(__name__)

LOCAL = "local"
"""``--ray local``: a cluster on this host, started for the run and stopped after it."""
AUTO = "auto"
"""``--ray auto``: the running cluster this host belongs to (``ray start`` was run here)."""
MAX_ATTEMPTS = 3
"""Actors a series may lose before it fails (its first try included)."""
CONNECT_TIMEOUT_S = 10.0
"""How long a ``HOST:PORT`` head may take to accept a connection before the run gives up."""
LOOPBACK = "127.0.0.1"
"""The node address of a ``--ray local`` cluster."""
USAGE_STATS_ENV = "RAY_USAGE_STATS_ENABLED"
"""Ray's switch of its usage statistics (``0``: off)."""


def import_ray() -> Any:
    """Ray, or an :class:`InputError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError(
            "--ray needs Ray, which is not installed; install the extra: "
            "pip install 'ggo-cli[ray]'"
        ) from None
    return ray


@contextmanager
def _usage_stats_off() -> Iterator[None]:
    """Ray's usage statistics off while a cluster for the run starts (its processes inherit
    the environment then); the variable is restored afterwards."""
    saved = os.environ.get(USAGE_STATS_ENV)
    os.environ[USAGE_STATS_ENV] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(USAGE_STATS_ENV, None)
        else:
            os.environ[USAGE_STATS_ENV] = saved


def check_reachable(address: str) -> None:
    """Fail at once when nothing listens at ``HOST:PORT`` (``ray.init`` would retry for
    minutes).

    Raises:
        InputError: the head's port does not accept a connection within
            :data:`CONNECT_TIMEOUT_S`.
    """
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise InputError(
            f"--ray {address}: no Ray head answers there ({exc.strerror or exc}); start one "
            "with 'ray start --head' or check the address"
        ) from None


@contextmanager
def connected(address: str) -> Iterator[Any]:
    """Connected to the cluster at ``address`` (``local``: started here) until the end.

    Raises:
        InputError: Ray is missing or no cluster answers at ``address``.
    """
    if address not in (LOCAL, AUTO):
        check_reachable(address)
    ray = import_ray()
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address == LOCAL:
            with _usage_stats_off():
                # Loopback only: nothing outside this host needs to reach a run's own cluster.
                ray.init(
                    address="local", include_dashboard=False, _node_ip_address=LOOPBACK, **quiet
                )
        else:
            ray.init(address=address, **quiet)
    except ConnectionError as exc:
        raise InputError(
            f"--ray {address}: no Ray cluster answers ({exc}); start one with "
            "'ray start --head' or use --ray local"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


LOST_TOO_OFTEN = (
    f"lost its Ray actor {MAX_ATTEMPTS} times (nodes died, or the series crashed the actor: "
    "a decoder crash, memory exhausted)"
)
NO_ACTOR_LEFT = "no Ray actor left to run it (every actor of the run was lost)"


def _lost(series: SeriesInfo, reason: str) -> SeriesOutcome:
    """The failed outcome of a series that could not be run on the cluster, for ``reason``
    (:data:`LOST_TOO_OFTEN`, :data:`NO_ACTOR_LEFT`); the next run retries it."""
    return lost_series(series, reason + RETRY_NOTE)


def run_on_ray(
    run: RunPlan,
    todo: Sequence[SeriesInfo],
    finish: Callable[[SeriesOutcome], None],
    progress: ProgressSink | None,
) -> tuple[SessionSummary | None, ClusterReport]:
    """Process ``todo`` on the Ray cluster of ``run.cfg.ray_address``; outcomes are passed to
    ``finish`` as they arrive.

    Returns:
        Where inference ran (the first actor's session), and what the cluster did.

    Raises:
        InputError: Ray missing, no cluster at the address, or no node fit for the device.
        OutputError: a fatal output error in an actor or, with ``--ray-ship``, in the driver
            (the run stops).
        ModelError: the model differs on a node, or an actor's session cannot be made.
    """
    cfg = run.cfg
    address = cfg.ray_address or AUTO
    with connected(address) as ray:
        pool = ActorPool(ray, run, largest_slices=max(len(s.files) for s in todo))
        if not pool.fill(len(todo)):
            wanted = "a GPU" if cfg.device.kind is DeviceKind.CUDA else "a CPU"
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            raise DeviceError(
                f"--ray {address}: no node of the cluster ({nodes} alive) offers {wanted} "
                "to Ray; start the nodes with --num-cpus / --num-gpus"
            )
        log.info(
            "%d series to process on Ray (%s%s): %d actors on %d nodes",
            len(todo), address, ", files shipped" if cfg.ray_ship else "",
            pool.placed, pool.nodes_used,
        )
        if progress is not None:
            n_slices = sum(len(s.files) for s in todo)
            progress.work_started(n_slices, f"slices, {pool.placed} Ray actors")
        queue: deque[SeriesInfo] = deque(todo)
        attempts: dict[str, int] = {}
        tally = Tally()
        summary: SessionSummary | None = None
        resubmitted = 0
        while queue or pool.in_flight:
            _submit_waiting(pool, queue, cfg.ray_ship, finish, progress)
            if not (pool.in_flight or pool.starting) and not pool.fill(len(queue)):
                for series in queue:  # every actor lost, no node left to place one on
                    _report(_lost(series, NO_ACTOR_LEFT), finish, progress)
                break
            if not pool.in_flight and not queue:
                break
            if queue and pool.replan_due():  # nodes that joined
                pool.fill(len(queue) + len(pool.in_flight))
            ref = pool.wait(REPLAN_S)
            if ref is None:
                continue
            if ref in pool.starting:
                pool.started(ref)
                continue
            actor, series = pool.in_flight.pop(ref)
            try:
                result: ActorResult = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
                pool.lost_actor(actor)
                uid = series.series_instance_uid
                attempts[uid] = attempts.get(uid, 1) + 1
                if attempts[uid] > MAX_ATTEMPTS:
                    _report(_lost(series, LOST_TOO_OFTEN), finish, progress)
                else:
                    log.warning(
                        "%s: its Ray actor was lost (node died or process crashed); "
                        "sent to another actor (try %d of %d)",
                        series.label, attempts[uid], MAX_ATTEMPTS,
                    )
                    resubmitted += 1
                    queue.appendleft(series)
                pool.fill(len(queue) + len(pool.in_flight))
                continue
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, GgoError):
                    raise exc.cause from None  # the same error and exit code as in one process
                raise
            pool.idle.append(actor)
            for record in result.records:
                logging.getLogger(record.name).handle(record)
            summary = summary or result.summary
            tally.add(result)
            outcome = result.outcome
            if cfg.ray_ship:
                outcome = write_returned(cfg, outcome, result.files)
            _report(place(outcome, result.device, node=result.hostname), finish, progress)
        pool.close()
    report = ClusterReport(address, pool.placed, pool.lost, resubmitted, tally.nodes(),
                           failed_starts=pool.failed_starts, shipped=cfg.ray_ship)
    return summary, report


def _submit_waiting(
    pool: ActorPool,
    queue: deque[SeriesInfo],
    ship: bool,
    finish: Callable[[SeriesOutcome], None],
    progress: ProgressSink | None,
) -> None:
    """Hand waiting series to idle actors (with ``ship``, read and packed first: a series
    whose files cannot be read fails here)."""
    while queue and pool.idle:
        series = queue.popleft()
        shipped = pack_series(series) if ship else None
        if isinstance(shipped, SeriesOutcome):
            _report(shipped, finish, progress)
            continue
        pool.submit(series, shipped)


def _report(
    outcome: SeriesOutcome, finish: Callable[[SeriesOutcome], None], progress: ProgressSink | None
) -> None:
    """Advance the progress bar by the series' slices and record its outcome."""
    if progress is not None:
        progress.advance(len(outcome.series.files))
    finish(outcome)

