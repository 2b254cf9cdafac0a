"""``--jobs N`` end to end: whole series in worker processes (ggo_cli.run.series_pool), workers
that die, fail or are stopped with the run (moved from tests/run/test_series_pool.py)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from typer.testing import CliRunner

from ggo_cli.cli.app import app
from ggo_cli.config import RunConfig
from ggo_cli.domain import SeriesInfo, SeriesOutcome, SeriesStatus
from ggo_cli.errors import EXIT_PARTIAL, OutputError
from ggo_cli.host import HostLimits
from ggo_cli.onnx.model_info import load_model_info
from ggo_cli.run.result import SessionSummary
from ggo_cli.run.series_pool import SeriesPool
from tests.dicom_factory import FactorySeries, make_ct_series
from tests.phantoms import make_cube_phantom

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
PHI = ("GGO^Phantom", "PHANTOM-001", "19600101")


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "ggo_volumes.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _segment_args(root: Path, out: Path, model: Path, jobs: str, *extra: str) -> list[str]:
    """``segment`` of ``root`` without the lung mask (cube phantoms have no lungs), no
    progress bar, no settling, with ``--jobs jobs``."""
    return [
        "segment",
        str(root),
        "-o",
        str(out),
        "-m",
        str(model),
        "--no-progress",
        "--settle",
        "0",
        "--no-lung-mask",
        "--jobs",
        jobs,
        *extra,
    ]


def _studies(root: Path, n: int, slices: int = 40) -> list[FactorySeries]:
    return [
        make_ct_series(
            root,
            phantom=make_cube_phantom((slices, 48, 48), (2.5, 0.7, 0.7), cube_voxels=(4 + k, 6, 6)),
            folder=f"study{k}",
            seed=k + 1,
        )
        for k in range(n)
    ]


def test_jobs_give_the_outputs_of_one_process_and_log_through_the_main_one(
    tmp_path: Path, band_model_path: Path
) -> None:
    """Four series, one broken, in two worker processes against one process: same rows, same
    SEG pixels; the workers' log lines reach the main process's log file, without PHI."""
    root = tmp_path / "in"
    series = _studies(root, 4)
    raw = series[2].paths[7].read_bytes()
    series[2].paths[7].write_bytes(raw[: len(raw) - 500])  # pixel data cut short
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    rows = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"out{jobs}"
        log_file = tmp_path / f"ggo{jobs}.log"
        result = runner.invoke(
            app,
            ["-v", "--log-file", str(log_file), *_segment_args(root, out, band_model_path, jobs)],
        )
        assert result.exit_code == EXIT_PARTIAL, result.output
        rows[jobs] = _rows(out)
        manifest = json.loads((out / "run_manifest.json").read_text())
        assert manifest["options"]["jobs"] == int(jobs)
        assert manifest["device"]["jobs"] == int(jobs)
        assert manifest["device"]["used"] == "cpu"
        assert manifest["device"]["precision"] == "fp32"
        logged = log_file.read_text()
        # Written by process_series in whichever process ran the series.
        assert logged.count("GGO ") == 3
        assert f"series {series[2].series_instance_uid}" in logged
        for identifier in PHI:
            assert identifier not in logged
    keys = ("series_instance_uid", "status", "ggo_voxels", "ggo_volume_ml", "n_slices", "message")
    assert [{k: r[k] for k in keys} for r in rows["1"]] == [
        {k: r[k] for k in keys} for r in rows["2"]
    ]
    by_uid = {r["series_instance_uid"]: r for r in rows["2"]}
    assert by_uid[series[2].series_instance_uid]["status"] == "failed"
    for k in (0, 1, 3):
        row = by_uid[series[k].series_instance_uid]
        assert row["status"] == "ok"
        assert int(row["ggo_voxels"]) > 0
        one = hd.seg.segread(tmp_path / "out1" / row["seg_path"])
        two = hd.seg.segread(tmp_path / "out2" / row["seg_path"])
        assert one.SOPInstanceUID == two.SOPInstanceUID
        np.testing.assert_array_equal(one.pixel_array, two.pixel_array)
    assert not list((tmp_path / "out2").rglob("*.tmp"))
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def _fake_series(name: str) -> SeriesInfo:
    return SeriesInfo(
        study_instance_uid="1.2.3", series_instance_uid=f"1.2.3.{name}", files=(), location=name
    )


def fake_task(series: SeriesInfo) -> tuple[SeriesOutcome, SessionSummary | None]:
    """A pool task: dies on series ``...9``, fails fatally on ``...8``, else returns ok."""
    if series.series_instance_uid.endswith(".9"):
        os._exit(3)  # a decoder crash, as the pool sees it
    if series.series_instance_uid.endswith(".8"):
        raise OutputError("disk full", fatal=True)
    time.sleep(0.2)
    outcome = SeriesOutcome(series=series, status=SeriesStatus.OK, message=str(os.getpid()))
    return outcome, SessionSummary("cpu", ("CPUExecutionProvider",), 4, "fp32")


def _pool(tmp_path: Path, band_model_path: Path, jobs: int) -> SeriesPool:
    cfg = RunConfig(inputs=(tmp_path,), out_dir=tmp_path / "out", model_path=band_model_path)
    model = load_model_info(band_model_path)
    return SeriesPool(cfg, model, None, jobs, limits=HostLimits(jobs), task=fake_task)


def test_a_worker_that_dies_fails_only_its_own_series(
    tmp_path: Path, band_model_path: Path
) -> None:
    todo = [_fake_series(str(k)) for k in (1, 2, 9, 3, 4)]
    with _pool(tmp_path, band_model_path, 2) as pool:
        outcomes = {o.series.series_instance_uid: o for o in pool.run(todo)}
        assert pool.summary == SessionSummary("cpu", ("CPUExecutionProvider",), 4, "fp32")
    assert set(outcomes) == {s.series_instance_uid for s in todo}
    assert outcomes["1.2.3.9"].status is SeriesStatus.FAILED
    assert "worker process died" in outcomes["1.2.3.9"].message
    for k in (1, 2, 3, 4):
        assert outcomes[f"1.2.3.{k}"].status is SeriesStatus.OK
    # Two workers shared the healthy series (they ran in more than one process).
    assert len({o.message for o in outcomes.values() if o.status is SeriesStatus.OK}) >= 2


def test_a_fatal_error_in_a_worker_stops_the_run_and_the_workers(
    tmp_path: Path, band_model_path: Path
) -> None:
    todo = [_fake_series(str(k)) for k in (1, 8, 2, 3, 4, 5)]
    with _pool(tmp_path, band_model_path, 2) as pool:
        seen = []
        with pytest.raises(OutputError, match="disk full"):
            for outcome in pool.run(todo):
                seen.append(outcome.series.series_instance_uid)
        assert pool._executor is None  # stopped
    assert "1.2.3.5" not in seen


def _tagged_processes(tag: str, *, workers_only: bool = False) -> list[int]:
    """Processes whose environment holds ``tag`` (the run and its children); with
    ``workers_only``, only the spawned worker processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag.encode() not in (entry / "environ").read_bytes():
                    continue
                if workers_only and b"spawn_main" not in (entry / "cmdline").read_bytes():
                    continue
                found.append(int(entry.name))
            except OSError:
                continue
    return found


