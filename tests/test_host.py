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
    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert command[0] == "nvidia-smi" and command[-1] == "1"
        return subprocess.CompletedProcess(command, 0, "81559\n", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert host.gpu_memory_bytes(1) == 81559 << 20

    def missing(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(subprocess, "run", missing)
    assert host.gpu_memory_bytes(0) is None


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
