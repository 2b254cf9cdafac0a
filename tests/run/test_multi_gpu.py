"""``--device cuda:all`` and ``cuda:0,2``: the devices a run may use, checked before any work,
the worker -> device mapping (ggo_cli.run.placement), ``--jobs`` sized per GPU, the device each
worker's sessions ask for, and the manifest's record of where each series ran. GPU discovery is
patched to pretend a host of four GPUs; the worker-process run of the same mapping is in
tests/e2e/test_multi_gpu_e2e.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ggo_cli import config
from ggo_cli.cli.app import app
from ggo_cli.cli.build import build_run_config
from ggo_cli.config import DeviceKind, DeviceRequest, RunConfig, parse_device
from ggo_cli.dicom.discovery import Discovery
from ggo_cli.domain import SeriesInfo, SeriesOutcome, SeriesStatus
from ggo_cli.errors import DeviceError, InputError, ModelError
from ggo_cli.host import GpuDevice, HostLimits
from ggo_cli.onnx.model_info import load_model_info
from ggo_cli.onnx.precision import Precision
from ggo_cli.onnx.sessions import Sessions
from ggo_cli.run import placement, series_pool
from ggo_cli.run.manifest import PlacedOutcome, build_manifest, place
from ggo_cli.run.placement import worker_devices
from ggo_cli.run.result import RunResult, SessionSummary
from ggo_cli.run.series_pool import auto_jobs, jobs_for
from tests.dicom_factory import make_ct_series

GIB = 1 << 30


def four_gpus() -> tuple[GpuDevice, ...]:
    """A pretend host: four 80 GiB GPUs, ordinals 0 to 3."""
    return tuple(GpuDevice(k, str(k), f"GPU-{k}", "H100", 80 * GIB) for k in range(4))


def _cuda(*ordinals: int) -> list[str]:
    return [f"cuda:{n}" for n in ordinals]


def test_cuda_all_resolves_to_every_visible_gpu_once_when_parsed() -> None:
    calls = []

    def listed() -> tuple[GpuDevice, ...]:
        calls.append(1)
        return four_gpus()

    request = parse_device("CUDA:ALL", list_gpus=listed)
    assert str(request) == "cuda:all" and request.spread and request.kind is DeviceKind.CUDA
    assert [str(d) for d in request.devices] == _cuda(0, 1, 2, 3)
    assert request.index == 0  # a session of one process: the first GPU
    assert len(calls) == 1
    # Single devices never list the GPUs (cuda:N is checked when its session starts).
    for value in ("auto", "cpu", "cuda", "cuda:7"):
        assert not parse_device(value, list_gpus=listed).spread
    assert len(calls) == 1


def test_a_gpu_list_keeps_its_order_and_its_first_gpu_runs_one_process() -> None:
    request = parse_device(" cuda:2, 0 ", list_gpus=four_gpus)
    assert str(request) == "cuda:2,0" and not request.all_gpus
    assert [str(d) for d in request.devices] == _cuda(2, 0)
    assert request.index == 2
    assert request == DeviceRequest(DeviceKind.CUDA, gpus=(2, 0))


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("cuda:0,5", InputError, r"there is no GPU 5; this process sees cuda:0, cuda:1, cuda:2"),
        ("cuda:1,1", InputError, "GPU 1 is listed twice"),
        ("cuda:0,", InputError, "use auto, cpu, cuda or cuda:N"),
        ("cpu:all", InputError, "use auto, cpu, cuda or cuda:N"),
        ("cuda:all,1", InputError, "use auto, cpu, cuda or cuda:N"),
    ],
)
def test_a_bad_gpu_list_is_a_one_line_input_error(
    value: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as caught:
        parse_device(value, list_gpus=four_gpus)
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 2  # type: ignore[attr-defined]


def test_several_gpus_without_one_visible_is_a_device_error() -> None:
    for value in ("cuda:all", "cuda:0,1"):
        with pytest.raises(DeviceError, match="no NVIDIA GPU is visible") as caught:
            parse_device(value, list_gpus=lambda: ())
        assert caught.value.exit_code == 5
    # GPUs that cannot be listed (no nvidia-smi): a list is taken as given (each session
    # start checks its GPU), cuda:all cannot be resolved.
    assert parse_device("cuda:0,3", list_gpus=lambda: None).gpus == (0, 3)
    with pytest.raises(DeviceError, match="cannot be listed"):
        parse_device("cuda:all", list_gpus=lambda: None)


def test_a_missing_gpu_stops_the_command_before_any_work(
    tmp_path: Path, band_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "visible_gpus", four_gpus)
    fs = make_ct_series(tmp_path / "in")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["segment", str(fs.root), "-o", str(out), "-m", str(band_model_path), "--no-progress",
         "--device", "cuda:0,4"],
    )
    assert result.exit_code == 2, result.output
    assert "there is no GPU 4" in result.stderr
    assert not out.exists()  # no lock, no state store, no folder
    cfg = build_run_config([fs.root], out, model=band_model_path, device="cuda:all")
    assert [str(d) for d in cfg.device.devices] == _cuda(0, 1, 2, 3)


def test_workers_take_the_gpus_in_turn() -> None:
    every = DeviceRequest(DeviceKind.CUDA, gpus=(0, 1, 2, 3), all_gpus=True)
    assert [str(d) for d in worker_devices(every, 6)] == _cuda(0, 1, 2, 3, 0, 1)
    assert [str(d) for d in worker_devices(every, 2)] == _cuda(0, 1)  # fewer workers: first GPUs
    listed = DeviceRequest(DeviceKind.CUDA, gpus=(2, 0))
    assert [str(d) for d in worker_devices(listed, 3)] == _cuda(2, 0, 2)
    one = parse_device("cuda:1")
    assert worker_devices(one, 3) == (one, one, one)
    auto = DeviceRequest()
    assert worker_devices(auto, 2) == (auto, auto)


def test_workers_fill_only_the_room_each_gpu_has() -> None:
    every = DeviceRequest(DeviceKind.CUDA, gpus=(0, 1, 2, 3), all_gpus=True)
    # GPU 1 holds one worker: the others take the rest in turn.
    placed = worker_devices(every, 7, capacity=[4, 1, 4, 4])
    assert [str(d) for d in placed] == _cuda(0, 1, 2, 3, 0, 2, 3)
    # Beyond every GPU's room (an explicit --jobs): the turns go on over all of them.
    placed = worker_devices(every, 6, capacity=[1, 1, 1, 1])
    assert [str(d) for d in placed] == _cuda(0, 1, 2, 3, 0, 1)


def test_automatic_jobs_add_up_what_each_gpu_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = {0: 80 * GIB, 1: 10 * GIB, 2: None, 3: 24 * GIB}
    monkeypatch.setattr(placement, "gpu_memory_bytes", lambda index: memory[index])
    monkeypatch.setattr(series_pool, "usable_cores", lambda: 128)
    monkeypatch.setattr(series_pool, "available_memory_bytes", lambda: 1024 * GIB)
    every = DeviceRequest(DeviceKind.CUDA, gpus=(0, 1, 2, 3), all_gpus=True)
    # 80 % of each GPU, 4 GiB a worker: 16 + 2 + 2 (memory unknown) + 4 = 24 workers.
    assert jobs_for(every, largest_slices=300, n_series=100) == 24
    assert [placement.gpu_job_capacity(k) for k in range(4)] == [16, 2, 2, 4]
    # At most MAX_JOBS (8) per GPU: one 80 GiB GPU runs 8 workers, two run 16.
    assert jobs_for(DeviceRequest(DeviceKind.CUDA, 0), largest_slices=300, n_series=100) == 8
    monkeypatch.setattr(placement, "gpu_memory_bytes", lambda index: 80 * GIB)
    two = DeviceRequest(DeviceKind.CUDA, gpus=(0, 1))
    assert jobs_for(two, largest_slices=300, n_series=100) == 16
    # The host's cores still bound the total.
    monkeypatch.setattr(series_pool, "usable_cores", lambda: 8)
    assert jobs_for(every, largest_slices=300, n_series=100) == 4


def _fake_series(name: str) -> SeriesInfo:
    return SeriesInfo(
        study_instance_uid="1.2.3", series_instance_uid=f"1.2.3.{name}", files=(), location=name
    )


def test_jobs_1_with_several_gpus_runs_on_the_first_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    every = DeviceRequest(DeviceKind.CUDA, gpus=(0, 1, 2, 3), all_gpus=True)
    cfg = RunConfig(
        inputs=(tmp_path,), out_dir=tmp_path / "out", model_path=tmp_path / "m", device=every,
        jobs=1,
    )
    todo = [_fake_series(str(k)) for k in range(5)]
    with caplog.at_level(logging.WARNING, logger="ggo_cli"):
        assert auto_jobs(cfg, todo) == 1
    assert "--jobs 1 runs one process, on cuda:0 only of --device cuda:all" in caplog.text
    assert "--jobs 4 or more" in caplog.text


def test_each_session_asks_for_its_own_gpu(
    tmp_path: Path, band_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request that reaches ONNX Runtime: ``device_id`` of the CUDA provider."""
    import onnxruntime as ort

    asked: list[Any] = []

    def refuse(source: Any, *, sess_options: Any, providers: list[Any]) -> Any:
        asked.append(providers)
        raise RuntimeError("no GPU in this test")

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", refuse)
    every = DeviceRequest(DeviceKind.CUDA, gpus=(0, 1, 2, 3), all_gpus=True)
    cfg = RunConfig(
        inputs=(tmp_path,), out_dir=tmp_path / "out", model_path=band_model_path, device=every,
        precision=Precision.FP32,
    )
    model = load_model_info(band_model_path)
    limits = HostLimits(1)
    for device, wanted in [(None, 0), *((d, d.index) for d in worker_devices(every, 4)[1:])]:
        sessions = Sessions(cfg, model, None, limits=limits, device=device)
        assert str(sessions.device) == f"cuda:{wanted}"
        with pytest.raises(ModelError, match="no GPU in this test"):
            sessions.segmenter()
        cuda_options = asked[-1][0][1]
        assert asked[-1][0][0] == "CUDAExecutionProvider" and cuda_options["device_id"] == wanted


