"""``--device cuda:all`` in real worker processes: each spawned worker takes its device from
its number (ggo_cli.run.placement.worker_devices) and its sessions ask for that GPU; each
series comes back naming the device it ran on. No GPU is needed: the task reports the device
the worker's sessions were given instead of creating them (tests/run/test_multi_gpu.py checks
that this device is what reaches ONNX Runtime)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ggo_cli.config import DeviceKind, DeviceRequest, RunConfig
from ggo_cli.dicom.discovery import Discovery
from ggo_cli.domain import SeriesInfo, SeriesOutcome, SeriesStatus
from ggo_cli.host import HostLimits
from ggo_cli.onnx.model_info import load_model_info
from ggo_cli.run import series_pool
from ggo_cli.run.manifest import PlacedOutcome, build_manifest
from ggo_cli.run.result import RunResult, SessionSummary
from ggo_cli.run.series_pool import SeriesPool

pytestmark = pytest.mark.e2e

JOBS = 4
BARRIER_S = 120


def report_worker(series: SeriesInfo) -> tuple[SeriesOutcome, SessionSummary | None]:
    """Pool task: hold this worker until every worker holds a series (one file per worker
    in the folder ``series.location``), so each of the ``JOBS`` workers runs exactly one;
    then report this worker's process id and the device its sessions were given."""
    sessions = series_pool._worker
    assert sessions is not None
    barrier = Path(series.location)
    (barrier / str(os.getpid())).write_text(str(sessions.device), encoding="ascii")
    deadline = time.monotonic() + BARRIER_S
    while len(list(barrier.iterdir())) < JOBS and time.monotonic() < deadline:
        time.sleep(0.05)
    message = f"{os.getpid()} {sessions.device}"
    return SeriesOutcome(series=series, status=SeriesStatus.OK, message=message), None


def test_each_worker_runs_on_its_own_gpu_and_each_series_names_it(
    tmp_path: Path, band_model_path: Path
) -> None:
    every = DeviceRequest(DeviceKind.CUDA, gpus=(0, 1, 2, 3), all_gpus=True)
    cfg = RunConfig(
        inputs=(tmp_path,), out_dir=tmp_path / "out", model_path=band_model_path,
        device=every, jobs=JOBS,
    )
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    todo = [SeriesInfo("1.2.3", f"1.2.3.{k}", (), str(barrier)) for k in range(JOBS)]
    model = load_model_info(band_model_path)
    with SeriesPool(
        cfg, model, None, JOBS, limits=HostLimits(JOBS), task=report_worker
    ) as pool:
        outcomes = list(pool.run(todo))
    assert len(outcomes) == JOBS
    assert all(isinstance(o, PlacedOutcome) for o in outcomes)
    placed = [o for o in outcomes if isinstance(o, PlacedOutcome)]
    # Four worker processes, one per GPU, each series marked with its worker's GPU.
    assert sorted(o.device for o in placed) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert len({o.message.split()[0] for o in placed}) == JOBS
    for outcome in placed:
        assert outcome.message.split()[1] == outcome.device
    result = RunResult(
        outcomes=tuple(outcomes),
        discovery=Discovery(tuple(todo), 0, 0, 0, 0),
        model=model,
        jobs=JOBS,
    )
    manifest = build_manifest(cfg, result, "2026-01-01T00:00:00")
    assert manifest["device"]["series_per_device"] == {f"cuda:{k}": 1 for k in range(4)}
    by_uid = {s["series_instance_uid"]: s["device"] for s in manifest["series"]}
    assert by_uid == {o.series.series_instance_uid: o.device for o in placed}
