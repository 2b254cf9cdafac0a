"""Which Ray actors a run places on which node of the cluster (pure: no Ray import).

The driver reads the alive nodes' resources (:class:`NodeResources`) and places actors, each
holding one ONNX Runtime session and running one series at a time (:class:`ActorSlot`):

* On a GPU node (``--device auto`` or ``cuda``): one actor per GPU (``num_gpus=1``), or with
  ``--jobs N`` N actors sharing the node's GPUs; each gets up to
  :data:`~ggo_cli.run.series_pool.CORES_PER_JOB` of the node's CPUs.
* On a CPU node (``--device auto`` without a GPU there, or ``cpu``): one actor with every CPU
  of the node (the model uses every core, as ``--jobs 1`` does on one host), or with
  ``--jobs N`` N actors with an equal share.
* A node with no CPU offered to Ray (``ray start --num-cpus 0``, usual for a head that only
  schedules) gets no CPU actor; with ``--device cuda`` a node without a GPU gets none.
* Memory: never more actors on a node than its Ray ``memory`` resource holds at one series
  of the run's largest size each (:func:`ggo_cli.run.memory.series_bytes`) plus a worker's
  base (:data:`~ggo_cli.run.series_pool.WORKER_BASE_BYTES`); at least one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import DeviceKind
from .memory import series_bytes
from .series_pool import CORES_PER_JOB, WORKER_BASE_BYTES

log = logging.getLogger(__name__)

GPU_SHARE_DECIMALS = 4
"""Ray accepts fractional GPU requests to four decimal places."""


@dataclass(frozen=True, slots=True)
class NodeResources:
    """What one alive Ray node offers (from ``ray.nodes()``).

    Attributes:
        node_id: the Ray node id (hex).
        hostname: the node's host name.
        cpus: CPUs offered to Ray.
        gpus: GPUs offered to Ray.
        memory_bytes: Ray's ``memory`` resource of the node (bytes), ``None`` if not reported.
    """

    node_id: str
    hostname: str
    cpus: int
    gpus: int
    memory_bytes: int | None

    @classmethod
    def from_ray(cls, node: Mapping[str, Any]) -> NodeResources:
        """One entry of ``ray.nodes()``."""
        resources = node.get("Resources", {})
        memory = resources.get("memory")
        return cls(
            node_id=str(node["NodeID"]),
            hostname=str(node.get("NodeManagerHostname") or node.get("NodeManagerAddress", "")),
            cpus=int(resources.get("CPU", 0)),
            gpus=int(resources.get("GPU", 0)),
            memory_bytes=None if memory is None else int(memory),
        )


@dataclass(frozen=True, slots=True)
class ActorSlot:
    """One actor to place.

    Attributes:
        node_id: the node it is pinned to.
        hostname: that node's host name (for logs and the manifest).
        device: ``cpu`` or ``cuda`` (inside the actor, Ray's ``CUDA_VISIBLE_DEVICES`` makes
            its GPU device 0).
        num_cpus: CPUs requested from Ray.
        num_gpus: GPUs requested from Ray (0 on a CPU actor; may be a fraction).
        cores: threads the actor's lung mask and CPU session use (at least 1).
    """

    node_id: str
    hostname: str
    device: str
    num_cpus: int
    num_gpus: float
    cores: int


def _memory_cap(node: NodeResources, largest_slices: int) -> int | None:
    """Actors the node's memory holds at one series of ``largest_slices`` each."""
    if node.memory_bytes is None:
        return None
    per_actor = series_bytes(largest_slices) + WORKER_BASE_BYTES
    fits = node.memory_bytes // per_actor
    if fits < 1:
        log.warning(
            "Ray node %s offers %.1f GiB, less than one series of %d slices needs (about "
            "%.1f GiB); one actor is placed there anyway",
            node.hostname,
            node.memory_bytes / 2**30,
            largest_slices,
            per_actor / 2**30,
        )
    return max(1, fits)


def _node_slots(
    node: NodeResources, kind: DeviceKind, per_node: int | None, largest_slices: int
) -> list[ActorSlot]:
    """The actors of one node (none when it offers nothing the device needs)."""
    use_gpu = node.gpus > 0 and kind is not DeviceKind.CPU
    if not use_gpu and (kind is DeviceKind.CUDA or node.cpus < 1):
        return []
    count = per_node or (node.gpus if use_gpu else 1)
    if not use_gpu:
        count = min(count, node.cpus)
    cap = _memory_cap(node, largest_slices)
    if cap is not None and cap < count:
        log.info("Ray node %s: %d actors, as its memory allows", node.hostname, cap)
        count = cap
    if use_gpu:
        share = 1.0 if count <= node.gpus else round(node.gpus / count, GPU_SHARE_DECIMALS)
        cpus = min(CORES_PER_JOB, node.cpus // count)
        return [
            ActorSlot(node.node_id, node.hostname, "cuda", cpus, share, max(1, cpus))
            for _ in range(count)
        ]
    cpus = node.cpus // count
    return [ActorSlot(node.node_id, node.hostname, "cpu", cpus, 0.0, cpus) for _ in range(count)]


def plan_actors(
    nodes: Sequence[NodeResources],
    kind: DeviceKind,
    *,
    per_node: int | None,
    largest_slices: int,
    n_series: int,
) -> list[ActorSlot]:
    """The actors of a run over ``nodes``, spread across nodes, never more than ``n_series``.

    Args:
        nodes: the alive nodes.
        kind: the run's device kind (``auto``: GPUs where a node has them, else its CPUs).
        per_node: ``--jobs``: actors per node (``None``: one per GPU, or one per CPU node).
        largest_slices: slices of the largest series to do (sizes the memory cap).
        n_series: series to do.

    Returns:
        The slots, taken in turn from each node so that a short run uses every node.
    """
    per = [
        _node_slots(node, kind, per_node, largest_slices)
        for node in sorted(nodes, key=lambda n: n.node_id)
    ]
    ordered: list[ActorSlot] = []
    for k in range(max((len(p) for p in per), default=0)):
        ordered.extend(p[k] for p in per if k < len(p))
    return ordered[:n_series]