def _result(outcomes: tuple[SeriesOutcome, ...], model_path: Path, jobs: int) -> RunResult:
    return RunResult(
        outcomes=outcomes,
        discovery=Discovery(tuple(o.series for o in outcomes), 0, 0, 0, 0),
        model=load_model_info(model_path),
        session=SessionSummary("cuda:0", ("CUDAExecutionProvider",), 16, "fp16"),
        jobs=jobs,
    )


def test_the_manifest_records_where_each_series_ran(
    tmp_path: Path, band_model_path: Path
) -> None:
    every = DeviceRequest(DeviceKind.CUDA, gpus=(0, 1, 2, 3), all_gpus=True)
    cfg = RunConfig(
        inputs=(tmp_path,), out_dir=tmp_path / "out", model_path=band_model_path, device=every
    )
    series = [_fake_series(str(k)) for k in range(6)]
    ok = SeriesStatus.OK
    outcomes = (
        place(SeriesOutcome(series[0], ok), "cuda:2"),
        place(SeriesOutcome(series[1], SeriesStatus.FAILED, "bad pixels"), "cuda:0"),
        place(SeriesOutcome(series[2], ok), "cuda:2"),
        SeriesOutcome(series[3], ok, reused=True),  # unchanged from an earlier run
        SeriesOutcome(series[4], SeriesStatus.SKIPPED, "localizer"),
        SeriesOutcome(series[5], SeriesStatus.FAILED, "the worker process died"),
    )
    assert isinstance(outcomes[0], PlacedOutcome) and outcomes[0].series == series[0]
    manifest = build_manifest(cfg, _result(outcomes, band_model_path, 4), "2026-01-01T00:00:00")
    assert [s["device"] for s in manifest["series"]] == [
        "cuda:2", "cuda:0", "cuda:2", None, None, None
    ]
    assert manifest["device"]["series_per_device"] == {"cuda:0": 1, "cuda:2": 2}
    assert manifest["device"]["gpus"] == _cuda(0, 1, 2, 3)
    assert manifest["options"]["device"] == manifest["device"]["requested"] == "cuda:all"
    # One process: every series it processed ran on the run's one device.
    one = RunConfig(inputs=(tmp_path,), out_dir=tmp_path / "out", model_path=band_model_path)
    plain = tuple(SeriesOutcome(s, ok) for s in series[:2])
    manifest = build_manifest(one, _result(plain, band_model_path, 1), "2026-01-01T00:00:00")
    assert [s["device"] for s in manifest["series"]] == ["cuda:0", "cuda:0"]
    assert manifest["device"]["gpus"] is None


def test_info_lists_the_devices_cuda_all_would_use(monkeypatch: pytest.MonkeyPatch) -> None:
    from ggo_cli import host
    from ggo_cli.cli.info import gpu_status, host_status

    monkeypatch.setattr(host, "visible_gpus", four_gpus)
    status = gpu_status()
    assert status["cuda_all"] == _cuda(0, 1, 2, 3)
    assert [(d["device"], d["uuid"], d["memory_gib"]) for d in status["devices"]] == [
        (f"cuda:{k}", f"GPU-{k}", 80.0) for k in range(4)
    ]
    assert host_status()["auto_jobs_300_slices_cuda_all"] >= 1
    monkeypatch.setattr(host, "visible_gpus", lambda: None)
    assert gpu_status()["cuda_all"] is None  # cannot be listed: no nvidia-smi
