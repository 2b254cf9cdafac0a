"""Nightly-cron safety across processes: the run lock held by another process, kill -9 at
random points then a rerun, decoder processes against one thread (moved from
tests/run/test_nightly.py)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np

from ggo_cli.errors import EXIT_PARTIAL
from tests.dicom_factory import make_ct_series
from tests.nightly_runs import csv_rows, cube_studies, manifest, segment
from tests.phantoms import make_cube_phantom

REPO = Path(__file__).resolve().parents[2]




def test_a_second_run_is_refused_while_the_first_holds_the_lock(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, _ = cube_studies(tmp_path, 1)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from ggo_cli.run.lock import RunLock\n"
            "with RunLock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(30)",
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        result = segment(root, "-o", out, "-m", band_model_path)
        assert result.exit_code == 8, result.output
        assert (
            f"pid {holder.pid}" in result.stderr
            and "in use by another ggo-cli run" in result.stderr
        )
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing anything: the next run takes the lock over
    result = segment(root, "-o", out, "-m", band_model_path)
    assert result.exit_code == 0, result.output


def _pixels(out: Path) -> dict[str, np.ndarray]:
    found = {}
    for row in csv_rows(out):
        seg = hd.seg.segread(out / row["seg_path"])
        found[row["series_instance_uid"]] = seg.get_volume().array
    return found


def _stable(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "processed_at"} for r in rows]


def test_kill_9_at_random_points_then_rerun_equals_an_uninterrupted_run(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, series = cube_studies(tmp_path, 4)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    reference = tmp_path / "reference"
    assert segment(root, "-o", reference, "-m", band_model_path).exit_code == 0
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "ggo_cli",
        "segment",
        str(root),
        "-o",
        str(out),
        "-m",
        str(band_model_path),
        "--no-progress",
        "--settle",
        "0",
        "--no-lung-mask",
    ]
    rng = random.Random(5)
    for _ in range(3):
        proc = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(0.8, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    assert _stable(csv_rows(out)) == _stable(csv_rows(reference))
    assert len(csv_rows(out)) == len(series)
    ours, theirs = _pixels(out), _pixels(reference)
    assert ours.keys() == theirs.keys()
    for uid in ours:
        np.testing.assert_array_equal(ours[uid], theirs[uid])
    assert not list(out.rglob("*.tmp"))
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_decode_ahead_and_write_behind_give_the_same_outputs(
    tmp_path: Path, band_model_path: Path
) -> None:
    """Four series of 40 slices through decoder processes and the writer thread, one of them
    broken mid-way, against a run that does everything in order in one thread."""
    root = tmp_path / "in"
    series = [
        make_ct_series(
            root,
            phantom=make_cube_phantom((40, 48, 48), (2.5, 0.7, 0.7), cube_voxels=(4 + k, 6, 6)),
            folder=f"study{k}",
            seed=k + 1,
        )
        for k in range(4)
    ]
    raw = series[2].paths[7].read_bytes()
    series[2].paths[7].write_bytes(raw[: len(raw) - 500])  # pixel data cut short
    rows = {}
    for workers in ("0", "2"):
        out = tmp_path / f"out{workers}"
        result = segment(root, "-o", out, "-m", band_model_path, "--decode-workers", workers)
        assert result.exit_code == EXIT_PARTIAL, result.output
        rows[workers] = csv_rows(out)
        assert manifest(out)["options"]["decode_workers"] == int(workers)
    keys = ("series_instance_uid", "status", "ggo_voxels", "ggo_volume_ml", "n_slices")
    assert [{k: r[k] for k in keys} for r in rows["0"]] == [
        {k: r[k] for k in keys} for r in rows["2"]
    ]
    by_uid = {r["series_instance_uid"]: r for r in rows["2"]}
    assert by_uid[series[2].series_instance_uid]["status"] == "failed"
    for k in (0, 1, 3):
        row = by_uid[series[k].series_instance_uid]
        assert row["status"] == "ok"
        assert int(row["ggo_voxels"]) > 0
        seg_0 = hd.seg.segread(tmp_path / "out0" / row["seg_path"])
        seg_2 = hd.seg.segread(tmp_path / "out2" / row["seg_path"])
        assert seg_0.SOPInstanceUID == seg_2.SOPInstanceUID  # deterministic UIDs
        np.testing.assert_array_equal(seg_0.pixel_array, seg_2.pixel_array)
