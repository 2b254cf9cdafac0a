"""What a run on a Ray cluster did, per node: the manifest's ``cluster`` object.

The driver counts each finished series on the node that ran it (:class:`Tally`), and the
run's :class:`ClusterReport` goes into ``run_manifest.json`` (docs/scaling.md, "Manifest").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .ray_actor import ActorResult


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
        actors: actors placed (those placed later, on nodes that joined or in place of lost
            actors, included).
        lost_actors: actors lost while they ran a series (node died, process crashed).
        resubmitted: series sent to another actor after their actor was lost.
        nodes: per node that finished a series, what it did.
        failed_starts: actors that never started (their node died first); no series was
            sent to them.
        shipped: files went through Ray's object store (``--ray-ship``).
    """

    address: str
    actors: int
    lost_actors: int
    resubmitted: int
    nodes: tuple[NodeReport, ...]
    failed_starts: int = 0
    shipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON object."""
        return {
            "address": self.address,
            "actors": self.actors,
            "lost_actors": self.lost_actors,
            "resubmitted_series": self.resubmitted,
            "failed_starts": self.failed_starts,
            "files_shipped": self.shipped,
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


class Tally:
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
        if result.device:
            node["device"] = result.device
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
