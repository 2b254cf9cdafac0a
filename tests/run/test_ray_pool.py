"""The run's actor pool against a scripted cluster: placement, a lost actor replaced while its
node lives, a node that joins, an actor that never starts.

The ``ray`` module is replaced by a small fake that records which actors were placed where;
the real cluster is ``tests/e2e/test_ray_cluster.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ggo_cli.config import DeviceKind, DeviceRequest, RunConfig
from ggo_cli.run.ray_pool import MAX_LOST_PER_NODE, ActorPool

pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[dev,ray]')")


def _id(name: str) -> str:
    """A node id of Ray's form (28 bytes in hex) for a short name."""
    return name.encode().hex().ljust(56, "0")


def _name(node_id: str) -> str:
    return bytes.fromhex(node_id).rstrip(b"\0").decode()


class ActorDied(Exception):
    """Stands for ``ray.exceptions.RayActorError``."""


class ObjectLost(Exception):
    """Stands for ``ray.exceptions.ObjectLostError``."""


class FakeActor:
    def __init__(self, cluster: FakeRay, node_id: str) -> None:
        self.node_id = node_id
        self.ready = SimpleNamespace(remote=lambda: cluster.ref(self, "ready"))


class FakeRay:
    """Just enough of ``ray`` for :class:`ActorPool`."""

    exceptions = SimpleNamespace(RayActorError=ActorDied, ObjectLostError=ObjectLost)

    def __init__(self, nodes: list[tuple[str, int]]) -> None:
        self.alive = {_id(name): cpus for name, cpus in nodes}
        self.actors: list[FakeActor] = []
        self.killed: list[FakeActor] = []
        self.dead_starts: set[str] = set()
        self._refs: dict[int, tuple[FakeActor, str]] = {}

    def nodes(self) -> list[dict[str, Any]]:
        return [{"NodeID": node, "NodeManagerHostname": node, "Alive": True,
                 "Resources": {"CPU": cpus}} for node, cpus in self.alive.items()]

    def ref(self, actor: FakeActor, what: str) -> int:
        key = len(self._refs)
        self._refs[key] = (actor, what)
        return key

    def put(self, value: object) -> object:
        return value

    def remote(self, _cls: type) -> Any:
        cluster = self

        class Options:
            def options(self, **kw: Any) -> Any:
                node = _name(kw["scheduling_strategy"].node_id)
                return SimpleNamespace(remote=lambda *args: cluster._start(node))

        return Options()

    def _start(self, node: str) -> FakeActor:
        actor = FakeActor(self, node)
        self.actors.append(actor)
        return actor

    def get(self, ref: int) -> bool:
        actor, _ = self._refs[ref]
        if actor.node_id in self.dead_starts:
            raise ActorDied("the actor's node died")
        return True

    def kill(self, actor: FakeActor, no_restart: bool) -> None:
        assert no_restart
        self.killed.append(actor)

    def placed_on(self) -> list[str]:
        return [actor.node_id for actor in self.actors]


def _pool(cluster: FakeRay, tmp_path: Path) -> ActorPool:
    cfg = RunConfig(inputs=(tmp_path,), out_dir=tmp_path / "out", model_path=tmp_path / "m.onnx",
                    device=DeviceRequest(DeviceKind.CPU))
    run = SimpleNamespace(cfg=cfg, model=None, sessions=SimpleNamespace(explain_info=None))
    return ActorPool(cluster, run, largest_slices=100)  # type: ignore[arg-type]


def _start_all(pool: ActorPool) -> None:
    for ref in list(pool.starting):
        pool.started(ref)


def test_one_actor_per_cpu_node_never_more_than_the_series(tmp_path: Path) -> None:
    cluster = FakeRay([("a", 4), ("b", 4)])
    pool = _pool(cluster, tmp_path)
    assert pool.fill(remaining=1) == 1
    assert pool.fill(remaining=1) == 0  # the one placed is enough
    assert pool.fill(remaining=5) == 1
    assert sorted(cluster.placed_on()) == ["a", "b"]
    assert pool.fill(remaining=5) == 0


def test_a_lost_actor_is_replaced_while_its_node_lives_then_the_node_is_left_alone(
    tmp_path: Path,
) -> None:
    cluster = FakeRay([("a", 2), ("b", 2)])
    pool = _pool(cluster, tmp_path)
    pool.fill(remaining=10)
    _start_all(pool)
    for lost in range(MAX_LOST_PER_NODE):
        victim = next(a for a in pool.idle if a.node_id == "b")
        pool.idle.remove(victim)
        pool.lost_actor(victim)
        placed = pool.fill(remaining=10)
        assert placed == (1 if lost + 1 < MAX_LOST_PER_NODE else 0)
        _start_all(pool)
    assert pool.lost == MAX_LOST_PER_NODE
    assert [a.node_id for a in pool.idle] == ["a"]
    assert len(cluster.killed) == MAX_LOST_PER_NODE


def test_a_node_that_joins_gets_an_actor_at_the_next_look(tmp_path: Path) -> None:
    cluster = FakeRay([("a", 2)])
    pool = _pool(cluster, tmp_path)
    assert pool.fill(remaining=10) == 1
    cluster.alive[_id("c")] = 2
    assert pool.fill(remaining=10) == 1
    assert cluster.placed_on() == ["a", "c"]
    assert pool.nodes_used == 2


def test_an_actor_that_never_starts_gets_no_series_and_costs_none_a_try(tmp_path: Path) -> None:
    cluster = FakeRay([("a", 2), ("dying", 2)])
    cluster.dead_starts.add("dying")
    pool = _pool(cluster, tmp_path)
    pool.fill(remaining=10)
    _start_all(pool)
    assert [a.node_id for a in pool.idle] == ["a"]
    assert pool.failed_starts == 1 and pool.lost == 0
