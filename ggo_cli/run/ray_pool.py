"""The actors of a run on Ray: placed on the alive nodes, replaced when lost, added when nodes join.

:class:`ActorPool` places actors as :func:`~ggo_cli.run.ray_plan.plan_actors` says for the
nodes alive *now*, and looks again (:meth:`ActorPool.fill`) when the run starts, after an actor
is lost, and every :data:`REPLAN_S` seconds while series remain:

* a node that joined the cluster during the run gets its actors then;
* a node whose actor was lost while the node lives on (its process crashed, memory exhausted)
  gets a new one, up to :data:`MAX_LOST_PER_NODE` losses per node and run: after that the node
  is left alone for the rest of the run (a warning says so);
* actors are never removed before the run ends, and never more are placed than series remain.

A new actor gets no series until it has answered (:meth:`SeriesActor.ready`, after its
constructor ran): an actor that never starts (placed on a node that had just died, before the
cluster noticed) costs no series a try. This module does not import Ray itself; the driver's
``ray`` module is passed in.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import replace
from typing import Any

from ..config import RunConfig, parse_device
from ..domain import SeriesInfo
from .plan import RunPlan
from .ray_actor import SeriesActor
from .ray_plan import ActorSlot, NodeResources, plan_actors
from .ray_ship import ShippedSeries, pack_model

log = logging.getLogger(__name__)

REPLAN_S = 2.0
"""How often the driver looks for nodes that joined while it waits for series."""
CLOSE_WAIT_S = 10.0
"""How long the driver waits at the end of a run for its actors to remove their scratch."""
MAX_LOST_PER_NODE = 3
"""Actors a node may lose (or fail to start) in one run before it gets no more."""


def _actor_cfg(cfg: RunConfig, slot: ActorSlot) -> RunConfig:
    """The configuration an actor gets: its device, no destinations (the driver sends)."""
    return replace(cfg, device=parse_device(slot.device), targets=())


class ActorPool:
    """The run's actors: starting, idle or running one series each.

    Args:
        ray: the driver's ``ray`` module (connected).
        run: the run's plan (its configuration, model and explain graph).
        largest_slices: slices of the run's largest series (sizes the memory cap).
    """

    def __init__(self, ray: Any, run: RunPlan, largest_slices: int) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._ray = ray
        self._run = run
        self._affinity = NodeAffinitySchedulingStrategy
        self._remote = ray.remote(SeriesActor)
        self._level = logging.getLogger("ggo_cli").getEffectiveLevel()
        self._largest = largest_slices
        self._model = ray.put(pack_model(run.model)) if run.cfg.ray_ship else None
        self._slot: dict[Any, ActorSlot] = {}
        self._lost_on: Counter[str] = Counter()
        self._next_plan = 0.0
        self.starting: dict[Any, Any] = {}
        self.idle: deque[Any] = deque()
        self.in_flight: dict[Any, tuple[Any, SeriesInfo]] = {}
        self.placed = 0
        self.lost = 0
        self.failed_starts = 0

    @property
    def nodes_used(self) -> int:
        """Nodes that hold an actor now."""
        return len({slot.node_id for slot in self._slot.values()})

    def fill(self, remaining: int) -> int:
        """Place the actors the alive nodes lack for ``remaining`` series; returns how many."""
        self._next_plan = time.monotonic() + REPLAN_S
        nodes = [NodeResources.from_ray(n) for n in self._ray.nodes() if n.get("Alive")]
        nodes = [n for n in nodes if self._lost_on[n.node_id] < MAX_LOST_PER_NODE]
        wanted = plan_actors(
            nodes, self._run.cfg.device.kind, per_node=self._run.cfg.jobs,
            largest_slices=self._largest, n_series=remaining,
        )
        have = Counter(slot.node_id for slot in self._slot.values())
        room = remaining - len(self._slot)
        added = 0
        for slot in wanted:
            if room <= 0:
                break
            if have[slot.node_id] > 0:
                have[slot.node_id] -= 1
                continue
            self._start(slot)
            room -= 1
            added += 1
        if added and self.placed > added:
            log.info("Ray: %d more actors placed (nodes that joined, or in place of lost ones)",
                     added)
        return added

    def replan_due(self) -> bool:
        """Whether :data:`REPLAN_S` passed since the last :meth:`fill`."""
        return time.monotonic() >= self._next_plan

    def _start(self, slot: ActorSlot) -> None:
        actor = self._remote.options(
            num_cpus=slot.num_cpus,
            num_gpus=slot.num_gpus,
            max_restarts=0,
            max_task_retries=0,
            scheduling_strategy=self._affinity(slot.node_id, soft=False),
        ).remote(_actor_cfg(self._run.cfg, slot), self._run.model,
                 self._run.sessions.explain_info, slot, self._level, self._model)
        self._slot[actor] = slot
        self.starting[actor.ready.remote()] = actor
        self.placed += 1

    def submit(self, series: SeriesInfo, shipped: ShippedSeries | None) -> None:
        """Start ``series`` on an idle actor (``shipped``: its files, with ``--ray-ship``)."""
        actor = self.idle.popleft()
        ref = (actor.process.remote(series) if shipped is None
               else actor.process_shipped.remote(shipped))
        self.in_flight[ref] = (actor, series)

    def wait(self, timeout_s: float) -> Any | None:
        """The next reference that is ready (a started actor or a finished series), or
        ``None`` when none is within ``timeout_s``."""
        refs = [*self.in_flight, *self.starting]
        done, _ = self._ray.wait(refs, num_returns=1, timeout=timeout_s)
        return done[0] if done else None

    def started(self, ref: Any) -> None:
        """An actor's answer to ``ready`` arrived: idle if it started, forgotten if not."""
        actor = self.starting.pop(ref)
        try:
            self._ray.get(ref)
        except (self._ray.exceptions.RayActorError, self._ray.exceptions.ObjectLostError):
            self.failed_starts += 1
            self._forget(actor)
            return
        self.idle.append(actor)

    def lost_actor(self, actor: Any) -> None:
        """An actor died while it ran a series: forgotten (killed, in case it is only
        unreachable)."""
        self.lost += 1
        self._forget(actor)

    def close(self) -> None:
        """Ask every actor still known to remove its scratch folder; waits a few seconds at
        most (an actor that does not answer is left to Ray's shutdown)."""
        refs = [actor.close.remote() for actor in self._slot]
        if refs:
            self._ray.wait(refs, num_returns=len(refs), timeout=CLOSE_WAIT_S)

    def _forget(self, actor: Any) -> None:
        slot = self._slot.pop(actor)
        self._lost_on[slot.node_id] += 1
        if self._lost_on[slot.node_id] == MAX_LOST_PER_NODE:
            log.warning("Ray node %s lost %d actors; it gets no more in this run",
                        slot.hostname, MAX_LOST_PER_NODE)
        self._ray.kill(actor, no_restart=True)
