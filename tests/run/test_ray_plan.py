"""Where the Ray executor places its actors (ggo_cli.run.ray_plan), the ``--ray`` option's
checks and the message of a missing ``ray`` extra; all without starting a cluster."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ggo_cli.cli.app import app
from ggo_cli.cli.build import check_ray_address
from ggo_cli.config import DeviceKind
from ggo_cli.errors import InputError
from ggo_cli.run.memory import series_bytes
from ggo_cli.run.ray_executor import connected, import_ray
from ggo_cli.run.ray_plan import ActorSlot, NodeResources, plan_actors
from ggo_cli.run.series_pool import WORKER_BASE_BYTES

GIB = 2**30


def _node(name: str, cpus: int, gpus: int = 0, memory_gib: float | None = 64) -> NodeResources:
    memory = None if memory_gib is None else int(memory_gib * GIB)
    return NodeResources(f"id-{name}", name, cpus, gpus, memory)


def _by_host(slots: list[ActorSlot]) -> dict[str, list[ActorSlot]]:
    hosts: dict[str, list[ActorSlot]] = {}
    for slot in slots:
        hosts.setdefault(slot.hostname, []).append(slot)
    return hosts


def test_a_cpu_node_gets_one_actor_with_every_cpu_and_a_gpu_node_one_per_gpu() -> None:
    """``auto``: the CPU node's actor has all 16 CPUs; the 2-GPU node gets two GPU actors of
    two cores each; a head offering no CPU gets none."""
    nodes = [_node("cpu", 16), _node("gpu", 8, gpus=2), _node("head", 0)]
    hosts = _by_host(plan_actors(nodes, DeviceKind.AUTO, per_node=None, largest_slices=300,
                                 n_series=100))
    assert set(hosts) == {"cpu", "gpu"}
    assert [(s.device, s.num_cpus, s.num_gpus, s.cores) for s in hosts["cpu"]] == [
        ("cpu", 16, 0.0, 16)
    ]
    assert [(s.device, s.num_cpus, s.num_gpus, s.cores) for s in hosts["gpu"]] == [
        ("cuda", 2, 1.0, 2),
        ("cuda", 2, 1.0, 2),
    ]
    assert all(s.node_id == f"id-{host}" for host, slots in hosts.items() for s in slots)


def test_device_cpu_ignores_gpus_and_device_cuda_skips_nodes_without_one() -> None:
    nodes = [_node("cpu", 4), _node("gpu", 8, gpus=1)]
    on_cpu = plan_actors(nodes, DeviceKind.CPU, per_node=None, largest_slices=100, n_series=9)
    assert sorted((s.hostname, s.device, s.num_cpus) for s in on_cpu) == [
        ("cpu", "cpu", 4),
        ("gpu", "cpu", 8),
    ]
    on_cuda = plan_actors(nodes, DeviceKind.CUDA, per_node=None, largest_slices=100, n_series=9)
    assert [(s.hostname, s.device) for s in on_cuda] == [("gpu", "cuda")]
    assert plan_actors([_node("cpu", 4)], DeviceKind.CUDA, per_node=None, largest_slices=100,
                       n_series=9) == []


def test_jobs_set_actors_per_node_sharing_its_cpus_or_gpus() -> None:
    """``--jobs 4``: four CPU actors of 4 CPUs on a 16-CPU node; four actors sharing two GPUs
    (half a GPU each); never more CPU actors than CPUs."""
    nodes = [_node("cpu", 16), _node("gpu", 8, gpus=2), _node("small", 2)]
    hosts = _by_host(plan_actors(nodes, DeviceKind.AUTO, per_node=4, largest_slices=100,
                                 n_series=100))
    assert [s.num_cpus for s in hosts["cpu"]] == [4, 4, 4, 4]
    assert [(s.num_gpus, s.num_cpus) for s in hosts["gpu"]] == [(0.5, 2)] * 4
    assert [s.num_cpus for s in hosts["small"]] == [1, 1]


def test_memory_caps_the_actors_of_a_node_at_one_series_each() -> None:
    """A node whose memory holds two series of the largest size (plus a worker's base each)
    gets two actors however many it could place; one too small still gets one."""
    per_actor = series_bytes(1000) + WORKER_BASE_BYTES
    roomy = NodeResources("id-a", "a", 32, 0, int(2.5 * per_actor))
    tight = NodeResources("id-b", "b", 32, 0, per_actor // 2)
    hosts = _by_host(plan_actors([roomy, tight], DeviceKind.CPU, per_node=8,
                                 largest_slices=1000, n_series=100))
    assert [s.num_cpus for s in hosts["a"]] == [16, 16]
    assert [s.num_cpus for s in hosts["b"]] == [32]


def test_a_short_run_spreads_its_actors_over_the_nodes() -> None:
    """Two series, two nodes of four actors each: one actor on each node."""
    nodes = [_node("a", 4), _node("b", 4)]
    slots = plan_actors(nodes, DeviceKind.CPU, per_node=4, largest_slices=100, n_series=2)
    assert sorted(s.hostname for s in slots) == ["a", "b"]


def test_node_resources_are_read_from_ray_nodes() -> None:
    entry = {
        "NodeID": "abc",
        "Alive": True,
        "NodeManagerHostname": "host1",
        "NodeManagerAddress": "10.0.0.1",
        "Resources": {"CPU": 3.0, "GPU": 1.0, "memory": 8.0 * GIB, "head_node": 1.0},
    }
    assert NodeResources.from_ray(entry) == NodeResources("abc", "host1", 3, 1, 8 * GIB)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), ("LOCAL", "local"), (" 127.0.0.1:6379 ", "127.0.0.1:6379"),
     ("head-1.example.org:6380", "head-1.example.org:6380"), (None, None)],
)
def test_ray_addresses_accepted(value: str | None, expected: str | None) -> None:
    assert check_ray_address(value) == expected


@pytest.mark.parametrize("value", ["ray://head:10001", "head", "", "http://head:8265"])
def test_other_ray_addresses_are_refused(value: str) -> None:
    with pytest.raises(InputError, match="invalid --ray"):
        check_ray_address(value)


def test_a_bad_ray_address_exits_2_before_anything_is_read(
    tmp_path: Path, band_model_path: Path
) -> None:
    result = CliRunner().invoke(
        app,
        ["segment", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(band_model_path),
         "--ray", "ray://head:10001"],
    )
    assert result.exit_code == 2, result.output
    assert "invalid --ray" in result.output
    assert not (tmp_path / "out").exists()


def test_a_head_where_nothing_listens_exits_2_before_discovery(
    tmp_path: Path, band_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The address is tried before a possibly long walk of the inputs starts."""
    import ggo_cli.run.runner as runner

    with socket.socket() as probe:  # a loopback port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    walked: list[object] = []
    monkeypatch.setattr(runner, "discover_series", lambda *a, **k: walked.append(a))
    result = CliRunner().invoke(
        app,
        ["segment", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(band_model_path),
         "--ray", f"127.0.0.1:{port}"],
    )
    assert result.exit_code == 2, result.output
    assert f"--ray 127.0.0.1:{port}: no Ray head answers" in result.output
    assert walked == [] and not (tmp_path / "out").exists()


def test_ray_ship_without_ray_exits_2_before_anything_is_read(
    tmp_path: Path, band_model_path: Path
) -> None:
    result = CliRunner().invoke(
        app,
        ["segment", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(band_model_path),
         "--ray-ship"],
    )
    assert result.exit_code == 2, result.output
    assert "--ray-ship needs --ray" in result.output
    assert not (tmp_path / "out").exists()


def test_without_the_ray_extra_the_message_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(InputError, match=r"pip install 'ggo-cli\[ray\]'"):
        import_ray()


def test_a_head_address_where_nothing_listens_fails_at_once() -> None:
    """``--ray HOST:PORT`` with no head there: an InputError (exit 2) within seconds, not
    Ray's minutes of retries."""
    with socket.socket() as probe:  # a loopback port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(InputError, match=f"--ray 127.0.0.1:{port}: no Ray head answers"):
        with connected(f"127.0.0.1:{port}"):
            pass
    assert time.monotonic() - started < 5
