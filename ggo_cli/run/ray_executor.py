"""Series on a Ray cluster (``segment --ray ADDRESS``): one series per unit of work on actors.

The driver (the ``ggo-cli`` process) keeps everything that must have one owner: discovery,
the plan, the lock, the state store, the CSV and the manifest (:mod:`ggo_cli.run.runner`).
Only the to-do series go to the cluster, each whole to one :class:`~ggo_cli.run.ray_actor.
SeriesActor`, which holds an ONNX Runtime session on its node's GPU or CPUs (placed by
:func:`~ggo_cli.run.ray_plan.plan_actors`) and writes the series' outputs atomically into the
output folder. The driver records each outcome as it arrives, as with ``--jobs``.

Paths: every node reads the inputs and the model, and writes the output folder, at the
driver's paths (a shared filesystem; the driver makes them absolute). An actor checks that
its node's model file has the driver's SHA-256 before its first series. No destination
(``--send``) or credential goes to the cluster: the driver alone sends.

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
from dataclasses import dataclass, replace
from typing import Any

from ..config import DeviceKind, RunConfig, parse_device
from ..domain import SeriesInfo, SeriesOutcome
from ..errors import DeviceError, GgoError, InputError
from .pipeline import RETRY_NOTE
from .plan import RunPlan
from .ray_actor import ActorResult, SeriesActor
from .ray_plan import ActorSlot, NodeResources, plan_actors
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


@dataclass(frozen=True, slots=True)
class NodeReport:
    """What one Ray node did in a run (the manifest's ``cluster.nodes``).

    Attributes:
        node_id: the Ray node id.
        hostname: its host name.
        device: where its actors ran inference (``cpu``, ``cuda:0``...).
        series: series it finished (ok or failed).
        slices: their slices.
        seconds: wall seconds from its first series' start to its last one's end.
    """

    node_id: str
    hostname: str
    device: str
    series: int
    slices: int
    seconds: float

    @property
    def slices_per_s(self) -> float:
        """Slices per wall second on the node (0 when no time passed)."""
        return self.slices / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class ClusterReport:
    """What a run on Ray did (the manifest's ``cluster``).

    Attributes:
        address: the ``--ray`` value.
        actors: actors placed.
        lost_actors: actors lost during the run (node died, process crashed).
        resubmitted: series sent to another actor after their actor was lost.
        nodes: per node that finished a series, what it did.
    """

    address: str
    actors: int
    lost_actors: int
    resubmitted: int
    nodes: tuple[NodeReport, ...]

    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON object."""
        return {
            "address": self.address,
            "actors": self.actors,
            "lost_actors": self.lost_actors,
            "resubmitted_series": self.resubmitted,
            "nodes": [
                {
                    "node_id": n.node_id,
                    "hostname": n.hostname,
                    "device": n.device,
                    "series": n.series,
                    "slices": n.slices,
                    "seconds": round(n.seconds, 3),
                    "slices_per_s": round(n.slices_per_s, 3),
                }
                for n in self.nodes
            ],
        }


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


def _check_reachable(address: str) -> None:
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
        _check_reachable(address)
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


class _Tally:
    """The driver's per-node accounting of finished series."""

    def __init__(self) -> None:
        self._nodes: dict[str, dict[str, Any]] = {}

    def add(self, result: ActorResult) -> None:
        """Count one finished series on its node."""
        node = self._nodes.setdefault(
            result.node_id,
            {"hostname": result.hostname, "device": "", "series": 0, "slices": 0,
             "first": result.started_s, "last": result.ended_s},
        )
        if result.summary is not None:
            node["device"] = result.summary.device
        node["series"] += 1
        node["slices"] += result.outcome.n_slices
        node["first"] = min(node["first"], result.started_s)
        node["last"] = max(node["last"], result.ended_s)

    def nodes(self) -> tuple[NodeReport, ...]:
        """The reports, by host name then node id."""
        return tuple(
            NodeReport(node_id, n["hostname"], n["device"] or "cpu", n["series"], n["slices"],
                       n["last"] - n["first"])
            for node_id, n in sorted(self._nodes.items(), key=lambda i: (i[1]["hostname"], i[0]))
        )


LOST_TOO_OFTEN = (
    f"lost its Ray actor {MAX_ATTEMPTS} times (nodes died, or the series crashed the actor: "
    "a decoder crash, memory exhausted)"
)
NO_ACTOR_LEFT = "no Ray actor left to run it (every actor of the run was lost)"


def _lost(series: SeriesInfo, reason: str) -> SeriesOutcome:
    """The failed outcome of a series that could not be run on the cluster, for ``reason``
    (:data:`LOST_TOO_OFTEN`, :data:`NO_ACTOR_LEFT`); the next run retries it."""
    return lost_series(series, reason + RETRY_NOTE)


def _actor_cfg(cfg: RunConfig, slot: ActorSlot) -> RunConfig:
    """The configuration an actor gets: its device, no destinations (the driver sends)."""
    return replace(cfg, device=parse_device(slot.device), targets=())


class _Actors:
    """The run's actors, each idle or running one series."""

    def __init__(self, ray: Any, run: RunPlan, slots: Sequence[ActorSlot]) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote = ray.remote(SeriesActor)
        level = logging.getLogger("ggo_cli").getEffectiveLevel()
        self._ray = ray
        self.idle: deque[Any] = deque()
        for slot in slots:
            self.idle.append(
                remote.options(
                    num_cpus=slot.num_cpus,
                    num_gpus=slot.num_gpus,
                    max_restarts=0,
                    max_task_retries=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(slot.node_id, soft=False),
                ).remote(_actor_cfg(run.cfg, slot), run.model, run.sessions.explain_info,
                         slot, level)
            )
        self.in_flight: dict[Any, tuple[Any, SeriesInfo]] = {}

    def submit(self, series: SeriesInfo) -> None:
        """Start ``series`` on an idle actor."""
        actor = self.idle.popleft()
        self.in_flight[actor.process.remote(series)] = (actor, series)

    def next_done(self) -> tuple[Any, Any, SeriesInfo]:
        """Wait for a series to end; returns its reference, its actor and the series."""
        (ref,), _ = self._ray.wait(list(self.in_flight), num_returns=1)
        actor, series = self.in_flight.pop(ref)
        return ref, actor, series

    def drop(self, actor: Any) -> None:
        """Forget a lost actor (killed, in case it is only unreachable)."""
        self._ray.kill(actor, no_restart=True)


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
        OutputError: a fatal output error in an actor (the run stops).
        ModelError: the model differs on a node, or an actor's session cannot be made.
    """
    cfg = run.cfg
    address = cfg.ray_address or AUTO
    with connected(address) as ray:
        nodes = [NodeResources.from_ray(n) for n in ray.nodes() if n.get("Alive")]
        slots = plan_actors(
            nodes,
            cfg.device.kind,
            per_node=cfg.jobs,
            largest_slices=max(len(s.files) for s in todo),
            n_series=len(todo),
        )
        if not slots:
            wanted = "a GPU" if cfg.device.kind is DeviceKind.CUDA else "a CPU"
            raise DeviceError(
                f"--ray {address}: no node of the cluster ({len(nodes)} alive) offers {wanted} "
                "to Ray; start the nodes with --num-cpus / --num-gpus"
            )
        log.info(
            "%d series to process on Ray (%s): %d actors on %d nodes",
            len(todo), address, len(slots), len({s.node_id for s in slots}),
        )
        if progress is not None:
            n_slices = sum(len(s.files) for s in todo)
            progress.work_started(n_slices, f"slices, {len(slots)} Ray actors")
        queue: deque[SeriesInfo] = deque(todo)
        attempts: dict[str, int] = {}
        tally = _Tally()
        summary: SessionSummary | None = None
        lost = resubmitted = 0
        actors = _Actors(ray, run, slots)
        while queue or actors.in_flight:
            while queue and actors.idle:
                actors.submit(queue.popleft())
            if not actors.in_flight:  # every actor lost: nothing left to run the rest on
                for series in queue:
                    _report(_lost(series, NO_ACTOR_LEFT), finish, progress)
                break
            ref, actor, series = actors.next_done()
            try:
                result: ActorResult = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
                lost += 1
                actors.drop(actor)
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
                continue
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, GgoError):
                    raise exc.cause from None  # the same error and exit code as in one process
                raise
            actors.idle.append(actor)
            for record in result.records:
                logging.getLogger(record.name).handle(record)
            summary = summary or result.summary
            tally.add(result)
            _report(result.outcome, finish, progress)
    report = ClusterReport(address, len(slots), lost, resubmitted, tally.nodes())
    return summary, report


def _report(
    outcome: SeriesOutcome, finish: Callable[[SeriesOutcome], None], progress: ProgressSink | None
) -> None:
    """Advance the progress bar by the series' slices and record its outcome."""
    if progress is not None:
        progress.advance(len(outcome.series.files))
    finish(outcome)

