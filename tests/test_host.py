"""Host probes and the cores a run's process may use (ggo_cli.host), and how that value
reaches the lung mask's threads and ONNX Runtime's sessions."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from ggo_cli import host
from ggo_cli.analysis import morphology
from ggo_cli.config import DeviceKind, DeviceRequest, RunConfig
from ggo_cli.host import MAX_DECODE_WORKERS, HostLimits
from ggo_cli.onnx.model_info import load_model_info
from ggo_cli.onnx.runtime import create_session
from ggo_cli.onnx.sessions import Sessions


def test_a_worker_share_divides_the_cores_and_holds_onnx_runtime_to_it() -> None:
    whole = HostLimits(16)
    assert whole.intra_op_threads is None  # one process: ONNX Runtime's own default
    assert whole.share(3) == HostLimits(5, shared=True)
    assert whole.share(3).intra_op_threads == 5
    assert HostLimits(2).share(8).cores == 1  # never below one core


def test_decode_workers_are_one_per_core_within_the_cap_and_none_on_one_core() -> None:
    assert HostLimits(1).decode_workers == 0  # decoded in the calling thread
    assert HostLimits(4).decode_workers == 4
    assert HostLimits(64).decode_workers == MAX_DECODE_WORKERS
    this = HostLimits.of_this_process()
    assert this.cores == host.usable_cores() >= 1 and not this.shared


def test_gpu_memory_is_read_from_nvidia_smi_or_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(host.CUDA_VISIBLE_ENV, raising=False)

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert command[0] == "nvidia-smi" and command[-1] == "1"
        return subprocess.CompletedProcess(command, 0, "81559\n", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert host.gpu_memory_bytes(1) == 81559 << 20

    def missing(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(subprocess, "run", missing)
    assert host.gpu_memory_bytes(0) is None


SMI_LIST = (
    "0, GPU-aaaa0000, NVIDIA H100 80GB HBM3, 81559\n"
    "1, GPU-bbbb1111, NVIDIA H100 80GB HBM3, 81559\n"
    "2, GPU-cccc2222, NVIDIA L4, 23034\n"
    "3, GPU-dddd3333, NVIDIA L4, 23034\n"
)


def _physical() -> list[host.GpuDevice]:
    return [
        host.GpuDevice(k, str(k), f"GPU-{c * 4}{str(k) * 4}", "x", (k + 1) << 30)
        for k, c in enumerate("abcd")
    ]


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (None, ["GPU-aaaa0000", "GPU-bbbb1111", "GPU-cccc2222", "GPU-dddd3333"]),
        ("2,0", ["GPU-cccc2222", "GPU-aaaa0000"]),  # renumbered: cuda:0 is physical GPU 2
        ("GPU-dddd, 1", ["GPU-dddd3333", "GPU-bbbb1111"]),  # UUID prefixes, spaces
        ("", []),
        ("-1", []),  # CUDA's way of hiding every GPU
        ("1,7,2", ["GPU-bbbb1111"]),  # the list stops at a GPU that does not exist
        ("1,1,2", ["GPU-bbbb1111"]),  # ... and at a GPU named twice
        ("GPU-, 3", []),  # ... and at a UUID prefix of several GPUs
    ],
)
def test_visible_gpus_follow_cuda_visible_devices(mask: str | None, expected: list[str]) -> None:
    seen = host.select_visible(_physical(), mask)
    assert [gpu.uuid for gpu in seen] == expected
    assert [gpu.ordinal for gpu in seen] == list(range(len(expected)))
    assert [gpu.label for gpu in seen] == [f"cuda:{k}" for k in range(len(expected))]


def test_visible_gpus_come_from_nvidia_smi_in_cudas_numbering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    commands: list[list[str]] = []

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        if "-i" in command:  # one GPU's memory
            return subprocess.CompletedProcess(command, 0, "23034\n", "")
        return subprocess.CompletedProcess(command, 0, SMI_LIST, "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(host, "nvidia_gpu_visible", lambda: True)
    monkeypatch.setenv(host.CUDA_VISIBLE_ENV, "3,GPU-aaaa")
    gpus = host.visible_gpus()
    assert gpus is not None
    assert [(g.label, g.name, g.memory_bytes) for g in gpus] == [
        ("cuda:0", "NVIDIA L4", 23034 << 20),
        ("cuda:1", "NVIDIA H100 80GB HBM3", 81559 << 20),
    ]
    # nvidia-smi numbers GPUs its own way: cuda:1 of this process is asked for by its entry.
    assert host.smi_id(1) == "GPU-aaaa" and host.smi_id(2) is None
    assert host.gpu_memory_bytes(0) == 23034 << 20 and commands[-1][-1] == "3"
    assert host.gpu_memory_bytes(2) is None  # no such GPU: nvidia-smi is not asked
    assert commands[-1][-1] == "3"
    monkeypatch.delenv(host.CUDA_VISIBLE_ENV)
    assert host.smi_id(1) == "1"
    assert len(host.visible_gpus() or ()) == 4


def test_no_gpu_or_no_nvidia_smi_are_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(subprocess, "run", missing)
    monkeypatch.setattr(host, "nvidia_gpu_visible", lambda: True)
    assert host.visible_gpus() is None  # a driver, but the GPUs cannot be listed
    monkeypatch.setattr(host, "nvidia_gpu_visible", lambda: False)
    if host.sys.platform.startswith("linux"):
        assert host.visible_gpus() == ()  # no driver: no GPU


def _threads_used(cores: int, n: int) -> set[str]:
    names: set[str] = set()
    lock = threading.Lock()

    def work(k: int) -> None:
        with lock:
            names.add(threading.current_thread().name)

    morphology.each_slice(work, n, cores=cores)
    return names


def test_slice_work_runs_on_the_cores_it_is_given() -> None:
    assert _threads_used(1, 16) == {threading.current_thread().name}
    used = _threads_used(3, 64)
    assert used and all(name.startswith("ggo-lungs") for name in used) and len(used) <= 3


def test_create_session_sets_intra_op_threads_only_when_given(band_model_path: Path) -> None:
    cpu = DeviceRequest(DeviceKind.CPU)
    held = create_session(band_model_path, cpu, intra_op_threads=3)
    assert held.get_session_options().intra_op_num_threads == 3
    free = create_session(band_model_path, cpu)
    assert free.get_session_options().intra_op_num_threads == 0  # ONNX Runtime decides


@pytest.mark.parametrize(
    ("limits", "threads"), [(HostLimits(2, shared=True), 2), (HostLimits(2), 0)]
)
def test_sessions_hold_the_segmenter_to_a_worker_share(
    tmp_path: Path, band_model_path: Path, limits: HostLimits, threads: int
) -> None:
    cfg = RunConfig(
        inputs=(tmp_path,),
        out_dir=tmp_path / "out",
        model_path=band_model_path,
        device=DeviceRequest(DeviceKind.CPU),
    )
    sessions = Sessions(cfg, load_model_info(band_model_path), None, limits=limits)
    session = sessions.segmenter().session
    assert session.get_session_options().intra_op_num_threads == threads