def _default_sigint() -> None:
    """In the run's process before it starts: Ctrl-C's default action. A process inherits an
    ignored SIGINT (POSIX), and Python then keeps ignoring it, as a run started in the
    background by a non-interactive shell rightly does; in a full e2e session the pytest
    process was seen with SIGINT ignored (by what is not known), so the run must not inherit
    that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_workers_end_with_a_stopped_run_and_a_rerun_completes(
    tmp_path: Path, band_model_path: Path, stop: signal.Signals
) -> None:
    """kill -9 or Ctrl-C of a ``--jobs 2`` run mid-way: no worker outlives it (none writes
    into the folder after its run); Ctrl-C exits 130 with no temporary file left; the next
    run finishes every series."""
    root = tmp_path / "in"
    series = _studies(root, 6, slices=80)
    out = tmp_path / "out"
    tag = f"GGO_TEST_TAG={uuid.uuid4().hex}"
    env = {**os.environ, tag.split("=")[0]: tag.split("=")[1]}
    command = [sys.executable, "-m", "ggo_cli", *_segment_args(root, out, band_model_path, "2")]
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_sigint,
    )
    deadline = time.monotonic() + 60
    while len(_tagged_processes(tag, workers_only=True)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    proc.send_signal(stop)
    assert proc.wait(timeout=30) == (130 if stop == signal.SIGINT else -signal.SIGKILL)
    if stop == signal.SIGINT:
        assert not list(out.rglob("*.tmp"))
    deadline = time.monotonic() + 10
    while _tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _tagged_processes(tag) == []
    final = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert final.returncode == 0, final.stderr
    rows = _rows(out)
    assert {r["series_instance_uid"] for r in rows} == {s.series_instance_uid for s in series}
    assert {r["status"] for r in rows} == {"ok"}
    assert not list(out.rglob("*.tmp"))


def test_segment_explain_in_workers_matches_one_process(tmp_path: Path) -> None:
    """``segment --explain --jobs 2``: every worker makes its own GradCAM++ session; the maps
    and the SEG pixels equal those of one process."""
    from tests.onnx_models import write_conv_explain_pair

    model, _ = write_conv_explain_pair(tmp_path / "model")
    root = tmp_path / "in"
    studies = []
    for k in range(3):
        hu = np.full((12, 64, 64), -1000.0, dtype=np.float32)
        hu[4:8, 20 + k : 36, 24:40] = 40.0
        studies.append(make_ct_series(root, phantom=hu, folder=f"study{k}", seed=k + 1))
    for jobs in ("1", "2"):
        result = runner.invoke(
            app,
            _segment_args(root, tmp_path / f"out{jobs}", model, jobs, "--explain"),
        )
        assert result.exit_code == 0, result.output
    for study in studies:
        part = Path(study.study_instance_uid) / study.series_instance_uid
        one, two = (np.load(tmp_path / f"out{j}" / part / "gradcam.npz") for j in "12")
        np.testing.assert_array_equal(one["cam"], two["cam"])
        assert list(one["sop_instance_uids"]) == list(two["sop_instance_uids"])
        seg_one = hd.seg.segread(tmp_path / "out1" / part / "ggo.seg.dcm")
        seg_two = hd.seg.segread(tmp_path / "out2" / part / "ggo.seg.dcm")
        np.testing.assert_array_equal(seg_one.pixel_array, seg_two.pixel_array)


def test_a_session_error_in_the_workers_is_the_runs_exit_code(
    tmp_path: Path, band_model_path: Path
) -> None:
    if Path("/proc/driver/nvidia/gpus").is_dir():
        pytest.skip("a GPU is present")
    root = tmp_path / "in"
    _studies(root, 2, slices=12)
    result = runner.invoke(
        app,
        _segment_args(root, tmp_path / "out", band_model_path, "2", "--device", "cuda"),
    )
    assert result.exit_code == 5, result.output
    assert not (tmp_path / "out" / "ggo_volumes.csv").exists()


class _Sink:
    """Records progress events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def discovered(self, n_series: int) -> None:
        self.events.append(("discovered", n_series))

    def series_started(self, series: SeriesInfo, n_slices: int) -> None:
        self.events.append(("series_started", n_slices))

    def work_started(self, n_units: int, description: str) -> None:
        self.events.append(("work_started", n_units))

    def advance(self, n: int) -> None:
        self.events.append(("advance", n))

    def series_finished(self, outcome: SeriesOutcome) -> None:
        self.events.append(("series_finished", outcome.status.value))


def test_progress_in_workers_counts_the_slices_of_finished_series(
    tmp_path: Path, band_model_path: Path
) -> None:
    from ggo_cli.run.runner import run_segment

    root = tmp_path / "in"
    _studies(root, 3, slices=12)
    cfg = RunConfig(
        inputs=(root,),
        out_dir=tmp_path / "out",
        model_path=band_model_path,
        lung_mask=False,
        jobs=2,
    )
    sink = _Sink()
    result = run_segment(cfg, progress=sink)
    assert result.jobs == 2 and result.device == "cpu"
    kinds = [kind for kind, _ in sink.events]
    assert kinds[:2] == ["discovered", "work_started"] and "series_started" not in kinds
    assert sink.events[1] == ("work_started", 36)
    assert sum(n for kind, n in sink.events if kind == "advance") == 36  # type: ignore[misc]
    assert [v for kind, v in sink.events if kind == "series_finished"] == ["ok"] * 3
