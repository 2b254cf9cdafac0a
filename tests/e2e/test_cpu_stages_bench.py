"""Smoke test of ``benchmarks/cpu_stages.py`` (``e2e``: it checks out two commits and runs
the stages of a small synthetic series in fresh child processes, about half a minute)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE = "5f99e6c"
"""Issue 18's base commit: the worker must run on its stage functions as well as on HEAD's."""
SLICES = 24
VOXEL_ML = 0.8 * 0.7 * 0.7 / 1000
"""The phantom's voxel (0.8 x 0.7 x 0.7 mm) in mL."""
CPU_STAGES = ["decode", "lung mask", "SEG build + write + read-back", "overlay"]


def test_cpu_stages_benchmark_measures_base_and_head_alternately(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cpu_stages.py"), "--slices", str(SLICES),
         "--repeats", "2", "--one-core", "--ref", BASE, "--ref", "HEAD", "--cli", "stand-in",
         "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())

    assert list(report["refs"]) == [BASE, "HEAD"]
    assert all(len(commit) == 40 for commit in report["refs"].values())
    assert report["cpu_stages"] == CPU_STAGES and report["one_core"] is True
    assert report["machine"]["cores_usable"] >= 1 and report["machine"]["onnxruntime"]
    assert set(report["machine"]["cpu_flags"]) >= {"avx2", "avx512f", "avx512_vnni"}
    assert len(report["load"]["start"]["loadavg"]) == 3

    trees = set()
    for ref in (BASE, "HEAD"):
        runs = report["runs"][ref]
        assert [run["repeat"] for run in runs] == [0, 1]
        for run in runs:
            # a fresh process pinned to one core, on the ref's own checkout, not this one
            assert run["affinity"] == runs[0]["affinity"] and len(run["affinity"]) == 1
            assert not run["ggo_cli"].startswith(str(ROOT))
            trees.add(run["ggo_cli"])
            assert run["slices"] == SLICES and run["hu_dtype"] == "int16"
            assert run["right_lung_voxels"] > 0 and run["left_lung_voxels"] > 0
            assert run["ggo_voxels"] > 0 and run["seg_bytes"] > 0
            assert run["calibration_s"] > 0
            # the whole CLI on the same series and tree: the same lungs, a sane peak
            cli = run["cli"]
            assert cli["max_rss_mib"] > 0 and cli["cpu_s"] > 0 and cli["ggo_volume_ml"] > 0
            assert cli["lung_volume_ml"] == pytest.approx(
                (run["right_lung_voxels"] + run["left_lung_voxels"]) * VOXEL_ML, rel=1e-3
            )
            # the peak so far is the running maximum of the stages' own peaks
            peaks = [row["stage_peak_rss_mib"] for row in run["stages"]]
            assert min(peaks) > 0
            assert [row["peak_rss_mib"] for row in run["stages"]] == [
                max(peaks[: i + 1]) for i in range(len(peaks))
            ]
        median = report["summary"]["median"][ref]
        for stage in CPU_STAGES:
            assert median[stage]["cpu_s"] > 0 and median[stage]["wall_s"] > 0
        assert median["total"]["cpu_s"] >= max(median[stage]["cpu_s"] for stage in CPU_STAGES)
        # the process's peak is at least each stage's own
        assert median["total"]["peak_rss_mib"] >= median["overlay"]["peak_rss_mib"]
        assert all(median["total"]["peak_rss_mib"] >= median[stage]["stage_peak_rss_mib"]
                   for stage in CPU_STAGES)
        # two series one after the other in each process (--passes 2, the default): every
        # stage of each, and the second's own summary
        for run in runs:
            assert [(row["pass"], row["stage"]) for row in run["stages"]
                    if row["stage"] in CPU_STAGES] == [
                (series_pass, stage) for series_pass in (1, 2) for stage in CPU_STAGES]
        later = report["summary_later_series"]["median"][ref]
        assert all(later[stage]["cpu_s"] > 0 for stage in CPU_STAGES)
    assert len(trees) == 2
    # the synthetic phantom is the same series for both: lungs of the same size within 5 %
    base, head = report["runs"][BASE][0], report["runs"]["HEAD"][0]
    assert abs(base["right_lung_voxels"] / head["right_lung_voxels"] - 1) < 0.05

    ratio = report["summary"]["ratio"][f"{BASE} / HEAD"]
    assert ratio["total"]["cpu_s"] > 0 and ratio["total"]["peak_rss_mib"] > 0
    assert "| total |" in done.stdout and report["markdown"] in done.stdout
    assert report["passes"] == 2 and "Series 2 of a process" in report["markdown"]
    assert set(report["summary"]["cli"]) == {BASE, "HEAD"}
    # the checkouts are gone, the series stays where --work put it
    worktrees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"],
                               capture_output=True, text=True, check=True).stdout
    assert not any(str(Path(tree).parent) in worktrees for tree in trees)
    assert len(list((tmp_path / "work" / f"series_{SLICES}").glob("*.dcm"))) == SLICES
