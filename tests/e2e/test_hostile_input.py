"""Whole runs on hostile input (issue 15): bombs stay under 2 GiB resident, a malformed JPEG 2000
codestream never aborts the process, decode workers die with a killed run, and the input
tree is left byte for byte as it was."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RLELossless

from tests.dicom.test_budgets import _deflate_bomb
from tests.dicom_factory import make_ct_series

REPO = Path(__file__).resolve().parents[2]
RSS_LIMIT_BYTES = 2 << 30
MEASURE = """
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": done.returncode, "peak": peak, "stderr": done.stderr}))
"""


def _bomb(kind: str, root: Path) -> None:
    """Write a small valid series and, next to it, the bomb ``kind``."""
    good = make_ct_series(root, shape=(12, 64, 64), folder="good", seed=1)
    if kind == "rows-65535":
        fs = make_ct_series(root, shape=(12, 32, 32), folder="bomb", seed=2)
        for path in fs.paths:
            ds = pydicom.dcmread(path)
            ds.Rows = ds.Columns = 65535
            ds.save_as(path)
    elif kind == "pixel-spacing-0.002":
        fs = make_ct_series(root, shape=(12, 64, 64), folder="bomb", seed=2)
        for path in fs.paths:
            ds = pydicom.dcmread(path)
            ds.PixelSpacing = [0.002, 0.002]
            ds.save_as(path)
    elif kind.startswith("deflate-"):
        megabytes = int(kind.split("-")[1].rstrip("mb"))
        _deflate_bomb(root / "bomb.dcm", good.paths[0], megabytes * 1000 << 20, new_uids=True)
    elif kind == "zeros-64mb":
        (root / "zeros.dcm").write_bytes(bytes(64 << 20))
    else:  # pragma: no cover
        raise ValueError(kind)


def _snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "kind", ["rows-65535", "pixel-spacing-0.002", "deflate-1mb", "deflate-3mb", "zeros-64mb"]
)
def test_a_bomb_stays_under_2_gib_and_is_never_a_bug(
    tmp_path: Path, band_model_path: Path, kind: str
) -> None:
    import json

    root = tmp_path / "in"
    _bomb(kind, root)
    before = _snapshot(root)
    out = tmp_path / "out"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, sys.executable, "-m", "ggo_cli", "-v", "segment",
         str(root), "-o", str(out), "-m", str(band_model_path), "--no-progress",
         "--settle", "0", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=True,
    )
    seconds = time.perf_counter() - started
    result = json.loads(done.stdout)
    print(f"{kind}: peak RSS {result['peak'] / 2**20:.0f} MiB, {seconds:.1f} s")
    assert result["peak"] < RSS_LIMIT_BYTES, f"{kind}: {result['peak'] / 2**30:.2f} GiB"
    assert result["rc"] in (0, 7), result["stderr"][-3000:]
    assert "(a bug" not in result["stderr"], result["stderr"][-3000:]
    with (out / "ggo_volumes.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert all("unexpected" not in row["message"] for row in rows), rows
    assert sum(row["status"] == "ok" for row in rows) == 1, rows
    assert _snapshot(root) == before


def _garbage_j2k_series(root: Path) -> None:
    fs = make_ct_series(root, shape=(10, 32, 32), transfer_syntax=JPEG2000Lossless)
    ds = pydicom.dcmread(fs.paths[4])
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 4])
    ds.save_as(fs.paths[4])


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_malformed_j2k_codestream_fails_its_series_without_aborting(
    tmp_path: Path, band_model_path: Path, workers: str
) -> None:
    root = tmp_path / "in"
    _garbage_j2k_series(root)
    before = _snapshot(root)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "ggo_cli", "segment", str(root), "-o", str(out), "-m",
         str(band_model_path), "--no-progress", "--settle", "0", "--no-lung-mask",
         "--decode-workers", workers],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 4, (done.returncode, done.stderr[-3000:])
    with (out / "ggo_volumes.csv").open(newline="", encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["status"] == "failed" and "JPEG 2000 codestream cannot be read" in row["message"]
    assert _snapshot(root) == before


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc's parent links)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_with_jobs_1_takes_the_decode_workers_along(
    tmp_path: Path, band_model_path: Path
) -> None:
    root = tmp_path / "in"
    for k in range(4):  # compressed: only compressed pixel data decodes in the workers
        make_ct_series(root, shape=(48, 64, 64), folder=f"s{k}", seed=k + 1,
                       transfer_syntax=RLELossless)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ggo_cli", "segment", str(root), "-o", str(tmp_path / "out"),
         "-m", str(band_model_path), "--no-progress", "--settle", "0", "--jobs", "1",
         "--decode-workers", "2"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(workers) < 3:  # forkserver + 2 workers
            time.sleep(0.2)
            workers = _descendants(proc.pid)
            assert proc.poll() is None, "the run ended before its decode pool started"
        assert len(workers) >= 3, workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        left = [pid for pid in workers if _alive(pid)]
        assert not left, f"still alive 10 s after kill -9: {left}"
    finally:  # whatever outlived the run (the failure this test is about) is ended here
        survivors = {pid for pid in workers if _alive(pid)} | _descendants(proc.pid)
        for pid in survivors | ({proc.pid} if proc.poll() is None else set()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
